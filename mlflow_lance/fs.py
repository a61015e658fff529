"""The filesystem under the store: whether a URI is local, the options Lance gets for it, and
the small whole files kept next to a dataset (its sidecar, its version index), read and
replaced atomically on a local disk or on object storage, plus the directory listing gc needs.

Local files are opened without waiting on a FIFO and read only when regular, up to a limit:
what is found there is input, not a promise. Object storage goes through pyarrow's
filesystems, configured from the same Lance-style storage options Lance gets.

Nothing here imports Lance or MLflow; ``pyarrow.fs`` is imported only when object storage
is used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlparse

StorageOptions = Mapping[str, str] | None

# Object stores: a request with no complete answer within 10 s fails (reads go in 16 MiB
# requests, so that is a stall, not a slow link), and a silent endpoint fails the call within
# about 70 s (Lance retries each request a few times) instead of ~185 s. Callers may override.
REMOTE_DEFAULTS = {"connect_timeout": "5s", "timeout": "10s", "client_max_retries": "1",
                   "client_retry_timeout": "10"}  # fmt: skip


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
        if err.errno == errno.ELOOP or "not found" in str(err).lower() or "NoSuchKey" in str(err) \
                or "does not exist" in str(err):  # fmt: skip
            return None
        raise
    return None if data is None or len(data) > limit else data


def read_text(uri: str, storage_options: StorageOptions = None, *, limit: int) -> str | None:
    """The file's text, or None if it does not exist, is not UTF-8, is over ``limit`` bytes
    or is not a regular file (see ``read_bytes``)."""
    data = read_bytes(uri, storage_options, limit=limit)
    try:
        return None if data is None else data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def write_text(uri: str, text: str, storage_options: StorageOptions = None, *, sync: bool = True) -> None:
    """Replace the file atomically: readers see the old or the new text, never a mix.

    Locally that is a rename of a new file in the same directory, flushed to the disk first
    unless ``sync`` is False (for derived data that a crash may lose); on object storage a
    single PUT.
    """
    local = local_path(uri)
    if local is None:
        filesystem, path = _filesystem(uri, storage_options)
        with filesystem.open_output_stream(path) as f:  # one PUT: atomic on S3-compatible stores
            f.write(text.encode("utf-8"))
        return
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, local)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def list_dirs(uri: str, storage_options: StorageOptions = None) -> list[str]:
    """The URIs of the directories directly under ``uri``, sorted; [] if it cannot be listed."""
    local = local_path(uri)
    if local is not None:
        try:
            return sorted(os.path.join(local, n) for n in os.listdir(local) if os.path.isdir(os.path.join(local, n)))
        except OSError:
            return []
    from pyarrow import fs

    filesystem, path = _filesystem(uri, storage_options)
    scheme = uri.split("://", 1)[0]
    try:
        infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    return sorted(f"{scheme}://{i.path}" for i in infos if i.type == fs.FileType.Directory)


def _read_regular(path: str, limit: int, follow_links: bool) -> bytes | None:
    """Up to ``limit + 1`` bytes of a local file; None if it is not a regular file or is
    already larger than ``limit`` (then nothing is read)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        with open(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def _filesystem(uri: str, storage_options: StorageOptions) -> tuple[Any, str]:
    """A pyarrow filesystem and path for ``uri`` (object storage), configured like Lance."""
    from pyarrow import fs

    opts = dict(storage_options or {})
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        endpoint = opts.get("aws_endpoint")
        kwargs = {
            "access_key": opts.get("aws_access_key_id"),
            "secret_key": opts.get("aws_secret_access_key"),
            "session_token": opts.get("aws_session_token"),
            "region": opts.get("aws_region", "us-east-1"),
        }
        if endpoint:
            ep = urlparse(endpoint)
            kwargs["endpoint_override"] = ep.netloc or endpoint
            kwargs["scheme"] = ep.scheme or "https"
        return fs.S3FileSystem(**{k: v for k, v in kwargs.items() if v}), f"{parsed.netloc}{parsed.path}"
    filesystem, path = fs.FileSystem.from_uri(uri)
    return filesystem, path
