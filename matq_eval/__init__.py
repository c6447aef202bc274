"""matq_eval: held-out perplexity, KL divergence and top-1 agreement to the unquantized model, for
matq widths and plans (transformers) and GGUF files (llama.cpp), with bits per weight beside each.

```python
from matq_eval import evaluate
results = evaluate("SmolLM2-hf", ["ck@8,4,2", "ck@plan:pyramid", "model-Q4_K_M.gguf"], "docs/")
```
"""

from .errors import CandidateError, TextError
from .metrics import Sums, log_softmax, score
from .run import KINDS, Candidate, Result, evaluate, parse_candidate
from .text import DEFAULT_CTX, DEFAULT_MAX_TOKENS, Windows, load_windows

__all__ = [
    "DEFAULT_CTX",
    "DEFAULT_MAX_TOKENS",
    "KINDS",
    "Candidate",
    "CandidateError",
    "Result",
    "Sums",
    "TextError",
    "Windows",
    "evaluate",
    "load_windows",
    "log_softmax",
    "parse_candidate",
    "score",
]
