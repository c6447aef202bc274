"""matq push / pull through the real huggingface_hub client against a Hub-compatible loopback server.

The client is unmodified; it is pointed at the server with its own settings (endpoint, HF_HOME,
HF_HUB_DISABLE_XET to stay on plain HTTP LFS). Bytes are counted by the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import matq_format as mf
from matq_format import constants as C
from matq_format import numerics as N
from matq_format.errors import MissingPlanesError, WriterError

hf = pytest.importorskip("huggingface_hub")
hf_constants = pytest.importorskip("huggingface_hub.constants")
hf_utils = pytest.importorskip("huggingface_hub.utils")
hf_download = pytest.importorskip("huggingface_hub.file_download")

import matq_hub  # noqa: E402
from matq_hub import pull, push  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import HubServer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # inside the client

TOKEN = "hf_test_write"
ROWS, COLS, LAYERS = 256, 1024, 4


def build(out: Path, *, seed: int = 0, layers: int = LAYERS, ep: tuple[int, ...] = (2,)) -> Path:
    """A checkpoint from random weights: per-channel MinMax codes (F16 scales, U8 zero points)."""
    rng = np.random.default_rng(seed)
    src = out.parent / f"{out.name}-hf"
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(
        json.dumps({"model_type": "llama", "_name_or_path": "org/tiny-base", "license": "apache-2.0"})
    )
    (src / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    with mf.CheckpointWriter(out, carry_from=src, source={"tool": "test"}) as w:
        for i in range(layers):
            x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
            a, z = N.minmax_params(x, 8, None, scale_dtype="F16")
            q = N.quantize(x, a, z, 8, None)
            w.add_quantized(f"model.layers.{i}.mlp.up_proj.weight", q, a, z, dtype="F32", extra_precision=ep)
        w.add_dense("model.norm.weight", rng.standard_normal(COLS).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def server():
    with HubServer() as s:
        yield s


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("hub") / "ck")


@pytest.fixture(scope="module", autouse=True)
def client_settings(server, tmp_path_factory):
    """Point the real client at the loopback Hub, on plain HTTP LFS, with no token of the machine's.

    The client reads HF_HUB_DISABLE_XET and HF_HOME (hence the login-file path) once, at import;
    setting its constants is the same switch as setting those variables before the import.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", server.url)
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.delenv("HF_TOKEN", raising=False)
        mp.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        mp.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        # CI sets HF_HUB_OFFLINE=1 so that nothing can reach the real Hub; this server is loopback.
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        mp.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path_factory.mktemp("hf-home") / "token"))
        hf_utils.disable_progress_bars()
        yield
        hf_utils.enable_progress_bars()


@pytest.fixture(autouse=True)
def no_faults(server):
    server.clear_faults()


@pytest.fixture(scope="module")
def pushed(server, ckpt) -> str:
    repo = "org/tiny-matq"
    push(ckpt, repo, token=TOKEN, endpoint=server.url)
    return repo


def resolve_gets(server) -> dict[str, int]:
    """Repository file -> body bytes the server sent for it (GET /resolve)."""
    out: dict[str, int] = {}
    for _, path, _, sent in server.requests("GET", "/resolve/"):
        name = path.split("/resolve/", 1)[1].split("/", 1)[1]
        out[name] = out.get(name, 0) + sent
    return out


def expected_files(ck: mf.Checkpoint, widths: dict[str, int]) -> set[str]:
    files = {C.BASE_FILENAME, *ck.manifest["carried"]}
    for name, r in widths.items():
        files |= {ck.manifest["entries"][f"{name}@plane{k}"]["file"] for k in N.planes_needed(8, r)}
    return files


