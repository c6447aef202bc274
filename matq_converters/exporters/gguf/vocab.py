"""Tokenizer metadata llama.cpp needs to load a model and tokenize as transformers does.

Three kinds, read from the checkpoint's carried tokenizer files as llama.cpp's converter reads them:
- SentencePiece (``tokenizer.model``; Gemma, Llama 2, Mistral): ``tokenizer.ggml.model = llama``;
- byte-level BPE (``tokenizer.json``; Llama 3, Qwen2, GPT-2): ``gpt2`` with merges, and the
  pre-tokenizer named from its split regex (llama.cpp hard-codes one regex per name);
- WordPiece (``tokenizer.json``; BERT): ``bert`` with llama.cpp's phantom-space vocabulary.
Special token ids and add-BOS/EOS flags come from ``gguf.SpecialVocab``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from matq_converters.exporters.gguf.arch import Arch
from matq_converters.registry import TokenizerError

# Split regexes of HF tokenizer.json files -> the llama.cpp pre-tokenizer that implements them.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_BY_SPLIT = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
PRE_IGNORES_MERGES = {"llama-bpe"}
"""llama.cpp skips merges for whole words found in the vocabulary with these (HF: ``ignore_merges``)."""


@dataclass(frozen=True)
class VocabInfo:
    kind: str
    pre: str
    tokens: int
    warnings: tuple[str, ...] = ()


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise TokenizerError(path, f"is not valid JSON: {exc}") from None


def detect(root: Path, arch: Arch) -> str:
    """Which tokenizer kind to write: the first of the architecture's kinds whose files are present."""
    tj = _json(root / "tokenizer.json")
    model = (tj or {}).get("model", {})
    for kind in arch.tokenizers:
        if kind == "spm" and (root / "tokenizer.model").is_file():
            return kind
        if kind == "bpe" and model.get("type") == "BPE" and not model.get("byte_fallback", False):
            return kind
        if kind == "wpm" and model.get("type") == "WordPiece":
            return kind
    have = sorted(p.name for p in root.glob("tokenizer*")) or ["no tokenizer files"]
    want = {
        "spm": "tokenizer.model (SentencePiece)",
        "bpe": "tokenizer.json with a byte-level BPE model",
        "wpm": "tokenizer.json with a WordPiece model",
    }
    raise TokenizerError(
        root,
        f"{arch.name} needs {' or '.join(want[k] for k in arch.tokenizers)}; found {', '.join(have)}",
    )


def bpe_pre(path: Path, tj: dict | None = None) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.json."""
    tj = _json(path) if tj is None else tj
    pt = (tj or {}).get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in PRE_BY_SPLIT and steps[0].get("behavior") in ("Isolated", "Removed"):
            return PRE_BY_SPLIT[regex]
    raise TokenizerError(
        path,
        f"byte-level BPE pre-tokenizer {json.dumps(pt)[:200]} is not one matq can name for llama.cpp "
        "(known: Llama 3 -> llama-bpe, Qwen2 -> qwen2, GPT-2 ByteLevel -> gpt-2); "
        "pass tokenizer_pre if you know llama.cpp's name for it",
    )


def add_vocab(w, root: Path, arch: Arch, n_vocab: int, cfg: dict, pre: str | None = None) -> VocabInfo:
    """Write ``tokenizer.ggml.*`` for a model whose embedding has ``n_vocab`` rows."""
    kind = detect(root, arch)
    if kind == "spm":
        return _spm(w, root, arch, n_vocab)
    tj = _json(root / "tokenizer.json") or {}
    if kind == "bpe":
        return _bpe(w, root, tj, n_vocab, pre)
    return _wpm(w, root, tj, n_vocab, cfg)


def _base_tokens(tj: dict, n_vocab: int, root: Path) -> tuple[list[str], list[int]]:
    """Token strings and types by id, as convert_hf_to_gguf's get_vocab_base builds them."""
    import gguf

    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for tok, i in tj["model"]["vocab"].items():
        if i >= n_vocab:
            raise TokenizerError(
                root / "tokenizer.json", f"token id {i} is past the embedding's {n_vocab} rows"
            )
        tokens[i], types[i] = tok, int(gguf.TokenType.NORMAL)
    for t in tj.get("added_tokens", []):
        i = t["id"]
        if i >= n_vocab:
            raise TokenizerError(
                root / "tokenizer.json", f"added token id {i} is past the embedding's {n_vocab} rows"
            )
        tokens[i] = t["content"]
        types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    return tokens, types


