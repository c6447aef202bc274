"""matq push / pull against a hostile Hub, hostile repositories and hostile local folders (issue 24).

The rules these tests hold matq to: pull deletes only files whose real path lies in the repository's
own cache folder, and reads no snapshot entry that resolves elsewhere; pull never fetches more bytes
than the manifest (or the Hub's listing) records for a file; push uploads no link and no file that is
not a regular file. Each test runs the command line as a user would and checks exit status 1, the one
line it prints, that the victim file outside the cache is unchanged, and that nothing was published.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

from matq_format import constants as C

hf = pytest.importorskip("huggingface_hub")

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import HubServer  # noqa: E402
from test_hub import TOKEN, build, client_settings, resolve_gets, run_cli  # noqa: E402, F401

from matq_hub import push  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

PRECIOUS = b"the user's own file, which no download may touch\n"


@pytest.fixture(scope="module")
def server():
    with HubServer() as s:
        yield s


@pytest.fixture(autouse=True)
def no_faults(server):
    server.clear_faults()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("hostile") / "ck", layers=2)


@pytest.fixture(scope="module")
def repo(server, ckpt) -> str:
    push(ckpt, "org/target", token=TOKEN, endpoint=server.url)
    return "org/target"


def victim(tmp_path: Path, data: bytes = PRECIOUS) -> Path:
    """A file of the user's beside the Hugging Face home, where a traversal ETag points."""
    v = tmp_path / "victim" / "precious.txt"
    v.parent.mkdir(parents=True, exist_ok=True)
    v.write_bytes(data)
    return v


# HF_HOME is tmp_path/home and the client's blobs folder is HF_HOME/hub/models--org--target/blobs:
# four levels up from it is tmp_path.
TRAVERSAL = "../../../../victim/precious.txt"


def pull_cli(server, tmp_path: Path, repo: str, *args: str):
    return run_cli(
        ["pull", repo, "--bits", "4", "-o", str(tmp_path / "out"), *args], server, tmp_path / "home", None
    )


