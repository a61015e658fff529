"""The Lance weight store: every version of a model's weights in one Lance dataset.

Layout: one row per tensor chunk (see tensors.py), in the state dict's key order. Each
Lance fragment (one data file) holds either one row of a large tensor or a run of small,
single-row tensors (packing, see "the save plan"). The ``data`` column is a Lance blob
column in file format 2.0: the raw bytes of a chunk sit contiguously (64-byte aligned) in
its data file, so local reads can memory-map them, and object storage is read through
Lance's blob API.

A new version is a Lance ``Overwrite`` commit whose fragment list reuses every fragment
whose rows are all unchanged since the latest version (same name, dtype, shape and content
hash, in the same order) and adds new fragments for the rest: a version costs the changed
bytes, plus the other tensors of the runs they were packed in (at most 1 MiB per run).

Nothing here knows about MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import json
import mmap
import os
import random
import re
import stat
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import NamedTuple, NoReturn
from urllib.parse import unquote, urlparse

import lance
import numpy as np
import pyarrow as pa
import torch
import zstandard
from lance.commit import CommitConflictError
from lance.fragment import FragmentMetadata, write_fragments

from . import tree
from .tensors import (
    DEFAULT_CHUNK_BYTES,
    DTYPES,
    META_COLUMNS,
    SCHEMA_FIELDS,
    TensorRows,
    check_key,
    dtype_from_name,
    find_aliases,
    hash_bytes,
    readonly_bytes,
    rows_batch,
    stored_nbytes,
    tensor_key,
    to_rows,
    uint8_view,
    validate_state_dict,
)

FORMAT_VERSION = 1
_FORMAT_KEY = "mlflow_lance.format"
_COMPRESSION_KEY = "mlflow_lance.compression"
_PROP = "mlflow_lance."  # prefix of our transaction properties
_STORAGE_VERSION = "2.0"  # Lance file format whose blob payloads sit contiguous in the data file
_COMPRESSIONS = ("zstd",)

Version = int | str  # a version number or a tag name
StorageOptions = Mapping[str, str] | None


class WeightsError(ValueError):
    """A weights dataset, version or tensor is missing, malformed or corrupt."""


class VersionNotFoundError(WeightsError, LookupError):
    """The requested version or tag does not exist (the message lists what does)."""


class CorruptionError(WeightsError):
    """A version's stored bytes or metadata are inconsistent: corrupted, truncated or crafted."""


@dataclass(frozen=True)
class VersionInfo:
    """One version of a weights dataset."""

    version: int
    timestamp: datetime
    message: str | None
    properties: dict[str, str]
    num_tensors: int
    total_bytes: int
    bytes_written: int
    changed: tuple[str, ...]  # names added or changed relative to `parent`
    removed: tuple[str, ...]
    parent: int | None  # the version this one was deduplicated against
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Diff:
    """Names added, removed, changed and unchanged from version ``a`` to version ``b``."""

    a: int
    b: int
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]


@dataclass(frozen=True)
class Problem:
    """One chunk whose bytes do not match what was recorded."""

    name: str
    chunk: int
    file: str
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of recomputing every content hash of a version."""

    uri: str
    version: int
    tensors: int
    chunks: int
    bytes: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` removed."""

    removed_versions: list[int]
    bytes_removed: int
    kept_tagged: list[int]


class LoadResult(NamedTuple):
    """Like ``nn.Module.load_state_dict``'s return value."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# --------------------------------------------------------------------------- opening


def _uri(uri: str | os.PathLike) -> str:
    return os.fspath(uri)


def _local_path(uri: str) -> str | None:
    """The filesystem path of a local dataset URI, or None for object storage."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return uri
    return None


# Object stores: a request with no complete answer within 10 s fails (reads go in 16 MiB
# requests, so that is a stall, not a slow link), and a silent endpoint fails the call within
# about 70 s (Lance retries each request a few times) instead of ~185 s. Callers may override.
_REMOTE_DEFAULTS = {"connect_timeout": "5s", "timeout": "10s", "client_max_retries": "1",
                    "client_retry_timeout": "10"}  # fmt: skip


def _lance_options(uri: str, storage_options: StorageOptions) -> dict[str, str] | None:
    """Storage options as Lance takes them, with time limits for object storage."""
    opts = dict(storage_options or {})
    if _local_path(uri) is None:
        opts = {**_REMOTE_DEFAULTS, **opts}
    return opts or None


def _unreachable(uri: str, err: Exception, elapsed: float = 0.0) -> ConnectionError | None:
    """A clear error for storage that cannot be reached, or None if ``err`` is something else."""
    text = str(err)
    markers = ("error sending request", "timed out", "Timeout", "Connection refused", "dns error",
               "connect error", "tcp connect")  # fmt: skip
    if not any(m in text for m in markers):
        return None
    silent = "timed out" in text or "Timeout" in text or elapsed > 5
    reason = f"timed out after {elapsed:.0f}s" if silent else "the connection failed"
    return ConnectionError(
        f"cannot reach the storage of {uri!r}: {reason} ({text.split(',')[0][:200]}). Check the "
        f"endpoint (MLFLOW_S3_ENDPOINT_URL or storage_options['aws_endpoint']), the credentials "
        f"and the network; nothing was written."
    )


def _open(uri: str, storage_options: StorageOptions = None) -> lance.LanceDataset:
    started = time.monotonic()
    try:
        return lance.dataset(uri, storage_options=_lance_options(uri, storage_options))
    except (ValueError, OSError) as e:
        if (err := _unreachable(uri, e, time.monotonic() - started)) is not None:
            raise err from None
        if "was not found" in str(e) or "Not found" in str(e):
            raise FileNotFoundError(
                f"no weights dataset at {uri!r}: nothing has been saved there yet "
                f"(check the URI, or save a version first)"
            ) from None
        raise


def _exists(uri: str, storage_options: StorageOptions) -> lance.LanceDataset | None:
    try:
        return _open(uri, storage_options)
    except FileNotFoundError:
        return None


def _tag_list(ds: lance.LanceDataset) -> dict:
    """Lance's tag listing, retried: a tag deleted by another process between Lance's directory
    listing and its read of the tag file makes one listing fail with 'Not found'."""
    for attempt in range(8):
        try:
            return ds.tags.list()
        except (ValueError, OSError) as err:
            if "not found" not in str(err).lower() or attempt == 7:
                raise
            time.sleep(random.uniform(0, 0.005 * 2**attempt))
    raise AssertionError("unreachable")


def _available(ds: lance.LanceDataset) -> str:
    versions = [v["version"] for v in ds.versions()]
    tags = sorted(_tag_list(ds))
    span = f"{versions[0]}..{versions[-1]}" if len(versions) > 2 else ", ".join(map(str, versions))
    return f"versions: {span}" + (f"; tags: {', '.join(tags)}" if tags else "; no tags")


def _checkout(ds: lance.LanceDataset, version: Version | None) -> lance.LanceDataset:
    if version is None:
        return ds
    if isinstance(version, bool) or not isinstance(version, (int, str)):
        raise TypeError(f"version must be an int or a tag name, got {version!r}")
    try:
        return ds.checkout_version(version)
    except (ValueError, OSError):
        kind = "tag" if isinstance(version, str) else "version"
        raise VersionNotFoundError(
            f"{kind} {version!r} does not exist in {ds.uri}; {_available(ds)}"
        ) from None


def _kind(ds: lance.LanceDataset) -> str:
    """'weights' for our layout, 'seed' for the Lance docs example's, else an error."""
    meta = ds.schema.metadata or {}
    if _FORMAT_KEY.encode() in meta:
        found = int(meta[_FORMAT_KEY.encode()])
        if found > FORMAT_VERSION:
            raise WeightsError(
                f"{ds.uri} uses weights format {found}, newer than this mlflow-lance reads "
                f"({FORMAT_VERSION}); upgrade mlflow-lance"
            )
        return "weights"
    names = set(ds.schema.names)
    if {"name", "value", "shape"} <= names and pa.types.is_list(ds.schema.field("value").type):
        return "seed"
    raise WeightsError(
        f"{ds.uri} is a Lance dataset but not a weights dataset (columns: "
        f"{', '.join(ds.schema.names)}); point at a dataset written by mlflow-lance"
    )


def _schema(compression: str | None) -> pa.Schema:
    """Schema of a new dataset. ``data`` is a blob column: each payload is stored contiguous.

    Compression is ours, per payload (zstd), recorded in the schema: Lance's own encodings
    leave one-value pages uncompressed, and our layout has one value per data file.
    """
    if compression is not None and compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be None or one of {_COMPRESSIONS}, got {compression!r}")
    data = pa.field("data", pa.large_binary(), nullable=False, metadata={"lance-encoding:blob": "true"})
    return pa.schema(
        [*SCHEMA_FIELDS, data],
        metadata={_FORMAT_KEY: str(FORMAT_VERSION), _COMPRESSION_KEY: compression or "none"},
    )


