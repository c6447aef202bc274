"""`matq eval` (issue 15): perplexity, KLD and top-1 agreement to the float reference, in one run,
for matq widths and plans (transformers) and GGUF files (llama.cpp).

A tiny Llama (random weights, tokenizer trained here) quantized with `matq quantize --layers linear`;
the text is the docstrings the tokenizer was trained on. Tolerance for the same int4 slice run by
llama.cpp (GGUF with every slice bit-exact and float embeddings) against transformers: perplexity
within 1% (measured: about 0.1%; llama.cpp quantizes activations to Q8 for its quantized matmuls).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import corpus, tiny_hf_model

from matq_cli.main import cli
from matq_eval import CandidateError, TextError, load_windows, parse_candidate, score
from matq_eval.metrics import Sums
from matq_eval.plot import labels, nudge, pareto

CTX, MAX_TOKENS = 64, 1024


def run(*args) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    hf = tiny_hf_model("llama", base / "hf", seed=1)
    code, out, err = run("quantize", hf, "-o", base / "ck", "--layers", "linear")
    assert code == 0, err
    text = base / "docs.txt"
    text.write_text("\n\n".join(corpus()), encoding="utf-8")
    return hf, base / "ck", text


def direct(ref: np.ndarray, test: np.ndarray, targets: np.ndarray) -> tuple[float, float, float]:
    """ppl, mean KLD and top-1 agreement, position by position."""
    nll, kld, same = [], [], []
    for r, t, y in zip(ref.astype(np.float64), test.astype(np.float64), targets, strict=True):
        p = np.exp(r) / np.exp(r).sum()
        q = np.exp(t) / np.exp(t).sum()
        nll.append(-np.log(q[y]))
        kld.append(float(np.sum(p * np.log(p / q))))
        same.append(r.argmax() == t.argmax())
    return float(np.exp(np.mean(nll))), float(np.mean(kld)), float(np.mean(same))


def test_metrics_match_a_direct_computation():
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((150, 40)) * 3).astype(np.float32)  # 150 rows: several chunks of 64
    test = ref + rng.standard_normal(ref.shape).astype(np.float32)
    targets = rng.integers(0, 40, 150)
    s = score(test, targets, ref)
    ppl, kld, top1 = direct(ref, test, targets)
    assert s.n == 150
    assert s.ppl == pytest.approx(ppl, rel=1e-12)
    assert s.mean_kld == pytest.approx(kld, rel=1e-10)
    assert s.top1_rate == top1
    halves = score(test[:70], targets[:70], ref[:70]) + score(test[70:], targets[70:], ref[70:])
    assert halves.ppl == pytest.approx(ppl, rel=1e-12) and halves.mean_kld == pytest.approx(kld, rel=1e-10)
    itself = score(ref, targets, ref)
    assert itself.mean_kld == pytest.approx(0.0, abs=1e-15) and itself.top1_rate == 1.0
    alone = score(ref, targets)
    assert (alone.mean_kld, alone.top1_rate) == (0.0, 1.0) and alone.ppl == pytest.approx(
        direct(ref, ref, targets)[0]
    )
    assert np.isnan(Sums().ppl)


def test_plot_helpers():
    assert pareto([(4, 1.0), (2, 3.0), (3, 0.5), (8, 0.7), (2, 5.0)]) == [1, 2]
    assert labels(["smol-Q8_0.gguf", "smol-matq-4.gguf", "smol-matq@2"]) == ["Q8_0", "matq-4", "matq@2"]
    assert labels(["a.gguf"]) == ["a"]


def test_labels_are_nudged_apart():
    """Close points (a Q4_K_M and a matq file of the same size): no label covers another or a marker."""
    pts = [(100.0, 100.0), (101.0, 101.0), (102.0, 99.0), (160.0, 100.0)]
    sizes = [(40.0, 8.0)] * 4
    offsets = nudge(pts, sizes)
    boxes = [
        (x + dx, y + dy, x + dx + w, y + dy + h)
        for (x, y), (dx, dy), (w, h) in zip(pts, offsets, sizes, strict=True)
    ]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]), (a, b)
        for x, y in pts:
            assert not (a[0] < x + 4 and x - 4 < a[2] and a[1] < y + 4 and y - 4 < a[3]), (a, (x, y))
    assert nudge([(0.0, 0.0)], [(10.0, 5.0)]) == [(5.0, 4.0)]  # alone: right of and above its point


def test_windows_are_deterministic_with_bos_and_half_scored(tiny, tmp_path):
    hf, _, text = tiny
    w = load_windows(hf, text, ctx=CTX, max_tokens=MAX_TOKENS)
    again = load_windows(hf, text, ctx=CTX, max_tokens=MAX_TOKENS)
    assert w.tokens.shape == (MAX_TOKENS // CTX, CTX) and np.array_equal(w.tokens, again.tokens)
    assert w.bos is not None and (w.tokens[:, 0] == w.bos).all()  # Llama 3 style tokenizer adds BOS
    assert w.first == CTX // 2 and w.scored == 16 * (CTX - 1 - CTX // 2)
    assert np.array_equal(w.targets(3), w.tokens[3, CTX // 2 + 1 :])
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.rst").write_text(text.read_text()[:20000])
    (folder / "sub" / "a.md").write_text(text.read_text()[20000:40000])
    (folder / "skip.bin").write_bytes(b"\0\1")
    (folder / "z.txt").write_bytes(b"\xff not read: the budget is spent before")
    fw = load_windows(hf, folder, ctx=CTX, max_tokens=256)
    assert [p.name for p in fw.files] == ["b.rst"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b" \n\t\n", "is empty"),
        (b"abc\xff\xfedef", "is not UTF-8 text"),
        (b"a\0b", "is not text"),
    ],
)
def test_bad_text_is_one_line_naming_the_file(tiny, tmp_path, content, message):
    hf, ck, _ = tiny
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(TextError, match=message):
        load_windows(hf, bad, ctx=CTX)
    code, out, err = run("eval", hf, "--text", bad, f"{ck}@4")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"matq: {bad}: {message}")


def test_other_request_errors(tiny, tmp_path):
    hf, ck, text = tiny
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextError, match="folder holds no files"):
        load_windows(hf, tmp_path / "empty")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(TextError, match="fewer than one window"):
        load_windows(hf, short, ctx=CTX)
    with pytest.raises(CandidateError, match="give a width or plan"):
        parse_candidate(ck)
    with pytest.raises(CandidateError, match="needs a matq checkpoint"):
        parse_candidate(f"{hf}@4")
    with pytest.raises(CandidateError, match="no such file"):
        parse_candidate(tmp_path / "nothing.gguf")
    assert [c.name for c in parse_candidate(f"{ck}@8,4,2+ep")] == ["ck@8+ep", "ck@4+ep", "ck@2+ep"]
    assert parse_candidate(f"{ck}@plan:budget:3.5")[0].plan == "budget:3.5"
    code, _, err = run("eval", hf, "--text", text, f"{ck}@9", "--ctx", CTX)
    assert code == 1 and err.count("\n") == 1 and "width 9" in err


def test_reference_widths_plans_and_gguf_in_one_run(tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    import gguf

    import matq_format as mf
    from matq_converters import registry
    from matq_converters.registry import ConvertOptions

    hf, ck, text = tiny
    g4 = tmp_path / "int4.gguf"  # every slice bit-exact, embeddings and head as floats: the same model
    registry.get("gguf").convert(
        mf.open(ck), g4, ConvertOptions(bits=4, settings={"outtype": "f32", "exact": True})
    )
    png = tmp_path / "pareto.png"
    args = [hf, "--text", text, "--ctx", CTX, "--max-tokens", MAX_TOKENS, "--json", "--plot", png]
    code, out, err = run("eval", *args, hf, f"{ck}@8,4,2", f"{ck}@plan:pyramid", g4)
    assert code == 0, err
    doc = json.loads(out)
    res = {r["name"]: r for r in doc["results"]}
    ref, itself = res["hf (reference)"], res["hf"]
    assert ref["kind"] == "reference" and itself["kind"] == "hf"
    assert itself["kld"] == 0.0 and itself["top1"] == 1.0 and itself["ppl"] == ref["ppl"]
    assert ref["tokens"] == 16 * (CTX - 1 - CTX // 2) == res["ck@2"]["tokens"]
    assert res["ck@8"]["kld"] < res["ck@4"]["kld"] < res["ck@2"]["kld"]
    assert res["ck@8"]["top1"] > res["ck@2"]["top1"]
    assert res["ck@plan:pyramid"]["kind"] == "matq-plan"
    # bits per weight: codes + F16 scale + U8 zero per group of 128 on the linear layers
    # the default gguf layout: an fp16 scale per group of 32; its zero point is one per tensor (10.6)
    assert res["ck@4"]["linear_bits_per_weight"] == pytest.approx(4 + 16 / 32)
    assert res["ck@8"]["bits_per_weight"] > res["ck@8"]["linear_bits_per_weight"]  # float embeddings
    r = gguf.GGUFReader(g4)
    nbytes, numel = sum(int(t.n_bytes) for t in r.tensors), sum(int(t.n_elements) for t in r.tensors)
    assert res["int4.gguf"]["kind"] == "gguf-matq" and res["int4.gguf"]["bytes"] == nbytes
    assert res["int4.gguf"]["bits_per_weight"] == pytest.approx(nbytes * 8 / numel)
    # the same slice in llama.cpp and in transformers
    assert res["int4.gguf"]["ppl"] == pytest.approx(res["ck@4"]["ppl"], rel=0.01)
    assert res["int4.gguf"]["kld"] == pytest.approx(res["ck@4"]["kld"], rel=0.1, abs=2e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and doc["plot"] == str(png)
    code, _, err = run("eval", *args, f"{ck}@8")  # the plot exists: refused before any work
    assert code == 1 and "already exists" in err
