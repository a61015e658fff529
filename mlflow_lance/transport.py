"""Weights datasets behind MLflow's own artifact store: the artifact-repository shim.

A team's ``mlflow server`` usually proxies artifacts (``mlflow-artifacts:/``): only the server
holds the bucket's credentials, and clients have nothing but ``MLFLOW_TRACKING_URI``. Lance
cannot open such a URI, so a dataset there is reached in three layers:

- **Upstream**: one artifact store as MLflow reaches it. ``mlflow-artifacts:`` and ``http(s)``
  go through MLflow's artifact service over HTTP (``GET`` with ``Range:`` for just the bytes
  needed, ``PUT``, listing, ``DELETE``), with MLflow's own credentials and TLS settings; any
  other scheme MLflow has a repository for (``dbfs:/``, ``azureml://``, ...) goes through
  MLflow's ``ArtifactRepository`` API (whole files, cached).
- **The gateway**: an S3 endpoint on 127.0.0.1 inside this process (started on first use,
  one per process, a random key that only this process knows), which Lance opens the dataset
  through as ``s3://<bucket>/<path>``; every request is checked to lie inside a dataset this
  process opened. ``fs`` reads and lists through a pyarrow filesystem over the same upstream.
- **Commit points**: the proxy has no conditional write (``PUT`` overwrites and ignores
  ``If-None-Match``), so the one write that must be "create if absent", a new version's
  manifest (or a tag), takes its atomicity from the tracking store: an experiment name is
  unique on every MLflow backend (a unique constraint on SQLite and PostgreSQL alike).

A conditional write of ``key`` (``put_if_absent``), in order:

1. if ``key`` exists, refuse (412, Lance rebases onto the newer version);
2. upload the bytes to ``_mlflow_lance/staged/<writer>-<time>-<key>`` inside the dataset;
3. create the experiment ``mlflow-lance.claims/<hash of key>#0`` tagged with that staged
   path: **the commit point**. If the name exists, the key is someone else's: if that claim is
   still active its writer may have died, so its staged bytes are copied to ``key``
   (rolling its commit forward: the claim decided it, and the same bytes may be written any
   number of times), then refuse. A claim that is finished (deleted) while ``key`` is
   missing again (a tag deleted since) moves on to ``#1``, ``#2``, ...; a version or a
   transaction is never written twice;
4. ``PUT key``, then delete the claim (soft: it stays reserved until ``mlflow gc`` purges it,
   by when ``key`` exists and step 1 answers first) and the staged copy. The staged copy
   stays while an active claim names it.

A writer killed before 3 leaves a staged file that gc removes after the grace and an hour;
one killed (or failing) after 3 leaves a claim that the next writer of that key, or gc
(``settle``), finishes. Nothing blocks. Claims need a tracking store with unique experiment
names under concurrency (MLflow's SQL stores, directly or behind a server).

Reads of data files (immutable: Lance names them by UUID) are cached on local disk as the
byte ranges fetched (``RangeCache``): bounded, safe to delete at any time, safe for several
processes. ``MLFLOW_LANCE_CACHE_DIR`` (default ``~/.cache/mlflow-lance``) and
``MLFLOW_LANCE_CACHE_BYTES`` (default 10 GiB; 0 turns it off) say where and how much.

A server that does not answer fails the call with a ConnectionError naming it: 5 s to
connect and ``MLFLOW_LANCE_HTTP_TIMEOUT`` (default 60 s) without a byte, one retry.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import posixpath
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlparse
from xml.sax.saxutils import escape

from .errors import CorruptionError

# Schemes Lance (and pyarrow) open themselves; everything else MLflow knows goes through here.
LANCE_SCHEMES = ("", "file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
PROXY_SCHEMES = ("mlflow-artifacts", "http", "https")
SERVICE_ROOT = "/api/2.0/mlflow-artifacts/artifacts"
CACHE_DIR_ENV = "MLFLOW_LANCE_CACHE_DIR"
CACHE_BYTES_ENV = "MLFLOW_LANCE_CACHE_BYTES"
TIMEOUT_ENV = "MLFLOW_LANCE_HTTP_TIMEOUT"
CONNECT_TIMEOUT = 5.0
MAX_LISTING = 1_000_000  # entries one listing may return
MAX_DEPTH = 32  # directory levels a recursive listing walks
MAX_KEY = 1024  # bytes in one key (S3's own limit)
CLAIM_PREFIX = "mlflow-lance.claims/"
STAGED_DIR = "_mlflow_lance/staged"
_CHUNK = 1 << 20
# The end of a data file this process uploads is kept in the range cache: Lance reads a file's
# footer (its last 64 KiB) as soon as the file is written (the new version's index scans the
# blob descriptors), and a ranged GET makes MLflow's server copy the whole file from its
# destination first (0.9 s for 32 MB here).
_TAIL = 1 << 20
FAULT_ENV = "MLFLOW_LANCE_FAULT"  # tests: the process kills itself at this point of a commit

# Bytes this process moved to and from artifact stores (cache hits not counted).
counters = {"fetched": 0, "uploaded": 0, "requests": 0}


def handles(uri: str) -> bool:
    """Whether dataset ``uri`` is reached through MLflow's artifact store rather than by Lance."""
    scheme = urlparse(uri).scheme
    if scheme in PROXY_SCHEMES:
        return True
    if scheme in LANCE_SCHEMES or len(scheme) == 1:
        return False
    return scheme in mlflow_schemes()


def mlflow_schemes() -> frozenset[str]:
    """The schemes MLflow has an artifact repository for (its registry, plugins included)."""
    from .compat import resolve

    return frozenset(resolve("_artifact_repository_registry")._registry)


def timeout() -> float:
    """Seconds an upstream request may go without a byte before it fails."""
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV, "60")))
    except ValueError:
        return 60.0


class Unanswered(ConnectionError):
    """The server behind an artifact store did not answer (refused, silent, unknown host)."""