def assert_refused(r, tmp_path: Path, prefix: str, *words: str) -> None:
    """Exit status 1, one line starting with ``prefix`` and holding ``words``, nothing at -o."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(prefix), r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    assert not os.path.lexists(tmp_path / "out")
    assert not list(tmp_path.glob("*partial*")) and not list(tmp_path.glob(".out*"))


# --- #4: an ETag that is a path --------------------------------------------------------------------
@pytest.mark.parametrize("target", ["matq-plane-7.safetensors", C.BASE_FILENAME])
@pytest.mark.parametrize("content", ["text", "checkpoint"])
def test_traversal_etag_deletes_and_reads_nothing(server, ckpt, repo, tmp_path, target, content):
    """The Hub answers ``ETag: ../../../../victim/precious.txt`` for one file.

    Before: the client linked the snapshot entry to the victim, the format check failed on it, and
    pull unlinked the victim ("the bad copy was removed from the cache"); with a checkpoint file as
    victim the base file was read from outside the cache and pull exited 0. Now pull refuses the
    answer before downloading: exit 1, the victim unchanged, nothing at -o, nothing outside the cache.
    """
    data = (ckpt / target).read_bytes() if content == "checkpoint" else PRECIOUS
    v = victim(tmp_path, data)
    server.fail("HEAD", f"/resolve/.*/{target}", "etag", times=-1, text=TRAVERSAL)
    r = pull_cli(server, tmp_path, repo)
    assert_refused(r, tmp_path, f"matq: {repo}: {target} (revision ", "outside the cache", "nothing")
    assert v.read_bytes() == data
    assert sorted(p.name for p in v.parent.iterdir()) == ["precious.txt"]  # nothing written beside it


@pytest.mark.parametrize("target", ["matq-plane-7.safetensors", C.BASE_FILENAME])
def test_poisoned_cache_entry_is_refused_not_followed(server, repo, tmp_path, target):
    """The cache already holds a snapshot link out of it (the unmodified client made it, trusting the
    ETag, for another program using the same cache). Pull refuses it and deletes nothing."""
    v = victim(tmp_path)
    server.fail("HEAD", f"/resolve/.*/{target}", "etag", text=TRAVERSAL)
    commit = server.head(repo)
    link = Path(
        hf.hf_hub_download(
            repo, target, revision=commit, cache_dir=tmp_path / "home" / "hub", endpoint=server.url
        )
    )
    assert link.resolve() == v.resolve()  # the client itself follows the ETag out of the cache
    server.clear_faults()
    r = pull_cli(server, tmp_path, repo)
    assert_refused(r, tmp_path, f"matq: {repo}: {target} (revision ", "outside the cache", "nothing")
    assert v.read_bytes() == PRECIOUS
    assert os.path.islink(link)  # refused, not deleted: the hint says how to clear it


# --- #15: sizes are checked before and while downloading ------------------------------------------
def test_oversized_body_is_cut_off(server, ckpt, repo, tmp_path):
    """The Hub announces the true size of config.json, then sends 256 MiB. Before: all of it came
    down, then the client's size check failed. Now the download stops at the first chunk past the
    manifest's size (the client reads 10 MiB chunks), and nothing is kept in the cache."""
    v = victim(tmp_path)
    size = (ckpt / "config.json").stat().st_size
    server.reset_counters()
    server.fail("GET", "/resolve/.*/config.json", "grow", 256 << 20, times=-1)
    r = pull_cli(server, tmp_path, repo)
    assert_refused(r, tmp_path, f"matq: {repo}: config.json (revision ", f"more than the {size} bytes")
    assert resolve_gets(server)["config.json"] < 64 << 20, resolve_gets(server)
    assert not [
        p for p in (tmp_path / "home" / "hub").rglob("*") if p.is_file() and p.stat().st_size > 16 << 20
    ]
    assert v.read_bytes() == PRECIOUS


def test_oversized_announcement_is_refused_before_download(server, ckpt, repo, tmp_path):
    """The Hub announces (HEAD) a config.json 256 MiB larger than the manifest records: refused
    before any byte of it is fetched."""
    size = (ckpt / "config.json").stat().st_size
    server.reset_counters()
    server.fail("HEAD", "/resolve/.*/config.json", "grow", 256 << 20, times=-1)
    r = pull_cli(server, tmp_path, repo)
    assert_refused(r, tmp_path, f"matq: {repo}: config.json (revision ", f"the manifest records {size}")
    assert server.requests("GET", "config.json") == []


def test_repository_file_larger_than_manifest_is_not_fetched(server, ckpt, tmp_path):
    """A repository whose config.json (12 MiB) is not the one its manifest records (an honest Hub,
    a tampered repository): refused from the Hub's listing, before any download of it."""
    name = "org/swapped"
    push(ckpt, name, token=TOKEN, endpoint=server.url)
    api = hf.HfApi(endpoint=server.url, token=TOKEN)
    api.upload_file(path_or_fileobj=b"{}" + b" " * (12 << 20), path_in_repo="config.json", repo_id=name)
    size = (ckpt / "config.json").stat().st_size
    server.reset_counters()
    r = pull_cli(server, tmp_path, name)
    assert_refused(r, tmp_path, f"matq: {name}: config.json (revision ", f"the manifest records {size}")
    assert "config.json" not in resolve_gets(server)


# --- #7 and #6: push uploads no link and nothing but regular files -------------------------------
def secret(tmp_path: Path) -> Path:
    key = tmp_path / "dot-ssh" / "id_ed25519"
    key.parent.mkdir()
    key.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot for the Hub\n")
    return key


def push_cli(server, tmp_path: Path, ck: Path, repo: str, *args: str):
    home = tmp_path / "home"
    return run_cli(["push", str(ck), repo, *args], server, home, TOKEN)


