"""A checkpoint as a float Hugging Face model, run through llama.cpp's converter in-process.

The converter's model class reads the carried config and tokenizer, and tensors that matq serves
lazily (a quantized one as its slice, dequantized): its own code then names the GGUF tensors,
writes the hyper-parameters and vocabulary and applies its transforms. Its writer's ``add_tensor``
is where matq takes over: :func:`plan` only records what would be written (nothing is computed),
:func:`run` hands each tensor, with the checkpoint tensors it was computed from, to a callback that
encodes it. One tensor is in memory at a time, as in the converter's own lazy mode. The vocabulary
is built once, by the plan (llama.cpp builds it in Python: 10 s of CPU for Gemma 3's 262k tokens),
and the run writes the keys the plan recorded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matq_converters.exporters.gguf import converter
from matq_converters.registry import TokenizerError, UnsupportedModelError
from matq_format import numerics as N
from matq_format.errors import MatqError

Loader = Callable[[str], np.ndarray]
"""Checkpoint tensor name -> its float weights, as the converter should see them."""
Vocab = tuple
"""The keys the converter's ``set_vocab`` wrote, in order: ``((key, gguf.GGUFValue), ...)``."""


@dataclass(frozen=True)
class Output:
    """One tensor of the GGUF file, as the converter would write it."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    """Checkpoint tensors it is computed from."""
    keep_float: bool
    """llama.cpp's converter keeps it float at every file type (norms, biases, routers, positions)."""


@dataclass(frozen=True)
class _Source:
    """Marks a checkpoint tensor among a lazy tensor's inputs."""

    name: str


def plan(ckpt, root: Path, model_name: str, pre: str | None) -> tuple[str, list[Output], Vocab]:
    """The GGUF architecture, every tensor the file will hold, and the vocabulary's keys; the converter
    also writes the hyper-parameters here (then discarded), so every refusal comes before writing."""
    import gguf

    def never(name: str) -> np.ndarray:
        raise AssertionError(f"planning read {name}")

    outputs: list[Output] = []
    with _model(ckpt, root, gguf.LlamaFileType.MOSTLY_F16, never, model_name, pre) as m:
        add_info = m.gguf_writer.add_tensor_info

        def record(name, tensor, raw_shape=None, raw_dtype=None, tensor_endianess=None):
            shape = tuple(int(n) for n in tensor.shape)
            outputs.append(Output(name, shape, _sources(tensor), raw_dtype == gguf.GGMLQuantizationType.F32))
            add_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)), raw_dtype=None)

        m.gguf_writer.add_tensor = record
        _prepare(m, ckpt)
        vocab = _recording_vocab(m)
        with _refusals(ckpt.path):
            m.prepare_metadata(vocab_only=False)
        return gguf.MODEL_ARCH_NAMES[m.model_arch], outputs, tuple(vocab)


def row_maps(ckpt, root: Path, wanted: dict[str, str], model_name: str) -> dict[str, np.ndarray]:
    """GGUF tensor -> the rows of its one source it holds (of the source's matrix view, in the file's
    order), for the tensors of ``wanted`` (GGUF tensor -> that source; gpt-oss's ``gate_up_proj``: its
    even rows make ``ffn_gate_exps``, its odd ones ``ffn_up_exps``). Found by running the converter on
    a probe, each row's index repeated along the input axis by a zero stride: no weights read, no
    memory per column. F32 (not :func:`plan`'s F16) keeps the indices whole."""
    import gguf

    sources = set(wanted.values())

    def probe(name: str) -> np.ndarray:
        if name not in sources:
            raise AssertionError(f"finding rows read {name}")
        t = ckpt.info(name)
        if t.rows >= 1 << 24:
            raise UnsupportedModelError(ckpt.path, f"{name} has more rows than float32 counts exactly")
        one = tuple(1 if i == t.in_axis else d for i, d in enumerate(t.shape))
        rows = N.from_matrix(np.arange(t.rows, dtype=np.float32)[:, None], one, t.in_axis)
        strides = tuple(0 if i == t.in_axis else st for i, st in enumerate(rows.strides))
        return np.lib.stride_tricks.as_strided(rows, t.shape, strides)

    maps: dict[str, np.ndarray] = {}
    with _model(ckpt, root, gguf.LlamaFileType.ALL_F32, probe, model_name, None) as m:

        def record(name, tensor, raw_shape=None, raw_dtype=None, tensor_endianess=None):
            if name in wanted:  # by the plan's name: a source's second output no longer reaches it
                x = np.asarray(gguf.LazyNumpyTensor.to_eager(tensor))
                maps[name] = x[..., 0].reshape(-1).astype(np.int64)

        m.gguf_writer.add_tensor = record
        _prepare(m, ckpt)
    return maps