def _compression(ds: lance.LanceDataset) -> str | None:
    found = (ds.schema.metadata or {}).get(_COMPRESSION_KEY.encode(), b"none").decode()
    return None if found == "none" else found


# --------------------------------------------------------------------------- reading metadata


class _Row(NamedTuple):
    """Where one chunk of a stored tensor lives."""

    chunk: int
    offset: int  # byte offset of the chunk inside the tensor
    size: int  # payload bytes
    hash: str
    address: int  # Lance row address (fragment id << 32 | row)
    index: int  # position of the row in the version
    position: int | None  # byte position of a blob payload inside its data file
    file: str  # the data file, relative to the dataset's data/ directory
    stored: int  # payload bytes in the file (differs from `size` when compressed)


@dataclass
class _Entry:
    """One stored tensor of a version, built from the small metadata columns only."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    alias: str | None
    meta: list[dict]
    rows: list[_Row]

    @property
    def key(self) -> tuple:
        return tensor_key(self.meta)


# A row's metadata, Lance row address, blob position, data file and stored payload size.
_Located = tuple[dict, int, "int | None", str, "int | None"]

# What a version's rows may claim. Checked before any byte is read or any tensor allocated:
# a dataset or version index from someone else is input, not a promise.
_MAX_DIMS = 64
_MAX_INDEX_BYTES = 64 << 20  # a version index larger than this is ignored (rebuilt by a scan)
_MAX_PROPERTY_BYTES = 16 << 20  # a commit property larger than this is malformed


def _build_entries(rows: Iterable[_Located]) -> OrderedDict[str, _Entry]:
    out: OrderedDict[str, _Entry] = OrderedDict()
    for index, (meta, address, position, file, stored) in enumerate(rows):
        e = out.get(meta["name"])
        if e is None:
            e = out[meta["name"]] = _Entry(
                meta["name"], meta["dtype"], meta["shape"], meta["nbytes"], meta["alias"], [], []
            )
        e.meta.append(meta)
        e.rows.append(
            _Row(meta["chunk"], meta["offset"], 0, meta["hash"], address, index, position, file, stored or 0)
        )
    for e in out.values():  # a chunk's size runs to the next chunk's offset
        ends = [r.offset for r in e.rows[1:]] + [0 if e.alias else e.nbytes]
        e.rows = [
            r._replace(size=end - r.offset, stored=r.stored if r.position is not None else end - r.offset)
            for r, end in zip(e.rows, ends)
        ]
    return out


def _entry_problem(e: _Entry, entries: Mapping[str, _Entry], compressed: bool) -> str | None:
    """Why ``e``'s metadata cannot be loaded as it claims, or None when it is consistent.

    The rules: one name is one run of rows that agree on dtype, shape, size and tie; dtype ×
    shape is the recorded size; chunks tile exactly that size, each stored with exactly its
    bytes; a tie names another stored, untied tensor of the same dtype and shape.
    """
    if len(e.rows) > 1:
        first = e.meta[0]
        if any((m["dtype"], m["shape"], m["nbytes"], m["alias"]) != (first["dtype"], first["shape"],
               first["nbytes"], first["alias"]) for m in e.meta):  # fmt: skip
            return "its rows disagree on dtype, shape, size or tie"
        if [r.index for r in e.rows] != list(range(e.rows[0].index, e.rows[0].index + len(e.rows))):
            return "the name is stored more than once"
    try:
        check_key(e.name)
    except (TypeError, ValueError) as err:
        return str(err)
    if e.dtype not in DTYPES:
        return f"dtype {e.dtype!r} is unknown to torch {torch.__version__}"
    if len(e.shape) > _MAX_DIMS or any(s is None or s < 0 for s in e.shape):
        return f"shape {e.shape} is not a list of at most {_MAX_DIMS} non-negative sizes"
    expected = stored_nbytes(e.dtype, e.shape)
    if e.nbytes != expected:
        return f"it records {e.nbytes} bytes, but {e.dtype} x {e.shape} takes {expected}"
    if e.alias is not None:
        target = entries.get(e.alias)
        if e.alias == e.name:
            return "it is tied to itself"
        if target is None:
            return f"it is tied to {e.alias!r}, which is not stored"
        if target.alias is not None:
            return f"it is tied to {e.alias!r}, which is itself a tie"
        if (target.dtype, target.shape) != (e.dtype, e.shape):
            return f"it is tied to {e.alias!r} of another dtype or shape"
        tie = e.rows[0]  # compressed, its empty payload is a (never read) empty zstd frame
        if len(e.rows) != 1 or tie.offset or tie.chunk or (tie.stored and not compressed):
            return "a tie must be one empty row"
        return None
    if [r.chunk for r in e.rows] != list(range(len(e.rows))):
        return f"its chunks are numbered {[r.chunk for r in e.rows][:10]}, not 0..{len(e.rows) - 1}"
    smallest = 1 if len(e.rows) > 1 else 0  # only a one-row tensor may be empty
    if e.rows[0].offset != 0 or any(r.size < smallest for r in e.rows):
        return f"its chunk offsets {[r.offset for r in e.rows][:10]} do not tile its {e.nbytes} bytes"
    for r in e.rows:
        if (r.position is not None and r.position < 0) or r.stored < 0:
            return f"chunk {r.chunk} has a negative position or size"
        if not compressed and r.stored != r.size:
            return f"chunk {r.chunk} stores {r.stored} bytes, but its part of the tensor takes {r.size}"
    return None


def _problems(entries: Mapping[str, _Entry], compressed: bool) -> list[Problem]:
    """Every tensor of the version whose metadata is inconsistent (see ``_entry_problem``)."""
    out = []
    for e in entries.values():
        detail = _entry_problem(e, entries, compressed)
        if detail is not None:
            out.append(Problem(e.name, -1, e.rows[0].file, detail))
    return out


def _raise_problems(ds: lance.LanceDataset, problems: list[Problem]) -> None:
    if problems:
        p = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptionError(
            f"version {ds.version} of {ds.uri} is corrupt or crafted: "
            f"{f'tensor {p.name[:200]!r}: ' if p.name else ''}{p.detail}{more}. Nothing was "
            f"loaded; run verify() for the full list, or load another version"
        )


def _scan(ds: lance.LanceDataset, fragments: list | None = None) -> list[_Located]:
    """Read the metadata columns (and blob descriptors) of every row, or of ``fragments``."""
    cols = [*META_COLUMNS, "data"]  # a blob column scans as (position, size) descriptors
    listed = fragments if fragments is not None else ds.get_fragments()
    files = {fid: path for fid, path, _ in _fragment_table(ds, listed)}
    try:
        table = ds.scanner(columns=cols, with_row_address=True, fragments=fragments).to_table()
    except (OSError, ValueError) as err:
        if (unreachable := _unreachable(ds.uri, err)) is not None:
            raise unreachable from None
        raise CorruptionError(
            f"the rows of version {ds.version} of {ds.uri} cannot be read ({str(err)[:300]}); "
            f"restore the dataset or load another version"
        ) from None
    out = []
    for row in table.to_pylist():
        address = row.pop("_rowaddr")
        desc = row.pop("data")
        out.append((row, address, desc["position"], files.get(address >> 32, ""), desc["size"]))
    return out


# The version index: a JSON copy of a version's metadata rows and blob positions, kept next
# to a local dataset so that opening a version reads one small file instead of one footer per
# data file (40 ms for GPT-2's 148 files). It is derived data: it is used only when its rows
# hash to the digest the version's commit recorded (``mlflow_lance.rows``) and its file list
# is the manifest's; anything else (missing, stale, unparsable, oversized, a version committed
# without a digest) is ignored and the rows are scanned.
_INDEX_DIR = ("_mlflow_lance", "index")
_INDEX_FORMAT = 1
_ROW_TYPES = [{str}, {int}, {int}, {int}, {str}, {list}, {str}, {str, type(None)}]  # per META_COLUMNS
_SHAPE = META_COLUMNS.index("shape")


def _index_path(ds: lance.LanceDataset, version: int) -> str | None:
    root = _local_path(ds.uri)
    return None if root is None else os.path.join(root, *_INDEX_DIR, f"{version}.json")


def _fragment_table(ds: lance.LanceDataset, fragments) -> list[tuple[int, str, int]]:
    """(fragment id, data file, rows) of each fragment, in order (rows as the manifest says).

    Data files must be plain names in the dataset's own data/ directory: a manifest that
    points elsewhere (``../x``, an absolute path, another base) is refused, naming the file.
    """
    out = []
    for f in fragments:
        files = f.metadata.files
        path = files[0].path if files else ""
        if files and (
            len(files) != 1 or files[0].base_id is not None or not path or path in (".", "..")
            or any(c in path for c in "/\\\0")
        ):  # fmt: skip
            raise CorruptionError(
                f"version {ds.version} of {ds.uri} names data file {path[:200]!r} for fragment "
                f"{f.fragment_id}, which is not a file of the dataset's data/ directory; only "
                f"files inside the dataset are read"
            )
        out.append((f.fragment_id, path, f.metadata.physical_rows))
    return out


def _rows_digest(metas: Iterable[Mapping]) -> str:
    """Digest of a version's metadata rows, recorded in its commit to check the index against."""
    rows = [[m[c] for c in META_COLUMNS] for m in metas]
    return hash_bytes(json.dumps(rows, separators=(",", ":")).encode())