# --- push ---------------------------------------------------------------------------------------
def test_push_writes_checkpoint_and_card_in_one_commit(server, ckpt, pushed):
    src = mf.open(ckpt)
    tree = server.tree(pushed)
    local = {p.relative_to(ckpt).as_posix(): p for p in ckpt.rglob("*") if p.is_file()}
    assert set(tree) == set(local) | {"README.md", ".gitattributes"}
    for rel, p in local.items():
        assert server.read(pushed, rel) == p.read_bytes(), rel
        assert tree[rel].lfs == rel.endswith(".safetensors")
    # one commit on top of the repository's initial commit
    repo = server.repos[pushed]
    head = repo.commits[repo.branches["main"]]
    assert repo.commits[head.parent].parent is None
    # the real client lists the same files
    api = hf.HfApi(endpoint=server.url, token=TOKEN)
    assert set(api.list_repo_files(pushed)) == set(tree)

    card = server.read(pushed, "README.md").decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "matq"
    assert meta["base_model"] == "org/tiny-base" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"
    assert {"matq", "int8", "int4", "int2", "extra-precision"} <= set(meta["tags"])
    assert hf.ModelCard(card).data.library_name == "matq"
    sizes = {f: len(server.read(pushed, f)) for f in tree}
    for r in (8, 4, 2):
        widths = dict.fromkeys(src.quantized_names(), r)
        dl = sum(sizes[f] for f in expected_files(src, widths))
        row = next(ln for ln in card.splitlines() if ln.startswith(f"| int{r} |")).split("|")
        value, unit = row[3].split()
        assert abs(float(value) * {"KB": 1e3, "MB": 1e6}[unit] - dl) <= 0.05 * dl, (row, dl)
        assert row[5].strip() == f"{mf.summarize(src, widths).bits_per_weight:.3f}"
    assert "| int2 + extra precision |" in card
    assert f"matq pull {pushed} --bits 4" in card


GOLDEN = Path(__file__).parent / "golden"


def bare_checkpoint(out: Path) -> Path:
    """One quantized tensor, nothing carried: no base model, license, or carried files to name."""
    rng = np.random.default_rng(1)
    with mf.CheckpointWriter(out) as w:
        x = rng.standard_normal((64, 256)).astype(np.float32)
        a, z = N.minmax_params(x, 8, None, scale_dtype="F16")
        w.add_quantized("w.weight", N.quantize(x, a, z, 8, None), a, z, dtype="F32")
    return out


def test_card_text_is_pinned(tmp_path):
    """The whole card, byte for byte, for a fixed checkpoint (the digest aside): with base model,
    license, extra precision and exports; and bare (no carried files, no exports)."""
    from matq_hub.card import render_card

    full = mf.open(build(tmp_path / "ck", layers=2))
    exports = {"tiny-int4.gguf": 123_456, "onnx/model.onnx": 7_890_123}
    text = render_card(full, "org/tiny-matq", base_bytes=4096, exports=exports)
    assert text.replace(full.digest, "{digest}") == (GOLDEN / "hub_card.md").read_text()
    bare = mf.open(bare_checkpoint(tmp_path / "bare"))
    text = render_card(bare, "bare", base_bytes=100)
    assert text.replace(bare.digest, "{digest}") == (GOLDEN / "hub_card_bare.md").read_text()


def test_push_again_changes_nothing(server, ckpt, pushed):
    head = server.head(pushed)
    server.reset_counters()
    r = push(ckpt, pushed, token=TOKEN, endpoint=server.url)
    assert not r.changed and r.commit == head == server.head(pushed)
    assert server.requests("PUT") == [] and server.requests("POST", "/commit/") == []


def test_failed_push_leaves_branch_alone_and_rerun_finishes(server, ckpt):
    repo = "org/interrupted"
    plane3 = hashlib.sha256((ckpt / "matq-plane-3.safetensors").read_bytes()).hexdigest()
    server.fail("PUT", f"/lfs/upload/{repo}/{plane3}", "status", 400)
    with pytest.raises(matq_hub.UploadError) as e:
        push(ckpt, repo, token=TOKEN, endpoint=server.url)
    assert "\n" not in str(e.value)
    assert set(server.tree(repo)) == {".gitattributes"}  # the branch did not move
    stored = server.lfs_objects(repo)
    assert plane3 not in stored and stored  # other uploads landed before the failure

    server.fail("POST", f"/api/models/{repo}/commit/", "status", 500)
    with pytest.raises(matq_hub.UploadError):
        push(ckpt, repo, token=TOKEN, endpoint=server.url)
    assert set(server.tree(repo)) == {".gitattributes"}
    assert plane3 in server.lfs_objects(repo)

    # someone else commits while the files go up: the push refuses to commit over their head
    server.fail("POST", f"/api/models/{repo}/preupload/", "advance")
    with pytest.raises(matq_hub.PushConflictError):
        push(ckpt, repo, token=TOKEN, endpoint=server.url)
    assert set(server.tree(repo)) == {".gitattributes", "concurrent.txt"}

    server.reset_counters()
    r = push(ckpt, repo, token=TOKEN, endpoint=server.url)
    assert r.changed and server.requests("PUT") == []  # every object was already there
    assert "concurrent.txt" in server.tree(repo)
    assert len(server.requests("POST", "/commit/")) == 1
    assert server.read(repo, "matq-plane-3.safetensors") == (ckpt / "matq-plane-3.safetensors").read_bytes()


