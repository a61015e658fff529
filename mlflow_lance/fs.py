"""The filesystem under the store: whether a URI is local, the options Lance gets for it, small
whole files (a sidecar, a version index, a pointer) read and replaced atomically, directory
listings, ranged reads of data files on object storage, and, on a local disk, the two rules
every file operation on a dataset keeps:

- **Confined.** A dataset is the tree under its root, and nothing in it may lead out: each
  directory below the root is opened without following links, relative to its parent's
  descriptor, and files are opened, listed and deleted relative to those descriptors. A link
  swapped in while gc runs is refused, never followed (``Tree``). Before Lance, which follows
  links and blocks on FIFOs, is handed a local dataset, ``check_tree`` refuses one whose
  directories are links or whose manifests, transaction files or tags are not regular files.
- **Durable before referenced.** ``sync_files`` / ``sync_dirs`` flush what a commit wrote
  before anything names it (``durable()`` says whether to: MLFLOW_LANCE_FSYNC=0 is the
  opt-out for scratch use). On object storage a completed PUT is durable already.

Local files are opened without waiting on a FIFO and read only when regular, up to a limit:
what is found there is input, not a promise. Object storage goes through pyarrow's
filesystems, configured from the same Lance-style storage options Lance gets.

Nothing here imports Lance or MLflow; ``pyarrow.fs`` is imported only when object storage
is used.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote, urlparse

from .errors import CorruptionError

StorageOptions = Mapping[str, str] | None
SEEN_FILE = "_mlflow_lance/seen.json"  # when gc first saw each file, where listings carry no times

# Object stores: a request with no complete answer within 10 s fails (reads go in 16 MiB
# requests, so that is a stall, not a slow link), and a silent endpoint fails the call within
# about 70 s (Lance retries each request a few times) instead of ~185 s. Callers may override.
REMOTE_DEFAULTS = {
    "connect_timeout": "5s",
    "timeout": "10s",
    "client_max_retries": "1",
    "client_retry_timeout": "10",
}
FSYNC_ENV = "MLFLOW_LANCE_FSYNC"

# The directories of a dataset (Lance's and ours), and those whose every entry Lance may open.
DATASET_DIRS = (
    "_versions",
    "data",
    "_transactions",
    "_refs",
    "_refs/tags",
    "_refs/branches",
    "_deletions",
    "_indices",
    "_mlflow_lance",
    "_mlflow_lance/index",
)
_OPENED_BY_LANCE = ("_versions", "_transactions", "_refs/tags", "_refs/branches", "_deletions", "_indices")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def local_path(uri: str) -> str | None:
    """The filesystem path of a local URI (a plain path or ``file://``), or None for object storage."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return uri
    return None


def lance_options(uri: str, storage_options: StorageOptions) -> dict[str, str] | None:
    """Storage options as Lance takes them, with time limits for object storage."""
    opts = dict(storage_options or {})
    if local_path(uri) is None:
        opts = {**REMOTE_DEFAULTS, **opts}
    return opts or None


def proxied(uri: str) -> bool:
    """Whether ``uri`` lies behind MLflow's artifact store (``mlflow-artifacts:/``, ``dbfs:/``,
    ...), reached through ``transport`` rather than by Lance or pyarrow themselves."""
    if local_path(uri) is not None:
        return False
    from . import transport

    return transport.handles(uri)


def logical(uri: str) -> str:
    """The dataset URI a user knows for a URI Lance reports (its gateway's ``s3://`` for a
    dataset behind MLflow's artifact store), so that errors name the dataset, not the gateway."""
    if uri.startswith("s3://mlflow-lance-"):
        from . import transport

        return transport.logical(uri) or uri
    return uri


def lance_target(uri: str, storage_options: StorageOptions) -> tuple[str, dict[str, str] | None]:
    """The URI and storage options Lance opens dataset ``uri`` with: the dataset itself, or for
    one behind MLflow's artifact store, this process's loopback gateway to it (``transport``)."""
    if proxied(uri):
        from . import transport

        return transport.lance_target(uri)
    return uri, lance_options(uri, storage_options)


_UNREACHABLE = (
    "error sending request",
    "timed out",
    "Timeout",
    "Connection refused",
    "dns error",
    "connect error",
    "tcp connect",
    "Couldn't connect",
    "NETWORK_CONNECTION",
    "Could not resolve",
)


class Unreachable(ConnectionError):
    """The storage of a dataset cannot be reached (refused, silent, unknown host)."""

    def __init__(self, uri: str, text: str, elapsed: float):
        silent = "timed out" in text or "Timeout" in text or elapsed > 5
        reason = f"timed out after {elapsed:.0f}s" if silent else "the connection failed"
        check = (
            "the MLflow tracking server (MLFLOW_TRACKING_URI), which serves its artifacts"
            if "MLflow server" in text
            else "the endpoint (MLFLOW_S3_ENDPOINT_URL or storage_options['aws_endpoint']), the credentials"
        )
        super().__init__(
            f"cannot reach the storage of {uri!r}: {reason} ({text.split(', check')[0][:300]}). Check "
            f"{check} and the network; nothing was written."
        )
        self.text, self.elapsed = text, elapsed

    def about(self, uri: str) -> Unreachable:
        """The same failure, told about ``uri`` (the dataset rather than one of its folders)."""
        return Unreachable(uri, self.text, self.elapsed)


def unreachable(uri: str, err: BaseException, elapsed: float = 0.0) -> Unreachable | None:
    """A clear error for storage that cannot be reached, or None if ``err`` is something else."""
    if isinstance(err, Unreachable):
        return err.about(uri)
    text = str(err)
    if proxied(uri):
        from . import transport

        if isinstance(err, transport.Unanswered):
            return Unreachable(uri, text, elapsed)
        if "ServerUnreachable" in text or "status 400" in text:
            seen = transport.failure(uri)
            return Unreachable(uri, seen, elapsed) if seen else None
    return Unreachable(uri, text, elapsed) if any(m in text for m in _UNREACHABLE) else None


OBJECT_STORES = ("s3", "s3a", "gs", "gcs")  # read by Lance and pyarrow, with the time limits above


LANCE_ONLY = ("az", "abfs", "abfss")  # opened by Lance (loads through its blob API), not pyarrow


def _mlflow_schemes() -> frozenset[str]:
    """The schemes MLflow has an artifact repository for (reached through ``transport``)."""
    from .transport import mlflow_schemes

    return mlflow_schemes()


def check_scheme(uri: str, where: str) -> None:
    """Refuse, before any I/O, a dataset URI that a file (``where``: a pointer, MLmodel) names
    with a scheme nothing here reaches. Supported: local paths (``file://`` too), the object
    stores of ``OBJECT_STORES``, and every scheme MLflow has an artifact repository for
    (``mlflow-artifacts``, ``http(s)``, ``dbfs``, ...). An object-store URI with a query or a
    fragment is refused as well: the request it makes must go to the store it names.

    Raises:
        CorruptionError: names ``where``, the scheme (never the rest of the URI) and the
            supported schemes.
    """
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in OBJECT_STORES + LANCE_ONLY and ("?" in uri or "#" in uri):
        raise CorruptionError(f"{where} names a {scheme}:// dataset URI with a query or fragment, which is refused")
    if local_path(uri) is not None or scheme in OBJECT_STORES + LANCE_ONLY or scheme in _mlflow_schemes():
        return
    mlflow = ", ".join(sorted(s for s in _mlflow_schemes() if s))
    raise CorruptionError(
        f"{where} names a dataset with the scheme {scheme[:40]!r}, which mlflow-lance does not read; supported: "
        f"local paths, {', '.join(OBJECT_STORES + LANCE_ONLY)}, and what MLflow reaches ({mlflow})"
    )


def join(uri: str, *parts: str) -> str:
    """``uri`` with path parts appended (local paths and URIs alike)."""
    return "/".join([uri.rstrip("/"), *parts])


# --------------------------------------------------------------------------- small whole files


def read_bytes(
    uri: str, storage_options: StorageOptions = None, *, limit: int, follow_links: bool = True
) -> bytes | None:
    """The file's bytes, or None if it does not exist, is over ``limit`` bytes or (locally)
    is not a regular file: a FIFO or device would block or never end. ``follow_links=False``
    also reads a local symbolic link as None instead of following it."""
    local = local_path(uri)
    try:
        if local is not None:
            data = _read_regular(local, limit, follow_links)
        else:
            filesystem, path = _filesystem(uri, storage_options)
            with filesystem.open_input_stream(path) as f:
                data = f.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR) or _missing(err):
            return None
        raise unreachable(uri, err) or err from None
    return None if data is None or len(data) > limit else data