def _recorded_digest(ds: lance.LanceDataset) -> str | None:
    try:
        txn = ds.read_transaction(ds.version)
    except (OSError, ValueError):
        return None
    props = (txn.transaction_properties or {}) if txn is not None else {}
    return props.get(_PROP + "rows")


def _valid_index_row(row: object, n: int) -> bool:
    """Each value of an index row has its column's JSON type (ints are never bools)."""
    if type(row) is not list or len(row) != n + 2:
        return False
    if any(type(v) not in types for v, types in zip(row, _ROW_TYPES)):
        return False
    return all(type(v) is int for v in row[_SHAPE]) and all(v is None or type(v) is int for v in row[n:])


def _read_index(
    ds: lance.LanceDataset, table: list[tuple[int, str, int]], digest: str | None
) -> list[_Located] | None:
    """The version's rows from its index, or None unless the index checks out (see above).

    Row addresses come from the manifest: fragment by fragment, as many rows as each holds."""
    path = _index_path(ds, ds.version)
    if path is None or digest is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_INDEX_BYTES:
                return None
            doc = json.loads(f.read(_MAX_INDEX_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    n = len(META_COLUMNS)
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if (
        not isinstance(rows, list)
        or doc.get("index_format") != _INDEX_FORMAT
        or doc.get("files") != [path for _, path, _ in table]
        or len(rows) != sum(count for *_, count in table)
        or not all(_valid_index_row(row, n) for row in rows)
    ):
        return None
    places = [(fid << 32 | i, path) for fid, path, count in table for i in range(count)]
    located = [
        (dict(zip(META_COLUMNS, row[:n])), address, row[n], path, row[n + 1])
        for row, (address, path) in zip(rows, places)
    ]
    return located if _rows_digest(m for m, *_ in located) == digest else None


def _write_index(ds: lance.LanceDataset, table: list[tuple[int, str, int]], rows: list[_Located]) -> None:
    """Best effort: a failure only means the next open scans. Writes only inside the dataset."""
    path = _index_path(ds, ds.version)
    if path is None or len(rows) != sum(count for *_, count in table):
        return
    doc = {
        "index_format": _INDEX_FORMAT,
        "version": ds.version,
        "files": [f for _, f, _ in table],
        "rows": [[m[c] for c in META_COLUMNS] + [pos, stored] for m, _, pos, _, stored in rows],
    }
    folder = os.path.dirname(path)
    if os.path.realpath(folder) != os.path.join(os.path.realpath(_local_path(ds.uri) or ""), *_INDEX_DIR):
        return  # a link out of the dataset: write nothing there
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{ds.version}.", suffix=".tmp")
        os.fchmod(fd, 0o644)  # readable like the data files (mkstemp makes it private)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _entries(ds: lance.LanceDataset) -> OrderedDict[str, _Entry]:
    """Every tensor of the checked-out version, in saved order (reads no tensor bytes)."""
    return _build_entries(_located(ds)[0])


def _located(ds: lance.LanceDataset, use_index: bool = True) -> tuple[list[_Located], bool]:
    """The version's rows (from its index when that checks out, else a scan) and whether
    they agree with the digest its commit recorded (True when it recorded none)."""
    table = _fragment_table(ds, ds.get_fragments())
    digest = _recorded_digest(ds)
    rows = _read_index(ds, table, digest) if use_index else None
    if rows is not None:
        return rows, True
    _check_local_files(ds, table)
    rows = _scan(ds)
    agree = digest is None or _rows_digest(m for m, *_ in rows) == digest
    if digest is not None and agree:
        _write_index(ds, table, rows)
    return rows, agree


def _check_local_files(ds: lance.LanceDataset, table: list[tuple[int, str, int]]) -> None:
    """Before Lance scans a local dataset: every data file is a regular file in data/ (a
    symlink or FIFO there is refused, naming it, instead of followed or waited on)."""
    root = _local_path(ds.uri)
    if root is None:
        return
    data = os.path.join(root, "data")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISDIR(os.lstat(data).st_mode):
            raise CorruptionError(_not_a_directory(ds, data))
    for _, name, _ in table:
        path = os.path.join(data, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue  # missing: Lance says so
        if not stat.S_ISREG(st.st_mode):
            raise CorruptionError(_not_regular(ds, path))


def _not_a_directory(ds: lance.LanceDataset, path: str) -> str:
    return (
        f"{path} of {ds.uri} is not a directory (a symbolic link?); only files inside the "
        f"dataset are read"
    )


def _not_regular(ds: lance.LanceDataset, path: str) -> str:
    return (
        f"data file {path} of version {ds.version} of {ds.uri} is not a regular file (a symbolic "
        f"link, FIFO, device or directory); only regular files inside the dataset are read"
    )


def _seed_entries(ds: lance.LanceDataset) -> OrderedDict[str, _Entry]:
    """Tensors of a dataset written by the Lance docs example (name / value / shape)."""
    table = ds.to_table(columns=["name", "shape"], with_row_address=True)
    out: OrderedDict[str, _Entry] = OrderedDict()
    for index, row in enumerate(table.to_pylist()):
        shape = list(row["shape"] or [])
        name = row["name"]
        if (not isinstance(name, str) or name in out or len(shape) > _MAX_DIMS
                or any(s is None or s < 0 for s in shape)):  # fmt: skip
            raise CorruptionError(
                f"row {index} of {ds.uri} (version {ds.version}) repeats the name {name!r} or has "
                f"shape {shape[:10]}, which is not a list of non-negative sizes"
            )
        nbytes = stored_nbytes("float64", shape)
        out[name] = _Entry(name, "float64", shape, nbytes, None, [],
                           [_Row(0, 0, nbytes, "", row["_rowaddr"], index, None, "", nbytes)])
    return out


def _select(entries: Mapping[str, _Entry], names: str | Iterable[str] | None) -> list[str]:
    """Names matching ``names``: None = all, a str = a prefix or a glob, else exact keys."""
    if names is None:
        return list(entries)
    if isinstance(names, str):
        if any(c in names for c in "*?["):
            return [n for n in entries if fnmatch.fnmatchcase(n, names)]
        return [n for n in entries if n.startswith(names)]
    wanted = list(names)
    missing = [n for n in wanted if n not in entries]
    if missing:
        raise KeyError(
            f"tensor(s) {missing[:10]} not stored in this version ({len(entries)} tensors, e.g. "
            f"{list(entries)[:3]}); pass a prefix or a glob to select by pattern"
        )
    return wanted


# --------------------------------------------------------------------------- reading bytes


_PIECE = 16 << 20
_THREADS = min(4, os.cpu_count() or 1)
_PARALLEL_WRITE_BYTES = 64 << 20
_COMMIT_ATTEMPTS = 64
_ZSTD_HEADER = 18  # the longest zstd frame header: enough to read the frame's content size


def _pread_exact(fd: int, path: str, position: int, dst: torch.Tensor) -> None:
    view, got = memoryview(dst.numpy()), 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], position + got)
        if n == 0:
            raise CorruptionError(f"{path} ends at byte {position + got}, before its tensor does")
        got += n


def _mmap_enabled() -> bool:
    """MLFLOW_LANCE_MMAP=0 makes load_state_dict read into fresh memory instead of mapping
    files (for filesystems where a mapped file may change or vanish under the reader)."""
    return os.environ.get("MLFLOW_LANCE_MMAP", "1").lower() not in ("0", "false", "no")


class _Reader:
    """Reads chunk payloads of one version; use as a context manager (it holds open files).

    Local datasets are read straight from the data files with ``preadv`` into memory the
    caller owns, or memory-mapped copy-on-write (``mapped``): that is what makes loads as
    fast as safetensors. Each data file is opened once, relative to the dataset's data/
    directory, without following links and without waiting on FIFOs, and must be a regular
    file holding every byte its rows claim. Object storage goes through Lance's blob API,
    seed-format datasets through Lance's reader.
    """

    def __init__(self, ds: lance.LanceDataset, kind: str = "weights"):
        self.ds = ds
        self.kind = kind
        self.codec = _compression(ds) if kind == "weights" else None
        self.root = _local_path(ds.uri) if kind == "weights" else None
        self._dir: int | None = None
        self._files: dict[str, tuple[int, int]] = {}  # data file -> (fd, size)

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None

    def file_of(self, row: _Row) -> str:
        return self.path_of(row.file)

    def path_of(self, file: str) -> str:
        """The full path or URI of a data file named in the manifest."""
        base = self.root if self.root is not None else self.ds.uri.rstrip("/")
        return f"{base}/data/{file}"

    def _open(self, row: _Row) -> tuple[int, int]:
        path = self.file_of(row)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        if self._dir is None:
            data = os.path.join(self.root, "data")
            try:
                self._dir = os.open(data, flags | os.O_DIRECTORY)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise CorruptionError(_not_a_directory(self.ds, data)) from None
                raise
        try:
            fd = os.open(row.file, flags, dir_fd=self._dir)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptionError(_not_regular(self.ds, path)) from None
            raise CorruptionError(
                f"data file {path} of version {self.ds.version} of {self.ds.uri} cannot be "
                f"opened ({err.strerror}); restore it or load another version"
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CorruptionError(_not_regular(self.ds, path))
        return fd, st.st_size

    def _local(self, row: _Row) -> int | None:
        """The open data file of a local chunk, checked to hold the chunk's bytes; else None."""
        if self.root is None or row.position is None:
            return None
        if row.file not in self._files:
            self._files[row.file] = self._open(row)
        fd, size = self._files[row.file]
        if row.position + row.stored > size:
            raise CorruptionError(
                f"data file {self.file_of(row)} holds {size} bytes, but chunk {row.chunk} of "
                f"version {self.ds.version} claims bytes {row.position}..{row.position + row.stored}; "
                f"the file was truncated or the metadata is crafted. Run verify() on {self.ds.uri}"
            )
        return fd

    def check(self, rows: Iterable[_Row]) -> None:
        """Before anything is allocated or written: each local file exists, is regular and
        holds its chunk; a compressed chunk's frame decompresses to exactly its size."""
        for row in rows:
            if row.stored and self.kind == "weights":
                self._local(row)
                if self.codec:
                    head = torch.empty(min(row.stored, _ZSTD_HEADER), dtype=torch.uint8)
                    self._read_stored(row, head, whole=False)
                    try:
                        size = zstandard.frame_content_size(memoryview(head.numpy()))
                        what = f"a zstd frame of {size} bytes" if size >= 0 else "a zstd frame of unknown size"
                    except zstandard.ZstdError:
                        size, what = None, "not a zstd frame"
                    if size != row.size:
                        raise CorruptionError(
                            f"chunk {row.chunk} at {self.file_of(row)} is {what}, but its tensor "
                            f"records {row.size} bytes; run verify() on {self.ds.uri}"
                        )

    def mapped(self, row: _Row, dtype: torch.dtype, shape: list[int]) -> torch.Tensor | None:
        """The chunk as a copy-on-write memory map of its data file (lazy, no copy), or None."""
        if self.codec or row.size == 0 or not _mmap_enabled():
            return None
        fd = self._local(row)
        if fd is None or row.position % dtype.itemsize:
            return None
        start = row.position - row.position % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, row.position + row.size - start, access=mmap.ACCESS_COPY, offset=start)
        flat = torch.frombuffer(mapping, dtype=torch.uint8, count=row.size, offset=row.position - start)
        return flat.view(dtype).reshape(shape)

    def read_many(self, jobs: list[tuple[_Row, torch.Tensor]]) -> None:
        """Fill each flat, contiguous uint8 CPU tensor with its chunk's bytes.

        Local files are read by a few threads in 16 MiB pieces: page-cache copies are
        memory-bound, and one core does not saturate memory.
        """
        if self.codec:
            for row, dst in jobs:
                self._decompress(row, dst)
            return
        pieces, other = [], []
        for row, dst in jobs:
            fd = self._local(row) if row.size else None
            if fd is None:
                other.append((row, dst))
                continue
            for start in range(0, row.size, _PIECE):
                pieces.append((fd, self.file_of(row), row.position + start, dst[start : start + _PIECE]))
        if len(pieces) > 1 and _THREADS > 1:
            with ThreadPoolExecutor(_THREADS) as pool:
                list(pool.map(lambda p: _pread_exact(*p), pieces))
        else:
            for p in pieces:
                _pread_exact(*p)
        for row, dst in other:
            self._read_stored(row, dst)

    def _read_stored(self, row: _Row, dst: torch.Tensor, whole: bool = True) -> None:
        """The payload as stored (or its first ``dst.numel()`` bytes unless ``whole``), through
        the local file, Lance's blob API or its reader. Remote reads go in 16 MiB requests,
        so that the object-store request timeout bounds a stall, not a large tensor."""
        want = dst.numel()
        if row.stored == 0:
            got = 0
        elif self.kind == "seed":
            value = self.ds.take([row.index], columns=["value"]).column(0).combine_chunks()
            src = readonly_bytes(value.flatten().to_numpy(zero_copy_only=False))
            got = src.numel()
            dst[: min(got, want)].copy_(src[:want])
        elif (fd := self._local(row)) is not None:
            _pread_exact(fd, self.file_of(row), row.position, dst)
            got = want
        else:
            (blob,) = self.ds.take_blobs("data", addresses=[row.address])
            view, got = memoryview(dst.numpy()), 0
            while got < want:
                n = blob.readinto(view[got : got + _PIECE])
                if not n:
                    break
                got += n
        if got != want or (whole and want != row.stored):
            raise CorruptionError(
                f"chunk {row.chunk} at {self.file_of(row)} holds {got} bytes, expected "
                f"{want}; run verify() on {self.ds.uri}"
            )

    def _decompress(self, row: _Row, dst: torch.Tensor) -> None:
        packed = torch.empty(row.stored, dtype=torch.uint8)
        self._read_stored(row, packed)
        try:
            raw = zstandard.ZstdDecompressor().decompress(memoryview(packed.numpy()), max_output_size=row.size)
        except zstandard.ZstdError as err:
            raise CorruptionError(
                f"chunk {row.chunk} at {self.file_of(row)} does not decompress ({err}); "
                f"run verify() on {self.ds.uri}"
            ) from None
        if len(raw) != row.size:
            raise CorruptionError(f"chunk {row.chunk} at {self.file_of(row)} decompresses to "
                                  f"{len(raw)} bytes, expected {row.size}")
        dst.copy_(readonly_bytes(raw))


def _device(map_location: str | torch.device | None) -> torch.device:
    if map_location is None:
        return torch.device("cpu")
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    raise TypeError(
        f"map_location must be None, a device string such as 'cuda:0', or a torch.device; "
        f"got {map_location!r}"
    )


def _check_row(reader: _Reader, e: _Entry, row: _Row, chunk: torch.Tensor) -> None:
    """Raise CorruptionError unless ``chunk`` (the chunk's bytes) hashes to what was recorded."""
    got = hash_bytes(memoryview(chunk.numpy()))
    if got != row.hash:
        raise CorruptionError(
            f"tensor {e.name!r} (chunk {row.chunk}) of version {reader.ds.version} in {reader.ds.uri} "
            f"is corrupt: content hash {got} != recorded {row.hash} (file "
            f"{reader.file_of(row)}); restore that file or load another version"
        )


def _materialize(reader: _Reader, entries: list[_Entry], *, verify: bool) -> dict[str, torch.Tensor]:
    """The stored tensors on the CPU: lazy copy-on-write maps where possible, else read
    (all in one ``read_many``, so that the reads run in parallel).

    With ``verify`` they are always read into fresh memory and hashed, so that what comes
    back is exactly what was checked: nothing outside the process can change it afterwards.
    """
    out: dict[str, torch.Tensor] = {}
    jobs: list[tuple[_Entry, _Row, torch.Tensor]] = []
    for e in entries:
        dtype = dtype_from_name(e.dtype, key=e.name)
        reader.check(e.rows)
        t = reader.mapped(e.rows[0], dtype, e.shape) if len(e.rows) == 1 and not verify else None
        if t is None:
            t = torch.empty(e.shape, dtype=dtype)
            flat = uint8_view(t)
            jobs += [(e, row, flat[row.offset : row.offset + row.size]) for row in e.rows]
        out[e.name] = t
    reader.read_many([(row, dst) for _, row, dst in jobs])
    if verify and reader.kind == "weights":
        for e, row, dst in jobs:
            _check_row(reader, e, row, dst)
    return out


def _read_version(
    ds: lance.LanceDataset, use_index: bool = True
) -> tuple[str, OrderedDict[str, _Entry], list[Problem]]:
    """A checked-out version's kind, tensors and their metadata problems."""
    kind = _kind(ds)
    if kind != "weights":
        return kind, _seed_entries(ds), []
    entries, problems = _checked_entries(ds, use_index)
    if problems and use_index:  # never blame the rows for their derived index: ask the rows
        entries, problems = _checked_entries(ds, use_index=False)
    return kind, entries, problems


def _checked_entries(ds: lance.LanceDataset, use_index: bool) -> tuple[OrderedDict[str, _Entry], list[Problem]]:
    rows, agree = _located(ds, use_index)
    entries = _build_entries(rows)
    problems = _problems(entries, _compression(ds) is not None)
    if not agree:
        problems.append(Problem("", -1, "", f"the rows differ from what commit {ds.version} recorded "
                                f"({_PROP}rows): they were rewritten after the commit"))
    return entries, problems


def _open_version(
    uri: str | os.PathLike, version: Version | None, storage_options: StorageOptions
) -> tuple[lance.LanceDataset, str, OrderedDict[str, _Entry], list[Problem]]:
    """The checked-out version, its kind, its tensors and their metadata problems."""
    ds = _checkout(_open(_uri(uri), storage_options), version)
    return ds, *_read_version(ds)


# --------------------------------------------------------------------------- the save plan

# Packing. Lance writes one data file per fragment, and each file costs time to write (~0.15
# ms here) and a footer read whenever its fragment is scanned: one file per tensor made the
# first save of a ResNet-50 state dict (320 tensors, 278 under 256 KiB) 2.4-3.4x safetensors.
# So a run of consecutive new tensors smaller than _PACK_TENSOR_BYTES shares one fragment, up
# to _PACK_RUN_BYTES of payload per run. A later version reuses a run only as a whole:
# changing one tensor of a run rewrites the run, so runs are kept small (the measurements
# behind these two figures are in the README, "Performance").
_PACK_TENSOR_BYTES = 256 << 10
_PACK_RUN_BYTES = 1 << 20

_RowData = tuple[dict, memoryview]  # one row's metadata and payload


@dataclass
class _Unit:
    """One fragment of a new version: a parent fragment reused whole, or rows to write."""

    rows: list[_RowData]
    reused: int | None = None  # the parent's fragment id, when reused
    old: list[_Row] = field(default_factory=list)  # where the reused rows lie in it


def _plan(
    tensors: list[TensorRows], previous: Mapping[str, _Entry], fragment_rows: Mapping[int, int]
) -> tuple[list[_Unit], list[str]]:
    """The new version's fragments, in order, and the names added or changed.

    Unchanged tensors (same name and key as in ``previous``) keep their rows wherever whole
    parent fragments (``fragment_rows``: id -> rows) hold exactly a stretch of them; every
    other tensor is written, small single-row ones packed into runs.
    """
    same = {t.name: previous[t.name] for t in tensors if t.name in previous and previous[t.name].key == t.key}
    keep = _reusable(tensors, same, fragment_rows)
    units: list[_Unit] = []
    run: list[_RowData] = []
    run_bytes = 0
    for t in tensors:
        rows = list(zip(t.meta, t.payloads))
        packable = t.name not in keep and len(rows) == 1 and t.nbytes < _PACK_TENSOR_BYTES
        if run and (not packable or run_bytes + t.nbytes > _PACK_RUN_BYTES):
            units.append(_Unit(run))
            run, run_bytes = [], 0
        if packable:
            run.append(rows[0])
            run_bytes += t.nbytes
        elif t.name in keep:
            for row, old in zip(rows, same[t.name].rows):
                if units and units[-1].reused == old.address >> 32:
                    units[-1].rows.append(row)
                    units[-1].old.append(old)
                else:
                    units.append(_Unit([row], old.address >> 32, [old]))
        else:
            units += [_Unit([row]) for row in rows]
    if run:
        units.append(_Unit(run))
    return units, [t.name for t in tensors if t.name not in same]


def _reusable(tensors: list[TensorRows], same: Mapping[str, _Entry], fragment_rows: Mapping[int, int]) -> set[str]:
    """Names of unchanged tensors whose rows can all be taken over in whole parent fragments:
    a fragment is reused only when the new version's rows at that place are exactly its rows,
    in order (a run of which one tensor changed, or was removed or moved, is rewritten)."""
    keep = set(same)
    while True:
        addresses = [
            (t.name, same[t.name].rows[i].address if t.name in keep else None)
            for t in tensors for i in range(len(t.meta))
        ]  # fmt: skip
        covered = [False] * len(addresses)
        p = 0
        while p < len(addresses):
            first = addresses[p][1]
            k = fragment_rows.get(first >> 32, 0) if first is not None and first & 0xFFFFFFFF == 0 else 0
            if k and [a for _, a in addresses[p : p + k]] == list(range(first, first + k)):
                covered[p : p + k] = [True] * k
                p += k
            else:
                p += 1
        drop = {name for (name, _), c in zip(addresses, covered) if not c} & keep
        if not drop:
            return keep
        keep -= drop


# --------------------------------------------------------------------------- public API


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    uri: str | os.PathLike,
    *,
    message: str | None = None,
    properties: Mapping[str, str] | None = None,
    storage_options: StorageOptions = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    compression: str | None = None,
) -> VersionInfo:
    """Save ``state_dict`` as a new version of the weights dataset at ``uri``.

    A checkpoint dict (tensors nested in dicts, lists and tuples next to numbers, strings and
    None: an optimizer's state dict, an epoch counter) is stored too: its tensors as rows
    named by their path, the rest as JSON with the version (see tree.py); it loads back equal.
    Only tensors whose bytes, dtype or shape differ from the latest version are written;
    the rest reuse that version's data files. ``properties`` (str -> str) are stored with
    the version. ``compression="zstd"`` applies to a new dataset only; the default stores
    raw bytes, which load fastest (memory-mapped, no decode).
    """
    spec = None
    if isinstance(state_dict, Mapping) and not tree.is_flat(state_dict):  # a checkpoint dict
        state_dict, spec = tree.flatten(state_dict)
    validate_state_dict(state_dict)
    if not state_dict:
        raise ValueError("the state dict holds no tensor; there is nothing to save")
    props = _check_properties(properties)
    uri = _uri(uri)
    parent = _exists(uri, storage_options)
    previous: Mapping[str, _Entry] = {}
    if parent is None:
        schema = _schema(compression)
    else:
        if _kind(parent) != "weights":
            raise WeightsError(
                f"{uri} holds weights in the Lance docs example's layout, which cannot take new "
                f"versions; load it with load_state_dict() and save to a new URI"
            )
        existing = _compression(parent)
        if compression is not None and compression != existing:
            raise ValueError(
                f"{uri} was created with compression={existing!r}; compression is fixed per "
                f"dataset, so pass compression=None or save to a new URI"
            )
        schema = _schema(existing)
        previous = _entries(parent)
        bad = {p.name for p in _problems(previous, existing is not None)}
        previous = {n: e for n, e in previous.items() if n not in bad}  # never reuse those rows

    aliases = find_aliases(state_dict)
    tensors = [to_rows(name, t, alias=aliases.get(name), chunk_bytes=chunk_bytes) for name, t in state_dict.items()]
    reusable = {f.fragment_id: f.metadata for f in parent.get_fragments()} if parent else {}
    units, changed = _plan(tensors, previous, {fid: f.physical_rows for fid, f in reusable.items()})
    fresh = [u.rows for u in units if u.reused is None]
    written = iter(_write_rows(fresh, uri, schema, storage_options, create=parent is None))
    fragments = [reusable[u.reused] if u.reused is not None else next(written) for u in units]
    bytes_written = sum(f.files[0].file_size_bytes or 0 for u, f in zip(units, fragments) if u.reused is None)

    removed = [n for n in previous if n not in state_dict]
    summary = {
        "format": str(FORMAT_VERSION),
        "message": message or "",
        "properties": json.dumps(props, sort_keys=True),
        "parent": "" if parent is None else str(parent.version),
        "tensors": str(len(state_dict)),
        "bytes": str(sum(t.nbytes for t in tensors)),
        "bytes_written": str(bytes_written),
        "changed": json.dumps(changed),
        "removed": json.dumps(removed),
        "rows": _rows_digest(m for t in tensors for m in t.meta),
    }
    txn_props = {_PROP + k: v for k, v in summary.items()}
    if spec is not None:
        txn_props[_PROP + "tree"] = tree.encode(spec)
    if message:
        txn_props["lance.commit.message"] = message
    ds = _commit(uri, lance.LanceOperation.Overwrite(schema, fragments), txn_props,
                 parent.version if parent else 0, storage_options)
    _index_new_version(ds, units)
    return _version_info(uri, ds.version, _now(ds), txn_props, ())