def http(base: str, label: str, method: str, endpoint: str, **kwargs: Any) -> Any:
    """One request to the MLflow server at ``base`` with MLflow's credentials and TLS settings,
    bounded (5 s to connect, ``timeout()`` without a byte, one retry); the response, whatever
    its status. Unanswered names the server (``label``) if it does not answer."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        return http_request(
            get_default_host_creds(base),
            endpoint,
            method,
            max_retries=1,
            backoff_factor=0.5,
            timeout=(CONNECT_TIMEOUT, timeout()),
            raise_on_status=False,
            **kwargs,
        )
    except Exception as err:  # noqa: BLE001 (requests' and urllib3's connection errors, MLflow's retry errors)
        raise Unanswered(
            f"the MLflow server at {label} did not answer ({type(err).__name__}: "
            f"{str(err)[:200]}); check MLFLOW_TRACKING_URI and that the server is up"
        ) from None


# --------------------------------------------------------------------------- upstreams


@dataclass(frozen=True)
class Listed:
    """One entry of an upstream directory."""

    name: str
    is_dir: bool
    size: int | None


class Upstream:
    """One artifact store root, as MLflow reaches it; keys are paths below the root."""

    label: str  # what messages call it: the server or the repository root
    tracking_uri: str | None  # where commit points are claimed

    def read(self, key: str, start: int, end: int | None) -> Iterator[bytes]:
        """The bytes of ``key`` from ``start`` to ``end`` (exclusive; None: to the end);
        FileNotFoundError if there is no such file."""
        raise NotImplementedError

    def put(self, key: str, body: BinaryIO, length: int) -> None:
        """Write ``length`` bytes from ``body`` to ``key`` (replacing any file there)."""
        raise NotImplementedError

    def listdir(self, key: str) -> list[Listed]:
        """The entries directly in directory ``key`` ([] if there is none)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove file ``key`` (nothing if it is missing)."""
        raise NotImplementedError

    @property
    def sizes(self) -> dict[str, int]:
        """Sizes of files that never change once written (``_fixed``), as this process listed
        or uploaded them."""
        return self.__dict__.setdefault("_sizes", {})

    def size(self, key: str) -> int | None:
        """The size of file ``key``, None if there is none (from its directory's listing; a
        file that never changes once written is listed once per process)."""
        sizes = self.sizes
        if key in sizes:
            return sizes[key]
        parent, _, name = key.rpartition("/")
        found = None
        for e in self.listdir(parent):
            if not e.is_dir and e.name == name:
                found = e.size or 0
            if not e.is_dir and _fixed(f"{parent}/{e.name}"):
                sizes[f"{parent}/{e.name}"] = e.size or 0
        return found

    def fetch(self, key: str, header: str) -> tuple[int, str | None, bytes]:
        """A GET of ``key`` with HTTP Range ``header`` ("" for all): (status, Content-Range, bytes)."""
        size = self.size(key)
        if size is None:
            raise FileNotFoundError(key)
        start, end = _range(header, size)
        data = b"".join(self.read(key, start, end)) if end > start else b""
        return (206, f"bytes {start}-{start + len(data) - 1}/{size}", data) if header else (200, None, data)


class ProxyUpstream(Upstream):
    """MLflow's artifact service over HTTP (``mlflow server --serve-artifacts``, the default)."""

    def __init__(self, base: str, tracking_uri: str):
        self.base = base.rstrip("/")  # http(s)://host[:port][/prefix]/api/2.0/mlflow-artifacts/artifacts
        self.label = self.base[: -len(SERVICE_ROOT)] or self.base
        self.tracking_uri = tracking_uri

    def _request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
        return http(self.base, self.label, method, endpoint, **kwargs)

    def _check(self, response: Any, key: str, method: str) -> None:
        if response.status_code >= 400:
            if response.status_code == 404:
                raise FileNotFoundError(f"{key} not found at {self.label}")
            text = response.text[:300]
            if response.status_code >= 500:
                raise Unanswered(f"the MLflow server at {self.label} failed a {method} of {key}: {text}")
            raise PermissionError(f"the MLflow server at {self.label} refused a {method} of {key}: {text}")

    def read(self, key: str, start: int, end: int | None) -> Iterator[bytes]:
        rng = f"bytes={start}-{'' if end is None else end - 1}"
        response = self._request("GET", "/" + quote(key), stream=True, extra_headers={"Range": rng})
        counters["requests"] += 1
        try:
            if response.status_code == 416:
                return
            self._check(response, key, "GET")
            skip = start if response.status_code == 200 else 0  # a server that ignored the range
            want = None if end is None else end - start
            for chunk in response.iter_content(_CHUNK):
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                if want is not None:
                    chunk = chunk[:want]
                    want -= len(chunk)
                if chunk:
                    counters["fetched"] += len(chunk)
                    yield chunk
                if want == 0:
                    break
        except (OSError, ValueError) as err:  # a connection that broke mid-body
            if isinstance(err, FileNotFoundError | PermissionError | Unanswered):
                raise
            raise Unanswered(f"the MLflow server at {self.label} broke off a GET of {key}: {err}") from None
        finally:
            response.close()

    def put(self, key: str, body: BinaryIO, length: int) -> None:
        self.sizes.pop(key, None)
        response = self._request(
            "PUT",
            "/" + quote(key),
            data=_Sized(body, length),
            extra_headers={"Content-Type": "application/octet-stream"},
        )
        self._check(response, key, "PUT")
        counters["uploaded"] += length
        counters["requests"] += 1

    def fetch(self, key: str, header: str) -> tuple[int, str | None, bytes]:
        response = self._request(
            "GET", "/" + quote(key), stream=True, extra_headers={"Range": header} if header else None
        )
        counters["requests"] += 1
        try:
            if response.status_code == 416:  # an empty file, or a range past its end
                return 416, None, b""
            self._check(response, key, "GET")
            data = response.content
        finally:
            response.close()
        counters["fetched"] += len(data)
        if header and response.status_code == 200:  # a server that sent the whole file (S3-backed MLflow does)
            start, end = _range(header, len(data))
            if start >= end:
                return 416, f"bytes */{len(data)}", b""
            return 206, f"bytes {start}-{end - 1}/{len(data)}", data[start:end]
        return response.status_code, response.headers.get("Content-Range"), data

    def listdir(self, key: str) -> list[Listed]:
        response = self._request("GET", "", params={"path": key})
        counters["requests"] += 1
        if response.status_code == 404:
            return []
        self._check(response, key, "listing")
        files = response.json().get("files", [])
        if not isinstance(files, list) or len(files) > MAX_LISTING:
            raise CorruptionError(f"the listing of {key} at {self.label} is malformed or too long")
        out = []
        for f in files:
            name = f.get("path") if isinstance(f, dict) else None
            if not _plain(name):
                raise CorruptionError(f"the listing of {key} at {self.label} names {name!r}, not a file name")
            size = f.get("file_size")
            out.append(Listed(name, bool(f.get("is_dir")), int(size) if str(size).isdigit() else None))
        return out

    def delete(self, key: str) -> None:
        self._check(self._request("DELETE", "/" + quote(key)), key, "DELETE")


class RepositoryUpstream(Upstream):
    """Any other artifact store, through MLflow's ``ArtifactRepository`` API (whole files)."""

    def __init__(self, root: str, tracking_uri: str | None):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        self.label = root
        self.tracking_uri = tracking_uri
        self.repo = get_artifact_repository(root)

    def read(self, key: str, start: int, end: int | None) -> Iterator[bytes]:
        with tempfile.TemporaryDirectory(prefix="mlflow-lance-") as tmp:
            try:
                path = self.repo.download_artifacts(key, tmp)
            except Exception as err:  # noqa: BLE001 (each repository raises its own kind for a missing file)
                raise FileNotFoundError(f"{key} not found at {self.label}: {err}") from None
            with open(path, "rb") as f:
                f.seek(start)
                left = None if end is None else end - start
                while left is None or left > 0:
                    chunk = f.read(_CHUNK if left is None else min(_CHUNK, left))
                    if not chunk:
                        break
                    if left is not None:
                        left -= len(chunk)
                    yield chunk

    def put(self, key: str, body: BinaryIO, length: int) -> None:
        parent, _, name = key.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="mlflow-lance-") as tmp:
            with open(os.path.join(tmp, name), "wb") as f:
                shutil.copyfileobj(_Sized(body, length), f, _CHUNK)
            self.repo.log_artifact(os.path.join(tmp, name), parent or None)

    def listdir(self, key: str) -> list[Listed]:
        infos = self.repo.list_artifacts(key or None)
        if len(infos) > MAX_LISTING:
            raise CorruptionError(f"the listing of {key} at {self.label} is too long")
        out = []
        for info in infos:
            name = posixpath.basename(info.path.rstrip("/"))
            if not _plain(name):
                raise CorruptionError(f"the listing of {key} at {self.label} names {name!r}, not a file name")
            out.append(Listed(name, bool(info.is_dir), info.file_size))
        return out

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.repo.delete_artifacts(key)