def read_text(uri: str, storage_options: StorageOptions = None, *, limit: int, follow_links: bool = True) -> str | None:
    """The file's text, or None if it does not exist, is not UTF-8, is over ``limit`` bytes
    or is not a regular file (see ``read_bytes``)."""
    data = read_bytes(uri, storage_options, limit=limit, follow_links=follow_links)
    try:
        return None if data is None else data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def write_text(uri: str, text: str, storage_options: StorageOptions = None, *, sync: bool = True) -> None:
    """Replace the file atomically: readers see the old or the new text, never a mix.

    Locally that is a rename of a new file in the same directory, the file and the directory
    flushed to the disk unless ``sync`` is False (derived data that a crash may lose) or
    ``durable()`` says not to; on object storage a single PUT.
    """
    local = local_path(uri)
    if local is None:
        filesystem, path = _filesystem(uri, storage_options)
        with filesystem.open_output_stream(path) as f:  # one PUT: atomic on S3-compatible stores
            f.write(text.encode("utf-8"))
        return
    folder = os.path.dirname(os.path.abspath(local))
    made = _made_dirs(folder)
    tmp = f"{local}.{uuid.uuid4().hex}.tmp"
    sync = sync and durable()
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, local)
        if sync:
            sync_dirs([folder, *made])
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` without aliases: in a file from someone else, one alias can stand for
    a list of thousands, and a few hundred KB of them cost minutes to walk. yaml.YAMLError
    (or RecursionError) for anything else that does not parse."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError("YAML aliases are not accepted here")
            return super().compose_node(parent, index)

    loader = NoAliases(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _made_dirs(folder: str) -> list[str]:
    """Create ``folder`` and its missing parents; the parents of those created (whose entries
    must be flushed for the new directories to survive a crash), deepest first."""
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    if missing:
        os.makedirs(missing[0], exist_ok=True)
    return [os.path.dirname(d) for d in missing]


def _read_regular(path: str, limit: int, follow_links: bool) -> bytes | None:
    """Up to ``limit + 1`` bytes of a local file; None if it is not a regular file or is
    already larger than ``limit`` (then nothing is read)."""
    fd = os.open(path, _FILE_FLAGS if not follow_links else _FILE_FLAGS & ~os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        with open(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
    )
    return next((what for test, what in kinds if test(mode)), "not a plain file")


# --------------------------------------------------------------------------- confinement


def check_tree(root: str) -> None:
    """Before Lance opens the local dataset at ``root``: its directories are directories (no
    link leads out of it), and every file Lance may open from them unasked (manifests,
    transaction files, tags) is a regular file, never a link, FIFO or device.
    CorruptionError names the first that is not."""
    for sub in DATASET_DIRS[:-2]:  # a linked index folder is only not read (index.py)
        path = os.path.join(root, sub)
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISDIR(mode):
            raise CorruptionError(
                f"{path} of dataset {root} is {_kind(mode)}, not a directory; nothing outside a dataset "
                f"is read or deleted through it"
            )
    for sub in _OPENED_BY_LANCE:
        _regular_files_only(root, os.path.join(root, sub), nested=sub == "_indices")


def _regular_files_only(root: str, folder: str, *, nested: bool) -> None:
    """Every entry of ``folder`` is a regular file (with ``nested``: or a real directory whose
    entries are, at any depth); CorruptionError names the first that is not."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        with os.scandir(folder) as it:
            for entry in it:
                if nested and entry.is_dir(follow_symlinks=False):
                    _regular_files_only(root, entry.path, nested=True)
                elif not entry.is_file(follow_symlinks=False):
                    raise CorruptionError(
                        f"{entry.path} of dataset {root} is {_kind(entry.stat(follow_symlinks=False).st_mode)}, "
                        f"not a regular file; only regular files inside a dataset are read"
                    )


@dataclass(frozen=True)
class Entry:
    """One file of a dataset directory, as a listing found it."""

    name: str
    size: int
    modified: datetime  # UTC


class Tree:
    """A dataset's directories, for listing and deleting its files and nothing else.

    Locally each directory is opened once, without following links, relative to its parent's
    descriptor (the root itself as named); listings and deletes go through those descriptors,
    so a link swapped in after the check is never followed and a delete can only remove an
    entry of the dataset's own directories (removing a hard link leaves its other names
    intact). On object storage there are no links: paths are the keys under the root.
    Use as a context manager.
    """

    def __init__(self, uri: str, storage_options: StorageOptions = None, *, dry_run: bool = False):
        self.uri = uri.rstrip("/")
        self.dry_run = dry_run  # lists and reads only: not even seen.json is written
        self.root = local_path(uri)
        self.storage_options = storage_options
        self._fds: dict[str, int | None] = {}
        self._made: list[str] = []  # directories a directory was created in
        self._seen: dict[str, str] | None = None  # path -> first seen (stores that list no times)
        self._listed: set[str] = set()

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._seen is not None and exc[0] is None and not self.dry_run:
            kept = {p: t for p, t in self._seen.items() if p.rpartition("/")[0] not in self._listed or p in self._now}
            write_text(join(self.uri, SEEN_FILE), json.dumps(kept), self.storage_options)
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()

    def _dir(self, sub: str, *, create: bool = False) -> int | None:
        """The descriptor of directory ``sub`` (e.g. "_mlflow_lance/index"), None if missing
        (with ``create``: made, level by level, inside its parent's descriptor)."""
        if self._fds.get(sub) is not None or (sub in self._fds and not create):
            return self._fds[sub]
        parent, _, name = sub.rpartition("/")
        if not name:
            fd: int | None = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            base = self._dir(parent, create=create)
            try:
                if base is not None and create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, dir_fd=base)
                        self._made.append(parent)
                fd = None if base is None else os.open(name, _DIR_FLAGS, dir_fd=base)
            except FileNotFoundError:
                fd = None
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise CorruptionError(
                        f"{join(self.uri, sub)} is not a directory (a symbolic link?); gc deletes only "
                        f"inside the dataset, so it removed nothing from {self.uri}"
                    ) from None
                raise
        self._fds[sub] = fd
        return fd

    def check(self) -> None:
        """Open every directory of the dataset (each must be one, not a link) before a delete."""
        if self.root is not None:
            self._dir("")
            for sub in DATASET_DIRS:
                self._dir(sub)

    def files(self, sub: str) -> list[Entry]:
        """The regular files directly in directory ``sub`` (links and FIFOs are not files)."""
        if self.root is None:
            return self._remote_files(sub)
        fd = self._dir(sub)
        if fd is None:
            return []
        out = []
        for name in os.listdir(fd):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append(Entry(name, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc)))
        return out

    def _remote_files(self, sub: str) -> list[Entry]:
        from pyarrow import fs

        filesystem, path = _filesystem(join(self.uri, sub), self.storage_options)
        try:
            infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
        except OSError as err:
            if _missing(err):
                return []
            raise
        files = [i for i in infos if i.type == fs.FileType.File]
        self._listed.add(sub)
        return [Entry(i.base_name, i.size or 0, self._modified(sub, i)) for i in files]

    def _modified(self, sub: str, info: Any) -> datetime:
        """A listed file's modification time; where the store lists none (MLflow's artifact
        service), when a gc first saw it, kept in ``_mlflow_lance/seen.json``: an age that
        only grows across gc runs, so that a file no version names goes once it has been
        unnamed for longer than the grace."""
        if info.mtime is not None:
            return info.mtime.astimezone(timezone.utc)
        if self._seen is None:
            text = read_text(join(self.uri, SEEN_FILE), self.storage_options, limit=64 << 20)
            try:
                loaded = json.loads(text) if text else {}
            except ValueError:
                loaded = {}
            self._seen = (
                {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)}
                if isinstance(loaded, dict)
                else {}
            )
            self._now: set[str] = set()
        path = f"{sub}/{info.base_name}"
        self._now.add(path)
        now = datetime.now(timezone.utc)
        try:
            return min(now, datetime.fromisoformat(self._seen[path]))
        except (KeyError, ValueError):
            self._seen[path] = now.isoformat()
            return now

    def remove(self, sub: str, name: str) -> bool:
        """Delete file ``name`` of directory ``sub``; False if it was already gone."""
        if not (name and "/" not in name and name not in (".", "..")):
            raise ValueError(f"not a file name of {sub}/: {name!r}")
        if self.root is None:
            filesystem, path = _filesystem(join(self.uri, sub, name), self.storage_options)
            try:
                filesystem.delete_file(path)
            except OSError as err:
                if _missing(err):
                    return False
                raise
            return True
        fd = self._dir(sub)
        if fd is None:
            return False
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            return False
        return True

    def write(self, sub: str, name: str, data: bytes, *, sync: bool = True) -> None:
        """Replace file ``name`` of directory ``sub`` (made if missing) atomically; locally
        through the directories' descriptors, so that nothing is written outside the dataset
        whatever links appear meanwhile, and flushed unless ``sync`` is False."""
        if self.root is None:
            filesystem, path = _filesystem(join(self.uri, sub, name), self.storage_options)
            with filesystem.open_output_stream(path) as f:  # one PUT: atomic on S3-compatible stores
                f.write(data)
            return
        fd = self._dir(sub, create=True)
        assert fd is not None
        tmp = f"{name}.{uuid.uuid4().hex}.tmp"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd)
        try:
            with open(out, "wb") as f:
                f.write(data)
                if sync and durable():
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)
        if sync:
            self.sync([sub, *self._made])

    def sync(self, subs: Iterable[str]) -> None:
        """Flush the directories ``subs`` (their entries: creations, renames, deletes)."""
        if self.root is not None and durable():
            for sub in subs:
                if (fd := self._dir(sub)) is not None:
                    os.fsync(fd)


# --------------------------------------------------------------------------- durability


def durable() -> bool:
    """Whether writes are flushed to the disk before anything references them (the default;
    MLFLOW_LANCE_FSYNC=0 turns it off for scratch use, where a crash may lose recent versions)."""
    return os.environ.get(FSYNC_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def sync_files(paths: Iterable[str]) -> None:
    """fsync each local file (opened without following links): its bytes reach the disk."""
    for path in paths:
        fd = os.open(path, _FILE_FLAGS)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sync_dirs(paths: Iterable[str]) -> None:
    """fsync each local directory: the names created or renamed in it reach the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- listings and reads


def list_dirs(uri: str, storage_options: StorageOptions = None) -> list[str]:
    """The URIs of the directories directly under ``uri``, sorted; [] if it cannot be listed.
    Locally a symbolic link is not a directory: what it leads to lies outside ``uri`` (and
    ``uri`` itself, if it is a link, lists nothing)."""
    local = local_path(uri)
    if local is not None:
        try:
            if os.path.islink(local.rstrip("/")):
                return []
            with os.scandir(local) as it:
                return sorted(e.path for e in it if e.is_dir(follow_symlinks=False))
        except OSError:
            return []
    from pyarrow import fs

    filesystem, path = _filesystem(uri, storage_options)
    try:
        infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    return sorted(join(uri, i.base_name) for i in infos if i.type == fs.FileType.Directory)


def list_names(uri: str, storage_options: StorageOptions = None) -> list[str] | None:
    """The names of the files directly in directory ``uri`` (None if it cannot be listed;
    locally, also if it is a link: a link is not the dataset's own directory)."""
    local = local_path(uri)
    if local is not None:
        try:
            if not stat.S_ISDIR(os.lstat(local).st_mode):
                return None
            return os.listdir(local)
        except OSError:
            return None
    from pyarrow import fs

    filesystem, path = _filesystem(uri, storage_options)
    started = time.monotonic()
    try:
        infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    except OSError as err:
        if (gone := unreachable(uri, err, time.monotonic() - started)) is not None:
            raise gone from None
        return None
    return [i.base_name for i in infos if i.type == fs.FileType.File]


class RemoteFiles:
    """Ranged reads of files on object storage (one HEAD per file opened, then GETs of the
    ranges asked for), for the payloads of a version whose positions are known."""

    def __init__(self, storage_options: StorageOptions):
        self.storage_options = storage_options
        self._open: dict[str, Any] = {}

    def size(self, uri: str) -> int:
        return self._file(uri).size()

    def read_into(self, uri: str, position: int, dst: memoryview) -> int:
        """Copy bytes from ``position`` into ``dst`` (16 MiB per request; behind MLflow's
        artifact store one request, which its server answers from a whole-file fetch); the
        bytes copied."""
        if proxied(uri):
            from . import transport

            return transport.read_into(transport.locate(uri), position, dst)
        f, got = self._file(uri), 0
        while got < len(dst):
            piece = f.read_at(min(len(dst) - got, 16 << 20), position + got)
            if not piece:
                break
            dst[got : got + len(piece)] = piece
            got += len(piece)
        return got

    def _file(self, uri: str) -> Any:
        if uri not in self._open:
            filesystem, path = _filesystem(uri, self.storage_options)
            self._open[uri] = filesystem.open_input_file(path)
        return self._open[uri]

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def remote_supported(uri: str) -> bool:
    """Whether pyarrow can read this object store (itself, or through ``transport``; else
    reads go through Lance)."""
    return urlparse(uri).scheme in ("s3", "s3a", "gs", "gcs") or proxied(uri)


def _missing(err: OSError) -> bool:
    text = str(err)
    return "not found" in text.lower() or "NoSuchKey" in text or "does not exist" in text or "404" in text


def _filesystem(uri: str, storage_options: StorageOptions) -> tuple[Any, str]:
    """A pyarrow filesystem and path for ``uri`` (object storage), configured like Lance."""
    from pyarrow import fs

    if proxied(uri):
        from . import transport

        return transport.filesystem(uri)
    opts = {**REMOTE_DEFAULTS, **dict(storage_options or {})}
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        endpoint = opts.get("aws_endpoint")
        kwargs = {
            "access_key": opts.get("aws_access_key_id"),
            "secret_key": opts.get("aws_secret_access_key"),
            "session_token": opts.get("aws_session_token"),
            "region": opts.get("aws_region", "us-east-1"),
            "connect_timeout": _seconds(opts.get("connect_timeout")),
            "request_timeout": _seconds(opts.get("timeout")),
            "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=1 + _count(opts.get("client_max_retries"))),
        }
        if endpoint:
            ep = urlparse(endpoint)
            kwargs["endpoint_override"] = ep.netloc or endpoint
            kwargs["scheme"] = ep.scheme or "https"
        return fs.S3FileSystem(**{k: v for k, v in kwargs.items() if v}), f"{parsed.netloc}{parsed.path}"
    if parsed.scheme in ("gs", "gcs"):
        limit = _call_limit(opts)
        gcs = fs.GcsFileSystem(retry_time_limit=timedelta(seconds=_seconds(opts.get("client_retry_timeout")) or 0))
        return _Bounded(gcs, uri, limit), f"{parsed.netloc}{parsed.path}"
    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
    except ValueError:  # pyarrow's ArrowInvalid: a scheme it has no filesystem for
        raise ValueError(
            f"cannot open {uri}: pyarrow has no filesystem for {parsed.scheme!r}; object storage is read "
            f"from {', '.join(OBJECT_STORES)}"
        ) from None
    return filesystem, path


def _call_limit(opts: Mapping[str, str]) -> float:
    """How long one call to a store without its own request timeouts (GCS) may take: every
    attempt its connect and request time, (1 + client_max_retries) x (connect_timeout +
    timeout), 30 s by default."""
    per_try = (_seconds(opts.get("connect_timeout")) or 0) + (_seconds(opts.get("timeout")) or 0)
    return (1 + _count(opts.get("client_max_retries"))) * (per_try or 15)


class _Bounded:
    """A pyarrow filesystem, or a file it opened, whose every call is given up after ``limit``
    seconds with ``Unreachable`` (a ConnectionError naming the URI). pyarrow's GCS filesystem
    has no request timeout: one request to an endpoint that accepts and never answers stalls
    for 120 s inside google-cloud-cpp, whatever its retry limit. The call given up ends in a
    daemon thread of its own (never joined at exit)."""

    def __init__(self, target: Any, uri: str, limit: float):
        self._target, self._uri, self._limit = target, uri, limit

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def bounded(*args: Any, **kwargs: Any) -> Any:
            out = _within(self._limit, self._uri, lambda: attr(*args, **kwargs))
            return _Bounded(out, self._uri, self._limit) if hasattr(out, "read") or hasattr(out, "write") else out

        return bounded

    def __enter__(self) -> _Bounded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _within(limit: float, uri: str, call: Any) -> Any:
    """``call()``'s result, or Unreachable if it has none after ``limit`` seconds."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["out"] = call()
        except BaseException as err:  # noqa: BLE001 (handed to the caller below)
            box["err"] = err
        done.set()

    started = time.monotonic()
    threading.Thread(target=run, daemon=True, name="mlflow-lance-store-call").start()
    if not done.wait(limit):
        raise Unreachable(uri, f"no answer within {limit:.0f}s (timed out)", time.monotonic() - started)
    if "err" in box:
        raise box["err"]
    return box["out"]


def _count(text: str | None) -> int:
    return int(text) if text and text.isdigit() else 0


def _seconds(text: str | None) -> float | None:
    """'10s' / '10' -> 10.0 (None if unset or unreadable)."""
    if not text:
        return None
    try:
        return float(text.rstrip("s"))
    except ValueError:
        return None