def _commit(
    uri: str,
    operation: lance.LanceOperation.BaseOperation,
    properties: dict[str, str],
    read_version: int,
    storage_options: StorageOptions,
) -> lance.LanceDataset:
    """Commit, retrying when concurrent writers got there first.

    The version is a complete fragment list, so it stays valid on top of any newer version:
    a retry commits the same files against the new latest (jittered backoff, 64 tries).
    """
    opts = _lance_options(uri, storage_options)
    for attempt in range(_COMMIT_ATTEMPTS):
        try:
            txn = lance.Transaction(read_version, operation, transaction_properties=properties)
            return lance.LanceDataset.commit(uri, txn, storage_options=opts)
        except (CommitConflictError, OSError, ValueError) as err:
            retryable = isinstance(err, CommitConflictError) or "conflict" in str(err).lower() \
                or "already exists" in str(err).lower()
            if not retryable or attempt == _COMMIT_ATTEMPTS - 1:
                _raise_write_error(uri, err)
            time.sleep(random.uniform(0, 0.02 * 2 ** min(attempt, 6)))
            read_version = _open(uri, storage_options).version
    raise AssertionError("unreachable")


def _index_new_version(ds: lance.LanceDataset, units: list[_Unit]) -> None:
    """Write the version index of a just-committed version, scanning only its new fragments."""
    fragments = ds.get_fragments()
    if _index_path(ds, ds.version) is None or len(fragments) != len(units):
        return
    table = _fragment_table(ds, fragments)
    located: list[_Located] = []
    fresh = []
    for unit, frag, (fid, path, _) in zip(units, fragments, table):
        if unit.reused is None:
            fresh.append(frag)
            located += [(meta, fid << 32 | i, None, path, None) for i, (meta, _) in enumerate(unit.rows)]
        else:
            located += [(meta, fid << 32 | i, old.position, path, old.stored)
                        for i, ((meta, _), old) in enumerate(zip(unit.rows, unit.old))]  # fmt: skip
    if fresh:  # their blob positions: a scan of the blob descriptors only (a third of a full scan)
        blobs = ds.scanner(columns=["data"], with_row_address=True, fragments=fresh).to_table()
        descriptors = zip(blobs["_rowaddr"].to_pylist(), blobs["data"].to_pylist())
        found = {address: (d["position"], d["size"]) for address, d in descriptors}
        for i, (meta, address, _, path, _) in enumerate(located):
            if address in found:
                position, stored = found[address]
                located[i] = (meta, address, position, path, stored)
    _write_index(ds, table, located)


