"""A local stand-in for the Hugging Face Hub, for tests (loopback only).

It speaks the parts of the Hub HTTP API that `guidealign push` (huggingface_hub's
create_repo, its preupload call and create_commit over the LFS protocol, with Xet off) and
`datasets.load_dataset` (repo info, tree, paths-info, resolve with ranges) use:

  POST /api/repos/create
  POST /api/validate-yaml                                  (a card's metadata)
  GET  /api/{type}s/{ns}/{name}[/revision/{rev}]
  GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]      (?recursive=1)
  POST /api/{type}s/{ns}/{name}/paths-info/{rev}
  POST /api/{type}s/{ns}/{name}/preupload/{rev}            (upload mode; oid at the path: the
                                                           sha256 of an LFS file, else the blob id)
  POST /api/{type}s/{ns}/{name}/commit/{rev}               (NDJSON: header, file, lfsFile, deleted*)
  POST /{prefix}{ns}/{name}.git/info/lfs/objects/batch     (answers "already have it" for known oids)
  PUT  /_lfs/{oid}                                         (the upload href it hands out)
  HEAD/GET /{prefix}{ns}/{name}/resolve/{rev}/{path}       (Range supported)

State lives in memory (LFS objects on disk). Tests can require a token, inject faults
(e.g. HTTP 429 with Retry-After on the first N commits, or HTTP 500 on every commit after the
first) and make LFS uploads hang after a number of finished ones (to interrupt a push), and
they read the request log, the commits and the list of finished LFS uploads.

Run standalone: ``python tests/hubserver.py [port]``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
REGULAR_EXT = (".md", ".json", ".txt", ".yaml", ".yml", ".jinja", ".gitattributes")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    size: int
    oid: str                 # git blob oid (of the LFS pointer for LFS files)
    sha256: str | None = None  # LFS files: the object id
    data: bytes | None = None  # regular files: the content


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: list[tuple[str, str, dict]] = field(default_factory=list)  # (sha, title, files)

    @property
    def head(self) -> tuple[str, str, dict]:
        return self.commits[-1]


@dataclass
class Fault:
    method: str
    path_re: str
    status: int
    times: int
    headers: dict = field(default_factory=dict)
    after: int = 0  # matching requests let through before the fault starts


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n").encode()


class HubState:
    def __init__(self, root: Path, token: str | None = None):
        self.root = root
        self.blobs = root / "lfs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self.log: list[tuple[str, str, int]] = []
        self.faults: list[Fault] = []
        self.lfs_uploads: list[str] = []      # oids whose PUT finished and was stored
        self.hang_after: int | None = None   # PUTs beyond this many hang until release
        self.hanging = 0                     # PUTs currently held
        self.puts_started = 0
        self.release = threading.Event()
        self.seen_tokens: set[str] = set()

    # -- helpers -------------------------------------------------------------------------
    def lfs_has(self, oid: str, size: int | None = None) -> bool:
        p = self.blobs / oid
        return p.exists() and (size is None or p.stat().st_size == size)

    def new_commit(self, repo: Repo, title: str, files: dict) -> str:
        parent = repo.commits[-1][0] if repo.commits else ""
        blob = json.dumps([parent, title, sorted((k, v.oid) for k, v in files.items()), time.time()])
        sha = hashlib.sha1(blob.encode()).hexdigest()
        repo.commits.append((sha, title, files))
        return sha

    def resolve_rev(self, repo: Repo, rev: str) -> tuple[str, str, dict] | None:
        rev = unquote(rev)
        if rev in ("main", "HEAD"):
            return repo.head
        for c in repo.commits:
            if c[0] == rev:
                return c
        return None


class Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass

    def log_message(self, fmt, *args):  # quiet
        pass

    # -- plumbing ------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def _send(self, status: int, body=b"", headers: dict | None = None, ctype="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        with self.state.lock:
            self.state.log.append((self.command, self.path, status))

    def _error(self, status: int, msg: str, code: str | None = None):
        h = {"X-Error-Message": msg}
        if code:
            h["X-Error-Code"] = code
        self._send(status, {"error": msg}, h)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def _authorized(self) -> bool:
        tok = self._token()
        if tok:
            self.state.seen_tokens.add(tok)
        return self.state.token is None or tok == self.state.token

    def _fault(self) -> bool:
        with self.state.lock:
            for f in self.state.faults:
                if f.times > 0 and f.method == self.command and re.search(f.path_re, self.path):
                    if f.after > 0:
                        f.after -= 1
                        continue
                    f.times -= 1
                    hit = f
                    break
            else:
                return False
        self._body()
        self._send(hit.status, {"error": f"injected {hit.status}"}, hit.headers)
        return True

    def _repo(self, rtype: str, repo_id: str, write=False) -> Repo | None:
        """The repo, or None after sending 401/404 (the Hub's answer to a missing or private repo)."""
        if write and not self._authorized():
            self._error(401, "Invalid credentials", "RepoNotFound")
            return None
        repo = self.state.repos.get((rtype, repo_id))
        if repo is None or (repo.private and not self._authorized()):
            self._error(401 if repo is not None else 404, f"Repository {repo_id} not found",
                        "RepoNotFound")
            return None
        return repo

    # -- routing -------------------------------------------------------------------------
    API = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(revision|tree|paths-info|"
                     r"preupload|commit)/([^/]+)(/.*)?)?$")
    BATCH = re.compile(r"^/(datasets/|spaces/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
    RESOLVE = re.compile(r"^/(datasets/|spaces/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        if self._fault():
            return
        url = urlparse(self.path)
        m = self.API.match(url.path)
        if m:
            rtype = m.group(1)[:-1]
            if m.group(3) in (None, "revision"):
                return self.repo_info(rtype, m.group(2), m.group(4) or "main")
            if m.group(3) == "tree":
                q = parse_qs(url.query)
                return self.tree(rtype, m.group(2), m.group(4), unquote((m.group(5) or "").lstrip("/")),
                                 q.get("recursive", ["false"])[0].lower() in ("1", "true"))
        m = self.RESOLVE.match(url.path)
        if m:
            rtype = {"datasets/": "dataset", "spaces/": "space"}.get(m.group(1) or "", "model")
            return self.resolve(rtype, m.group(2), m.group(3), unquote(m.group(4)))
        if url.path == "/api/whoami-v2":
            if not self._authorized() or not self._token():
                return self._error(401, "Invalid credentials")
            return self._send(200, {"type": "user", "name": "tester", "auth": {}})
        self._error(404, f"no route GET {url.path}")

    def do_POST(self):
        if self._fault():
            return
        url = urlparse(self.path)
        if url.path == "/api/repos/create":
            return self.create_repo(json.loads(self._body() or b"{}"))
        if url.path == "/api/validate-yaml":
            return self.validate_yaml(json.loads(self._body() or b"{}"))
        m = self.BATCH.match(url.path)
        if m:
            rtype = {"datasets/": "dataset", "spaces/": "space"}.get(m.group(1) or "", "model")
            return self.lfs_batch(rtype, m.group(2), json.loads(self._body()))
        m = self.API.match(url.path)
        if m and m.group(3) in ("paths-info", "preupload", "commit"):
            rtype, repo_id, rev = m.group(1)[:-1], m.group(2), m.group(4)
            body = self._body()
            if m.group(3) == "paths-info":
                return self.paths_info(rtype, repo_id, rev, body)
            if m.group(3) == "preupload":
                return self.preupload(rtype, repo_id, rev, json.loads(body))
            return self.commit(rtype, repo_id, rev, body)
        self._body()
        self._error(404, f"no route POST {url.path}")

    def do_PUT(self):
        if self._fault():
            return
        url = urlparse(self.path)
        m = re.match(r"^/_lfs/([0-9a-f]{64})$", url.path)
        if not m:
            self._body()
            return self._error(404, f"no route PUT {url.path}")
        return self.lfs_put(m.group(1))

    # -- endpoints -----------------------------------------------------------------------
    def create_repo(self, payload: dict):
        if not self._authorized() or not self._token():
            return self._error(401, "Invalid credentials")
        name, org = payload.get("name"), payload.get("organization")
        rtype = payload.get("type") or "model"
        repo_id = f"{org}/{name}" if org else f"tester/{name}"
        private = payload.get("private")
        if private is None:
            private = payload.get("visibility", "public") != "public"
        url = f"http://{self.headers['Host']}/{PREFIX[rtype]}{repo_id}"
        with self.state.lock:
            if (rtype, repo_id) in self.state.repos:
                return self._send(409, {"error": "You already created this repo", "url": url},
                                  {"X-Error-Message": "You already created this repo"})
            repo = Repo(repo_id, rtype, bool(private))
            ga = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            self.state.new_commit(repo, "initial commit",
                                  {".gitattributes": Entry(len(ga), git_blob_oid(ga), data=ga)})
            self.state.repos[(rtype, repo_id)] = repo
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, payload: dict):
        """The card's YAML metadata must parse to a mapping (the Hub checks much more)."""
        import yaml

        content = payload.get("content", "")
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
            meta = meta or {}
            if not isinstance(meta, dict):
                raise ValueError("metadata must be a mapping")
        except (yaml.YAMLError, ValueError) as e:
            return self._send(400, {"errors": [{"message": str(e)}]})
        self._send(200, {"errors": [], "warnings": []})

    def repo_info(self, rtype, repo_id, rev):
        repo = self._repo(rtype, repo_id)
        if repo is None:
            return
        c = self.state.resolve_rev(repo, rev)
        if c is None:
            return self._error(404, f"Revision {rev} not found", "RevisionNotFound")
        sha, _, files = c
        self._send(200, {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id,
            "author": repo_id.split("/")[0], "sha": sha, "private": repo.private, "disabled": False,
            "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p} for p in sorted(files)], "cardData": {},
        })

    @staticmethod
    def _file_json(path: str, e: Entry) -> dict:
        d = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
        if e.sha256:
            d["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
        return d

    def _listing(self, files: dict, base: str, recursive: bool) -> list[dict] | None:
        base = base.strip("/")
        pre = base + "/" if base else ""
        out, dirs = [], set()
        for p in sorted(files):
            if not p.startswith(pre):
                continue
            rest = p[len(pre):]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                d = pre + "/".join(parts[:i])
                if (recursive or i == 1) and d not in dirs:
                    dirs.add(d)
                    out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(),
                                "size": 0, "path": d})
            if recursive or len(parts) == 1:
                out.append(self._file_json(p, files[p]))
        if base and not out:
            return None
        return out

    def tree(self, rtype, repo_id, rev, path, recursive):
        repo = self._repo(rtype, repo_id)
        if repo is None:
            return
        c = self.state.resolve_rev(repo, rev)
        if c is None:
            return self._error(404, f"Revision {rev} not found", "RevisionNotFound")
        listing = self._listing(c[2], path, recursive)
        if listing is None:
            return self._error(404, f"{path} not found", "EntryNotFound")
        self._send(200, listing)

    def paths_info(self, rtype, repo_id, rev, body: bytes):
        repo = self._repo(rtype, repo_id)
        if repo is None:
            return
        c = self.state.resolve_rev(repo, rev)
        if c is None:
            return self._error(404, f"Revision {rev} not found", "RevisionNotFound")
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        files, out = c[2], []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(self._file_json(p, files[p]))
            elif any(f.startswith(p + "/") for f in files) or p == "":
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(),
                            "size": 0, "path": p})
        self._send(200, out)

    def preupload(self, rtype, repo_id, rev, payload):
        repo = self._repo(rtype, repo_id, write=True)
        if repo is None:
            return
        c = self.state.resolve_rev(repo, rev)
        files = c[2] if c else {}
        out = []
        for f in payload.get("files", []):
            regular = f["path"].endswith(REGULAR_EXT) and f["size"] < 10 << 20
            e = files.get(f["path"])
            oid = (e.sha256 or e.oid) if e else None  # as the Hub: an LFS file's oid is its sha256
            out.append({"path": f["path"], "uploadMode": "regular" if regular else "lfs",
                        "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": out, "commitOid": c[0] if c else None})

    def lfs_batch(self, rtype, repo_id, payload):
        repo = self._repo(rtype, repo_id, write=True)
        if repo is None:
            return
        host = f"http://{self.headers['Host']}"
        objs = []
        for o in payload.get("objects", []):
            oid, size = o["oid"], o["size"]
            if self.state.lfs_has(oid, size):
                objs.append({"oid": oid, "size": size})  # already there: nothing to upload
            else:
                objs.append({"oid": oid, "size": size, "authenticated": True,
                             "actions": {"upload": {"href": f"{host}/_lfs/{oid}", "header": {}}}})
        self._send(200, {"transfer": "basic", "objects": objs, "hash_algo": "sha256"},
                   ctype="application/vnd.git-lfs+json")

    def lfs_put(self, oid: str):
        st = self.state
        with st.lock:
            # PUTs run in parallel: count them as they start, so that exactly hang_after go through.
            hang = st.hang_after is not None and st.puts_started >= st.hang_after
            st.puts_started += 1
            if hang:
                st.hanging += 1
        if hang:
            # An interrupted upload: held until the test releases it, then dropped unstored.
            st.release.wait()
            with st.lock:
                st.hanging -= 1
            self.close_connection = True
            try:
                self._error(503, "upload aborted")
            except OSError:
                pass
            return
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "sha256 mismatch")
        tmp = st.blobs / f".{oid}.{threading.get_ident()}"
        tmp.write_bytes(data)
        tmp.replace(st.blobs / oid)
        with st.lock:
            st.lfs_uploads.append(oid)
        self._send(200, b"", ctype="text/plain")

    def commit(self, rtype, repo_id, rev, body: bytes):
        repo = self._repo(rtype, repo_id, write=True)
        if repo is None:
            return
        with self.state.lock:
            c = self.state.resolve_rev(repo, rev)
            if c is None:
                return self._error(404, f"Revision {rev} not found", "RevisionNotFound")
            files = dict(c[2])
            title = ""
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, v = item["key"], item["value"]
                if key == "header":
                    title = v.get("summary", "")
                    parent = v.get("parentCommit")
                    if parent and parent != c[0]:
                        return self._error(412, "parent commit is not the head")
                elif key == "file":
                    data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" \
                        else v["content"].encode()
                    files[v["path"]] = Entry(len(data), git_blob_oid(data), data=data)
                elif key == "lfsFile":
                    oid = v["oid"]
                    p = self.state.blobs / oid
                    if not p.exists():
                        return self._error(422, f"LFS object {oid} of {v['path']} was never uploaded")
                    size = p.stat().st_size
                    files[v["path"]] = Entry(size, git_blob_oid(lfs_pointer(oid, size)), sha256=oid)
                elif key == "deletedFile":
                    files.pop(v["path"], None)
                elif key == "deletedFolder":
                    pre = v["path"].rstrip("/") + "/"
                    for k in [k for k in files if k.startswith(pre)]:
                        files.pop(k)
                else:
                    return self._error(400, f"unknown commit key {key}")
            sha = self.state.new_commit(repo, title, files)
        host = f"http://{self.headers['Host']}"
        self._send(200, {"success": True, "commitOid": sha,
                         "commitUrl": f"{host}/{PREFIX[rtype]}{repo_id}/commit/{sha}"})

    def resolve(self, rtype, repo_id, rev, path):
        repo = self._repo(rtype, repo_id)
        if repo is None:
            return
        c = self.state.resolve_rev(repo, rev)
        if c is None:
            return self._error(404, f"Revision {rev} not found", "RevisionNotFound")
        e = c[2].get(path)
        if e is None:
            return self._error(404, f"Entry {path} not found", "EntryNotFound")
        data = e.data if e.data is not None else (self.state.blobs / e.sha256).read_bytes()
        headers = {"X-Repo-Commit": c[0], "ETag": f'"{e.oid}"', "Accept-Ranges": "bytes",
                   "Last-Modified": formatdate(usegmt=True)}
        if e.sha256:
            headers.update({"X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size)})
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and self.command == "GET":
            a, _, b = rng[6:].split(",")[0].partition("-")
            if a == "":
                start, end = max(0, len(data) - int(b)), len(data) - 1
            else:
                start, end = int(a), (int(b) if b else len(data) - 1)
            end = min(end, len(data) - 1)
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers, ctype="application/octet-stream")
        self._send(200, data, headers, ctype="application/octet-stream")


class HubServer:
    """``with HubServer(token="t") as hub: ...`` -> hub.endpoint, hub.state."""

    def __init__(self, token: str | None = None, root: str | Path | None = None, port: int = 0):
        self._tmp = None if root else tempfile.mkdtemp(prefix="fakehub-")
        self.state = HubState(Path(root or self._tmp), token=token)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- test conveniences ---------------------------------------------------------------
    def fail(self, method: str, path_re: str, status: int, times: int, after: int = 0,
             **headers) -> None:
        """Answer ``status`` (with ``headers``, ``_`` read as ``-``) to the next ``times``
        requests matching method and path, after letting ``after`` of them through."""
        self.state.faults.append(Fault(method, path_re, status, times,
                                       {k.replace("_", "-"): v for k, v in headers.items()}, after))

    def commits(self, repo_id: str, repo_type: str = "dataset") -> list[tuple[str, str, dict]]:
        """The repo's commits, oldest first: (sha, title, files)."""
        return list(self.state.repos[(repo_type, repo_id)].commits)

    def files(self, repo_id: str, repo_type: str = "dataset") -> dict[str, Entry]:
        return dict(self.state.repos[(repo_type, repo_id)].head[2])

    def content(self, repo_id: str, path: str, repo_type: str = "dataset") -> bytes:
        e = self.files(repo_id, repo_type)[path]
        return e.data if e.data is not None else (self.state.blobs / e.sha256).read_bytes()

    def requests(self, method: str | None = None, pattern: str = "") -> list[tuple[str, str, int]]:
        with self.state.lock:
            return [r for r in self.state.log
                    if (method is None or r[0] == method) and re.search(pattern, r[1])]


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    srv = HubServer(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0).start()
    print(f"fake hub on {srv.endpoint}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.stop()
