"""A Hugging Face Hub-compatible HTTP server on loopback, for tests and the hub benchmark.

It speaks the endpoints the real, unmodified ``huggingface_hub`` client calls to create a repository,
commit files (preupload, LFS batch with the basic transfer, upload, verify, NDJSON commit), list and
describe a repository, and resolve files (HEAD and GET with ``Range``). Git history is kept in memory
as whole-tree commits, so a commit lands completely or not at all; LFS objects live on disk, addressed
by sha256, one store per repository as in git LFS. The server counts every byte of every response body it sends (``bytes_served``) so tests
measure what a download really transferred, and can inject faults (an HTTP status, a dropped
connection after N bytes, a flipped byte) into matching requests, or answer as a hostile Hub
would (an ETag that is a path, a file larger than the repository holds).

The client must stay on plain HTTP LFS: run it with ``HF_HUB_DISABLE_XET=1`` (the Xet token
endpoint answers 501 with a message saying so).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".gguf",
    ".onnx",
    ".onnx_data",
    ".pt",
    ".pth",
    ".h5",
    ".msgpack",
    ".npz",
)
LFS_MIN_BYTES = 10 << 20
"""Files at least this large, binary files, and weight-like suffixes go to LFS, as on the Hub."""
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Blob:
    """One file in a tree: regular content in memory, or an LFS object on disk."""

    size: int
    sha1: str  # git blob id (of the pointer, for LFS files)
    sha256: str | None = None  # LFS files only
    data: bytes | None = None  # regular files only
    path: Path | None = None  # LFS files only: the object in the repository's LFS store

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def etag(self) -> str:
        return self.sha256 or self.sha1


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    action: str  # "status", "drop_after", "corrupt", "advance", "etag", "grow"
    value: int
    remaining: int  # -1: forever
    text: str = ""  # the ETag answered by "etag"


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class HubServer:
    """Start with :meth:`start` (or as a context manager); ``url`` is the ``HF_ENDPOINT`` to use."""

    def __init__(self, root: str | Path | None = None, tokens: dict[str, str] | None = None):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="hubserver-")) if root is None else Path(root)
        self.lfs_dir = self.root / "lfs"
        self.lfs_dir.mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens or {"hf_test_write": "write", "hf_test_read": "read"})
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.faults: list[Fault] = []
        self.log: list[list] = []  # [method, path, status, body bytes sent], logged before the reply goes out
        self.bytes_served = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def process_request(self, request, client_address):
                with server.lock:
                    server._conns.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):
                with server.lock:
                    server._conns.discard(request)
                super().shutdown_request(request)

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop listening and cut every open connection: to a client, the network is down."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._httpd = None

    def close(self) -> None:
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- test helpers ------------------------------------------------------------------------------
    def fail(
        self,
        method: str,
        pattern: str,
        action: str = "status",
        value: int = 500,
        times: int = 1,
        text: str = "",
    ) -> None:
        """Inject a fault into the next ``times`` requests (-1: all) whose path matches ``pattern``.

        ``status``: answer ``value`` instead; ``drop_after``: send the headers and ``value`` body bytes,
        then cut the connection; ``corrupt``: flip the body byte at offset ``value``; ``advance``: first
        commit a file to the repository's main branch, as a concurrent writer would, then answer.
        Hostile answers to a file request (HEAD or GET ``/resolve/``): ``etag``: answer the ETag
        ``text`` (e.g. a path such as ``../../victim``); ``grow``: the file is ``value`` bytes longer
        than the repository holds, announced in Content-Length and sent (zeros after the real bytes).
        """
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(pattern), action, value, times, text))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def reset_counters(self) -> None:
        with self.lock:
            self.log.clear()
            self.bytes_served = 0

    def requests(self, method: str | None = None, pattern: str = "") -> list[tuple[str, str, int, int]]:
        rx = re.compile(pattern)
        with self.lock:
            return [tuple(r) for r in self.log if (method is None or r[0] == method) and rx.search(r[1])]

    def head(self, repo_id: str, revision: str = "main") -> str | None:
        with self.lock:
            repo = self.repos.get(repo_id)
            return None if repo is None else repo.branches.get(revision)

    def tree(self, repo_id: str, revision: str = "main") -> dict[str, Blob]:
        with self.lock:
            commit = self.repos[repo_id].resolve(revision)
            assert commit is not None
            return dict(commit.files)

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        blob = self.tree(repo_id, revision)[path]
        return blob.data if blob.data is not None else blob.path.read_bytes()

    def lfs_store(self, repo_id: str) -> Path:
        return self.lfs_dir / repo_id.replace("/", "--")

    def lfs_objects(self, repo_id: str) -> set[str]:
        """sha256 of every LFS object uploaded to a repository (committed or not)."""
        d = self.lfs_store(repo_id)
        return {p.name for p in d.iterdir() if len(p.name) == 64} if d.exists() else set()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.method == method and f.remaining != 0 and f.pattern.search(path):
                    if f.remaining > 0:
                        f.remaining -= 1
                    return f
        return None

    # --- repository model --------------------------------------------------------------------------
    def _new_commit(self, repo: Repo, parent: str | None, title: str, files: dict[str, Blob]) -> str:
        oid = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{title}\0{uuid.uuid4()}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, title, files)
        return oid

    def _create_repo(self, repo_id: str, private: bool) -> None:
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", None, url=f"{self.url}/{repo_id}")
            repo = Repo(repo_id, private)
            ga = Blob(len(GITATTRIBUTES), git_blob_sha1(GITATTRIBUTES), data=GITATTRIBUTES)
            repo.branches["main"] = self._new_commit(repo, None, "initial commit", {".gitattributes": ga})
            self.repos[repo_id] = repo

    def _commit(self, repo: Repo, revision: str, lines: list[dict]) -> str:
        """Apply one NDJSON commit atomically: validate everything, then move the branch."""
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with self.lock:
            if revision not in repo.branches:
                raise HubError(404, f"Revision Not Found: {revision}", "RevisionNotFound")
            head = repo.branches[revision]
            parent = header.get("parentCommit")
            if parent and not head.startswith(parent):
                raise HubError(412, f"parent commit {parent} is not the head of {revision} ({head})")
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                key, v = line.get("key"), line.get("value", {})
                path = v.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise HubError(400, f"invalid path {path!r}")
                if key == "file":
                    if v.get("encoding") != "base64":
                        raise HubError(400, "regular files must be base64")
                    data = base64.b64decode(v["content"])
                    files[path] = Blob(len(data), git_blob_sha1(data), data=data)
                elif key == "lfsFile":
                    oid = v.get("oid", "")
                    obj = self.lfs_store(repo.repo_id) / oid
                    if (
                        v.get("algo") != "sha256"
                        or not re.fullmatch(r"[0-9a-f]{64}", oid)
                        or not obj.exists()
                    ):
                        raise HubError(422, f"LFS object {oid} for {path} was never uploaded")
                    size = obj.stat().st_size
                    if v.get("size", size) != size:
                        raise HubError(422, f"LFS object {oid} is {size} bytes, not {v['size']}")
                    files[path] = Blob(size, git_blob_sha1(lfs_pointer(oid, size)), sha256=oid, path=obj)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"cannot delete {path}: no such file", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            oid = self._new_commit(repo, head, header.get("summary", ""), files)
            repo.branches[revision] = oid
            return oid


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format, *args) -> None:  # noqa: A002 - silence the default stderr log
        pass

    # --- plumbing --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        entry = self._record(status)
        self.send_response(status)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        hdrs.setdefault("Content-Length", str(len(body)))
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self._write(entry, body)

    def _record(self, status: int) -> list:
        """Log a reply before any of it is sent, so a client never sees bytes the counters miss."""
        entry = [self.command, urlsplit(self.path).path, status, 0]
        with self.hub.lock:
            self.hub.log.append(entry)
        return entry

    def _write(self, entry: list, data: bytes) -> None:
        with self.hub.lock:
            entry[3] += len(data)
            self.hub.bytes_served += len(data)
        self.wfile.write(data)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, e: HubError) -> None:
        headers = {"X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        body = json.dumps({"error": e.message, **e.body}).encode()
        self._send(e.status, body, headers, head=self.command == "HEAD")

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _auth(self, write: bool) -> str | None:
        """The caller's access ('read'/'write') or None; a token the server does not know is a 401."""
        token = self._token()
        if token is None:
            if write:
                raise HubError(401, "You must be authenticated to do this (no token)")
            return None
        access = self.hub.tokens.get(token)
        if access is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if write and access != "write":
            raise HubError(403, "This token has no write access")
        return access

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        access = self._auth(write)
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and access is None):
            raise HubError(404, f"Repository Not Found for {repo_id}", "RepoNotFound")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Revision Not Found: {revision}", "RevisionNotFound")
        return commit

    def _dispatch(self) -> None:
        raw = urlsplit(self.path)
        segs = [unquote(s) for s in raw.path.split("/")[1:]]
        query = parse_qs(raw.query)
        fault = self.hub._take_fault(self.command, raw.path)
        if fault is not None and fault.action == "status":
            self._body()
            raise HubError(fault.value, f"injected fault ({fault.value})")
        if fault is not None and fault.action == "advance" and segs[:2] == ["api", "models"]:
            repo = self.hub.repos[f"{segs[2]}/{segs[3]}"]
            data = f"written by someone else ({len(repo.commits)})".encode()
            line = {"key": "file", "value": {"path": "concurrent.txt", "encoding": "base64"}}
            line["value"]["content"] = base64.b64encode(data).decode()
            self.hub._commit(repo, "main", [{"key": "header", "value": {"summary": "concurrent"}}, line])
        try:
            self._route(segs, query, fault)
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise HubError(400, f"bad request: {exc}") from None

    def _handle(self) -> None:
        try:
            self._dispatch()
        except HubError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = _handle  # noqa: N815

    # --- routes ----------------------------------------------------------------------------------
    def _route(self, s: list[str], query: dict, fault: Fault | None) -> None:
        hub, m = self.hub, self.command
        base = hub.url
        if m == "POST" and s[:3] == ["api", "repos", "create"]:
            body = json.loads(self._body() or b"{}")
            self._auth(write=True)
            if body.get("type", "model") != "model":
                raise HubError(400, "only model repositories are served here")
            name, org = body["name"], body.get("organization")
            repo_id = f"{org}/{name}" if org else f"user/{name}"
            private = body.get("private", body.get("visibility") == "private") or False
            hub._create_repo(repo_id, bool(private))
            return self._json(200, {"url": f"{base}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex})
        if m == "POST" and s[:2] == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(self._body()))
        if m == "GET" and s[:2] == ["api", "whoami-v2"]:
            self._auth(write=False)
            return self._json(
                200, {"type": "user", "name": "user", "auth": {"accessToken": {"role": "write"}}}
            )
        if len(s) >= 4 and s[:2] == ["api", "models"]:
            return self._api_models(s[2] + "/" + s[3], s[4:], query)
        if (
            len(s) >= 6
            and s[1].endswith(".git")
            and s[2:6] == ["info", "lfs", "objects", "batch"]
            and m == "POST"
        ):
            return self._lfs_batch(s[0] + "/" + s[1][: -len(".git")], json.loads(self._body()))
        if m == "PUT" and s[:2] == ["lfs", "upload"] and len(s) == 5:
            return self._lfs_put(s[2] + "/" + s[3], s[4])
        if m == "POST" and s[:2] == ["lfs", "verify"] and len(s) == 5:
            body = json.loads(self._body())
            obj = hub.lfs_store(s[2] + "/" + s[3]) / s[4]
            if not obj.exists() or obj.stat().st_size != body.get("size"):
                raise HubError(404, f"LFS object {s[4]} not found")
            return self._json(200, {"success": True})
        if m in ("GET", "HEAD") and len(s) >= 5 and s[2] == "resolve":
            return self._resolve(s[0] + "/" + s[1], s[3], "/".join(s[4:]), fault)
        raise HubError(404, f"no route for {m} {self.path}")

    def _validate_yaml(self, body: dict) -> None:
        text = body.get("content", "")
        errors: list[dict] = []
        if text.startswith("---"):
            end = text.find("\n---", 3)
            if end < 0:
                errors.append({"message": "unterminated metadata block"})
            else:
                try:
                    meta = yaml.safe_load(text[3:end])
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({"message": "metadata must be a mapping"})
                    elif meta:
                        for key in ("tags",):
                            if key in meta and not isinstance(meta[key], list):
                                errors.append({"message": f"'{key}' must be a list"})
                except yaml.YAMLError as exc:
                    errors.append({"message": f"invalid YAML: {exc}"})
        status = 400 if errors else 200
        self._send(status, json.dumps({"errors": errors, "warnings": []}).encode())

    def _api_models(self, repo_id: str, rest: list[str], query: dict) -> None:
        hub, m = self.hub, self.command
        if m == "GET" and (not rest or rest[0] == "revision"):
            repo = self._repo(repo_id)
            revision = rest[1] if rest else "main"
            commit = self._commit_of(repo, revision)
            siblings = []
            for path, b in sorted(commit.files.items()):
                sib: dict = {"rfilename": path}
                if query.get("blobs"):
                    sib.update(size=b.size, blobId=b.sha1)
                    if b.lfs:
                        sib["lfs"] = {
                            "size": b.size,
                            "sha256": b.sha256,
                            "pointerSize": len(lfs_pointer(b.sha256, b.size)),
                        }
                siblings.append(sib)
            return self._json(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit.oid,
                    "private": repo.private,
                    "siblings": siblings,
                    "tags": [],
                },
            )
        if m == "GET" and rest and rest[0] == "tree":
            repo = self._repo(repo_id)
            commit = self._commit_of(repo, rest[1])
            prefix = "/".join(rest[2:]).strip("/")
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            out, folders = [], set()
            for path, b in sorted(commit.files.items()):
                if prefix and not path.startswith(prefix + "/"):
                    continue
                rel = path[len(prefix) + 1 :] if prefix else path
                if "/" in rel and not recursive:
                    folders.add((prefix + "/" if prefix else "") + rel.split("/")[0])
                    continue
                entry: dict = {"type": "file", "oid": b.sha1, "size": b.size, "path": path}
                if b.lfs:
                    entry["lfs"] = {
                        "oid": b.sha256,
                        "size": b.size,
                        "pointerSize": len(lfs_pointer(b.sha256, b.size)),
                    }
                out.append(entry)
            out += [
                {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "path": f}
                for f in sorted(folders)
            ]
            return self._json(200, out)
        if m == "POST" and rest and rest[0] == "preupload":
            body = json.loads(self._body())
            repo = self._repo(repo_id, write=True)
            commit = self._commit_of(repo, rest[1])
            files = []
            for f in body["files"]:
                sample = base64.b64decode(f.get("sample", ""))
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_BYTES or b"\0" in sample
                cur = commit.files.get(f["path"])
                oid = None if cur is None else (cur.sha256 if lfs and cur.lfs else cur.sha1)
                files.append(
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
            return self._json(200, {"files": files, "commitOid": commit.oid})
        if m == "POST" and rest and rest[0] == "commit":
            data = self._body()
            repo = self._repo(repo_id, write=True)
            lines = [json.loads(x) for x in data.splitlines() if x.strip()]
            oid = hub._commit(repo, rest[1], lines)
            url = f"{hub.url}/{repo_id}/commit/{oid}"
            return self._json(
                200, {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None}
            )
        if m == "POST" and rest and rest[0] == "branch":
            body = json.loads(self._body() or b"{}")
            repo = self._repo(repo_id, write=True)
            branch = "/".join(rest[1:])
            with hub.lock:
                if branch in repo.branches:
                    raise HubError(409, f"Reference already exists: {branch}")
                start = self._commit_of(repo, body.get("startingPoint") or "main")
                repo.branches[branch] = start.oid
            return self._json(200, {})
        if m == "GET" and rest and rest[0] == "xet-write-token":
            raise HubError(501, "this test Hub speaks plain HTTP LFS only; set HF_HUB_DISABLE_XET=1")
        raise HubError(404, f"no route for {m} {self.path}")

    def _lfs_batch(self, repo_id: str, body: dict) -> None:
        repo = self._repo(repo_id, write=body.get("operation") == "upload")
        del repo
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(422, "only uploads with the basic transfer are supported")
        objects = []
        for o in body["objects"]:
            oid, size = o["oid"], int(o["size"])
            obj = self.hub.lfs_store(repo_id) / oid
            if obj.exists() and obj.stat().st_size == size:
                objects.append({"oid": oid, "size": size})
                continue
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{self.hub.url}/lfs/upload/{repo_id}/{oid}"},
                        "verify": {"href": f"{self.hub.url}/lfs/verify/{repo_id}/{oid}"},
                    },
                }
            )
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_put(self, repo_id: str, oid: str) -> None:
        """The upload URL the batch answer handed out (like a signed storage URL: no token needed)."""
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise HubError(400, "bad oid")
        store = self.hub.lfs_store(repo_id)
        store.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=store, prefix=".upload-")
        try:
            with open(fd, "wb") as f:
                data = self._body()
                h.update(data)
                f.write(data)
            if h.hexdigest() != oid:
                raise HubError(400, "uploaded content does not match its sha256")
            Path(tmp).replace(store / oid)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _resolve(self, repo_id: str, revision: str, path: str, fault: Fault | None) -> None:
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        blob = commit.files.get(path)
        headers = {"X-Repo-Commit": commit.oid}
        if blob is None:
            e = HubError(404, f"Entry Not Found: {path}", "EntryNotFound")
            self._send(404, b"", {**headers, "X-Error-Code": e.code, "X-Error-Message": e.message}, head=True)
            return
        grow = fault.value if fault is not None and fault.action == "grow" else 0
        size = blob.size + grow
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng:
            mm = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not mm or (mm.group(1) == "" and mm.group(2) == ""):
                raise HubError(416, f"bad range {rng}")
            if mm.group(1) == "":
                start = max(size - int(mm.group(2)), 0)
            else:
                start = int(mm.group(1))
                end = min(int(mm.group(2)), size - 1) if mm.group(2) else size - 1
            if start >= size or start > end:
                self._send(416, b"", {"Content-Range": f"bytes */{size}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers.update(
            {
                "ETag": f'"{fault.text if fault is not None and fault.action == "etag" else blob.etag}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
                "Content-Length": str(end - start + 1),
                "Content-Disposition": f'attachment; filename="{quote(path.rsplit("/", 1)[-1])}"',
            }
        )
        entry = self._record(status)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = end - start + 1
        if fault is not None and fault.action == "drop_after":
            limit = min(limit, fault.value)
        sent = 0
        src = blob.path
        if src is None:
            chunk = blob.data[start : start + limit]
            self._write(entry, self._maybe_corrupt(chunk, start, fault))
            sent = len(chunk)
        else:
            with open(src, "rb") as f:
                f.seek(start)
                while sent < limit:
                    chunk = f.read(min(1 << 20, limit - sent))
                    if not chunk:
                        break
                    self._write(entry, self._maybe_corrupt(chunk, start + sent, fault))
                    sent += len(chunk)
        while sent < limit and start + sent >= blob.size:  # "grow": zeros past the real end
            n = min(1 << 20, limit - sent)
            self._write(entry, bytes(n))
            sent += n
        if sent < end - start + 1:  # injected drop: cut the connection mid-body
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _maybe_corrupt(chunk: bytes, offset: int, fault: Fault | None) -> bytes:
        if fault is None or fault.action != "corrupt" or not offset <= fault.value < offset + len(chunk):
            return chunk
        b = bytearray(chunk)
        b[fault.value - offset] ^= 0xFF
        return bytes(b)
