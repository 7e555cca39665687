"""A Hugging Face Hub on loopback: the Hub HTTP API subset that the client libraries call.

Why this exists: tests of pushing and loading checkpoints, dataset streaming and model cards must
run without the network, but they should still exercise the real client code paths
(``HfApi.create_repo``/``upload_folder``, ``PreTrainedModel.push_to_hub``/``from_pretrained``,
``Dataset.push_to_hub``/``load_dataset(..., streaming=True)``, ``ModelCard.load``). No package on
PyPI serves that API offline with writes, 404 error codes and Range requests, so this module
implements it with the standard library only, from memory, on ``127.0.0.1``.

It imports nothing from huggingface_hub, transformers or datasets on purpose: those libraries read
``HF_ENDPOINT`` once at import time, so the server has to be running (and its URL known) before a
client library is imported. Run the clients in a subprocess whose environment comes from
:func:`poyo_hf.testing.hub_env.hub_environment`, or set that environment before their first import.

Routes served (what huggingface_hub 2.4, datasets 5.2 and transformers 5.23 call):

* ``GET /api/whoami-v2``, ``GET /api/agent-harnesses``, ``POST /api/validate-yaml``
* ``POST /api/repos/create`` (existing repo: 409 whose JSON still has ``url``),
  ``DELETE /api/repos/delete``, ``POST /api/repos/move``
* ``GET /api/{models|datasets|spaces|kernels}`` (listing, ``author``/``search`` filters)
* ``GET /api/{type}s/{repo_id}[/revision/{rev}]``: id, sha, siblings, lastModified, private ...
* ``GET /api/{type}s/{repo_id}/tree/{rev}[/{path}]`` (``recursive``, ``expand``),
  ``POST /api/{type}s/{repo_id}/paths-info/{rev}`` (form or JSON body)
* ``POST /api/{type}s/{repo_id}/preupload/{rev}``, ``POST /api/{type}s/{repo_id}/commit/{rev}``
  (NDJSON ``header``/``file``/``lfsFile``/``deletedFile``/``deletedFolder``, ``parentCommit``,
  ``create_pr``)
* ``GET /api/{type}s/{repo_id}/refs``, ``GET /api/{type}s/{repo_id}/commits/{rev}``,
  ``POST|DELETE /api/{type}s/{repo_id}/branch/{name}``, ``POST /api/{type}s/{repo_id}/tag/{rev}``,
  ``DELETE /api/{type}s/{repo_id}/tag/{name}``, ``PUT /api/{type}s/{repo_id}/settings``
* ``POST /{prefix}{repo_id}.git/info/lfs/objects/batch`` (basic transfer), then
  ``PUT /_lfs/{sha256}`` with the bytes (``GET /_lfs/{sha256}`` for downloads)
* ``HEAD|GET /{prefix}{repo_id}/resolve/{rev}/{path}`` (also ``/raw/``) with ``X-Repo-Commit``,
  a quoted ``ETag``, ``Content-Length`` and ``Range`` (206 + ``Content-Range``, 416 past the end)

Errors carry the ``X-Error-Code`` header the clients map to exceptions: ``RepoNotFound`` ->
``RepositoryNotFoundError``, ``RevisionNotFound`` -> ``RevisionNotFoundError``, ``EntryNotFound``
-> ``EntryNotFoundError``.

Repo ids: ``namespace/name`` as on the Hub. A bare ``name`` (``"poyo-1"``) is served too, as an
alias of ``{user}/{name}`` where ``user`` is the account ``whoami`` reports. Aliasing (rather than
storing single-segment repos) is needed because huggingface_hub parses the URLs the server
returns from ``create_repo`` and ``commit`` and rejects single-segment repo URLs; with the alias,
``push_to_hub("poyo-1")`` lands in ``tester/poyo-1`` (as on the real Hub) and
``from_pretrained("poyo-1")`` reads it back.

Fault injection: ``hub.refuse_writes = True`` answers every write (create, delete, preupload,
LFS batch and PUT, commit, branches, tags, settings) with ``hub.refuse_status`` (403 by default:
a 5xx would make the clients retry with back-off for several seconds before failing), and
``hub.fault_hook`` can fail any request.

Usage::

    from poyo_hf.testing.hub_server import serve_hub

    with serve_hub() as server:          # server.url == "http://127.0.0.1:<port>"
        server.hub.create_repo("tester/seeded")
        server.hub.commit("tester/seeded", {"config.json": b"{}"})
        ...  # run clients with HF_ENDPOINT=server.url (see hub_env.hub_environment)

or from a shell (prints the URL on the first line, serves until killed)::

    python -m poyo_hf.testing.hub_server --port 0
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import itertools
import json
import mimetypes
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "HubError",
    "HubServer",
    "LoopbackHub",
    "main",
    "serve_hub",
    "start_hub",
]

REPO_TYPES: tuple[str, ...] = ("model", "dataset", "space", "kernel")
"""Repo types the Hub knows; the URL prefix of each is in ``_URL_PREFIX``."""

_API_PLURAL: dict[str, str] = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_URL_PREFIX: dict[str, str] = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}

# Sub-routes of /api/{type}s/{repo_id}/...; used to tell a bare id from namespace/name in a path.
_REPO_ACTIONS = frozenset(
    {"revision", "tree", "paths-info", "preupload", "commit", "refs", "commits", "branch", "tag", "settings"}
)
# Sub-routes of /{prefix}{repo_id}/... that serve file bytes.
_FILE_ACTIONS = frozenset({"resolve", "raw"})

# Files the Hub stores through LFS whatever their size (its default .gitattributes), so a small
# safetensors or parquet file takes the same LFS path as a large one.
# fmt: off
_LFS_SUFFIXES: tuple[str, ...] = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gz", ".h5", ".joblib", ".lz4", ".mlmodel",
    ".model", ".msgpack", ".nwb", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle",
    ".pkl", ".pt", ".pth", ".rar", ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz",
    ".zip", ".zst",
)
# fmt: on

_DEFAULT_GITATTRIBUTES = "".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in _LFS_SUFFIXES
).encode()

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HEX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_LFS_BATCH_RE = re.compile(r"^/(?:(datasets|spaces|kernels)/)?(.+)\.git/info/lfs/objects/batch$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


# --------------------------------------------------------------------------------------------
# Storage model
# --------------------------------------------------------------------------------------------


class HubError(Exception):
    """An HTTP error answer, with the ``X-Error-Code`` the Hub clients turn into exceptions.

    Args:
        status: HTTP status code.
        message: human-readable message (JSON ``error`` field and ``X-Error-Message`` header).
        code: ``X-Error-Code`` header value (``RepoNotFound``, ``RevisionNotFound``,
            ``EntryNotFound``) or ``None``.
        headers: extra response headers (``X-Repo-Commit`` on a missing file, for example).
        payload: extra JSON fields (the ``url`` of an already existing repo, for example).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.payload = dict(payload or {})