Encode = Callable[[str, np.ndarray, tuple[str, ...]], tuple[object, np.ndarray]]
"""(GGUF name, float tensor, its sources) -> (ggml type, data to write)."""


@contextlib.contextmanager
def run(ckpt, root: Path, out: Path, load: Loader, encode: Encode, model_name: str, vocab: Vocab):
    """Yields the converter's model with its tensors encoded into its writer (``use_temp_file``) and
    ``vocab`` (:func:`plan`'s) for its vocabulary; the caller adds keys, sets ``ftype``, then calls
    :func:`write`."""
    import gguf

    with _model(ckpt, root, gguf.LlamaFileType.ALL_F32, load, model_name, None, out) as m:
        add = m.gguf_writer.add_tensor

        def encoded(name, tensor, raw_shape=None, raw_dtype=None, tensor_endianess=None):
            sources = _sources(tensor)
            x = np.asarray(gguf.LazyNumpyTensor.to_eager(tensor))
            qtype, data = encode(name, x, sources)
            float_type = qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            add(name, data, raw_dtype=None if float_type else qtype)

        m.gguf_writer.add_tensor = encoded
        _prepare(m, ckpt)
        m.set_vocab = lambda: m.gguf_writer.kv_data[0].update(vocab)
        yield m


def write(m, ftype, path) -> None:
    """Metadata (with ``ftype`` as the file type) and the header, keys and tensors into ``m.fname_out``."""
    m.ftype = ftype
    with _refusals(path):
        m.prepare_metadata(vocab_only=False)
    w = m.gguf_writer
    w.write_header_to_file(path=m.fname_out)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@contextlib.contextmanager
def _model(ckpt, root: Path, ftype, load: Loader, model_name: str, pre: str | None, out: Path | None = None):
    """An instance of the converter's model class for this checkpoint, reading tensors through ``load``."""
    import torch

    conv = converter.load()
    quiet = logging.getLogger("hf-to-gguf")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        cls = _model_class(conv, ckpt, root)
        tensors = _lazy_tensors(conv, ckpt, load)

        def index_tensors(self, remote_hf_model_id=None):
            return dict(t for item in tensors.items() if (t := self.filter_tensors(item)))

        view = type(cls.__name__, (cls,), {"model_arch": cls.model_arch, "index_tensors": index_tensors})
        with torch.inference_mode():
            with _refusals(ckpt.path):
                m = view(root, ftype, out or root / "unused.gguf", use_temp_file=True, model_name=model_name)
            m.dir_model_card = _named(root, model_name)
            _choose_pre(m, ckpt, root, pre)
            yield m
    finally:
        quiet.setLevel(level)


def _recording_vocab(m) -> list:
    """The keys ``m.set_vocab`` writes (new, or replaced), recorded as it runs. It is the last step of
    the converter's ``prepare_metadata``: nothing after it reads what else it may change."""
    kv = m.gguf_writer.kv_data[0]
    got: list = []
    vocab = m.set_vocab

    def set_vocab() -> None:
        before = dict(kv)
        vocab()
        got.extend((k, v) for k, v in kv.items() if before.get(k) is not v)

    m.set_vocab = set_vocab
    return got