def test_push_branch_private_exports_and_stale_planes(server, ckpt, tmp_path):
    repo = "org/private-matq"
    export = tmp_path / "tiny-int4.gguf"
    export.write_bytes(b"GGUF" + bytes(100))
    push(ckpt, repo, token=TOKEN, endpoint=server.url, private=True, revision="v2", exports=[export])
    assert "exports/tiny-int4.gguf" in server.tree(repo, "v2")
    assert set(server.tree(repo, "main")) == {".gitattributes"}
    assert "exports/tiny-int4.gguf" in server.read(repo, "README.md", "v2").decode()
    with pytest.raises(matq_hub.RepoNotFoundError):  # private: no token, no repository
        pull(repo, tmp_path / "anon", bits=4, revision="v2", cache_dir=tmp_path / "c")
    assert not (tmp_path / "anon").exists()
    pull(repo, tmp_path / "authed", bits=4, revision="v2", token=TOKEN, cache_dir=tmp_path / "c")
    assert mf.open(tmp_path / "authed").info("model.layers.0.mlp.up_proj.weight").planes == (7, 6, 5, 4, 3)

    # a narrower checkpoint pushed over a full one removes the plane files it no longer has
    mf.slice_checkpoint(ckpt, tmp_path / "int4", bits=4)
    r = push(tmp_path / "int4", repo, token=TOKEN, endpoint=server.url, revision="v2")
    assert r.deleted == ["matq-plane-0.safetensors", "matq-plane-1.safetensors", "matq-plane-2.safetensors"]
    assert not any(f.startswith("matq-plane-2") for f in server.tree(repo, "v2"))
    card = server.read(repo, "README.md", "v2").decode()
    assert "| int4 |" in card and "| int2 |" in card and "| int6 |" not in card
    whole = pull(repo, tmp_path / "whole", revision="v2", token=TOKEN, cache_dir=tmp_path / "c")
    assert set(whole.widths.values()) == {4}  # no width given: everything the revision holds
    with pytest.raises(mf.errors.PlanError, match=f"^{repo}: .*serves up to 4"):
        pull(repo, tmp_path / "int8", bits=8, revision="v2", token=TOKEN, cache_dir=tmp_path / "c")


# --- pull ---------------------------------------------------------------------------------------
def test_pull_downloads_only_the_planes_a_width_reads(server, ckpt, pushed, tmp_path):
    src = mf.open(ckpt)
    names = src.quantized_names()
    sent = {}
    for r in (8, 4, 2):
        server.reset_counters()
        out = pull(pushed, tmp_path / f"int{r}", bits=r, cache_dir=tmp_path / f"cache{r}")
        got = resolve_gets(server)
        assert set(got) == expected_files(src, dict.fromkeys(names, r)) == set(out.files)
        assert sum(got.values()) == out.needed_bytes
        sent[r] = server.bytes_served
        ck = mf.open(out.path)
        ck.verify()
        for n in names:
            assert ck.info(n).planes == N.planes_needed(8, r)
            np.testing.assert_array_equal(ck.dequantize(n, r), src.dequantize(n, r))
        np.testing.assert_array_equal(ck.dense("model.norm.weight"), src.dense("model.norm.weight"))
        assert set(ck.carried_files()) == {"config.json", "tokenizer.json"}
    assert sent[2] <= 0.40 * sent[8] and sent[4] <= 0.65 * sent[8], sent
    with pytest.raises(MissingPlanesError):
        mf.open(tmp_path / "int2").sliced_codes(names[0], 4)


def test_pull_a_width_of_a_checkpoint_without_zero_entries(server, tmp_path):
    """Symmetric tensors record one zero point (spec 10.6): int2 still downloads the base file and
    three plane files, and reads as the original does."""
    ck = tmp_path / "sym"
    rng = np.random.default_rng(3)
    with mf.CheckpointWriter(ck, carry_from={"config.json": b'{"model_type": "llama"}'}) as w:
        for i in range(2):
            x = rng.standard_normal((64, 96)).astype(np.float32)
            a, z = N.minmax_params(x, 8, 32, symmetric=True, scale_dtype="F16")
            w.add_quantized(f"model.layers.{i}.mlp.up_proj.weight", N.quantize(x, a, z, 8, 32), a, z, group_size=32)
    src = mf.open(ck)
    assert src.version == "1.2" and all(src.info(n).zero_point == 128 for n in src.quantized_names())
    push(ck, "org/sym", token=TOKEN, endpoint=server.url)
    server.reset_counters()
    out = pull("org/sym", tmp_path / "int2", bits=2, cache_dir=tmp_path / "cache")
    assert set(resolve_gets(server)) == expected_files(src, dict.fromkeys(src.quantized_names(), 2))
    got = mf.open(out.path)
    for n in src.quantized_names():
        assert got.dequantize(n, 2).tobytes() == src.dequantize(n, 2).tobytes()