class _Sized(io.RawIOBase):
    """``length`` bytes of ``body`` as a file whose length requests can read (no chunked upload)."""

    def __init__(self, body: BinaryIO, length: int):
        self.body, self.left, self.len = body, length, length
        self.start = body.tell() if body.seekable() else None

    def seekable(self) -> bool:
        return self.start is not None

    def tell(self) -> int:
        return self.len - self.left

    def seek(self, offset: int, whence: int = 0) -> int:
        """Rewind (for a retried request): only to an offset from the start."""
        if self.start is None or whence != 0:
            raise io.UnsupportedOperation("seek")
        self.body.seek(self.start + offset)
        self.left = self.len - offset
        return offset

    def __len__(self) -> int:
        return self.left

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.body.read(n) if n else b""
        self.left -= len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _plain(name: object) -> bool:
    return (
        isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..") and not re.search(r"[/\\\x00]", name)
    )


# --------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class Location:
    """A dataset behind an artifact store: its upstream and its key (path below the root)."""

    upstream: Upstream
    key: str


_upstreams: dict[tuple[str, str], Upstream] = {}
_lock = threading.Lock()


def locate(uri: str) -> Location:
    """The upstream and key of dataset ``uri`` (``mlflow-artifacts:/...``, ``http(s)://...``
    of an MLflow artifact service, or another scheme MLflow has a repository for)."""
    import mlflow

    parsed = urlparse(uri.rstrip("/"))
    tracking = mlflow.get_tracking_uri()
    if parsed.scheme == "mlflow-artifacts":
        from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

        base = MlflowArtifactsRepository.resolve_uri("mlflow-artifacts:/", tracking) if not parsed.netloc else None
        if base is None:
            _same_server(uri, parsed.netloc, tracking)
            track = urlparse(tracking)
            base = f"{track.scheme}://{parsed.netloc}{track.path.rstrip('/')}{SERVICE_ROOT}"
        root, key, server = base, parsed.path, tracking
    elif parsed.scheme in ("http", "https") and SERVICE_ROOT in parsed.path:
        _same_server(uri, parsed.netloc, tracking)
        prefix, _, key = parsed.path.partition(SERVICE_ROOT)
        root = f"{parsed.scheme}://{parsed.netloc}{prefix}{SERVICE_ROOT}"
        server = f"{parsed.scheme}://{parsed.netloc}{prefix}"
    else:
        if parsed.scheme in ("http", "https"):
            _same_server(uri, parsed.netloc, tracking)
        root, key, server = f"{parsed.scheme}://{parsed.netloc}/", parsed.path, tracking
    key = key.strip("/")
    if not key or len(key.encode()) > MAX_KEY or any(not _plain(p) for p in key.split("/")):
        raise ValueError(f"{uri!r} does not name a dataset inside an artifact store (a plain path is needed)")
    kind = "proxy" if parsed.scheme in PROXY_SCHEMES else "repository"
    with _lock:
        upstream = _upstreams.get((kind, root))
        if upstream is None:
            upstream = ProxyUpstream(root, server) if kind == "proxy" else RepositoryUpstream(root, server)
            _upstreams[(kind, root)] = upstream
    return Location(upstream, key)


def _same_server(uri: str, netloc: str, tracking: str) -> None:
    """An artifact URI that names a host gets MLflow's credentials only if it is the tracking
    server's host: a planted URI cannot send them elsewhere."""
    if netloc.rpartition("@")[2].lower() != urlparse(tracking).netloc.rpartition("@")[2].lower():
        raise ValueError(
            f"{uri!r} names another host than the tracking server ({urlparse(tracking).netloc or tracking!r}); "
            f"MLflow's credentials go to the tracking server only: set MLFLOW_TRACKING_URI to that server"
        )


# --------------------------------------------------------------------------- the range cache


def _fixed(key: str) -> bool:
    """Files whose bytes never change once written: data files, manifests, transactions."""
    return any(f"/{d}/" in f"/{key}" for d in ("data", "_versions", "_transactions")) and "/staged/" not in key


def _immutable(key: str) -> bool:
    """Files that never change once written: Lance's data files (named by UUID)."""
    return "/data/" in f"/{key}" and key.endswith(".lance")