def _named(root: Path, model_name: str) -> Path:
    """The carried folder under the model's name: llama.cpp derives ``general.basename`` and
    ``general.finetune`` from the folder's name, which would otherwise be a random temporary one."""
    link = root / ".matq-model-card" / (Path(model_name).name or "model")
    if not link.exists():
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(root, target_is_directory=True)
    return link


def _model_class(conv, ckpt, root: Path):
    hparams = conv.ModelBase.load_hparams(root, False)
    arch = conv.get_model_architecture(hparams, conv.ModelType.TEXT)
    try:
        return conv.get_model_class(arch, mmproj=False)
    except NotImplementedError:
        raise UnsupportedModelError(
            ckpt.path,
            f"architecture {arch} is not one llama.cpp {converter.version()}'s converter knows; "
            "a newer llama-cpp-python (and its converter) would be needed",
        ) from None


def _lazy_tensors(conv, ckpt, load: Loader) -> dict[str, Callable]:
    """Checkpoint tensor name -> a function making the converter's lazy tensor of it."""
    import torch

    def lazy(name: str):
        info = ckpt.info(name)
        dtype = torch.float32 if info.quantized or info.dtype.startswith(("F", "BF")) else None
        if dtype is None:
            dtype = torch.from_numpy(np.zeros(0, ckpt.dense(name).dtype)).dtype
        meta = conv.LazyTorchTensor.meta_with_dtype_and_shape(dtype, tuple(info.shape))
        return conv.LazyTorchTensor(meta=meta, args=(_Source(name),), func=lambda s: torch.from_numpy(load(s.name)))

    return {n: (lambda n=n: lazy(n)) for n in ckpt.tensor_names()}


def _sources(tensor) -> tuple[str, ...]:
    """The checkpoint tensors a lazy tensor is computed from. gguf's lazy tensors keep their inputs
    in ``_args`` and have no public accessor for them."""
    import gguf

    found: dict[str, None] = {}
    stack, seen = [tensor], set()
    while stack:
        x = stack.pop()
        if isinstance(x, _Source):
            found[x.name] = None
        elif isinstance(x, (list, tuple)):
            stack.extend(reversed(x))
        elif isinstance(x, gguf.LazyBase) and id(x) not in seen:
            seen.add(id(x))
            stack.extend(reversed((*x._args, *x._kwargs.values())))
    return tuple(found)


def _prepare(m, ckpt) -> None:
    with _refusals(ckpt.path):
        m.prepare_tensors()


def _choose_pre(m, ckpt, root: Path, pre: str | None) -> None:
    """llama.cpp names a BPE pre-tokenizer by hashing a sample's tokens, which a retrained vocabulary
    changes; then matq names it from the split regex, or ``tokenizer_pre`` says."""
    from matq_converters.exporters.gguf.pretokenizer import bpe_pre

    base = m.get_vocab_base_pre

    def get_vocab_base_pre(tokenizer) -> str:
        if pre:
            return pre
        try:
            return base(tokenizer)
        except NotImplementedError:
            return bpe_pre(root / "tokenizer.json")

    m.get_vocab_base_pre = get_vocab_base_pre
    vocab = m.set_vocab

    def set_vocab() -> None:
        try:
            vocab()
        except MatqError:
            raise
        except Exception as exc:  # noqa: BLE001 - the converter's refusals are assorted built-in errors
            files = ", ".join(sorted(p.name for p in root.glob("tokenizer*"))) or "none"
            raise TokenizerError(
                ckpt.path,
                f"llama.cpp {converter.version()}'s converter could not build its vocabulary "
                f"({_first_line(exc)}); carried: {files}",
            ) from exc

    m.set_vocab = set_vocab


@contextlib.contextmanager
def _refusals(path) -> Iterator[None]:
    """The converter's exceptions as one-line matq errors naming the file."""
    try:
        yield
    except MatqError:
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the converter signals refusals with assorted built-in exceptions
        raise UnsupportedModelError(
            path, f"llama.cpp {converter.version()}'s converter refused it: {_first_line(exc)}"
        ) from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