def _special(w, root: Path, n_vocab: int, merges: bool):
    import gguf

    sv = gguf.SpecialVocab(root, load_merges=merges, n_vocab=n_vocab)
    sv.add_to_gguf(w, quiet=True)
    return sv


def _bpe(w, root: Path, tj: dict, n_vocab: int, pre: str | None) -> VocabInfo:
    tokens, types = _base_tokens(tj, n_vocab, root)
    pre = pre or bpe_pre(root / "tokenizer.json", tj)
    warnings = []
    ignores = bool(tj["model"].get("ignore_merges", False))
    if ignores != (pre in PRE_IGNORES_MERGES):
        warnings.append(
            f"tokenizer.json has ignore_merges={ignores} but llama.cpp's {pre!r} pre-tokenizer "
            f"{'ignores' if pre in PRE_IGNORES_MERGES else 'applies'} merges for whole words; "
            "rare words may tokenize differently"
        )
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    sv = _special(w, root, n_vocab, merges=True)
    if not sv.merges:
        raise TokenizerError(root / "tokenizer.json", "byte-level BPE tokenizer has no merges")
    if "bos" not in sv.add_special_token:
        w.add_add_bos_token(False)  # some llama.cpp pre-tokenizers default to adding BOS; HF did not say so
    return VocabInfo("bpe", pre, len(tokens), tuple(warnings))


def _wpm(w, root: Path, tj: dict, n_vocab: int, cfg: dict) -> VocabInfo:
    tokens, types = _base_tokens(tj, n_vocab, root)

    def phantom(tok: str) -> str:
        """llama.cpp's WPM vocabulary marks word starts with U+2581 instead of marking suffixes with ##."""
        if tok.startswith("[") and tok.endswith("]"):
            return tok
        return tok[2:] if tok.startswith("##") else "\u2581" + tok

    w.add_token_type_count(int(cfg.get("type_vocab_size", 1)))
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list([phantom(t) for t in tokens])
    w.add_token_types(types)
    _special(w, root, n_vocab, merges=False)
    return VocabInfo("wpm", "default", len(tokens))


def _spm(w, root: Path, arch: Arch, n_vocab: int) -> VocabInfo:
    import gguf
    from gguf.vocab import SentencePieceVocab

    try:
        sp = SentencePieceVocab(root)
    except (OSError, RuntimeError, ValueError) as exc:
        raise TokenizerError(
            root / "tokenizer.model", f"cannot be read as a SentencePiece model: {exc}"
        ) from None
    tokens, scores, types = [], [], []
    for text, score, toktype in sp.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(toktype))
    if len(tokens) > n_vocab:
        raise TokenizerError(
            root / "tokenizer.model", f"has {len(tokens)} pieces, the embedding only {n_vocab} rows"
        )
    # tokens the HF files mark as added (convert_hf_to_gguf: _create_vocab_sentencepiece); transformers 5
    # keeps them in tokenizer.json, earlier versions in tokenizer_config.json
    added = {int(t["id"]): t for t in (_json(root / "tokenizer.json") or {}).get("added_tokens", [])}
    tc = _json(root / "tokenizer_config.json") or {}
    added.update({int(k): v for k, v in (tc.get("added_tokens_decoder") or {}).items()})
    keep = (int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.BYTE))
    for i, info in sorted(added.items()):
        if i >= len(tokens) or types[i] in keep:
            continue
        content = info["content"]
        if info.get("special"):
            types[i] = int(gguf.TokenType.CONTROL)
        else:
            content = content.replace("\u2581", " ")
            types[i] = int(gguf.TokenType.USER_DEFINED)
        tokens[i] = content.encode("utf-8")
        scores[i] = -1000.0
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    prefix = arch.spm_space_prefix
    if prefix is None:
        prefix = _spm_dummy_prefix(sp.fname_tokenizer)
    if prefix is not None:
        w.add_add_space_prefix(prefix)
    sv = _special(w, root, n_vocab, merges=False)
    if (root / "tokenizer.json").is_file() and "bos" not in sv.add_special_token:
        w.add_add_bos_token(False)  # the fast tokenizer adds no BOS; llama.cpp's SPM default would
    return VocabInfo("spm", "default", len(tokens))


def _spm_dummy_prefix(path: Path) -> bool | None:
    """SentencePiece's ``add_dummy_prefix`` (llama.cpp's add_space_prefix), if protobuf can read it."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # protobuf missing: llama.cpp's default (add the prefix) applies
        return None
    m = pb.ModelProto()
    m.ParseFromString(Path(path).read_bytes())
    return bool(m.normalizer_spec.add_dummy_prefix)