def _raise_write_error(uri: str, err: Exception) -> NoReturn:
    """Raise what a failed write means for the user (nothing was committed), else ``err``."""
    if (unreachable := _unreachable(uri, err)) is not None:
        raise unreachable from err
    if "No space left" in str(err) or "Disk quota" in str(err) or "ENOSPC" in str(err):
        raise OSError(
            f"writing a new version to {uri!r} failed: no space left on the device. Nothing was "
            f"committed and earlier versions are intact; free space (or run gc) and save again."
        ) from err
    text = str(err)
    for marker in ("Permission denied", "Operation not permitted", "Read-only file system", "AccessDenied"):
        if marker in text:
            where = re.search(r'at path "([^"]+)"', text)
            raise PermissionError(
                f"writing a new version to {uri!r} failed: {marker.lower()}"
                + (f" for {where.group(1)!r}" if where else "")
                + ". Nothing was committed and earlier versions are intact; write where you have write "
                "access (lance_uri= / MLFLOW_LANCE_ROOT) or fix the permissions."
            ) from err
    raise err


def _write_rows(
    units: list[list[_RowData]],
    uri: str,
    schema: pa.Schema,
    storage_options: StorageOptions,
    *,
    create: bool,
) -> list[FragmentMetadata]:
    """Write each unit (a list of rows) into a data file of its own: one fragment per unit,
    returned in ``units``' order.

    Large saves are split into byte-balanced groups written by parallel ``write_fragments``
    calls (0.34 s -> 0.24 s for GPT-2 here). Each call writes the units of one group that
    have the same number of rows k, cut into files of k rows (``max_rows_per_file``).
    """
    if not units:
        return []
    codec = (schema.metadata or {}).get(_COMPRESSION_KEY.encode()) == b"zstd"
    calls = _write_calls(units)

    def write(call: list[int], mode: str = "create" if create else "append") -> list[FragmentMetadata]:
        # A compressor per call: one ZstdCompressor used by two threads at once fails.
        pack = zstandard.ZstdCompressor(level=3).compress if codec else (lambda p: p)
        batches = (rows_batch(schema, m, pack(p)) for i in call for m, p in units[i])
        try:
            return write_fragments(
                pa.RecordBatchReader.from_batches(schema, batches),
                uri,
                schema=schema,
                mode=mode,
                max_rows_per_file=len(units[call[0]]),
                data_storage_version=_STORAGE_VERSION,
                storage_options=_lance_options(uri, storage_options),
            )
        except OSError as err:  # another writer created the dataset since we looked
            if mode == "create" and "already exists" in str(err):
                return write(call, "append")
            _raise_write_error(uri, err)

    threads = min(_THREADS, len(calls)) if sum(map(_unit_bytes, units)) >= _PARALLEL_WRITE_BYTES else 1
    if threads == 1:
        results = [write(call) for call in calls]
    else:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(write, calls))
    written: list[FragmentMetadata | None] = [None] * len(units)
    for call, frags in zip(calls, results):
        k = len(units[call[0]])
        if len(frags) != len(call) or any(f.physical_rows != k for f in frags):
            raise WeightsError(f"Lance wrote {len(frags)} fragments for {len(call)} files of {k} rows at {uri}")
        for i, frag in zip(call, frags):
            written[i] = frag
    return written