class RangeCache:
    """Byte ranges of immutable files fetched before, on local disk.

    One folder per file (``<sha256 of server and key>/``), one file per range
    (``<start>-<end>``), written to a temporary name and renamed: a reader sees a whole range
    or none. Any file may be deleted at any time (a miss fetches again). When the folder
    outgrows its budget, the least recently used ranges go.
    """

    def __init__(self, root: str, budget: int):
        self.root, self.budget = root, budget
        self._added = 0

    @classmethod
    def default(cls) -> RangeCache | None:
        """The cache the environment asks for, or None when it is turned off."""
        try:
            budget = int(os.environ.get(CACHE_BYTES_ENV, str(10 << 30)))
        except ValueError:
            budget = 10 << 30
        if budget <= 0:
            return None
        root = os.environ.get(CACHE_DIR_ENV) or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mlflow-lance"
        )
        return cls(root, budget)

    def _folder(self, upstream: Upstream, key: str) -> str:
        return os.path.join(self.root, hashlib.sha256(f"{upstream.label}\0{key}".encode()).hexdigest())

    def get(self, upstream: Upstream, key: str, start: int, end: int) -> bytes | None:
        """The bytes ``start:end`` of ``key`` if a cached range holds them."""
        folder = self._folder(upstream, key)
        try:
            names = os.listdir(folder)
        except OSError:
            return None
        for name in names:
            a, _, b = name.partition("-")
            if a.isdigit() and b.isdigit() and int(a) <= start and end <= int(b):
                try:
                    with open(os.path.join(folder, name), "rb") as f:
                        f.seek(start - int(a))
                        data = f.read(end - start)
                    os.utime(os.path.join(folder, name))
                except OSError:
                    continue
                if len(data) == end - start:
                    return data
        return None

    def put(self, upstream: Upstream, key: str, start: int, data: bytes | memoryview) -> None:
        """Keep ``data``, the bytes of ``key`` from ``start`` (best effort: a full disk skips it)."""
        if not data or len(data) > self.budget // 4:
            return
        folder = self._folder(upstream, key)
        tmp = os.path.join(folder, f".{uuid.uuid4().hex}.tmp")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(folder, f"{start}-{start + len(data)}"))
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            return
        self._added += len(data)
        if self._added > self.budget // 8:
            self._added = 0
            self.trim()

    def trim(self) -> None:
        """Remove the least recently used ranges until the cache is within its budget."""
        entries = []
        with contextlib.suppress(OSError):
            for folder in os.scandir(self.root):
                with contextlib.suppress(OSError):
                    for f in os.scandir(folder.path):
                        st = f.stat()
                        entries.append((st.st_mtime, st.st_size, f.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.budget:
                break
            with contextlib.suppress(OSError):
                os.remove(path)
            total -= size


_cache: list[RangeCache | None] = []


def cache() -> RangeCache | None:
    """The process's range cache (read from the environment once)."""
    if not _cache:
        _cache.append(RangeCache.default())
    return _cache[0]


def read_range(loc: Location, start: int, end: int) -> bytes:
    """Bytes ``start:end`` of the file at ``loc`` (fewer at its end), from the cache when an
    immutable file's range was fetched before."""
    store = cache() if _immutable(loc.key) else None
    if store is not None and (hit := store.get(loc.upstream, loc.key, start, end)) is not None:
        return hit
    data = b"".join(loc.upstream.read(loc.key, start, end))
    if store is not None:
        store.put(loc.upstream, loc.key, start, data)
    return data


def read_into(loc: Location, position: int, dst: memoryview) -> int:
    """Copy the bytes of the file at ``loc`` from ``position`` into ``dst`` with one request
    (or from the cache); the number of bytes copied."""
    store = cache() if _immutable(loc.key) else None
    end = position + len(dst)
    if store is not None and (hit := store.get(loc.upstream, loc.key, position, end)) is not None:
        dst[: len(hit)] = hit
        return len(hit)
    got = 0
    for chunk in loc.upstream.read(loc.key, position, end):
        n = min(len(chunk), len(dst) - got)
        dst[got : got + n] = chunk[:n]
        got += n
    if store is not None and got:
        store.put(loc.upstream, loc.key, position, bytes(dst[:got]))
    return got


def _uploaded(upstream: Upstream, key: str, tail: bytes, length: int) -> None:
    """Record what this process just uploaded to an immutable file: its size, and its last
    bytes (``tail``) in the range cache, so that reading its footer back fetches nothing."""
    if not _fixed(key):
        return
    upstream.sizes[key] = length
    if _immutable(key) and tail and (store := cache()) is not None:
        store.put(upstream, key, length - len(tail), tail)


def _tail_of(body: BinaryIO, length: int) -> bytes:
    """The last ``_TAIL`` bytes of a seekable ``body`` of ``length`` bytes (rewound after)."""
    if not body.seekable():
        return b""
    here = body.tell()
    body.seek(max(0, length - _TAIL))
    tail = body.read(_TAIL)
    body.seek(here)
    return tail


def _tail_of_parts(paths: list[str]) -> bytes:
    """The last ``_TAIL`` bytes of part files read in order."""
    pieces: list[bytes] = []
    want = _TAIL
    for path in reversed(paths):
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - want))
            pieces.append(f.read(want))
        want -= len(pieces[-1])
        if want <= 0:
            break
    return b"".join(reversed(pieces))


# --------------------------------------------------------------------------- commit points


def _claim_name(upstream: Upstream, key: str, generation: int) -> str:
    """The claim's experiment name: from the key alone (the path below the artifact root), never
    from how a client spells the server's URL, since the claims live in that server's own
    tracking store; a repository scheme keeps its scheme."""
    scope = "" if isinstance(upstream, ProxyUpstream) else urlparse(upstream.label).scheme
    digest = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()[:40]
    return f"{CLAIM_PREFIX}{digest}#{generation}"


def _staged_key(dataset_key: str, key: str) -> str:
    """Where the bytes of a conditional write wait for their claim: the writer's id, the time it
    staged them (seconds, its own clock) and the path it writes, in one plain file name."""
    rel = base64.urlsafe_b64encode(key[len(dataset_key) + 1 :].encode()).decode().rstrip("=")
    return f"{dataset_key}/{STAGED_DIR}/{uuid.uuid4().hex}-{int(time.time())}-{rel}"


def _staged_parts(name: str) -> tuple[int, str] | None:
    """(staged at, path in the dataset) of a staged file's name, or None for anything else."""
    head, stamp, rel = (name.split("-", 2) + ["", ""])[:3]
    if len(head) != 32 or not stamp.isdigit() or not rel:
        return None
    try:
        path = base64.urlsafe_b64decode(rel + "=" * (-len(rel) % 4)).decode()
    except ValueError:
        return None
    return (int(stamp), path) if path and all(_plain(p) for p in path.split("/")) else None