@dataclass(frozen=True)
class _Blob:
    """Metadata of one stored file version; the bytes live in ``LoopbackHub._blobs[sha256]``."""

    sha256: str
    content_sha1: str  # git blob sha1 of the content: what the client hashes for "regular" files
    size: int
    lfs: bool

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file git would store in place of an LFS file."""
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n").encode()

    @property
    def git_oid(self) -> str:
        """The git blob id: of the content for regular files, of the pointer for LFS files."""
        return _git_sha1(self.pointer) if self.lfs else self.content_sha1

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag: git blob id for regular files, sha256 for LFS files."""
        return self.sha256 if self.lfs else self.content_sha1


@dataclass(frozen=True)
class _Commit:
    oid: str
    parent: str | None
    files: Mapping[str, _Blob]
    title: str
    message: str
    date: float


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: float
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch name or "refs/pr/N" -> commit oid
    tags: dict[str, str] = field(default_factory=dict)


def _git_sha1(data: bytes) -> str:
    """Git's blob id: sha1 over ``b"blob <size>\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(ts: float) -> str:
    """Timestamp in the Hub's JSON format, e.g. ``2024-05-01T12:00:00.000Z``."""
    moment = _dt.datetime.fromtimestamp(ts, tz=_dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _check_path(path: str) -> str:
    """Reject paths a git tree cannot hold (the client validates too; the server must not trust it)."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


# --------------------------------------------------------------------------------------------
# HTTP request / response values (kept free of socket code so the routing is easy to follow)
# --------------------------------------------------------------------------------------------


@dataclass
class _Request:
    method: str
    path: str  # still percent-encoded: segments are split first, then unquoted
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    base_url: str

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except json.JSONDecodeError as exc:
            raise HubError(400, f"Body is not valid JSON: {exc}") from None

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        """Query booleans arrive as ``True``, ``true`` or ``1`` depending on the client."""
        value = self.arg(name)
        return value is not None and value.lower() in ("1", "true", "yes")


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json; charset=utf-8"

    @classmethod
    def of_json(cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
        return cls(status=status, body=json.dumps(payload).encode(), headers=dict(headers or {}))


# --------------------------------------------------------------------------------------------
# The Hub
# --------------------------------------------------------------------------------------------


class LoopbackHub:
    """In-memory Hub state (repos, commits, refs, blobs) and the HTTP routes that expose it.

    All state lives in memory: blobs are stored once per sha256 and shared between commits, so a
    test pushing a model twice holds each weight file once. Every public method and every HTTP
    request takes one lock, which makes the hub safe under ``ThreadingHTTPServer`` and under the
    clients' parallel LFS uploads.

    Args:
        user: account name reported by ``whoami`` and namespace of bare repo ids.
        lfs_threshold: files larger than this (bytes) are asked to go through LFS in
            ``preupload``; binary files (a NUL byte in the first 512 bytes) and files with an LFS
            suffix (``.safetensors``, ``.parquet`` ...) always are, as on the Hub.
        refuse_writes: answer every write with ``refuse_status`` (see the module docstring).
        refuse_status: status code of refused writes; keep it 4xx unless a test wants to see the
            clients' retries (they retry 429 and 5xx with back-off).

    Attributes:
        fault_hook: optional ``(method, path) -> status | None``; a status fails that request.
        requests: the last requests served, as ``(method, path_with_query, status)``; useful to
            assert what a client actually called.
        server_errors: tracebacks of unexpected exceptions in the server (answered with 500).
    """

    def __init__(
        self,
        *,
        user: str = "tester",
        lfs_threshold: int = 1 << 20,
        refuse_writes: bool = False,
        refuse_status: int = 403,
    ) -> None:
        if not _NAME_RE.match(user):
            raise ValueError(f"user={user!r} is not a valid Hub account name (letters, digits, '-', '_', '.').")
        self.user = user
        self.lfs_threshold = lfs_threshold
        self.refuse_writes = refuse_writes
        self.refuse_status = refuse_status
        self.fault_hook: Callable[[str, str], int | None] | None = None
        self.requests: deque[tuple[str, str, int]] = deque(maxlen=10_000)
        self.server_errors: list[str] = []
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._commit_counter = 0

    # ---------------------------------------------------------------- python API (test seeding)

    def canonical_id(self, repo_id: str) -> str:
        """``namespace/name`` for ``repo_id``; a bare ``name`` maps to ``{user}/{name}``."""
        repo_id = repo_id.strip("/")
        parts = repo_id.split("/")
        if len(parts) == 1:
            parts = [self.user, parts[0]]
        if len(parts) != 2 or not all(_NAME_RE.match(part) for part in parts):
            raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'name' or 'namespace/name'.")
        return "/".join(parts)

    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = False
    ) -> str:
        """Create a repo with an initial ``.gitattributes`` commit (as the Hub does); returns its id.

        Raises:
            HubError: 409 if it exists and ``exist_ok`` is false; 400 for a bad id or type.
        """
        self._check_type(repo_type)
        canonical = self.canonical_id(repo_id)
        with self._lock:
            existing = self._repos.get((repo_type, canonical))
            if existing is not None:
                if exist_ok:
                    return canonical
                raise HubError(
                    409,
                    f"You already created this {repo_type} repo: {canonical}",
                    payload={"url": f"/{_URL_PREFIX[repo_type]}{canonical}"},
                )
            now = time.time()
            repo = _Repo(repo_type=repo_type, repo_id=canonical, private=private, created_at=now)
            self._repos[(repo_type, canonical)] = repo
            initial = self._new_commit(
                parent=None,
                files={".gitattributes": self._store(_DEFAULT_GITATTRIBUTES, lfs=False)},
                title="initial commit",
                message="",
            )
            repo.commits[initial.oid] = initial
            repo.refs["main"] = initial.oid
        return canonical

    def delete_repo(self, repo_id: str, *, repo_type: str = "model", missing_ok: bool = False) -> None:
        """Forget a repo (its blobs stay, as they may be shared)."""
        with self._lock:
            key = (repo_type, self.canonical_id(repo_id))
            if key not in self._repos:
                if missing_ok:
                    return
                raise self._repo_not_found(repo_type, repo_id)
            del self._repos[key]

    def repo_exists(self, repo_id: str, *, repo_type: str = "model") -> bool:
        """Whether the repo exists (a bare id checks `{user}/{name}`)."""
        with self._lock:
            return (repo_type, self.canonical_id(repo_id)) in self._repos

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | Path] | None = None,
        *,
        deletions: Sequence[str] = (),
        repo_type: str = "model",
        revision: str = "main",
        message: str = "Upload files",
        lfs: bool | None = None,
    ) -> str:
        """Commit ``files`` (path in repo -> bytes, text, or a local file to read) and return the oid.

        ``lfs=None`` stores each file the way ``preupload`` would ask a client to upload it.
        Paths in ``deletions`` ending in ``/`` delete a folder. Ignores ``refuse_writes``: it is
        the test's own back door for seeding a hub.
        """
        additions: dict[str, _Blob] = {}
        for path, content in (files or {}).items():
            data = content.read_bytes() if isinstance(content, Path) else content
            data = data.encode() if isinstance(data, str) else data
            use_lfs = self._wants_lfs(path, len(data), data[:512]) if lfs is None else lfs
            additions[_check_path(path)] = self._store(data, lfs=use_lfs)
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            ops: list[tuple[str, str, _Blob | None]] = [("add", p, b) for p, b in additions.items()]
            ops += [("deleteFolder" if d.endswith("/") else "delete", d.rstrip("/"), None) for d in deletions]
            return self._apply(repo, revision, ops, title=message, message="").oid

    def upload_folder(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        path_in_repo: str = "",
        repo_type: str = "model",
        revision: str = "main",
        message: str = "Upload folder",
    ) -> str:
        """Commit every file under ``folder`` (recursively); returns the commit oid."""
        root = Path(folder)
        prefix = path_in_repo.strip("/")
        files: dict[str, bytes | str | Path] = {
            "/".join(filter(None, [prefix, p.relative_to(root).as_posix()])): p
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }
        return self.commit(repo_id, files, repo_type=repo_type, revision=revision, message=message)

    def read_file(self, repo_id: str, path: str, *, repo_type: str = "model", revision: str = "main") -> bytes:
        """Bytes of ``path`` at ``revision`` (raises ``HubError`` 404 like the HTTP route)."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            commit = self._resolve(repo, revision)
            blob = commit.files.get(path)
            if blob is None:
                raise HubError(404, f"Entry not found: {path}", code="EntryNotFound")
            return self._blobs[blob.sha256]

    def list_files(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Sorted paths of all files at ``revision``."""
        with self._lock:
            return sorted(self._resolve(self._get_repo(repo_type, repo_id), revision).files)

    def list_commits(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Commit oids reachable from ``revision``, newest first."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return [c.oid for c in self._history(repo, self._resolve(repo, revision))]

    def create_branch(self, repo_id: str, branch: str, *, repo_type: str = "model", revision: str = "main") -> None:
        """Point a new branch at ``revision`` (409 if it exists)."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            if branch in repo.refs:
                raise HubError(409, f"Reference {branch} already exists")
            repo.refs[branch] = self._resolve(repo, revision).oid

    # ---------------------------------------------------------------- internals: storage

    @staticmethod
    def _check_type(repo_type: str) -> None:
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}; expected one of {REPO_TYPES}.")

    def _wants_lfs(self, path: str, size: int, sample: bytes) -> bool:
        """The Hub's rule, simplified: LFS for big files, binary files and LFS suffixes."""
        if size == 0:
            return False  # the client uploads empty files as regular files whatever we say
        return size > self.lfs_threshold or b"\0" in sample or path.lower().endswith(_LFS_SUFFIXES)

    def _store(self, data: bytes, *, lfs: bool) -> _Blob:
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            self._blobs.setdefault(sha, data)
        return _Blob(sha256=sha, content_sha1=_git_sha1(data), size=len(data), lfs=lfs)

    def _new_commit(self, *, parent: str | None, files: Mapping[str, _Blob], title: str, message: str) -> _Commit:
        self._commit_counter += 1
        seed = json.dumps(
            [parent, sorted((p, b.sha256) for p, b in files.items()), title, self._commit_counter, uuid.uuid4().hex]
        )
        return _Commit(
            oid=hashlib.sha1(seed.encode()).hexdigest(),
            parent=parent,
            files=dict(files),
            title=title,
            message=message,
            date=time.time(),
        )

    def _repo_not_found(self, repo_type: str, repo_id: str) -> HubError:
        return HubError(404, f"Repository not found: {repo_type} {repo_id}", code="RepoNotFound")

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        try:
            canonical = self.canonical_id(repo_id)
        except HubError:
            raise self._repo_not_found(repo_type, repo_id) from None
        repo = self._repos.get((repo_type, canonical))
        if repo is None:
            raise self._repo_not_found(repo_type, repo_id)
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        """A branch, ``refs/heads/x``, a tag, ``refs/pr/N``, a full commit oid or a unique prefix."""
        candidates = [revision]
        for prefix in ("refs/heads/", "refs/tags/"):
            if revision.startswith(prefix):
                candidates.append(revision[len(prefix) :])
        for name in candidates:
            if name in repo.refs:
                return repo.commits[repo.refs[name]]
            if name in repo.tags:
                return repo.commits[repo.tags[name]]
        if revision in repo.commits:
            return repo.commits[revision]
        if _HEX_RE.match(revision):
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return repo.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _history(self, repo: _Repo, head: _Commit) -> list[_Commit]:
        out: list[_Commit] = []
        commit: _Commit | None = head
        while commit is not None:
            out.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return out

    def _writable_ref(self, repo: _Repo, revision: str) -> str:
        """Commits go to a branch (or ``refs/pr/N``), never to a bare commit oid."""
        name = revision.removeprefix("refs/heads/")
        if name in repo.refs:
            return name
        raise HubError(404, f"Invalid rev id: {revision} (commits go to an existing branch)", code="RevisionNotFound")

    def _apply(
        self,
        repo: _Repo,
        revision: str,
        ops: Sequence[tuple[str, str, _Blob | None]],
        *,
        title: str,
        message: str,
        parent_commit: str | None = None,
    ) -> _Commit:
        """Apply add/delete/deleteFolder operations on top of a branch head; caller holds the lock."""
        ref = self._writable_ref(repo, revision)
        head = repo.commits[repo.refs[ref]]
        if parent_commit is not None and parent_commit != head.oid:
            # The Hub answers 412 so that clients (datasets' push_to_hub) can re-read and retry.
            raise HubError(412, f"Parent commit {parent_commit} is not the head of {ref} ({head.oid})")
        files = dict(head.files)
        for op, path, blob in ops:
            if op == "add":
                assert blob is not None
                files[path] = blob
            elif op == "delete":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
            else:  # deleteFolder
                prefix = path.rstrip("/") + "/"
                for existing in [p for p in files if p.startswith(prefix)]:
                    del files[existing]
        commit = self._new_commit(parent=head.oid, files=files, title=title, message=message)
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit

    def _last_commit_touching(self, repo: _Repo, head: _Commit, path: str, is_dir: bool) -> _Commit:
        """Newest commit in ``head``'s history that changed ``path`` (for ``expand=True``)."""

        def state(commit: _Commit) -> Any:
            if not is_dir:
                blob = commit.files.get(path)
                return blob.sha256 if blob else None
            prefix = path + "/"
            return sorted((p, b.sha256) for p, b in commit.files.items() if p.startswith(prefix))

        history = self._history(repo, head)
        for commit, parent in itertools.pairwise(history):
            if state(commit) != state(parent):
                return commit
        return history[-1]

    # ---------------------------------------------------------------- JSON views

    def _repo_url(self, base_url: str, repo: _Repo) -> str:
        return f"{base_url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _file_entry(self, repo: _Repo, head: _Commit, path: str, blob: _Blob, expand: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
        if expand:
            entry["lastCommit"] = self._commit_ref(self._last_commit_touching(repo, head, path, False))
        return entry

    def _dir_entry(self, repo: _Repo, head: _Commit, path: str, expand: bool) -> dict[str, Any]:
        prefix = path + "/"
        listing = sorted((p, b.git_oid) for p, b in head.files.items() if p.startswith(prefix))
        entry: dict[str, Any] = {
            "type": "directory",
            "oid": hashlib.sha1(json.dumps(listing).encode()).hexdigest(),
            "size": 0,
            "path": path,
        }
        if expand:
            entry["lastCommit"] = self._commit_ref(self._last_commit_touching(repo, head, path, True))
        return entry

    @staticmethod
    def _commit_ref(commit: _Commit) -> dict[str, Any]:
        return {"id": commit.oid, "title": commit.title, "date": _iso(commit.date)}

    def _repo_info(self, repo: _Repo, head: _Commit, base_url: str, with_siblings: bool = True) -> dict[str, Any]:
        namespace = repo.repo_id.split("/")[0]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": namespace,
            "sha": head.oid,
            "lastModified": _iso(head.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "usedStorage": sum(b.size for b in head.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if repo.repo_type == "space":
            info["sdk"] = None
        if with_siblings:
            info["siblings"] = [
                {
                    "rfilename": path,
                    "size": blob.size,
                    "blobId": blob.git_oid,
                    **(
                        {"lfs": {"sha256": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}}
                        if blob.lfs
                        else {}
                    ),
                }
                for path, blob in sorted(head.files.items())
            ]
        return info

    # ---------------------------------------------------------------- HTTP routing

    def handle(self, req: _Request) -> _Response:
        """Answer one HTTP request (thread-safe); errors come back as ``HubError`` answers.

        A bug in the server becomes a 500 whose message names the exception (and is kept in
        ``server_errors``) rather than a dropped connection, which the clients would retry.
        """
        try:
            if self.fault_hook is not None:
                status = self.fault_hook(req.method, req.path)
                if status is not None:
                    raise HubError(status, f"Injected fault for {req.method} {req.path}")
            try:
                with self._lock:
                    return self._route(req)
            except HubError:
                raise
            except Exception as exc:
                self.server_errors.append(traceback.format_exc())
                raise HubError(500, f"Loopback Hub bug: {type(exc).__name__}: {exc}") from exc
        except HubError as err:
            message = err.message.replace("\r", " ").replace("\n", " ")
            headers = {"X-Error-Message": message.encode("latin-1", "replace").decode("latin-1"), **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            return _Response.of_json({"error": err.message, **err.payload}, status=err.status, headers=headers)

    def _guard_write(self) -> None:
        if self.refuse_writes:
            raise HubError(self.refuse_status, "Writes are refused by this loopback Hub (refuse_writes=True)")

    def _route(self, req: _Request) -> _Response:
        raw = req.path.split("/")[1:]
        if raw and raw[0] == "api":
            return self._route_api(req, raw[1:])
        if len(raw) == 2 and raw[0] == "_lfs":
            return self._http_lfs_object(req, unquote(raw[1]))
        match = _LFS_BATCH_RE.match(req.path)
        if match:
            repo_type = _API_PLURAL[match.group(1)] if match.group(1) else "model"
            return self._http_lfs_batch(req, repo_type, unquote(match.group(2)))
        repo_type = "model"
        if raw and raw[0] in _API_PLURAL and raw[0] != "models":
            repo_type, raw = _API_PLURAL[raw[0]], raw[1:]
        split = self._split_repo_path(raw, _FILE_ACTIONS)
        if split is not None and split[1] is not None and req.method in ("GET", "HEAD"):
            repo_id, _action, rest = split
            revision, path_parts = self._split_revision(rest)
            return self._http_resolve(req, repo_type, repo_id, revision, "/".join(path_parts))
        raise HubError(404, f"No route for {req.method} {req.path}")

    @staticmethod
    def _split_repo_path(raw: list[str], actions: frozenset[str]) -> tuple[str, str | None, list[str]] | None:
        """Split ``[ns, name, action, ...]`` or ``[name, action, ...]`` into (repo_id, action, rest).

        A repo id is one or two segments, so the action keyword decides: it is looked for after two
        segments first (``namespace/name``), then after one (bare ``name``).
        """
        segs = [unquote(s) for s in raw]
        if len(segs) >= 3 and segs[2] in actions:
            return f"{segs[0]}/{segs[1]}", segs[2], raw[3:]
        if len(segs) >= 2 and segs[1] in actions:
            return segs[0], segs[1], raw[2:]
        if len(segs) == 2:
            return f"{segs[0]}/{segs[1]}", None, []
        if len(segs) == 1 and segs[0]:
            return segs[0], None, []
        return None

    @staticmethod
    def _split_revision(raw_rest: list[str]) -> tuple[str, list[str]]:
        """First segment is the revision (clients quote ``/`` in it); accept unquoted ``refs/x/y`` too."""
        if not raw_rest:
            return "main", []
        parts = [unquote(s) for s in raw_rest]
        if parts[0] == "refs" and len(parts) >= 3 and parts[1] in ("pr", "heads", "tags", "convert"):
            return "/".join(parts[:3]), parts[3:]
        return parts[0], parts[1:]

    def _route_api(self, req: _Request, raw: list[str]) -> _Response:
        head = raw[0] if raw else ""
        m = req.method
        if raw == ["whoami-v2"] and m == "GET":
            return self._http_whoami()
        if raw == ["agent-harnesses"] and m == "GET":
            # The registry is a mapping; an empty one disables huggingface_hub's agent detection.
            return _Response.of_json({"standardEnvVars": [], "harnesses": {}})
        if raw == ["validate-yaml"] and m == "POST":
            return _Response.of_json({"errors": [], "warnings": []})
        if raw == ["repos", "create"] and m == "POST":
            return self._http_create(req)
        if raw == ["repos", "delete"] and m == "DELETE":
            return self._http_delete(req)
        if raw == ["repos", "move"] and m == "POST":
            return self._http_move(req)
        if head in _API_PLURAL:
            repo_type = _API_PLURAL[head]
            if len(raw) == 1 and m == "GET":
                return self._http_list(req, repo_type)
            split = self._split_repo_path(raw[1:], _REPO_ACTIONS)
            if split is not None:
                repo_id, action, rest = split
                repo = self._get_repo(repo_type, repo_id)
                return self._route_repo(req, repo, action, rest)
        raise HubError(404, f"No route for {req.method} {req.path}")

    def _route_repo(self, req: _Request, repo: _Repo, action: str | None, rest: list[str]) -> _Response:
        m = req.method
        if action is None and m == "GET":
            return self._http_info(req, repo, "main")
        if action == "revision" and m == "GET":
            revision, _ = self._split_revision(rest)
            return self._http_info(req, repo, revision)
        if action == "tree" and m == "GET":
            revision, path_parts = self._split_revision(rest)
            return self._http_tree(req, repo, revision, "/".join(path_parts))
        if action == "paths-info" and m == "POST":
            return self._http_paths_info(req, repo, self._split_revision(rest)[0])
        if action == "preupload" and m == "POST":
            self._guard_write()
            return self._http_preupload(req, repo, self._split_revision(rest)[0])
        if action == "commit" and m == "POST":
            self._guard_write()
            return self._http_commit(req, repo, self._split_revision(rest)[0])
        if action == "refs" and m == "GET":
            return self._http_refs(req, repo)
        if action == "commits" and m == "GET":
            return self._http_commits(repo, self._split_revision(rest)[0])
        if action == "branch" and m in ("POST", "DELETE"):
            self._guard_write()
            return self._http_branch(req, repo, "/".join(unquote(s) for s in rest))
        if action == "tag" and m in ("POST", "DELETE"):
            self._guard_write()
            return self._http_tag(req, repo, "/".join(unquote(s) for s in rest))
        if action == "settings" and m == "PUT":
            self._guard_write()
            body = req.json() or {}
            if "private" in body:
                repo.private = bool(body["private"])
            if "visibility" in body:
                repo.private = body["visibility"] != "public"
            return _Response.of_json({})
        raise HubError(404, f"No route for {req.method} {req.path}")

    # ---------------------------------------------------------------- HTTP handlers

    def _http_whoami(self) -> _Response:
        return _Response.of_json(
            {
                "type": "user",
                "id": hashlib.sha1(self.user.encode()).hexdigest()[:24],
                "name": self.user,
                "fullname": "Loopback Tester",
                "email": f"{self.user}@example.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": "write"}},
            }
        )

    def _id_from_payload(self, body: Mapping[str, Any]) -> tuple[str, str]:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise HubError(400, "Missing repo 'name' in request body")
        organization = body.get("organization") or self.user
        repo_type = body.get("type") or "model"
        self._check_type(repo_type)
        return repo_type, name if "/" in name else f"{organization}/{name}"

    def _http_create(self, req: _Request) -> _Response:
        self._guard_write()
        body = req.json() or {}
        repo_type, repo_id = self._id_from_payload(body)
        private = bool(body.get("private")) or body.get("visibility") in ("private", "protected")
        url_prefix = f"{req.base_url}/{_URL_PREFIX[repo_type]}"
        try:
            canonical = self.create_repo(repo_id, repo_type=repo_type, private=private)
        except HubError as err:
            if err.status == 409:
                err.payload["url"] = url_prefix + self.canonical_id(repo_id)
            raise
        return _Response.of_json({"url": url_prefix + canonical, "name": canonical, "id": canonical})

    def _http_delete(self, req: _Request) -> _Response:
        self._guard_write()
        repo_type, repo_id = self._id_from_payload(req.json() or {})
        self.delete_repo(repo_id, repo_type=repo_type)
        return _Response.of_json({})

    def _http_move(self, req: _Request) -> _Response:
        self._guard_write()
        body = req.json() or {}
        repo_type = body.get("type") or "model"
        repo = self._get_repo(repo_type, str(body.get("fromRepo", "")))
        target = self.canonical_id(str(body.get("toRepo", "")))
        if (repo_type, target) in self._repos:
            raise HubError(409, f"Repository {target} already exists")
        del self._repos[(repo_type, repo.repo_id)]
        repo.repo_id = target
        self._repos[(repo_type, target)] = repo
        return _Response.of_json({})

    def _http_list(self, req: _Request, repo_type: str) -> _Response:
        author = req.arg("author")
        search = (req.arg("search") or "").lower()
        out = [
            self._repo_info(repo, repo.commits[repo.refs["main"]], req.base_url, with_siblings=False)
            for (kind, repo_id), repo in sorted(self._repos.items())
            if kind == repo_type and (author is None or repo_id.split("/")[0] == author) and search in repo_id.lower()
        ]
        return _Response.of_json(out)

    def _http_info(self, req: _Request, repo: _Repo, revision: str) -> _Response:
        return _Response.of_json(self._repo_info(repo, self._resolve(repo, revision), req.base_url))

    def _http_tree(self, req: _Request, repo: _Repo, revision: str, path: str) -> _Response:
        commit = self._resolve(repo, revision)
        path = path.strip("/")
        recursive, expand = req.flag("recursive"), req.flag("expand")
        prefix = f"{path}/" if path else ""
        under = {p: b for p, b in commit.files.items() if p.startswith(prefix)}
        if path and not under:
            raise HubError(404, f"Entry not found: {path} is not a folder at {revision}", code="EntryNotFound")
        dirs: set[str] = set()
        files: dict[str, _Blob] = {}
        for file_path, blob in under.items():
            parts = file_path[len(prefix) :].split("/")
            if recursive:
                files[file_path] = blob
                dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
            elif len(parts) == 1:
                files[file_path] = blob
            else:
                dirs.add(prefix + parts[0])
        entries = [self._dir_entry(repo, commit, d, expand) for d in sorted(dirs)]
        entries += [self._file_entry(repo, commit, p, b, expand) for p, b in sorted(files.items())]
        return _Response.of_json(entries)

    def _http_paths_info(self, req: _Request, repo: _Repo, revision: str) -> _Response:
        commit = self._resolve(repo, revision)
        content_type = req.headers.get("Content-Type", "")
        if "json" in content_type:
            body = req.json() or {}
            paths = body.get("paths") or []
            paths = [paths] if isinstance(paths, str) else list(paths)
            expand = bool(body.get("expand"))
        else:  # huggingface_hub sends a form: paths=a&paths=b&expand=False
            form = parse_qs(req.body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        out: list[dict[str, Any]] = []
        for raw_path in paths:
            path = str(raw_path).strip("/")
            if path in commit.files:
                out.append(self._file_entry(repo, commit, path, commit.files[path], expand))
            elif path and any(p.startswith(path + "/") for p in commit.files):
                out.append(self._dir_entry(repo, commit, path, expand))
        return _Response.of_json(out)

    def _http_preupload(self, req: _Request, repo: _Repo, revision: str) -> _Response:
        commit = self._resolve(repo, revision)
        body = req.json() or {}
        answers = []
        for item in body.get("files", []):
            path = str(item.get("path", ""))
            size = int(item.get("size", 0))
            sample = base64.b64decode(item.get("sample") or b"")
            mode = "lfs" if self._wants_lfs(path, size, sample) else "regular"
            existing = commit.files.get(path)
            # The client skips a file whose oid matches: sha256 for LFS, git sha1 of content otherwise.
            oid = None if existing is None else (existing.sha256 if mode == "lfs" else existing.content_sha1)
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _Response.of_json({"files": answers, "commitOid": commit.oid})

    def _http_lfs_batch(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        self._get_repo(repo_type, repo_id)  # 404 RepoNotFound before anything else
        body = req.json() or {}
        operation = body.get("operation", "upload")
        if operation == "upload":
            self._guard_write()
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid", "")), int(obj.get("size", 0))
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            href = f"{req.base_url}/_lfs/{oid}"
            if operation == "upload":
                if oid not in self._blobs:  # no "actions" = already stored, the client skips it
                    entry["actions"] = {"upload": {"href": href, "header": {}}}
            elif oid in self._blobs:
                entry["actions"] = {"download": {"href": href, "header": {}}}
            else:
                entry["error"] = {"code": 404, "message": f"Object {oid} does not exist"}
            objects.append(entry)
        return _Response(
            body=json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _http_lfs_object(self, req: _Request, oid: str) -> _Response:
        if req.method == "PUT":
            self._guard_write()
            actual = hashlib.sha256(req.body).hexdigest()
            if actual != oid:
                raise HubError(400, f"Uploaded bytes hash to {actual}, not to the announced oid {oid}")
            self._blobs.setdefault(oid, req.body)
            return _Response(headers={"ETag": f'"{oid}"'}, content_type="text/plain")
        if req.method in ("GET", "HEAD") and oid in self._blobs:
            return _Response(body=self._blobs[oid], content_type="application/octet-stream")
        raise HubError(404, f"No LFS object {oid}")

    def _http_commit(self, req: _Request, repo: _Repo, revision: str) -> _Response:
        items = []
        for line in req.body.splitlines():
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise HubError(400, f"Commit payload is not NDJSON: {exc}") from None
        header: dict[str, Any] = {}
        ops: list[tuple[str, str, _Blob | None]] = []
        for item in items:
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                ops.append(("add", _check_path(value.get("path", "")), self._store(data, lfs=False)))
            elif key == "lfsFile":
                oid = str(value.get("oid", ""))
                data = self._blobs.get(oid)
                if data is None:
                    raise HubError(422, f"LFS object {oid} for {value.get('path')!r} was never uploaded")
                blob = _Blob(sha256=oid, content_sha1=_git_sha1(data), size=len(data), lfs=True)
                ops.append(("add", _check_path(value.get("path", "")), blob))
            elif key == "deletedFile":
                ops.append(("delete", _check_path(value.get("path", "")), None))
            elif key == "deletedFolder":
                ops.append(("deleteFolder", _check_path(value.get("path", "").rstrip("/")), None))
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        pr_url = None
        if req.flag("create_pr"):
            base = self._resolve(repo, revision)
            number = 1 + sum(1 for ref in repo.refs if ref.startswith("refs/pr/"))
            revision = f"refs/pr/{number}"
            repo.refs[revision] = base.oid
            pr_url = f"{self._repo_url(req.base_url, repo)}/discussions/{number}"
        commit = self._apply(
            repo,
            revision,
            ops,
            title=str(header.get("summary") or "Commit"),
            message=str(header.get("description") or ""),
            parent_commit=header.get("parentCommit"),
        )
        return _Response.of_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(req.base_url, repo)}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _http_refs(self, req: _Request, repo: _Repo) -> _Response:
        def ref(name: str, full: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": full, "targetCommit": oid}

        branches = [ref(n, f"refs/heads/{n}", o) for n, o in sorted(repo.refs.items()) if not n.startswith("refs/")]
        prs = [ref(n, n, o) for n, o in sorted(repo.refs.items()) if n.startswith("refs/pr/")]
        tags = [ref(n, f"refs/tags/{n}", o) for n, o in sorted(repo.tags.items())]
        payload: dict[str, Any] = {"branches": branches, "converts": [], "tags": tags}
        if req.flag("include_prs"):
            payload["pullRequests"] = prs
        return _Response.of_json(payload)

    def _http_commits(self, repo: _Repo, revision: str) -> _Response:
        return _Response.of_json(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "date": _iso(c.date),
                    "authors": [{"user": self.user, "avatar": ""}],
                }
                for c in self._history(repo, self._resolve(repo, revision))
            ]
        )

    def _http_branch(self, req: _Request, repo: _Repo, branch: str) -> _Response:
        if not branch:
            raise HubError(400, "Missing branch name")
        if req.method == "DELETE":
            if branch not in repo.refs:
                raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            del repo.refs[branch]
            return _Response.of_json({})
        body = req.json() or {}
        if branch in repo.refs:
            raise HubError(409, f"Reference {branch} already exists")
        if body.get("emptyBranch"):
            empty = self._new_commit(parent=None, files={}, title="empty branch", message="")
            repo.commits[empty.oid] = empty
            repo.refs[branch] = empty.oid
        else:
            repo.refs[branch] = self._resolve(repo, str(body.get("startingPoint") or "main")).oid
        return _Response.of_json({})

    def _http_tag(self, req: _Request, repo: _Repo, name: str) -> _Response:
        if req.method == "DELETE":
            if name not in repo.tags:
                raise HubError(404, f"Invalid rev id: {name}", code="RevisionNotFound")
            del repo.tags[name]
            return _Response.of_json({})
        body = req.json() or {}
        tag = str(body.get("tag") or "")
        if not tag:
            raise HubError(400, "Missing 'tag' in request body")
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = self._resolve(repo, name or "main").oid
        return _Response.of_json({})

    def _http_resolve(self, req: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo = self._get_repo(repo_type, repo_id)
        commit = self._resolve(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            # X-Repo-Commit lets the client cache the miss under .no_exist/<commit>/.
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        data = self._blobs[blob.sha256]
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Cache-Control": "no-cache",
        }
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        range_header = req.headers.get("Range")
        if range_header:
            span = self._parse_range(range_header, len(data))
            if span is not None:
                start, end = span
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return _Response(status=206, body=data[start : end + 1], headers=headers, content_type=content_type)
        return _Response(body=data, headers=headers, content_type=content_type)

    @staticmethod
    def _parse_range(header: str, size: int) -> tuple[int, int] | None:
        """One ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range as ``(first, last)`` byte indices.

        ``None`` means "serve the whole file" (multi-range or malformed headers may be ignored).
        A range past the end raises a 416 HubError: the clients read until they get one.
        """
        match = _RANGE_RE.match(header.strip())
        if match is None or (not match.group(1) and not match.group(2)):
            return None
        if match.group(1):
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if start < size and start <= end:
                return start, end
        elif int(match.group(2)) > 0 and size > 0:
            return max(0, size - int(match.group(2))), size - 1
        raise HubError(416, f"Range {header!r} not satisfiable", headers={"Content-Range": f"bytes */{size}"})


# --------------------------------------------------------------------------------------------
# HTTP server plumbing
# --------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Turns socket I/O into ``_Request``/``_Response`` for ``LoopbackHub.handle``."""

    # HTTP/1.1 keeps the clients' pooled connections alive (they reconnect otherwise, which is slow).
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY each answer waits ~40 ms for
    # a delayed ACK, which adds seconds to a from_pretrained.
    disable_nagle_algorithm = True
    timeout = 120  # an idle keep-alive connection is dropped after this many seconds
    server: _HubHTTPServer

    def _serve(self) -> None:
        body = self._read_body()
        split = urlsplit(self.path)
        host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
        req = _Request(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers=self.headers,
            body=body,
            base_url=f"http://{host}",
        )
        resp = self.server.hub.handle(req)
        self.server.hub.requests.append((self.command, self.path, resp.status))
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and resp.body:
            self.wfile.write(resp.body)

    def _read_body(self) -> bytes:
        """Whole request body; LFS PUTs of file objects may arrive chunked (no Content-Length)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: test output stays readable; ``LoopbackHub.requests`` records every request."""


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], hub: LoopbackHub) -> None:
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Unblock handler threads parked on idle keep-alive connections."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HubServer:
    """A running loopback Hub: ``url`` to give the clients, ``hub`` to seed or inspect, ``stop()``.

    Also a context manager that stops the server on exit.
    """

    def __init__(self, hub: LoopbackHub, host: str = "127.0.0.1", port: int = 0) -> None:
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"host={host!r}: the loopback Hub only listens on 127.0.0.1 or localhost.")
        self.hub = hub
        self._httpd = _HubHTTPServer((host, port), hub)
        self.url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> Self:
        """Serve in a daemon thread (returns at once)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="loopback-hub", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``stop()`` (from another thread) or an interrupt."""
        self._httpd.serve_forever(poll_interval=0.1)

    def stop(self) -> None:
        """Stop serving, close the listening socket and drop open client connections.

        Safe to call after ``serve_forever`` returned too (the script entry point does).
        """
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.close_connections()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_hub(port: int = 0, *, hub: LoopbackHub | None = None, host: str = "127.0.0.1") -> tuple[HubServer, str]:
    """Start a loopback Hub in a daemon thread; returns ``(server, url)``. Call ``server.stop()``.

    Args:
        port: TCP port; 0 picks a free one (read it back from ``url``).
        hub: the state to serve; a fresh ``LoopbackHub()`` by default.
        host: loopback address to bind.
    """
    server = HubServer(hub or LoopbackHub(), host=host, port=port).start()
    return server, server.url


@contextmanager
def serve_hub(port: int = 0, *, hub: LoopbackHub | None = None, host: str = "127.0.0.1") -> Iterator[HubServer]:
    """Context manager form of :func:`start_hub`; yields the running ``HubServer``."""
    server, _url = start_hub(port, hub=hub, host=host)
    try:
        yield server
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m poyo_hf.testing.hub_server``: print the URL on the first line, serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one (default)")
    parser.add_argument("--user", default="tester", help="account name whoami reports (default tester)")
    parser.add_argument("--lfs-threshold", type=int, default=1 << 20, help="bytes above which uploads use LFS")
    parser.add_argument("--refuse-writes", action="store_true", help="answer every write with 403")
    args = parser.parse_args(argv)

    hub = LoopbackHub(user=args.user, lfs_threshold=args.lfs_threshold, refuse_writes=args.refuse_writes)
    server = HubServer(hub, host=args.host, port=args.port)

    def _terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    print(server.url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