def test_pull_extra_precision_plan_and_cache(server, ckpt, pushed, tmp_path):
    src = mf.open(ckpt)
    n0 = src.quantized_names()[0]
    cache = tmp_path / "cache"
    ep = pull(pushed, tmp_path / "ep", bits=2, extra_precision=True, cache_dir=cache)
    np.testing.assert_array_equal(
        mf.open(ep.path).dequantize(n0, 2, extra_precision=True), src.dequantize(n0, 2, extra_precision=True)
    )
    # int2 is cached: the same width again transfers no file bytes
    server.reset_counters()
    pull(pushed, tmp_path / "again", bits=2, cache_dir=cache)
    assert sum(resolve_gets(server).values()) == 0

    server.reset_counters()
    mnm = pull(pushed, tmp_path / "mnm", plan="pyramid", cache_dir=cache)
    plan = mf.resolve_plan("pyramid", src)
    assert mnm.widths == plan and len(set(plan.values())) > 1
    assert set(mnm.files) == expected_files(src, plan)
    assert set(resolve_gets(server)) == expected_files(src, plan) - expected_files(
        src, dict.fromkeys(plan, 2)
    )
    ck = mf.open(mnm.path)
    for n, r in plan.items():
        np.testing.assert_array_equal(ck.dequantize(n, r), src.dequantize(n, r))

    budget = pull(pushed, tmp_path / "budget", plan="budget:3", cache_dir=cache)
    assert set(budget.files) >= {f"matq-plane-{k}.safetensors" for k in range(8)}  # it reads the weights
    assert budget.widths == mf.resolve_plan("budget:3", src)
    with pytest.raises(WriterError):
        pull(pushed, tmp_path / "budget", bits=4, cache_dir=cache)


def test_dropped_download_is_retried_and_ranges_are_served(server, ckpt, pushed, tmp_path):
    server.fail("GET", "/resolve/.*/matq-plane-7", "drop_after", 5000)
    server.reset_counters()
    out = pull(pushed, tmp_path / "out", bits=2, cache_dir=tmp_path / "cache")
    assert len(server.requests("GET", "matq-plane-7")) == 2  # cut off once, fetched again
    want = (ckpt / "matq-plane-7.safetensors").read_bytes()
    assert (tmp_path / "out" / "matq-plane-7.safetensors").read_bytes() == want
    mf.open(out.path).verify()
    # the client resumes with a Range request once it holds whole 10 MiB chunks; the server serves ranges
    url = hf.hf_hub_url(pushed, "matq-plane-7.safetensors", endpoint=server.url)
    part = tmp_path / "part"
    with open(part, "wb") as f:
        f.write(want[:1000])
        hf_download.http_get(url, f, resume_size=1000, expected_size=len(want))
    assert part.read_bytes() == want
    assert server.requests("GET", "matq-plane-7")[-1][2:] == (206, len(want) - 1000), server.requests(
        "GET", "matq-plane-7"
    )


def test_download_that_never_completes_leaves_nothing(server, pushed, tmp_path):
    server.fail("GET", "/resolve/.*/matq-plane-6", "drop_after", 1000, times=-1)
    with pytest.raises(matq_hub.DownloadInterruptedError) as e:
        pull(pushed, tmp_path / "out", bits=4, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("*partial*"))
    assert not list((tmp_path / "cache").rglob("*.incomplete"))


