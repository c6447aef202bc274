"""Calibration for ``matq quantize --calib``: text, and a model run one layer at a time in transformers.

Text. A file, or a folder's files whatever their names (recursively, in sorted order of their
relative paths; files that are not text skipped and said once), read as UTF-8; each file is tokenized on its own with the model's tokenizer
(no special tokens), the streams are concatenated and files are read only until ``max_tokens``
tokens are there. The stream is cut into sequences of ``seq_len`` tokens (whole sequences only;
one shorter sequence when the text holds fewer); when the tokenizer puts a BOS token in front of
a text, it replaces the first token of every sequence. A binary, non-UTF-8 or empty file
given by name, or a folder with no text is a :class:`CalibrationTextError` naming it.

Model. :class:`LayerwiseModel` builds the transformers base model (``AutoModel.from_config``) on
the meta device, so it holds no weights; the modules outside the layer list (embeddings, final
norm, rotary tables) are materialised on the device and loaded from the folder's safetensors
through :class:`~matq_converters.importers.hf.source.HFSource`, and each layer is loaded when its turn comes
and dropped after. Layer inputs are captured by running the model's own forward up to the layers
(so its masks, position ids and rotary embeddings are transformers' own) with stand-ins that
record each layer's arguments; the layers are then called directly. Decoder models whose base
model keeps its layers in ``layers`` (Llama, Mistral, Qwen2, Gemma 2) and BERT-like encoders
(``encoder.layer``) are supported (the layer lists of :mod:`matq_converters.roles`); a model transformers cannot build or run is a
:class:`CalibrationModelError`.

:func:`calibrate_layers` is the layer-by-layer GPTQ pass: embeddings once; then per layer, hooks
on the selected linears accumulate ``H = X^T X`` (float32 products per batch, summed in float64;
linears fed the same tensor, as q/k/v and gate/up are, share one H and are quantized as one
matrix, rows stacked, which is the same as one at a time), :func:`~matq_converters.importers.hf.gptq.gptq_multiwidth`
quantizes them (on the CPU several at once, one thread each: the same bytes as one at a time), their weights are replaced by the int8 (full code width) dequantization, and the
layer runs again to give the next layer's inputs. Quantized inputs, as GPTQ's sequential mode: each
layer's H describes the inputs it will see with quantized layers before it, so it compensates their
error too. The full width, because it is the one slice every width is cut from and the closest to
the float model: calibrating on int2 activations would fit every later layer to int2's distortions,
which the wider slices do not have (MatGPTQ runs the next layer at its master width too).

Peak memory: one layer's weights and its H matrices, the calibration activations twice (inputs
and outputs of the layer; 2 x tokens x hidden x 4 bytes), and the modules outside the layers
(embeddings), all on the device. Deterministic: fixed token order, no sampling, float64 H sums,
deterministic kernels on CUDA; the same inputs, options, device and thread count give the same
bytes (CPU and GPU results differ in rounding, hence in some codes).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from matq_converters import roles
from matq_converters import text as corpus
from matq_converters.importers.hf.source import HFSource, SourceError
from matq_format import numerics
from matq_format.errors import MatqError

__all__ = [
    "DEFAULT_CALIB_TOKENS",
    "DEFAULT_SEQ_LEN",
    "CalibrationError",
    "CalibrationModelError",
    "CalibrationText",
    "CalibrationTextError",
    "LayerwiseModel",
    "calibrate_layers",
    "load_calibration_text",
]

DEFAULT_SEQ_LEN = 512
DEFAULT_CALIB_TOKENS = 8192
"""Default calibration tokens (``--calib-tokens``): 16 sequences of 512. The time per layer is the
GPTQ sweep (about 8 s for a 135M model's layer on 2 CPU cores, independent of the tokens) plus two
forward passes and ``X^T X`` over the tokens, which at 131,072 tokens (the earlier default) took 16
times as long: half an hour for SmolLM2-135M, no result in 30 minutes on busy cores. 8,192 tokens
make it minutes; a Hessian of 576 or 1,536 input columns is full rank from that many tokens, and it
is what llama-imatrix was given in the comparisons (issue 23). Give more where time allows.
"""
MIN_TOKENS = 16
"""Fewer calibration tokens than this is refused: the Hessian would say nothing."""
BATCH_TOKENS = 4096
"""Tokens per forward call (whole sequences; at least one)."""


class CalibrationError(MatqError):
    """Calibration cannot run (base class)."""


class CalibrationTextError(CalibrationError):
    """The calibration text is missing, empty, binary or not UTF-8, or too short."""

    hint = "pass a UTF-8 text file or a folder of text files"


class CalibrationModelError(CalibrationError, SourceError):
    """The model does not run in transformers layer by layer (unknown type, no layer list, bad weights)."""


# --- text -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationText:
    """Token sequences ``int64 [n, seq_len]`` and where they came from."""

    tokens: np.ndarray
    files: list[Path] = field(default_factory=list)
    sha256: str = ""
    """sha256 of the bytes of the files read, in order."""
    text_bytes: int = 0

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)

    def record(self, path: str | os.PathLike) -> dict:
        """What the manifest's source says about the calibration."""
        return {
            "text": Path(path).name,
            "files": len(self.files),
            "text_bytes": self.text_bytes,
            "sha256": self.sha256,
            "tokens": self.n_tokens,
            "sequences": int(self.tokens.shape[0]),
            "seq_len": int(self.tokens.shape[1]),
        }


def load_calibration_text(
    tokenizer,
    path: str | os.PathLike,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int = DEFAULT_CALIB_TOKENS,
) -> CalibrationText:
    """Tokenize the calibration text at ``path`` into sequences (see the module docstring)."""
    if seq_len < 2:
        raise CalibrationTextError(None, f"sequence length {seq_len} must be at least 2 tokens")
    if max_tokens < MIN_TOKENS:
        raise CalibrationTextError(None, f"calibration tokens {max_tokens} must be at least {MIN_TOKENS}")
    files = corpus.text_files(path, CalibrationTextError)
    single = len(files) == 1 and not Path(path).is_dir()
    stream = corpus.tokenize_files(tokenizer, files, CalibrationTextError, max_tokens, skip_empty=not single)
    where = files[0] if single else Path(path)
    if not stream.files:
        raise CalibrationTextError(where, "holds no text (every file is empty or not text)")
    n_ids = len(stream.ids)
    if n_ids < MIN_TOKENS:
        raise CalibrationTextError(where, f"holds {n_ids} tokens; calibration needs at least {MIN_TOKENS}")
    seq = min(seq_len, n_ids, max_tokens)
    tokens = corpus.cut_windows(stream.ids, seq, min(n_ids, max_tokens) // seq, corpus.adds_bos(tokenizer))
    return CalibrationText(tokens, stream.files, stream.sha256, stream.text_bytes)


# --- device -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def deterministic(dev) -> Iterator[None]:
    """Deterministic kernels while calibrating on CUDA (no TF32, deterministic cuBLAS/cuDNN); CPU kernels
    already are. Settings are restored afterwards."""
    import torch

    if dev.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        ) = saved[2:]


# --- the model, one layer at a time ------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the last stand-in layer: everything needed has been recorded."""


def _stand_in(index: int, record: dict, stop_at: int):
    import torch.nn as nn

    class _Record(nn.Module):
        def forward(self, *args, **kwargs):
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            record[index] = (rest, kwargs)
            if index == 0:
                record["hidden"] = hidden
            if index == stop_at:
                raise _Stop
            return hidden

    return _Record()


class LayerwiseModel:
    """A transformers base model whose layers are loaded from the folder one at a time."""

    def __init__(self, src: HFSource, device):
        import torch

        self.src = src
        self.device = device
        path = src.root / "config.json"
        try:
            from transformers import AutoConfig, AutoModel

            cfg_dict = dict(src.config)
            model_type = cfg_dict.pop("model_type", None)
            if not model_type:
                raise CalibrationModelError(path, "has no model_type; transformers cannot build the model")
            self.config = AutoConfig.for_model(model_type, **cfg_dict)
            if hasattr(self.config, "use_cache"):
                self.config.use_cache = False
            with torch.device("meta"):
                self.base = AutoModel.from_config(self.config, dtype=torch.float32)
        except CalibrationModelError:
            raise
        except Exception as exc:  # transformers' own errors: unknown type, bad config values, ...
            raise CalibrationModelError(
                path, f"transformers cannot build this model ({type(exc).__name__}: {_first_line(exc)})"
            ) from None
        self.base.eval()
        self.layers_path, self.layers = self._find_layers(path)
        self.prefix = self._file_prefix(path)
        self._materialize_outside_layers()

    # names -------------------------------------------------------------------------------------
    def _find_layers(self, path: Path):
        import torch.nn as nn

        candidates = roles.detect(self.src.config).layers
        for p in candidates:
            try:
                m = self.base.get_submodule(p)
            except AttributeError:
                continue
            if isinstance(m, nn.ModuleList) and len(m):
                return p, m
        raise CalibrationModelError(
            path,
            f"{type(self.base).__name__} keeps no list of layers where calibration looks "
            f"({', '.join(candidates)}); calibrated quantization does not support it",
        )

    def _file_prefix(self, path: Path) -> str:
        first = next(iter(self.layers[0].state_dict()), None)
        probe = f"{self.layers_path}.0.{first}"
        for prefix in ("", f"{self.base.base_model_prefix}."):
            if prefix + probe in self.src.tensors:
                return prefix
        raise CalibrationModelError(
            path,
            f"the weights hold no {probe!r} (nor under {self.base.base_model_prefix!r}): not this model's",
        )

    def layer_prefix(self, i: int) -> str:
        """Tensor-name prefix of layer ``i`` in the folder's files."""
        return f"{self.prefix}{self.layers_path}.{i}."

    def _load_into(self, module, names: dict[str, str], what: str) -> None:
        """Copy ``{module-relative name: file tensor name}`` into ``module`` (already on the device)."""
        import torch

        tensors = dict(module.named_parameters())
        tensors.update(module.named_buffers())
        for rel, fname in names.items():
            t = tensors[rel]
            arr = self.src.read(fname)
            if arr.dtype.kind == "V" or str(arr.dtype) in ("bfloat16", "float16"):
                arr = arr.astype(np.float32)
            src_t = torch.from_numpy(np.array(arr, copy=True))
            if tuple(src_t.shape) != tuple(t.shape):
                raise CalibrationModelError(
                    self.src.tensors[fname].file,
                    f"{fname} is {list(src_t.shape)}, but transformers' {what} expects {list(t.shape)}",
                )
            with torch.no_grad():
                t.copy_(src_t.to(t.dtype))

    def _materialize_outside_layers(self) -> None:
        import torch

        lp = self.layers_path
        inside = lambda n: n == lp or n.startswith(lp + ".")  # noqa: E731
        with torch.no_grad():
            for name, mod in self.base.named_modules():
                if inside(name):
                    continue
                mod.to_empty(device=self.device, recurse=False)
                self.base._init_weights(mod)  # recomputes non-persistent buffers (rotary tables, ids)
        names = {}
        persistent = set(self.base.state_dict())
        for n, _ in [*self.base.named_parameters(), *self.base.named_buffers()]:
            if inside(n):
                continue
            fname = self.prefix + n
            if fname in self.src.tensors:
                names[n] = fname
            elif n in persistent and n.split(".")[0] not in ("norm", "pooler", "final_layernorm"):
                raise CalibrationModelError(
                    self.src.root, f"the weights lack {fname!r}, which the model needs before its layers"
                )
        self._load_into(self.base, names, type(self.base).__name__)

    def load_layer(self, i: int):
        """Layer ``i`` on the device with the folder's weights."""
        layer = self.layers[i]
        layer.to_empty(device=self.device)
        pre = self.layer_prefix(i)
        names = {}
        for n in layer.state_dict():
            if pre + n not in self.src.tensors:
                raise CalibrationModelError(self.src.root, f"the weights lack {pre + n!r}")
            names[n] = pre + n
        nonpersistent = [n for n, _ in layer.named_buffers() if n not in names]
        if nonpersistent:
            raise CalibrationModelError(
                self.src.root,
                f"layer {i} has buffers not stored in the weights ({nonpersistent[0]}); not supported",
            )
        self._load_into(layer, names, f"layer {i}")
        layer.eval()
        return layer

    def release_layer(self, i: int) -> None:
        self.layers[i].to("meta")

    # inputs --------------------------------------------------------------------------------------
    def capture(self, ids, last: int) -> tuple[object, list[tuple[tuple, dict]]]:
        """Layer 0's input and each layer's other arguments (up to ``last``) for one batch of ids."""
        import torch

        record: dict = {}
        real = list(self.layers)
        for i in range(len(real)):
            self.layers[i] = _stand_in(i, record, last)
        try:
            with torch.no_grad():
                self.base(input_ids=ids.to(self.device), use_cache=False)
        except _Stop:
            pass
        except Exception as exc:
            raise CalibrationModelError(
                self.src.root,
                f"transformers could not run the model ({type(exc).__name__}: {_first_line(exc)})",
            ) from None
        finally:
            for i, m in enumerate(real):
                self.layers[i] = m
        missing = [i for i in range(last + 1) if i not in record]
        if missing or "hidden" not in record:
            raise CalibrationModelError(
                self.src.root, f"the model's forward never reached layer {missing[0] if missing else 0}"
            )
        return record["hidden"], [record[i] for i in range(last + 1)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def run_layer(layer, hidden, args_kwargs):
    """A decoder layer on ``hidden`` with the extra arguments the capture recorded; its hidden output."""
    args, kwargs = args_kwargs
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


# --- the GPTQ pass ------------------------------------------------------------------------------------
class _Hessians:
    """Forward pre-hooks on a layer's selected linears: ``H += X^T X`` per distinct input tensor."""

    def __init__(self, linears: dict[str, object], device):
        import torch

        self.torch = torch
        self.device = device
        self.names = list(linears)
        self.leader: dict[str, str] = {}  # linear -> the first linear that saw its input
        self.H: dict[str, object] = {}
        self.tokens: dict[str, int] = {}
        self.order: list[str] = []  # linears in the order the layer first called them
        self._last = None
        self._last_leader = None
        self._first_batch = True
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if x is self._last:
                lead = self._last_leader
            else:
                lead = name
                self._last, self._last_leader = x, name
            if self._first_batch and name not in self.leader:
                self.leader[name] = lead
                self.order.append(name)
            if self.leader.get(name) != lead:
                raise RuntimeError(f"{name}: its input changed sharing between batches")
            if lead == name:
                X = x.detach().reshape(-1, x.shape[-1]).to(self.torch.float32)
                G = X.T @ X
                if name not in self.H:
                    self.H[name] = self.torch.zeros(G.shape, dtype=self.torch.float64, device=self.device)
                    self.tokens[name] = 0
                self.H[name] += G
                self.tokens[name] += X.shape[0]

        return hook

    def end_batch(self) -> None:
        self._first_batch = False
        self._last = self._last_leader = None

    def groups(self) -> list[list[str]]:
        """Linears sharing one H, in the order the layer calls them (the leader, owner of H, first)."""
        out: dict[str, list[str]] = {}
        for n in self.order:
            out.setdefault(self.leader[n], []).append(n)
        return list(out.values())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _gptq_groups(jobs: list[tuple], spec, propagate: str, workers: int) -> list[tuple]:
    """GPTQ of one layer's matrices ``(W, H, importance)``, the largest first on ``workers`` threads
    of one torch thread each: their column steps are serial and too small to share out, so the
    matrices are what goes in parallel. Each matrix's result is what it is alone."""
    import torch

    from matq_converters.importers.hf.gptq import gptq_multiwidth

    def one(job: tuple, threads: int | None = None) -> tuple:
        if threads is not None:
            torch.set_num_threads(threads)
        W, H, imp = job
        return gptq_multiwidth(W, H, spec, importance=imp, propagate=propagate)

    workers = min(workers, len(jobs))
    if workers <= 1:
        return [one(job) for job in jobs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="matq-gptq") as pool:
            largest = sorted(range(len(jobs)), key=lambda j: -jobs[j][0].numel())
            running = {j: pool.submit(one, jobs[j], 1) for j in largest}
            return [running[j].result() for j in range(len(jobs))]
    finally:
        torch.set_num_threads(threads)


@dataclass
class LayerPlan:
    """Which selected tensors of one layer GPTQ handles: ``{file tensor name: module-relative path}``."""

    index: int
    linears: dict[str, str]


def plan_layers(model: LayerwiseModel, selected) -> tuple[list[LayerPlan], list[str]]:
    """GPTQ plans per layer for the selected tensor names, and the selected names GPTQ cannot take
    (outside the layers, or not the weight of an ``nn.Linear``): those are quantized without data."""
    import torch.nn as nn

    plans = [LayerPlan(i, {}) for i in range(len(model.layers))]
    other = []
    for name in selected:
        done = False
        for i in range(len(model.layers)):
            pre = model.layer_prefix(i)
            if name.startswith(pre) and name.endswith(".weight"):
                path = name[len(pre) : -len(".weight")]
                try:
                    mod = model.layers[i].get_submodule(path)
                except AttributeError:
                    break
                if type(mod) is nn.Linear:
                    plans[i].linears[name] = path
                    done = True
                break
        if not done:
            other.append(name)
    return plans, other


def calibrate_layers(
    model: LayerwiseModel,
    text: CalibrationText,
    plans: list[LayerPlan],
    spec,
    *,
    propagate: str = "per-width",
    on_layer: Callable[[int, int], None] | None = None,
    nonfinite: Callable[[str], Exception] | None = None,
    inputs: Callable[[str, Any, Any], None] | None = None,
    workers: int = 1,
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(tensor name, codes, scale, zero)`` for every planned linear, layer by layer.

    ``on_layer(done, total)`` is called after each layer. ``nonfinite(name)`` builds the error for
    a weight holding NaN or infinity. ``inputs(name, float weights, column importance)`` receives
    what the importance entry and the per-width fit need (spec 10.7, 10.8) before each tensor is
    yielded, as torch tensors valid during the call only (the weight is then overwritten): the
    caller copies what it keeps. ``workers``: on the
    CPU, how many of a layer's matrices (q/k/v, o, gate/up, down) GPTQ quantizes at once, one
    thread each.
    """
    import torch

    dev = model.device
    needed = [p.index for p in plans if p.linears]
    if not needed:
        return
    last = max(needed)
    seqs = torch.from_numpy(text.tokens)
    per_batch = max(1, BATCH_TOKENS // seqs.shape[1])
    hidden: list = []
    extras: list = []
    with deterministic(dev), torch.no_grad():
        for b0 in range(0, seqs.shape[0], per_batch):
            h, kw = model.capture(seqs[b0 : b0 + per_batch], last)
            hidden.append(h)
            extras.append(kw)
        for i in range(last + 1):
            layer = model.load_layer(i)
            lin_names = plans[i].linears
            if lin_names:
                mods = {n: layer.get_submodule(p) for n, p in lin_names.items()}
                hess = _Hessians(mods, dev)
                try:
                    for b, h in enumerate(hidden):
                        run_layer(layer, h, extras[b][i])
                        hess.end_batch()
                finally:
                    hess.remove()
                never = [n for n in lin_names if n not in hess.leader]
                if never:
                    raise CalibrationModelError(model.src.root, f"{never[0]} was never called by its layer")
                jobs = []
                for group in hess.groups():
                    ws = [mods[n].weight.detach().to(torch.float32) for n in group]
                    for n, w in zip(group, ws, strict=True):
                        if not bool(torch.isfinite(w).all()):
                            raise (nonfinite(n) if nonfinite else ValueError(f"{n} holds NaN or infinity"))
                    H = hess.H[group[0]]
                    imp = torch.diagonal(H) / hess.tokens[group[0]]
                    jobs.append((torch.cat(ws, 0) if len(ws) > 1 else ws[0], H, imp))
                results = _gptq_groups(jobs, spec, propagate, workers if dev.type == "cpu" else 1)
                for group, job, (codes, scale, zero) in zip(hess.groups(), jobs, results, strict=True):
                    r0 = 0
                    for n in group:
                        r1 = r0 + mods[n].weight.shape[0]
                        c, a, z = codes[r0:r1], scale[r0:r1], zero[r0:r1]
                        if inputs is not None:  # before the weight is replaced by its int8 values
                            inputs(n, mods[n].weight.detach(), job[2].detach())
                        full = numerics.dequantize_codes(
                            c, a, z, spec.code_bits, spec.code_bits, spec.group_size
                        )
                        mods[n].weight.copy_(torch.from_numpy(full).to(dev))
                        yield n, c, a, z
                        r0 = r1
                del hess
            for b, h in enumerate(hidden):
                hidden[b] = run_layer(layer, h, extras[b][i])
            model.release_layer(i)
            if on_layer is not None:
                on_layer(i + 1, last + 1)