def _unit_bytes(unit: list[_RowData]) -> int:
    return sum(len(p) for _, p in unit)


def _write_calls(units: list[list[_RowData]]) -> list[list[int]]:
    """Unit indices per ``write_fragments`` call: units spread over _THREADS byte-balanced
    groups (one group below _PARALLEL_WRITE_BYTES), then split by row count, in order."""
    total = sum(_unit_bytes(u) for u in units)
    n = min(_THREADS, len(units)) if total >= _PARALLEL_WRITE_BYTES else 1
    groups: list[list[int]] = [[] for _ in range(n)]
    loads = [0] * n
    for i in sorted(range(len(units)), key=lambda i: -_unit_bytes(units[i])):
        g = loads.index(min(loads))
        groups[g].append(i)
        loads[g] += _unit_bytes(units[i]) + 1
    calls: list[list[int]] = []
    for group in groups:
        by_rows: dict[int, list[int]] = {}
        for i in sorted(group):
            by_rows.setdefault(len(units[i]), []).append(i)
        calls += by_rows.values()
    return calls


def _check_properties(properties: Mapping[str, str] | None) -> dict[str, str]:
    props = dict(properties or {})
    for k, v in props.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"properties must map str to str; {k!r}: {v!r} is not (convert values with str())"
            )
    return props


def _now(ds: lance.LanceDataset) -> datetime:
    return _aware(ds.versions()[-1]["timestamp"]) if ds.versions() else datetime.now(timezone.utc)


def _aware(ts: datetime) -> datetime:
    return ts.astimezone(timezone.utc)


def _version_info(
    uri: str, version: int, ts: datetime, props: Mapping[str, str], tags: tuple[str, ...]
) -> VersionInfo:
    """A version's summary from its commit properties; WeightsError names a malformed one."""
    return VersionInfo(version=version, timestamp=ts, tags=tags, **_summary(uri, version, props))


def _summary(uri: str, version: int, props: Mapping[str, str]) -> dict:
    """The VersionInfo fields a commit's properties hold, each checked."""
    p = {k[len(_PROP):]: v for k, v in props.items() if k.startswith(_PROP)}

    def bad(key: str, why: str) -> WeightsError:
        return WeightsError(
            f"version {version} of {uri} has a malformed commit property {_PROP}{key}="
            f"{str(p.get(key))[:80]!r} ({why}); the commit was altered or not written by "
            f"mlflow-lance. Its weights load only if their own metadata is consistent: run "
            f"`mlflow-lance verify {uri} --version {version}`"
        )

    def count(key: str, default: str = "0") -> int:
        text = p.get(key) or default
        if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 20:
            raise bad(key, "not a non-negative integer")
        return int(text)

    def parsed(key: str, default: str, check: Callable[[object], bool]) -> object:
        text = p.get(key) or default
        if not isinstance(text, str) or len(text) > _MAX_PROPERTY_BYTES:
            raise bad(key, f"not a JSON string of at most {_MAX_PROPERTY_BYTES} bytes")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise bad(key, "not JSON, or nested too deeply") from None
        if not check(value):
            raise bad(key, "not the JSON shape mlflow-lance writes")
        return value

    def names(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def strings(v: object) -> bool:
        return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())

    message = p.get("message")
    return {
        "message": message if isinstance(message, str) and message else None,
        "properties": parsed("properties", "{}", strings),
        "num_tensors": count("tensors"),
        "total_bytes": count("bytes"),
        "bytes_written": count("bytes_written"),
        "changed": tuple(parsed("changed", "[]", names)),
        "removed": tuple(parsed("removed", "[]", names)),
        "parent": count("parent") if p.get("parent") else None,
    }


