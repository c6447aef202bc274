"""Tiny real models for the GGUF tests: transformers models built from configs, tokenizers trained here.

Nothing is downloaded. Tokenizers are trained on the docstrings of standard-library modules (real
English prose, a few hundred KB) the way each family's tokenizer is built:
- Llama 3 style: byte-level BPE, Llama 3 split regex, BOS added, ``ignore_merges``;
- Qwen2 style: byte-level BPE, Qwen2 split regex (single digits), NFC, no BOS;
- Gemma style: a SentencePiece BPE model with byte fallback and no dummy prefix (``tokenizer.model``).
Checkpoints are written with matq_format directly (MinMax, per channel or per group).
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import email
import functools
import inspect
import json
import logging
import os
import pathlib
import re
import shutil
import string
import subprocess
import textwrap
import unittest
import zipfile
from pathlib import Path

import numpy as np

import matq_format as mf
from matq_format import numerics as N

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
BERT_LINEAR = re.compile(r"\.(query|key|value|dense)\.weight$")
SAMPLE = (
    "The quick brown fox jumps over the lazy dog. Return a new list of 12345 items;\n"
    "  raise ValueError('bad value') if the path does not exist.  Tabs\tand   spaces!"
)


def corpus() -> list[str]:
    """Docstrings of a fixed set of standard-library modules, classes and functions."""
    mods = [argparse, collections, csv, datetime, email, functools, inspect, json, logging, os, pathlib]
    mods += [re, shutil, string, subprocess, textwrap, unittest, zipfile]
    out = []
    for m in mods:
        out.append(m.__doc__ or "")
        for _, obj in sorted(vars(m).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and isinstance(obj.__doc__, str):
                out.append(obj.__doc__)
    return [t for t in out if t.strip()]


def byte_level_bpe(style: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``) in Llama 3 or Qwen2 style."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    split = LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    specials = (
        ["<|begin_of_text|>", "<|end_of_text|>"]
        if style == "llama3"
        else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    if style == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)],
        )
        doc = json.loads(tok.to_str())
        doc["model"]["ignore_merges"] = True  # as Llama 3's tokenizer.json
        tok = Tokenizer.from_str(json.dumps(doc))
    return tok


def gemma_sentencepiece(folder: Path, vocab_size: int = 512) -> Path:
    """Train a Gemma-style SentencePiece model into ``folder/tokenizer.model``."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<mask>"],
        normalization_rule_name="identity",
        character_coverage=1.0,
        max_sentence_length=100000,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    return folder / "tokenizer.model"


def tiny_hf_model(arch: str, folder: Path, seed: int = 0, init: float = 0.08, intermediate: int = 512) -> Path:
    """A tiny transformers model of ``arch`` (llama, qwen2, gemma2) with its tokenizer, saved to ``folder``."""
    import torch
    import transformers as tf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    common = dict(
        hidden_size=256,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=init,
    )
    if arch == "gemma2":
        spm_dir = folder / "_spm"
        gemma_sentencepiece(spm_dir)
        tok = tf.GemmaTokenizer.from_pretrained(spm_dir, add_bos_token=True)
        tok.save_pretrained(folder)
        shutil.copy(spm_dir / "tokenizer.model", folder / "tokenizer.model")
        shutil.rmtree(spm_dir)
        cfg = tf.Gemma2Config(
            vocab_size=len(tok),
            head_dim=64,
            query_pre_attn_scalar=64,
            sliding_window=128,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            **common,
        )
        model_cls = tf.Gemma2ForCausalLM
    else:
        style = "llama3" if arch == "llama" else "qwen2"
        raw = byte_level_bpe(style)
        if style == "llama3":
            tok = tf.PreTrainedTokenizerFast(
                tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
            )
            cfg = tf.LlamaConfig(
                vocab_size=raw.get_vocab_size(),
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                tie_word_embeddings=False,
                **common,
            )
            model_cls = tf.LlamaForCausalLM
        else:
            tok = tf.PreTrainedTokenizerFast(
                tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
            )
            cfg = tf.Qwen2Config(
                vocab_size=raw.get_vocab_size(),
                eos_token_id=tok.eos_token_id,
                tie_word_embeddings=True,
                **common,
            )
            model_cls = tf.Qwen2ForCausalLM
        tok.save_pretrained(folder)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # norms away from their init of exactly 0 / 1, so a wrong offset shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


def hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def to_matq(
    src: Path,
    out: Path,
    *,
    group_size: int | None = None,
    symmetric: bool = False,
    zero_multiple: int = 1,
    quantize_embeddings: bool = False,
    pattern: re.Pattern = LINEAR,
) -> mf.Checkpoint:
    """MinMax-quantize the linear layers (and optionally embeddings) of an HF folder to a matq checkpoint."""
    with mf.CheckpointWriter(out, 8, carry_from=src, source={"model": Path(src).name}) as w:
        for name, x in hf_tensors(src).items():
            quant = x.ndim == 2 and (
                pattern.search(name) or (quantize_embeddings and "embed" in name and "position" not in name)
            )
            if not quant:
                w.add_dense(name, x)
                continue
            x = x.astype(np.float32)
            s, z = N.minmax_params(x, 8, group_size, symmetric=symmetric, zero_multiple=zero_multiple)
            w.add_quantized(
                name,
                N.quantize(x, s, z, 8, group_size),
                s,
                z,
                dtype="F32",
                group_size=group_size,
                scheme="symmetric" if symmetric else "asymmetric",
                extra_precision=(2,),
            )
    return mf.open(out)


def hf_model_on_matq(
    src: Path, ckpt: mf.Checkpoint, bits: int | dict[str, int], extra_precision: bool = False, cls=None
):
    """The transformers model of ``src`` running matq's dequantized weights at ``bits`` (or per-tensor widths)."""
    import torch
    import transformers as tf

    cls = cls or tf.AutoModelForCausalLM
    model = cls.from_pretrained(src, dtype=torch.float32).eval()
    state = {}
    for name in ckpt.quantized_names():
        r = bits[name] if isinstance(bits, dict) else bits
        state[name] = torch.from_numpy(ckpt.dequantize(name, r, extra_precision and r < ckpt.code_bits))
    missing = set(state) - set(model.state_dict())
    assert not missing, missing
    model.load_state_dict(state, strict=False)
    return model


def env_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def llama_cpp_model(path: Path, **kw):
    """``llama_cpp.Llama(path, **kw)`` with llama.cpp's extra CPU buffer types off: see
    ``matq_eval.llama.load_llama`` (AMX builds crash or miscompute with them)."""
    from matq_eval.llama import load_llama

    llm = load_llama(path, **kw)
    assert llm.model_params.use_extra_bufts is False, "llama.cpp's extra buffer types are still on"
    return llm