class Claims:
    """Commit points in the tracking store: experiments with unique names, created, read and
    soft-deleted with bounded requests (5 s to connect, ``timeout()`` to answer, one retry)
    where the store is a server, through MlflowClient otherwise."""

    def __init__(self, tracking_uri: str | None):
        self.uri = tracking_uri or ""
        self.http = urlparse(self.uri).scheme in ("http", "https")

    def _call(self, method: str, endpoint: str, **kwargs: Any) -> dict:
        response = http(self.uri, self.uri, method, endpoint, **kwargs)
        body = response.json() if response.text.strip().startswith("{") else {}
        if response.status_code == 200:
            return body
        code = body.get("error_code", str(response.status_code))
        if code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            raise KeyError(code)
        if response.status_code >= 500:
            raise Unanswered(f"the MLflow server at {self.uri} failed a claim: {response.text[:300]}")
        raise PermissionError(f"the MLflow server at {self.uri} refused a claim: {response.text[:300]}")

    def create(self, name: str, tags: dict[str, str]) -> str | None:
        """The new experiment's id, or None if the name is taken."""
        if self.http:
            body = {"name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
            try:
                return str(self._call("POST", "/api/2.0/mlflow/experiments/create", json=body)["experiment_id"])
            except KeyError:
                return None
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            return MlflowClient(self.uri or None).create_experiment(name, tags=tags)
        except MlflowException as err:
            if err.error_code == "RESOURCE_ALREADY_EXISTS":
                return None
            raise

    def get(self, name: str) -> tuple[str, bool, dict[str, str]] | None:
        """(id, active, tags) of the claim named ``name``, None if there is none."""
        if self.http:
            try:
                e = self._call("GET", "/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
            except KeyError:
                return None
            e = e.get("experiment", {})
            tags = {t.get("key"): t.get("value") for t in e.get("tags", []) if isinstance(t, dict)}
            return str(e.get("experiment_id")), e.get("lifecycle_stage") == "active", tags
        from mlflow import MlflowClient

        found = MlflowClient(self.uri or None).get_experiment_by_name(name)
        return None if found is None else (found.experiment_id, found.lifecycle_stage == "active", found.tags)

    def finish(self, experiment_id: str) -> None:
        """Soft-delete a claim (already deleted, or not ours to delete: left as it is)."""
        try:
            if self.http:
                self._call("POST", "/api/2.0/mlflow/experiments/delete", json={"experiment_id": experiment_id})
            else:
                from mlflow import MlflowClient

                MlflowClient(self.uri or None).delete_experiment(experiment_id)
        except (KeyError, PermissionError, Unanswered, OSError):
            return  # the write is done; a claim left active is finished by the next writer or gc
        except Exception:  # noqa: BLE001 (MlflowException of a local store for a claim already deleted)
            return


_ONCE = ("_versions", "_transactions")  # written once: never claimed again after a delete


def put_if_absent(upstream: Upstream, dataset_key: str, key: str, body: BinaryIO, length: int) -> bool:
    """Write ``key`` unless it exists, atomically among all writers (see the module docstring):
    True if this call wrote it, False if it existed or another writer's claim decided it."""
    if upstream.size(key) is not None:
        return False
    staged = _staged_key(dataset_key, key)
    upstream.put(staged, body, length)
    claims = Claims(upstream.tracking_uri)
    once = key[len(dataset_key) + 1 :].split("/", 1)[0] in _ONCE
    written = False
    generation = 0
    try:
        while generation < 64:
            name = _claim_name(upstream, key, generation)
            tags = {"mlflow_lance.claim": key[-250:], "mlflow_lance.staged": staged}
            experiment = claims.create(name, tags)
            if experiment is None:
                other = claims.get(name)
                if other is None:  # purged between the two calls: the same name again
                    continue
                other_id, active, other_tags = other
                if other_tags.get("mlflow_lance.staged") == staged:  # our own claim (a retried create)
                    experiment = other_id
                elif active:
                    _roll_forward(upstream, key, other_tags.get("mlflow_lance.staged", ""), dataset_key)
                    return False
                elif once or upstream.size(key) is not None:
                    return False  # a version or transaction is written once, even after gc deleted it
                else:
                    generation += 1  # a tag deleted since its last claim finished
                    continue
            _fault("claimed")
            body.seek(0)
            upstream.put(key, body, length)
            written = True
            claims.finish(experiment)
            return True
        raise CorruptionError(f"{key} at {upstream.label} was created and deleted 64 times; refusing to go on")
    finally:
        if written or not _claimed_by(claims, upstream, key, staged, generation):
            with contextlib.suppress(OSError):
                upstream.delete(staged)


def _claimed_by(claims: Claims, upstream: Upstream, key: str, staged: str, generation: int) -> bool:
    """Whether an active claim names ``staged`` (then its bytes must stay until ``key`` is written)."""
    try:
        found = claims.get(_claim_name(upstream, key, generation))
    except OSError:
        return True  # cannot tell: keep the staged bytes (gc removes them once no claim needs them)
    return found is not None and found[1] and found[2].get("mlflow_lance.staged") == staged


def _fault(point: str) -> None:
    """Kill this process at ``point`` when the tests ask for it (``MLFLOW_LANCE_FAULT``)."""
    if os.environ.get(FAULT_ENV) == point:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _roll_forward(upstream: Upstream, key: str, staged: str, dataset_key: str) -> None:
    """Finish another writer's claimed write of ``key`` from its staged copy (idempotent)."""
    if not staged.startswith(f"{dataset_key}/{STAGED_DIR}/") or upstream.size(key) is not None:
        return
    try:
        data = b"".join(upstream.read(staged, 0, None))
    except FileNotFoundError:  # its writer finished and removed it meanwhile
        return
    if upstream.size(key) is None:
        upstream.put(key, io.BytesIO(data), len(data))


UNCLAIMED_AFTER = 3600.0  # an unclaimed staged file older than this (by its writer's clock) is a dead writer's


def settle(uri: str, grace_seconds: float) -> int:
    """Finish the claimed writes of dataset ``uri`` that their writers left (rolled forward
    from their staged copies), and remove staged copies that no active claim needs: claimed
    ones once their write is finished, unclaimed ones once older than ``grace_seconds`` and
    an hour (clocks of other machines may be off); the number of staged files removed. gc
    calls this before it sweeps."""
    loc = locate(uri)
    up, removed = loc.upstream, 0
    staged_dir = f"{loc.key}/{STAGED_DIR}"
    entries = [e for e in up.listdir(staged_dir) if not e.is_dir]
    if not entries:
        return 0
    claims = Claims(up.tracking_uri)
    for entry in entries:
        parts = _staged_parts(entry.name)
        if parts is None:
            continue
        stamp, path = parts
        key, staged = f"{loc.key}/{path}", f"{staged_dir}/{entry.name}"
        claimed = None
        for g in range(64):
            found = claims.get(_claim_name(up, key, g))
            if found is None:
                break
            if found[2].get("mlflow_lance.staged") == staged:
                claimed = found
                break
        if claimed is not None and claimed[1]:
            _roll_forward(up, key, staged, loc.key)
            claims.finish(claimed[0])
        elif claimed is None and time.time() - stamp < max(grace_seconds, UNCLAIMED_AFTER):
            continue  # a writer that may still claim it
        up.delete(staged)
        removed += 1
    return removed


# --------------------------------------------------------------------------- pyarrow filesystem


def filesystem(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem over the upstream of ``uri``, and the path of ``uri`` in it."""
    import pyarrow.fs as pafs

    loc = locate(uri)
    return pafs.PyFileSystem(_Handler(loc.upstream)), loc.key


class _RemoteFile(io.RawIOBase):
    """A file of an upstream opened for reading: each read is one ranged request."""

    def __init__(self, loc: Location, size: int):
        self.loc, self._size, self._pos = loc, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self._size}[whence] + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b""
        data = read_range(self.loc, self._pos, end)
        self._pos += len(data)
        return data


class _Upload(io.RawIOBase):
    """A file of an upstream opened for writing: spooled locally, one PUT on close."""

    def __init__(self, upstream: Upstream, key: str):
        self.upstream, self.key = upstream, key
        self._spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self._spool.write(b)

    def close(self) -> None:
        if not self.closed:
            length = self._spool.tell()
            self._spool.seek(0)
            try:
                self.upstream.put(self.key, self._spool, length)
            finally:
                self._spool.close()
        super().close()


def _pa_handler_base() -> type:
    import pyarrow.fs as pafs

    return pafs.FileSystemHandler


class _Handler(_pa_handler_base()):  # type: ignore[misc]
    """pyarrow's view of an upstream: what fs.py reads, lists, writes and deletes."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream

    def get_type_name(self) -> str:
        return "mlflow-artifacts"

    def normalize_path(self, path: str) -> str:
        return path

    def equals(self, other: Any) -> bool:
        return isinstance(other, _Handler) and other.upstream is self.upstream

    def _info(self, path: str, entry: Listed | None) -> Any:
        import pyarrow.fs as pafs

        if entry is None:
            return pafs.FileInfo(path, pafs.FileType.NotFound)
        kind = pafs.FileType.Directory if entry.is_dir else pafs.FileType.File
        return pafs.FileInfo(path, kind, size=entry.size if not entry.is_dir else None)

    def get_file_info(self, paths: list[str]) -> list[Any]:
        out = []
        for path in paths:
            parent, _, name = path.rstrip("/").rpartition("/")
            out.append(self._info(path, next((e for e in self.upstream.listdir(parent) if e.name == name), None)))
        return out

    def get_file_info_selector(self, selector: Any) -> list[Any]:
        base = selector.base_dir.rstrip("/")
        out, todo = [], [(base, 0)]
        while todo:
            folder, depth = todo.pop()
            for entry in self.upstream.listdir(folder):
                path = f"{folder}/{entry.name}"
                out.append(self._info(path, entry))
                if entry.is_dir and selector.recursive and depth < MAX_DEPTH:
                    todo.append((path, depth + 1))
                if len(out) > MAX_LISTING:
                    raise CorruptionError(f"{base} at {self.upstream.label} lists more than {MAX_LISTING} entries")
        return out

    def create_dir(self, path: str, recursive: bool) -> None:
        """Directories exist as soon as a file is written below them."""

    def delete_dir(self, path: str) -> None:
        self.upstream.delete(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        for entry in self.upstream.listdir(path):
            self.upstream.delete(f"{path}/{entry.name}")

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("refusing to delete the root of an artifact store")

    def delete_file(self, path: str) -> None:
        if self.upstream.size(path) is None:
            raise FileNotFoundError(f"{path} not found at {self.upstream.label}")
        self.upstream.delete(path)

    def move(self, src: str, dest: str) -> None:
        raise NotImplementedError("an artifact store cannot rename")

    def copy_file(self, src: str, dest: str) -> None:
        data = b"".join(self.upstream.read(src, 0, None))
        self.upstream.put(dest, io.BytesIO(data), len(data))

    def open_input_stream(self, path: str) -> Any:
        return self.open_input_file(path)

    def open_input_file(self, path: str) -> Any:
        import pyarrow as pa

        size = self.upstream.size(path)
        if size is None:
            raise FileNotFoundError(f"{path} not found at {self.upstream.label}")
        return pa.PythonFile(_RemoteFile(Location(self.upstream, path), size), mode="r")

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        import pyarrow as pa

        return pa.PythonFile(_Upload(self.upstream, path), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        raise NotImplementedError("an artifact store cannot append")


# --------------------------------------------------------------------------- the gateway for Lance


class Gateway(ThreadingHTTPServer):
    """The loopback S3 endpoint Lance opens proxied datasets through (see the module docstring)."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _S3)
        self.key_id = "mlflowlance" + secrets.token_hex(12)
        self.secret = secrets.token_hex(24)
        self.buckets: dict[str, Upstream] = {}
        self.datasets: dict[str, set[str]] = {}  # bucket -> dataset keys this process opened
        self.uploads: dict[str, tuple[str, str, str]] = {}  # upload id -> (bucket, key, folder)
        self.failures: dict[str, str] = {}  # bucket -> the last upstream failure
        self.spool = tempfile.mkdtemp(prefix="mlflow-lance-gateway-")
        threading.Thread(target=self.serve_forever, name="mlflow-lance-gateway", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def bucket_of(self, upstream: Upstream) -> str:
        name = "mlflow-lance-" + hashlib.sha256(upstream.label.encode()).hexdigest()[:24]
        self.buckets[name] = upstream
        return name

    def dataset_of(self, bucket: str, key: str) -> str | None:
        return next((d for d in self.datasets.get(bucket, ()) if key == d or key.startswith(d + "/")), None)


_gateway: list[Gateway] = []


def gateway() -> Gateway:
    """This process's gateway, started on first use (and again in a forked child)."""
    with _lock:
        if not _gateway or _gateway[0].pid != os.getpid():
            g = Gateway()
            g.pid = os.getpid()  # type: ignore[attr-defined]
            _gateway[:] = [g]
        return _gateway[0]


def lance_target(uri: str) -> tuple[str, dict[str, str]]:
    """The ``s3://`` URI and storage options that Lance opens dataset ``uri`` with."""
    loc = locate(uri)
    g = gateway()
    bucket = g.bucket_of(loc.upstream)
    with _lock:
        g.datasets.setdefault(bucket, set()).add(loc.key)
    options = {
        "aws_endpoint": g.endpoint,
        "allow_http": "true",
        "aws_access_key_id": g.key_id,
        "aws_secret_access_key": g.secret,
        "aws_region": "us-east-1",
        "connect_timeout": "5s",
        "timeout": f"{int(timeout() * 2 + 30)}s",  # the gateway bounds each upstream request itself
        "client_max_retries": "1",
        "client_retry_timeout": "10",
    }
    return f"s3://{bucket}/{loc.key}", options


def logical(target: str) -> str | None:
    """The dataset URI behind a gateway URI (``s3://<bucket>/<key>``), if this process opened it."""
    if not _gateway:
        return None
    bucket, _, key = target[len("s3://") :].partition("/")
    upstream = _gateway[0].buckets.get(bucket)
    if upstream is None:
        return None
    if isinstance(upstream, ProxyUpstream):
        return f"mlflow-artifacts:/{key}" if upstream.base.endswith(SERVICE_ROOT) else f"{upstream.base}/{key}"
    return f"{upstream.label.rstrip('/')}/{key}"


def failure(uri: str) -> str | None:
    """The last upstream failure the gateway met for ``uri``'s store (for an error that names it)."""
    if not _gateway:
        return None
    try:
        loc = locate(uri)
    except ValueError:
        return None
    return _gateway[0].failures.get(_gateway[0].bucket_of(loc.upstream))


_S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


class _S3(BaseHTTPRequestHandler):
    """The subset of S3 that Lance uses, answered from an upstream."""

    protocol_version = "HTTP/1.1"
    server: Gateway

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: requests are not logged."""

    # -- plumbing

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        if self.command in ("PUT", "POST") and not getattr(self, "_consumed", False):
            self.close_connection = True  # the body was not read: the connection cannot carry another request
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        body += "</Error>"
        self._reply(status, body.encode(), {"Content-Type": "application/xml"})

    def _body(self) -> tuple[BinaryIO, int]:
        """The request body, spooled (plain, HTTP-chunked or S3's aws-chunked encoding)."""
        spool = tempfile.SpooledTemporaryFile(max_size=8 << 20, dir=self.server.spool)
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        aws = self.headers.get("x-amz-content-sha256", "").startswith(
            "STREAMING-"
        ) or "aws-chunked" in self.headers.get("Content-Encoding", "")
        if chunked or aws:
            source = self.rfile if chunked else _Limited(self.rfile, int(self.headers.get("Content-Length", 0)))
            while True:
                line = source.readline(4096).strip()
                size = int(line.split(b";")[0] or b"0", 16)
                if size == 0:
                    while source.readline(4096).strip():  # trailers
                        pass
                    break
                _copy(source, spool, size)
                source.readline(8)
        else:
            _copy(self.rfile, spool, int(self.headers.get("Content-Length", 0)))
        length = spool.tell()
        spool.seek(0)
        self._consumed = True
        return spool, length

    def _target(self) -> tuple[str, str, dict[str, list[str]]] | None:
        """(bucket, key, query) of an authorised request inside a dataset this process opened."""
        parsed = urlparse(self.path)
        bucket, _, key = parsed.path.lstrip("/").partition("/")
        query = parse_qs(parsed.query, keep_blank_values=True)
        if f"Credential={self.server.key_id}/" not in self.headers.get("Authorization", ""):
            self._error(403, "AccessDenied", "not this process's key")
            return None
        key = unquote(key)
        if bucket not in self.server.buckets:
            self._error(404, "NoSuchBucket", bucket)
            return None
        if key and (len(key.encode()) > MAX_KEY or any(not _plain(p) for p in key.split("/"))):
            self._error(400, "InvalidArgument", f"not a plain key: {key!r}")
            return None
        return bucket, key, query

    def _guarded(self, call: Any) -> None:
        target = self._target()
        if target is None:
            return
        bucket, key, query = target
        if (key or self.command != "GET") and self.server.dataset_of(bucket, key) is None:
            return self._error(403, "AccessDenied", f"{key} lies outside every dataset this process opened")
        try:
            call(self.server.buckets[bucket], bucket, key, query)
        except FileNotFoundError as err:
            self._error(404, "NoSuchKey", str(err))
        except Unanswered as err:
            self.server.failures[bucket] = str(err)
            self._error(400, "ServerUnreachable", str(err))  # not retried: the gateway retried already
        except (CorruptionError, PermissionError, ValueError) as err:
            self._error(403, "AccessDenied", str(err))
        except Exception as err:  # noqa: BLE001 (the tracking store refused a claim, ...: Lance gets an answer, not a hang-up)
            self.server.failures[bucket] = f"{type(err).__name__}: {err}"
            self._error(500, "InternalError", f"{type(err).__name__}: {err}"[:1000])

    # -- verbs

    def do_HEAD(self) -> None:
        def head(up: Upstream, bucket: str, key: str, query: dict) -> None:
            size = up.size(key) if _fixed(key) else _probe(up, key)
            if size is None:
                raise FileNotFoundError(key)
            self.send_response(200)
            for k, v in {**_meta(key, size), "Content-Length": str(size)}.items():
                self.send_header(k, v)
            self.end_headers()

        self._guarded(head)

    def do_GET(self) -> None:
        target = urlparse(self.path)
        if not target.path.lstrip("/").partition("/")[2]:  # a bucket: a listing
            return self._guarded_list()

        def get(up: Upstream, bucket: str, key: str, query: dict) -> None:
            rng = self.headers.get("Range", "")
            if not _immutable(key):  # one GET, passed through (a tag may change between two requests)
                status, content_range, data = up.fetch(key, rng)
                headers = {**_meta(key, len(data)), **({"Content-Range": content_range} if content_range else {})}
                return self._reply(status, data, headers)
            size = up.size(key)
            if size is None:
                raise FileNotFoundError(key)
            start, end = _range(rng, size)
            if start >= end and size:
                return self._error(416, "InvalidRange", rng)
            data = read_range(Location(up, key), start, end) if end > start else b""
            status = 206 if rng else 200
            headers = _meta(key, size)
            if rng:
                headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{size}"
            self._reply(status, data, headers)

        self._guarded(get)

    def _guarded_list(self) -> None:
        target = self._target()
        if target is None:
            return
        bucket, _, query = target
        prefix = query.get("prefix", [""])[0]
        delimiter = query.get("delimiter", [""])[0]
        after = query.get("continuation-token", query.get("start-after", [""]))[0]
        wanted = query.get("max-keys", ["1000"])[0]
        limit = max(1, min(1000, int(wanted))) if wanted.isdigit() else 1000
        up = self.server.buckets[bucket]
        folder = prefix if prefix.endswith("/") else prefix.rpartition("/")[0] + "/"
        folder = folder.strip("/")
        if self.server.dataset_of(bucket, folder) is None and not any(
            d.startswith(folder + "/") for d in self.server.datasets.get(bucket, ())
        ):
            return self._error(403, "AccessDenied", f"{prefix} lies outside every dataset this process opened")
        try:
            keys, prefixes = _walk(up, folder, recursive=delimiter != "/")
        except Unanswered as err:
            self.server.failures[bucket] = str(err)
            return self._error(400, "ServerUnreachable", str(err))
        except (CorruptionError, PermissionError) as err:
            return self._error(403, "AccessDenied", str(err))
        items = sorted(
            [(k, s) for k, s in keys if k.startswith(prefix)] + [(p, None) for p in prefixes if p.startswith(prefix)]
        )
        mine = self.server.datasets.get(bucket, set())
        items = [  # nothing of a sibling dataset: only what lies in, or leads to, a dataset opened here
            it
            for it in items
            if it[0] > after
            and (self.server.dataset_of(bucket, it[0].rstrip("/")) or any(d.startswith(it[0]) for d in mine))
        ]
        page, more = items[:limit], len(items) > limit
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        parts = [f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{_S3_NS}">']
        parts.append(f"<Name>{bucket}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>")
        parts.append(f"<MaxKeys>{limit}</MaxKeys><IsTruncated>{'true' if more else 'false'}</IsTruncated>")
        if more:
            parts.append(f"<NextContinuationToken>{escape(page[-1][0])}</NextContinuationToken>")
        for k, s in page:
            if s is None:
                parts.append(f"<CommonPrefixes><Prefix>{escape(k)}</Prefix></CommonPrefixes>")
            else:
                parts.append(
                    f"<Contents><Key>{escape(k)}</Key><LastModified>{stamp}</LastModified>"
                    f'<ETag>"{_etag(k, s)}"</ETag><Size>{s}</Size><StorageClass>STANDARD</StorageClass></Contents>'
                )
        parts.append("</ListBucketResult>")
        self._reply(200, "".join(parts).encode(), {"Content-Type": "application/xml"})

    def do_PUT(self) -> None:
        def put(up: Upstream, bucket: str, key: str, query: dict) -> None:
            if "uploadId" in query:
                upload = self.server.uploads.get(query["uploadId"][0])
                number = query.get("partNumber", ["0"])[0]
                if upload is None or upload[:2] != (bucket, key) or not number.isdigit():
                    return self._error(404, "NoSuchUpload", query["uploadId"][0])
                body, length = self._body()
                with body, open(os.path.join(upload[2], f"{int(number):05d}"), "wb") as f:
                    shutil.copyfileobj(body, f, _CHUNK)
                return self._reply(200, b"", {"ETag": f'"{number}-{length}"'})
            if self.headers.get("x-amz-copy-source"):
                source_bucket, _, source = unquote(self.headers["x-amz-copy-source"]).lstrip("/").partition("/")
                if (
                    source_bucket != bucket
                    or any(not _plain(p) for p in source.split("/"))
                    or self.server.dataset_of(bucket, source) is None
                ):
                    return self._error(403, "AccessDenied", f"{source} lies outside the dataset")
                data = b"".join(up.read(source, 0, None))
                up.put(key, io.BytesIO(data), len(data))
                body = f'<CopyObjectResult><ETag>"{_etag(key, len(data))}"</ETag></CopyObjectResult>'
                return self._reply(200, body.encode(), {"Content-Type": "application/xml"})
            body, length = self._body()
            with body:
                if self.headers.get("If-None-Match", "").strip() == "*":
                    dataset = self.server.dataset_of(bucket, key)
                    assert dataset is not None
                    if not put_if_absent(up, dataset, key, body, length):
                        return self._error(412, "PreconditionFailed", f"{key} exists")
                else:
                    tail = _tail_of(body, length) if _immutable(key) else b""
                    up.put(key, body, length)
                    _uploaded(up, key, tail, length)
            self._reply(200, b"", {"ETag": f'"{_etag(key, length)}"'})

        self._guarded(put)

    def do_POST(self) -> None:
        def post(up: Upstream, bucket: str, key: str, query: dict) -> None:
            if "uploads" in query:
                upload_id = uuid.uuid4().hex
                folder = tempfile.mkdtemp(dir=self.server.spool)
                self.server.uploads[upload_id] = (bucket, key, folder)
                body = (
                    f'<InitiateMultipartUploadResult xmlns="{_S3_NS}"><Bucket>{bucket}</Bucket>'
                    f"<Key>{escape(key)}</Key><UploadId>{upload_id}</UploadId></InitiateMultipartUploadResult>"
                )
                return self._reply(200, body.encode(), {"Content-Type": "application/xml"})
            if "uploadId" in query:
                upload = self.server.uploads.pop(query["uploadId"][0], None)
                body, _ = self._body()
                body.close()
                if upload is None or upload[:2] != (bucket, key):
                    return self._error(404, "NoSuchUpload", query["uploadId"][0])
                try:
                    parts = sorted(os.path.join(upload[2], p) for p in os.listdir(upload[2]))
                    length = sum(os.path.getsize(p) for p in parts)
                    with _Joined(parts) as joined:
                        up.put(key, joined, length)
                    _uploaded(up, key, _tail_of_parts(parts) if _immutable(key) else b"", length)
                finally:
                    shutil.rmtree(upload[2], ignore_errors=True)
                body = (
                    f'<CompleteMultipartUploadResult xmlns="{_S3_NS}"><Bucket>{bucket}</Bucket>'
                    f'<Key>{escape(key)}</Key><ETag>"{_etag(key, length)}"</ETag></CompleteMultipartUploadResult>'
                )
                return self._reply(200, body.encode(), {"Content-Type": "application/xml"})
            self._error(501, "NotImplemented", "POST")

        if "delete" in parse_qs(urlparse(self.path).query, keep_blank_values=True):
            return self._bulk_delete()
        self._guarded(post)

    def _bulk_delete(self) -> None:
        target = self._target()
        if target is None:
            return
        bucket = target[0]
        body, _ = self._body()
        with body:
            text = body.read(16 << 20).decode("utf-8", "replace")
        keys = [unquote(k) for k in re.findall(r"<Key>(.*?)</Key>", text)]
        up, done = self.server.buckets[bucket], []
        for key in keys:
            key = key.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
            if self.server.dataset_of(bucket, key) is None or any(not _plain(p) for p in key.split("/")):
                continue
            try:
                up.delete(key)
            except (Unanswered, OSError) as err:
                self.server.failures[bucket] = str(err)
                continue
            done.append(f"<Deleted><Key>{escape(key)}</Key></Deleted>")
        result = f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="{_S3_NS}">{"".join(done)}</DeleteResult>'
        self._reply(200, result.encode(), {"Content-Type": "application/xml"})

    def do_DELETE(self) -> None:
        def delete(up: Upstream, bucket: str, key: str, query: dict) -> None:
            if "uploadId" in query:
                upload = self.server.uploads.pop(query["uploadId"][0], None)
                if upload is not None:
                    shutil.rmtree(upload[2], ignore_errors=True)
            else:
                up.delete(key)
            self._reply(204)

        self._guarded(delete)


def _walk(up: Upstream, folder: str, *, recursive: bool) -> tuple[list[tuple[str, int]], list[str]]:
    """(key, size) of the files below ``folder`` and the sub-folders (as ``prefix/``)."""
    files: list[tuple[str, int]] = []
    folders: list[str] = []
    todo = [(folder, 0)]
    while todo:
        current, depth = todo.pop()
        for entry in up.listdir(current):
            path = f"{current}/{entry.name}" if current else entry.name
            if entry.is_dir:
                if recursive and depth < MAX_DEPTH:
                    todo.append((path, depth + 1))
                elif not recursive:
                    folders.append(path + "/")
            else:
                files.append((path, entry.size or 0))
            if len(files) + len(folders) > MAX_LISTING:
                raise CorruptionError(f"{folder} at {up.label} lists more than {MAX_LISTING} entries")
    return files, folders


def _probe(up: Upstream, key: str) -> int:
    """The size of a file that may change, from a one-byte GET (no listing of its folder)."""
    status, content_range, data = up.fetch(key, "bytes=0-0")
    total = (content_range or "").rpartition("/")[2]
    return int(total) if status in (206, 416) and total.isdigit() else len(data)


def _range(header: str, size: int) -> tuple[int, int]:
    """(start, end) of an HTTP Range header (one range) on a file of ``size`` bytes."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m:
        return 0, size
    a, b = m.groups()
    if not a:
        return max(0, size - int(b or 0)), size
    return int(a), min(size, int(b) + 1) if b else size


def _meta(key: str, size: int) -> dict[str, str]:
    return {
        "ETag": f'"{_etag(key, size)}"',
        "Last-Modified": "Thu, 01 Jan 1970 00:00:00 GMT",
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }


def _etag(key: str, size: int) -> str:
    return hashlib.md5(f"{key}\0{size}".encode(), usedforsecurity=False).hexdigest()


def _copy(src: Any, dst: Any, length: int) -> None:
    while length > 0:
        chunk = src.read(min(_CHUNK, length))
        if not chunk:
            raise ValueError("the request body ended early")
        dst.write(chunk)
        length -= len(chunk)


class _Limited:
    """At most ``length`` bytes of a stream, with readline."""

    def __init__(self, raw: Any, length: int):
        self.raw, self.left = raw, length

    def read(self, n: int) -> bytes:
        data = self.raw.read(min(n, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data

    def readline(self, limit: int) -> bytes:
        data = self.raw.readline(min(limit, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data


class _Joined(io.RawIOBase):
    """Several part files read as one (a multipart upload's parts, in order)."""

    def __init__(self, paths: list[str]):
        self.paths, self._f = list(paths), None

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while self.paths or self._f is not None:
            if self._f is None:
                self._f = open(self.paths.pop(0), "rb")
            data = self._f.read(n if n and n > 0 else _CHUNK)
            if data:
                return data
            self._f.close()
            self._f = None
        return b""

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        super().close()