def load_state_dict(
    uri: str | os.PathLike,
    version: Version | None = None,
    *,
    map_location: str | torch.device | None = None,
    names: str | Iterable[str] | None = None,
    storage_options: StorageOptions = None,
    verify: bool = False,
) -> OrderedDict[str, torch.Tensor]:
    """Load a version (a number or a tag; default latest) as an ordered state dict, or as the
    checkpoint dict it was saved as.

    ``names`` selects tensors: a list of keys, or one string that is a prefix or a glob;
    only their bytes are read. Local datasets come back memory-mapped copy-on-write (lazy,
    no copy; see the README on what a map shares with its file). Tied tensors come back as
    one tensor under each name. ``verify`` recomputes every content hash, raises
    CorruptionError on a mismatch, and returns fresh memory instead of maps.
    A version whose metadata is inconsistent raises CorruptionError before anything is read.
    """
    device = _device(map_location)
    ds, kind, entries, problems = _open_version(uri, version, storage_options)
    _raise_problems(ds, problems)
    selected = _select(entries, names)
    sources = {entries[name].alias or name: None for name in selected}  # ordered, unique
    with _Reader(ds, kind) as reader:
        if device.type == "cpu":
            loaded = _materialize(reader, [entries[s] for s in sources], verify=verify)
        else:  # one at a time: host memory holds one tensor on its way to the device
            loaded = {s: _materialize(reader, [entries[s]], verify=verify)[s].to(device) for s in sources}
    out = OrderedDict((name, loaded[entries[name].alias or name]) for name in selected)
    spec = _tree_spec(ds) if names is None and kind == "weights" else None
    return out if spec is None else tree.unflatten(spec, out)


def _tree_spec(ds: lance.LanceDataset) -> dict | None:
    """The checkpoint-dict spec saved with the checked-out version, if it holds one."""
    txn = ds.read_transaction(ds.version)
    text = (txn.transaction_properties or {}).get(_PROP + "tree") if txn is not None else None
    if text is None:
        return None
    try:
        return tree.decode(text)
    except ValueError as err:
        raise CorruptionError(f"version {ds.version} of {ds.uri}: {err}") from None


def load_into(
    module: torch.nn.Module,
    uri: str | os.PathLike,
    version: Version | None = None,
    *,
    strict: bool = True,
    storage_options: StorageOptions = None,
    verify: bool = False,
) -> LoadResult:
    """Read a version straight into ``module``'s parameters and buffers, tensor by tensor.

    Bytes go from the data files into the parameters' memory without an intermediate state
    dict, so peak memory stays near one tensor. Keys, shapes, the version's metadata and
    every data file are checked before anything is written: with ``strict`` missing or
    unexpected keys raise, as do shape mismatches. With ``verify`` each chunk is read into
    a staging buffer (at most one chunk, 1 GiB, at a time) and hashed before it is copied
    into the module, so the module never holds unverified bytes; a corrupt chunk raises
    CorruptionError, and the tensors copied before it keep their new values.
    """
    ds, kind, entries, problems = _open_version(uri, version, storage_options)
    _raise_problems(ds, problems)
    targets = module.state_dict(keep_vars=True)
    missing = [k for k in targets if k not in entries]
    unexpected = [k for k in entries if k not in targets]
    errors = []
    if strict and unexpected:
        errors.append(f"Unexpected key(s) in state_dict: {', '.join(map(repr, unexpected))}.")
    if strict and missing:
        errors.append(f"Missing key(s) in state_dict: {', '.join(map(repr, missing))}.")
    for k, e in entries.items():
        if k in targets and list(targets[k].shape) != list(e.shape):
            errors.append(
                f"size mismatch for {k}: copying a param with shape {torch.Size(e.shape)} from "
                f"version {ds.version}, the shape in current model is {targets[k].shape}."
            )
    if errors:
        raise RuntimeError(
            f"Error(s) in loading {ds.uri} (version {ds.version}) into "
            f"{type(module).__name__}:\n\t" + "\n\t".join(errors)
        )
    dtypes = {name: dtype_from_name(e.dtype, key=name) for name, e in entries.items()}
    with _Reader(ds, kind) as reader, torch.no_grad():
        dsts = {name: targets[name].detach() for name in entries if name in targets}
        reader.check(row for name in dsts for row in entries[entries[name].alias or name].rows)
        # 1. Tensors whose memory can take the bytes as they are: read straight into it.
        direct = [
            name for name, dst in dsts.items()
            if entries[name].alias is None
            and kind == "weights"
            and dst.device.type == "cpu"
            and dst.is_contiguous()
            and dst.dtype == dtypes[name]
        ]  # fmt: skip
        jobs = [(entries[name], row, uint8_view(dsts[name])[row.offset : row.offset + row.size])
                for name in direct for row in entries[name].rows]  # fmt: skip
        if verify:
            stage = torch.empty(max((row.size for _, row, _ in jobs), default=0), dtype=torch.uint8)
            for e, row, dst in jobs:
                chunk = stage[: row.size]
                reader.read_many([(row, chunk)])
                _check_row(reader, e, row, chunk)
                np.copyto(dst.numpy(), chunk.numpy())  # a plain memcpy (uint8 copy_ is ~50x slower here)
        else:
            reader.read_many([(row, dst) for _, row, dst in jobs])
        # 2. The rest (other dtype or device, non-contiguous, tied): through a CPU tensor.
        done = set(direct)
        for name, dst in dsts.items():
            if name in done:
                continue
            e = entries[name]
            source = e.alias or name
            if source in done and source in dsts:
                src = dsts[source]
            else:
                src = _materialize(reader, [entries[source]], verify=verify)[source]
            if not (src.data_ptr() == dst.data_ptr() and src.device == dst.device):
                dst.copy_(src)
            done.add(name)
    return LoadResult(missing, unexpected)


def versions(uri: str | os.PathLike, *, storage_options: StorageOptions = None) -> list[VersionInfo]:
    """Every version still stored, oldest first, with what each one wrote and changed."""
    ds = _open(_uri(uri), storage_options)
    _kind(ds)
    by_version: dict[int, list[str]] = {}
    for name, t in _tag_list(ds).items():
        by_version.setdefault(t["version"], []).append(name)
    out = []
    for v in ds.versions():
        n = v["version"]
        txn = ds.read_transaction(n)
        props = dict(txn.transaction_properties or {}) if txn is not None else {}
        tags = tuple(sorted(by_version.get(n, ())))
        if _PROP + "tensors" not in props:  # written by something else: derive the figures
            vds = ds.checkout_version(n)
            entries = _entries(vds) if _kind(vds) == "weights" else _seed_entries(vds)
            total = sum(e.nbytes for e in entries.values() if e.alias is None)
            props = {_PROP + "tensors": str(len(entries)), _PROP + "bytes": str(total),
                     _PROP + "bytes_written": str(total), _PROP + "changed": json.dumps(list(entries))}
        out.append(_version_info(ds.uri, n, _aware(v["timestamp"]), props, tags))
    return out


def diff(
    uri: str | os.PathLike, a: Version, b: Version | None = None, *, storage_options: StorageOptions = None
) -> Diff:
    """Tensor names added, removed, changed and unchanged from version ``a`` to ``b`` (default latest)."""
    ds = _open(_uri(uri), storage_options)
    da, db = _checkout(ds, a), _checkout(ds, b)
    ea = _entries(da) if _kind(da) == "weights" else _seed_entries(da)
    eb = _entries(db) if _kind(db) == "weights" else _seed_entries(db)
    common = [n for n in eb if n in ea]
    return Diff(
        a=da.version,
        b=db.version,
        added=[n for n in eb if n not in ea],
        removed=[n for n in ea if n not in eb],
        changed=[n for n in common if ea[n].key != eb[n].key or not eb[n].meta],
        unchanged=[n for n in common if ea[n].key == eb[n].key and eb[n].meta],
    )