def assert_nothing_pushed(server, repo: str, r, link: Path, what: str, key: Path | None = None) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"matq: {link}: {what}"), r.stderr
    assert repo not in server.repos  # refused before the repository was even created
    if key is not None:
        assert hashlib.sha256(key.read_bytes()).hexdigest() not in server.lfs_objects(repo)


def export_folder(tmp_path: Path) -> Path:
    d = tmp_path / "hf-export"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "model.safetensors").write_bytes(bytes(64))
    return d


@pytest.mark.parametrize("where", ["top", "sub", "dirlink"])
def test_push_refuses_links_in_an_export_folder(server, ckpt, tmp_path, where):
    """A link to a private key inside ``--include-export DIR`` (at the top, in a subfolder, or a link
    to a folder holding it). Before: the key was uploaded. Now: exit 1, one line naming the link."""
    key = secret(tmp_path)
    d = export_folder(tmp_path)
    link = {"top": d / "tokenizer.model", "sub": d / "sub" / "extra.bin", "dirlink": d / "keys"}[where]
    link.symlink_to(key.parent if where == "dirlink" else key)
    repo = f"org/export-link-{where}"
    r = push_cli(server, tmp_path, ckpt, repo, "--include-export", str(d))
    assert_nothing_pushed(server, repo, r, link, "is a symbolic link", key)


def test_push_refuses_an_export_folder_that_is_a_link(server, ckpt, tmp_path):
    key = secret(tmp_path)
    link = tmp_path / "export-link"
    link.symlink_to(key.parent)
    r = push_cli(server, tmp_path, ckpt, "org/export-dirlink", "--include-export", str(link))
    assert_nothing_pushed(server, "org/export-dirlink", r, link, "is a symbolic link", key)


def test_push_refuses_a_fifo_in_an_export_folder(server, ckpt, tmp_path):
    """A FIFO is not silently skipped (nor waited on): the push is refused, naming it."""
    d = export_folder(tmp_path)
    fifo = d / "sub" / "pipe"
    os.mkfifo(fifo)
    r = push_cli(server, tmp_path, ckpt, "org/export-fifo", "--include-export", str(d))
    assert_nothing_pushed(server, "org/export-fifo", r, fifo, "is not a regular file (a FIFO)")


@pytest.mark.parametrize("target", [C.BASE_FILENAME, "matq-plane-3.safetensors"])
def test_push_refuses_checkpoint_files_linked_out_of_the_folder(server, ckpt, tmp_path, target):
    """A checkpoint folder whose file is a link to a copy elsewhere. Before: the base file was
    uploaded from outside the folder. Now: exit 1, one line naming the link."""
    ck = tmp_path / "ck"
    shutil.copytree(ckpt, ck)
    outside = tmp_path / "elsewhere" / target
    outside.parent.mkdir()
    (ck / target).rename(outside)
    (ck / target).symlink_to(outside)
    repo = f"org/linked-{target.split('.')[0]}"
    r = push_cli(server, tmp_path, ck, repo)
    assert_nothing_pushed(server, repo, r, ck / target, "is a link to a file outside")


def test_push_accepts_a_link_inside_the_checkpoint_folder(server, ckpt, tmp_path):
    """A link that stays inside the folder is fine: its target is part of the checkpoint."""
    ck = tmp_path / "ck"
    shutil.copytree(ckpt, ck)
    (ck / "store").mkdir()
    (ck / C.BASE_FILENAME).rename(ck / "store" / C.BASE_FILENAME)
    (ck / C.BASE_FILENAME).symlink_to(Path("store") / C.BASE_FILENAME)
    r = push_cli(server, tmp_path, ck, "org/linked-inside")
    assert r.returncode == 0, r.stderr
    assert server.read("org/linked-inside", C.BASE_FILENAME) == (ckpt / C.BASE_FILENAME).read_bytes()