def test_corrupted_download_is_caught_and_dropped(server, ckpt, pushed, tmp_path):
    size = (ckpt / "matq-plane-5.safetensors").stat().st_size
    server.fail("GET", "/resolve/.*/matq-plane-5", "corrupt", size - 100)
    with pytest.raises(matq_hub.DownloadChecksumError, match="matq-plane-5"):
        pull(pushed, tmp_path / "out", bits=4, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()
    server.reset_counters()
    pull(pushed, tmp_path / "out", bits=4, cache_dir=tmp_path / "cache")  # fetches the bad file again
    assert set(resolve_gets(server)) == {"matq-plane-5.safetensors"}
    mf.open(tmp_path / "out").verify()


def test_errors_are_typed_one_liners_with_clean_state(server, ckpt, pushed, tmp_path):
    cases = [
        (matq_hub.RepoNotFoundError, lambda o: pull("org/missing", o, bits=4, cache_dir=tmp_path / "c")),
        (
            matq_hub.RevisionNotFoundError,
            lambda o: pull(pushed, o, revision="nope", cache_dir=tmp_path / "c"),
        ),
        (matq_hub.HubAuthError, lambda o: push(ckpt, "org/x", token="hf_wrong", endpoint=server.url)),
        (matq_hub.HubAuthError, lambda o: push(ckpt, "org/x", token=None, endpoint=server.url)),
    ]
    hf.HfApi(endpoint=server.url, token=TOKEN).create_repo("org/plain")
    cases.append((matq_hub.NotAMatqRepoError, lambda o: pull("org/plain", o, cache_dir=tmp_path / "c")))
    cases.append((matq_hub.BadRepoIdError, lambda o: pull("not a repo id", o, cache_dir=tmp_path / "c")))
    server.fail("GET", "/api/models/org/flaky", "status", 500)
    cases.append((matq_hub.HubResponseError, lambda o: pull("org/flaky", o, cache_dir=tmp_path / "c")))
    for i, (cls, run) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(cls) as e:
            run(out)
        assert isinstance(e.value, mf.errors.MatqError) and "\n" not in str(e.value) and e.value.hint
        assert not out.exists()
    assert "org/x" not in server.repos

    down = HubServer().start()
    url = down.url
    down.close()  # the network is down: nothing listens there any more
    for run in (
        lambda: pull(pushed, tmp_path / "down", bits=2, endpoint=url, cache_dir=tmp_path / "c"),
        lambda: push(ckpt, "org/down", token=TOKEN, endpoint=url),
    ):
        with pytest.raises(matq_hub.HubConnectionError, match="cannot reach"):
            run()
    assert not (tmp_path / "down").exists()


# --- command line (a fresh process reads HF_ENDPOINT, HF_HOME and HF_TOKEN like a user's shell) ---
def run_cli(args: list[str], server, home: Path, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(home), HF_HUB_DISABLE_XET="1")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "matq_cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_push_pull_and_login_file(server, ckpt, tmp_path):
    home = tmp_path / "home"
    r = run_cli(["push", str(ckpt), "org/cli-matq"], server, home, None)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("matq: org/cli-matq: no Hugging Face token found (")
    assert "org/cli-matq" not in server.repos

    home.mkdir()
    (home / "token").write_text(TOKEN)  # what `hf auth login` leaves behind
    r = run_cli(["push", str(ckpt), "org/cli-matq", "-m", "first"], server, home, None)
    assert r.returncode == 0, r.stderr
    assert server.repos["org/cli-matq"].commits[server.head("org/cli-matq")].title == "first"

    r = run_cli(["pull", "org/cli-matq", "--bits", "4", "-o", str(tmp_path / "int4")], server, home, TOKEN)
    assert r.returncode == 0, r.stderr
    assert "widths [4]" in r.stdout
    assert mf.open(tmp_path / "int4").info("model.layers.0.mlp.up_proj.weight").planes == (7, 6, 5, 4, 3)

    r = run_cli(["pull", "org/nothing-here", "-o", str(tmp_path / "x")], server, home, None)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no such repository" in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_pulled_checkpoint_converts_like_the_original(server, tmp_path):
    """`matq convert` accepts a pulled int4 folder and writes the same GGUF tensors as from the source."""
    pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    from click.testing import CliRunner
    from gguf_helpers import to_matq
    from tiny_models import tiny_hf_model

    from matq_cli.main import cli

    src = to_matq(tiny_hf_model("llama", tmp_path / "hf"), tmp_path / "ck")
    push(src.root, "org/tiny-llama", token=TOKEN, endpoint=server.url)
    got = pull("org/tiny-llama", tmp_path / "int4", bits=4, cache_dir=tmp_path / "cache")
    tensors = {}
    for ck, out in ((got.path, "pulled.gguf"), (src.root, "direct.gguf")):
        args = ["convert", str(ck), "--to", "gguf", "--bits", "4", "-o", str(tmp_path / out)]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output
        reader = gguf.GGUFReader(tmp_path / out)
        tensors[out] = {t.name: (t.tensor_type, bytes(t.data)) for t in reader.tensors}
    assert tensors["pulled.gguf"] == tensors["direct.gguf"] and len(tensors["direct.gguf"]) > 10


def test_offline_mode_is_named(tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE set, pull says so instead of blaming the network."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(matq_hub.HubConnectionError, match="HF_HUB_OFFLINE"):
        pull("org/anything", tmp_path / "out", bits=4, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()