def tag(uri: str | os.PathLike, name: str, version: int, *, storage_options: StorageOptions = None) -> None:
    """Point tag ``name`` at ``version`` (moving it if it exists); tagged versions survive gc."""
    if not isinstance(name, str) or not name or name.isdigit():
        raise ValueError(f"tag name must be a non-empty, non-numeric string, got {name!r}")
    ds = _open(_uri(uri), storage_options)
    target = _checkout(ds, version).version
    for attempt in range(8):  # another writer may create or move the same tag in between
        try:
            if name in _tag_list(ds):
                ds.tags.update(name, target)
            else:
                ds.tags.create(name, target)
            return
        except (ValueError, OSError, RuntimeError):
            if attempt == 7:
                raise
            time.sleep(random.uniform(0, 0.01 * 2**attempt))


def untag(uri: str | os.PathLike, name: str, *, storage_options: StorageOptions = None) -> None:
    """Remove tag ``name``; the version it pointed at may then be garbage-collected."""
    ds = _open(_uri(uri), storage_options)
    if name not in _tag_list(ds):
        raise VersionNotFoundError(f"tag {name!r} does not exist in {ds.uri}; {_available(ds)}")
    ds.tags.delete(name)


def tags(uri: str | os.PathLike, *, storage_options: StorageOptions = None) -> dict[str, int]:
    """Tag name -> version number."""
    ds = _open(_uri(uri), storage_options)
    return {name: t["version"] for name, t in sorted(_tag_list(ds).items())}


def verify(
    uri: str | os.PathLike,
    version: Version | None = None,
    *,
    storage_options: StorageOptions = None,
    progress: Callable[[int], object] | None = None,
) -> VerifyReport:
    """Check a version: its metadata (rows consistent with each other, with the data files
    and with its commit) and the content hash of every chunk; report each problem.

    ``progress`` is called with the bytes of each chunk checked (for progress bars).
    """
    ds = _checkout(_open(_uri(uri), storage_options), version)
    try:
        kind, entries, problems = _read_version(ds, use_index=False)  # the rows themselves
    except CorruptionError as err:  # the version's rows themselves cannot be read
        return VerifyReport(ds.uri, ds.version, 0, 0, 0, [Problem("", -1, "", str(err))])
    problems += _commit_problems(ds, entries)
    bad = {p.name for p in problems}
    buf = torch.empty(0, dtype=torch.uint8)
    chunks = nbytes = 0
    with _Reader(ds, kind) as reader:
        problems = [dataclasses.replace(p, file=reader.path_of(p.file)) if p.file else p for p in problems]
        for e in entries.values():
            chunks += len(e.rows)
            if e.name in bad:
                continue
            for row in e.rows:
                try:
                    reader.check([row])
                    if buf.numel() < row.size:
                        buf = torch.empty(row.size, dtype=torch.uint8)
                    dst = buf[: row.size]
                    reader.read_many([(row, dst)])
                except (OSError, CorruptionError) as err:
                    problems.append(Problem(e.name, row.chunk, reader.file_of(row), f"unreadable: {err}"))
                    continue
                nbytes += row.size
                if progress is not None:
                    progress(row.size)
                if kind != "weights":
                    continue
                got = hash_bytes(memoryview(dst.numpy()))
                if got != row.hash:
                    problems.append(Problem(e.name, row.chunk, reader.file_of(row),
                                            f"content hash {got} != recorded {row.hash}"))
    return VerifyReport(ds.uri, ds.version, len(entries), chunks, nbytes, problems)


def _commit_problems(ds: lance.LanceDataset, entries: Mapping[str, _Entry]) -> list[Problem]:
    """What the version's commit records and its rows disagree on (nothing for commits that
    other writers made without mlflow-lance's properties)."""
    try:
        txn = ds.read_transaction(ds.version)
    except (OSError, ValueError):
        return []
    props = dict(txn.transaction_properties or {}) if txn is not None else {}
    if _PROP + "tensors" not in props:
        return []
    try:
        summary = _summary(ds.uri, ds.version, props)
    except WeightsError as err:
        return [Problem("", -1, "", str(err))]
    total = sum(e.nbytes for e in entries.values() if e.alias is None)
    if (summary["num_tensors"], summary["total_bytes"]) != (len(entries), total):
        return [Problem("", -1, "", f"the commit records {summary['num_tensors']} tensors of "
                        f"{summary['total_bytes']} bytes; the rows hold {len(entries)} of {total}")]
    return []


def latest_version(uri: str | os.PathLike, *, storage_options: StorageOptions = None) -> int:
    """The newest version number (reads the manifest pointer only)."""
    return _open(_uri(uri), storage_options).version


def resolve_version(uri: str | os.PathLike, version: Version | None, *, storage_options: StorageOptions = None) -> int:
    """The version number a number or tag (None: latest) stands for; raises if none."""
    return _checkout(_open(_uri(uri), storage_options), version).version


def version_properties(
    uri: str | os.PathLike, version: Version, *, storage_options: StorageOptions = None
) -> dict[str, str]:
    """The ``properties`` one version was saved with (reads that version's transaction only);
    WeightsError if they are malformed."""
    ds = _checkout(_open(_uri(uri), storage_options), version)
    txn = ds.read_transaction(ds.version)
    props = dict(txn.transaction_properties or {}) if txn is not None else {}
    return dict(_summary(ds.uri, ds.version, props)["properties"])


def _gc_select(
    ds: lance.LanceDataset,
    keep_last: int | None,
    older_than: timedelta | None,
    grace: timedelta,
    candidates: Collection[int] | None = None,
    ignore_tags: Collection[str] = (),
) -> tuple[list[int], list[int]]:
    """(versions to remove, old versions kept only because they are tagged), as if the tags
    in ``ignore_tags`` (about to be removed) were gone."""
    if keep_last is None and older_than is None and candidates is None:
        raise ValueError("gc needs keep_last=N and/or older_than=timedelta(...) to know what to remove")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    _kind(ds)
    all_versions = ds.versions()
    tagged = {t["version"] for name, t in _tag_list(ds).items() if name not in ignore_tags}
    newest = {v["version"] for v in all_versions[-(keep_last or 1):]}
    now = datetime.now(timezone.utc)
    cutoff = now - older_than if older_than is not None else None
    superseded = {  # when each version stopped being the latest
        v["version"]: _aware(nxt["timestamp"]) for v, nxt in zip(all_versions, all_versions[1:])
    }
    old = [v for v in all_versions if v["version"] not in newest]
    doomed = [
        v["version"] for v in old
        if v["version"] not in tagged
        and (candidates is None or v["version"] in candidates)
        and (cutoff is None or _aware(v["timestamp"]) < cutoff)
        and superseded.get(v["version"], now) <= now - grace
    ]  # fmt: skip
    return doomed, sorted(v["version"] for v in old if v["version"] in tagged)


def gc_plan(
    uri: str | os.PathLike,
    *,
    keep_last: int | None = None,
    older_than: timedelta | None = None,
    grace: timedelta = timedelta(minutes=30),
    candidates: Collection[int] | None = None,
    ignore_tags: Collection[str] = (),
    storage_options: StorageOptions = None,
) -> list[int]:
    """The versions ``gc`` with these arguments would remove (see ``gc``), counting the tags in
    ``ignore_tags`` as already removed."""
    ds = _open(_uri(uri), storage_options)
    return _gc_select(ds, keep_last, older_than, grace, candidates, ignore_tags)[0]


def gc(
    uri: str | os.PathLike,
    *,
    keep_last: int | None = None,
    older_than: timedelta | None = None,
    grace: timedelta = timedelta(minutes=30),
    candidates: Collection[int] | None = None,
    storage_options: StorageOptions = None,
) -> GcReport:
    """Delete old versions and the data files only they use.

    A version is removed when it is not among the ``keep_last`` newest, is older than
    ``older_than`` (when given), is one of ``candidates`` (when given: the caller has
    decided which versions nothing references), carries no tag, and was superseded more
    than ``grace`` ago. The grace period protects writers: a save reuses the data files of
    the version that was latest when it started, so that version must outlive any save in
    flight. The latest version is always kept.

    This is the store's gc, which knows nothing of MLflow; ``mlflow_lance.gc`` asks MLflow
    what it still references before calling it.
    """
    ds = _open(_uri(uri), storage_options)
    doomed, kept_tagged = _gc_select(ds, keep_last, older_than, grace, candidates)
    if not doomed:
        return GcReport([], 0, kept_tagged)
    stats = ds.cleanup_old_versions(versions=doomed, error_if_tagged_old_versions=False)
    for v in doomed:  # their version indexes go with them
        if (path := _index_path(ds, v)) is not None:
            try:
                os.remove(path)
            except OSError:
                pass
    return GcReport(doomed, int(stats.bytes_removed), kept_tagged)
