"""How a weights dataset is laid out and read: a handle that opens a dataset once, opening a
version, its format and schema, the metadata rows of a version and the rules they must keep,
the version index, and the readers of payload bytes, one per format (preadv, copy-on-write
maps, Lance's blob API; the Lance docs example's float64 lists).

Layout: one row per tensor chunk (see tensors.py), in the state dict's key order. Each
Lance fragment (one data file) holds either one row of a large tensor or a run of small,
single-row tensors (packing, see plan.py). The ``data`` column is a Lance blob column in
file format 2.0: the raw bytes of a chunk sit contiguously (64-byte aligned) in its data
file, so local reads can memory-map them, and object storage is read through Lance's blob
API. Everything read here is input, not a promise: it is checked before it is used.

Nothing here writes a version (see store.py) or knows about MLflow.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import mmap
import os
import random
import stat
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import pyarrow as pa
import torch
import zstandard

from .fs import StorageOptions, lance_options, local_path, read_bytes, write_text
from .tensors import (
    DTYPES,
    META_COLUMNS,
    SCHEMA_FIELDS,
    check_key,
    dtype_from_name,
    hash_bytes,
    readonly_bytes,
    stored_nbytes,
    tensor_key,
    uint8_view,
)

if TYPE_CHECKING:  # imported where a dataset is opened: a load through the version index never needs it
    import lance

FORMAT_VERSION = 1
_FORMAT_KEY = "mlflow_lance.format"
_COMPRESSION_KEY = "mlflow_lance.compression"
_PROP = "mlflow_lance."  # prefix of our transaction properties
_STORAGE_VERSION = "2.0"  # Lance file format whose blob payloads sit contiguous in the data file
_COMPRESSIONS = ("zstd",)

Version = int | str  # a version number or a tag name


class WeightsError(ValueError):
    """A weights dataset, version or tensor is missing, malformed or corrupt."""


class VersionNotFoundError(WeightsError, LookupError):
    """The requested version or tag does not exist (the message lists what does)."""


class CorruptionError(WeightsError):
    """A version's stored bytes or metadata are inconsistent: corrupted, truncated or crafted."""


@dataclass(frozen=True)
class Problem:
    """One chunk whose bytes do not match what was recorded."""

    name: str
    chunk: int
    file: str
    detail: str


# --------------------------------------------------------------------------- opening


def _open(uri: str, storage_options: StorageOptions = None) -> lance.LanceDataset:
    """The dataset at ``uri``, at its latest version; FileNotFoundError that says so if nothing
    was saved there, ConnectionError if its storage cannot be reached."""
    import lance  # here, not at the top: a local load through the version index never needs it

    started = time.monotonic()
    try:
        return lance.dataset(uri, storage_options=lance_options(uri, storage_options))
    except (ValueError, OSError) as e:
        if (err := _unreachable(uri, e, time.monotonic() - started)) is not None:
            raise err from None
        if "was not found" in str(e) or "Not found" in str(e):
            raise FileNotFoundError(
                f"no weights dataset at {uri!r}: nothing has been saved there yet "
                f"(check the URI, or save a version first)"
            ) from None
        raise


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


class Dataset:
    """A handle on one weights dataset: its URI and storage options, resolved once, and the
    Lance dataset, opened on first use and then kept, so that several reads of the same
    dataset (a sidecar refresh) open it once. Every store verb takes one in place of a URI.

    The open dataset is the version that was latest at the first use; its version and tag
    listings are read afresh each time.
    """

    def __init__(self, uri: str | os.PathLike, storage_options: StorageOptions = None):
        self.uri = os.fspath(uri)
        self.storage_options = storage_options
        self._lance: lance.LanceDataset | None = None

    @classmethod
    def of(cls, uri: str | os.PathLike | Dataset, storage_options: StorageOptions = None) -> Dataset:
        """``uri`` itself if it is a handle already (with its own storage options), else a new one."""
        return uri if isinstance(uri, Dataset) else cls(uri, storage_options)

    @property
    def lance(self) -> lance.LanceDataset:
        """The open dataset; FileNotFoundError if nothing has been saved there yet."""
        if self._lance is None:
            self._lance = _open(self.uri, self.storage_options)
        return self._lance

    @property
    def opened(self) -> bool:
        """Whether the dataset has been opened in Lance (its latest version is then fixed)."""
        return self._lance is not None

    def existing(self) -> lance.LanceDataset | None:
        """The open dataset, or None if nothing has been saved there yet."""
        try:
            return self.lance
        except FileNotFoundError:
            return None

    def checkout(self, version: Version | None) -> lance.LanceDataset:
        """Version ``version`` (a number or a tag; None: the open one)."""
        return _checkout(self.lance, version)


# Retry jitter: never draws from the global RNG that training resumes bit-exactly.
JITTER = random.Random()


def _tag_list(ds: lance.LanceDataset) -> dict:
    """Lance's tag listing, retried: a tag deleted by another process between Lance's directory
    listing and its read of the tag file makes one listing fail with 'Not found'."""
    for attempt in range(8):
        try:
            return ds.tags.list()
        except (ValueError, OSError) as err:
            if "not found" not in str(err).lower() or attempt == 7:
                raise
            time.sleep(JITTER.uniform(0, 0.005 * 2**attempt))
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


def _open_version(
    dataset: Dataset, version: Version | None, *, index_alone: bool = True
) -> tuple[_Reader, OrderedDict[str, _Entry], list[Problem]]:
    """The reader of the version, its tensors and their metadata problems: from the version
    index alone when ``index_alone`` and the index is complete and consistent (no Lance
    import), else through Lance."""
    reader = _indexed_reader(dataset, version) if index_alone else None
    if reader is not None:
        entries, problems = reader.checked()
        if not problems:
            return reader, entries, problems
    reader = _reader(dataset.checkout(version))
    return reader, *reader.checked()


def _reader(ds: lance.LanceDataset) -> _Reader:
    """The reader for the checked-out version's format, chosen from its schema: ours, or the
    Lance docs example's (see ``_SeedReader``); any other dataset is refused."""
    meta = ds.schema.metadata or {}
    if _FORMAT_KEY.encode() in meta:
        found = int(meta[_FORMAT_KEY.encode()])
        if found > FORMAT_VERSION:
            raise WeightsError(
                f"{ds.uri} uses weights format {found}, newer than this mlflow-lance reads "
                f"({FORMAT_VERSION}); upgrade mlflow-lance"
            )
        return _Reader(ds)
    names = set(ds.schema.names)
    if {"name", "value", "shape"} <= names and pa.types.is_list(ds.schema.field("value").type):
        return _SeedReader(ds)
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
    return _codec((ds.schema.metadata or {}).get(_COMPRESSION_KEY.encode(), b"none").decode())


def _codec(recorded: str) -> str | None:
    """The payload codec a schema's compression key names (None: raw bytes)."""
    return None if recorded == "none" else recorded


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


def _raise_problems(ds: lance.LanceDataset | _Reader, problems: list[Problem]) -> None:
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
# to a local dataset, so that opening a version reads one small file instead of one footer per
# data file (40 ms for GPT-2's 148 files). It is derived data, used two ways:
# - through Lance: only when its rows hash to the digest the version's commit recorded
#   (``mlflow_lance.rows``) and its fragments are the manifest's;
# - alone, for a local load of the latest version or a numbered one (``_IndexedReader``): only
#   when that version's manifest is listed, the index names it, carries the commit's
#   properties and its rows hash to the digest among them. Lance is then never imported
#   (about half a second of a fresh process), and the rows get every check a scan's get.
# Anything else (missing, stale, unparsable, oversized, a version committed without a digest,
# an index of an older format) is ignored and the rows are scanned.
_INDEX_DIR = ("_mlflow_lance", "index")
_INDEX_FORMAT = 2
_INDEXED_PROPERTIES = (_PROP + "rows", _PROP + "tree")  # what a load reads from a commit
_ROW_TYPES = [{str}, {int}, {int}, {int}, {str}, {list}, {str}, {str, type(None)}]  # per META_COLUMNS
_SHAPE = META_COLUMNS.index("shape")


def _index_path(ds: lance.LanceDataset, version: int) -> str | None:
    root = local_path(ds.uri)
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
        if files and (len(files) != 1 or files[0].base_id is not None or not _plain_name(path)):
            raise CorruptionError(
                f"version {ds.version} of {ds.uri} names data file {path[:200]!r} for fragment "
                f"{f.fragment_id}, which is not a file of the dataset's data/ directory; only "
                f"files inside the dataset are read"
            )
        out.append((f.fragment_id, path, f.metadata.physical_rows))
    return out


def _plain_name(path: str) -> bool:
    """A data file name that can only mean a file of the dataset's own data/ directory."""
    return path not in ("", ".", "..") and not any(c in path for c in "/\\\0")


def _rows_digest(metas: Iterable[Mapping]) -> str:
    """Digest of a version's metadata rows, recorded in its commit to check the index against."""
    rows = [[m[c] for c in META_COLUMNS] for m in metas]
    return hash_bytes(json.dumps(rows, separators=(",", ":")).encode())


_COMMITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # checked-out dataset -> its commit's properties


def _commit_properties(ds: lance.LanceDataset) -> dict[str, str] | None:
    """The transaction properties of the checked-out version (None if its commit cannot be
    read), read once per checked-out dataset: a load asks for the rows digest and the
    checkpoint spec, verify for the summary."""
    if ds not in _COMMITS:
        try:
            txn = ds.read_transaction(ds.version)
        except (OSError, ValueError):
            return None
        _COMMITS[ds] = dict(txn.transaction_properties or {}) if txn is not None else {}
    return _COMMITS[ds]


def _recorded_digest(ds: lance.LanceDataset) -> str | None:
    return (_commit_properties(ds) or {}).get(_PROP + "rows")


def _valid_index_row(row: object, n: int) -> bool:
    """Each value of an index row has its column's JSON type (ints are never bools) and
    range (the chunk an int32, every other number a non-negative int64, as Lance stores them)."""
    if type(row) is not list or len(row) != n + 2:
        return False
    if any(type(v) not in types for v, types in zip(row, _ROW_TYPES)):
        return False
    numbers = [row[1], row[2], row[3], *row[_SHAPE], *(v for v in row[n:] if v is not None)]
    return (
        all(type(v) is int and 0 <= v < 1 << 63 for v in numbers)
        and row[1] < 1 << 31
        and all(v is None or type(v) is int for v in row[n:])
    )


def _index_doc(root: str, version: int) -> dict | None:
    """The parsed version index of ``version`` if it is well-formed (types and counts), else None."""
    try:
        if any(os.path.islink(os.path.join(root, *_INDEX_DIR[:i])) for i in (1, 2)):
            return None  # an index folder that links elsewhere is not the dataset's
        data = read_bytes(os.path.join(root, *_INDEX_DIR, f"{version}.json"), limit=_MAX_INDEX_BYTES,
                          follow_links=False)  # fmt: skip
        doc = json.loads(data) if data is not None else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("index_format") != _INDEX_FORMAT or doc.get("version") != version:
        return None
    rows, fragments, props, schema = doc.get("rows"), doc.get("fragments"), doc.get("properties"), doc.get("schema")
    n = len(META_COLUMNS)
    if (
        not isinstance(rows, list)
        or not isinstance(schema, dict)
        or not all(type(v) is str for v in schema.values())
        or not isinstance(fragments, list)
        or not all(_valid_fragment(f) for f in fragments)
        or len(rows) != sum(f[2] for f in fragments)
        or not all(_valid_index_row(row, n) for row in rows)
        or not isinstance(props, dict)
        or not all(type(k) is str and type(v) is str for k, v in props.items())
    ):
        return None
    return doc


def _valid_fragment(f: object) -> bool:
    """[fragment id, data file, rows]: the file a plain name in data/ (as ``_fragment_table``)."""
    return (
        type(f) is list and len(f) == 3 and type(f[0]) is int and 0 <= f[0] < 1 << 32
        and type(f[1]) is str and _plain_name(f[1])
        and type(f[2]) is int and f[2] >= 0
    )  # fmt: skip


def _index_rows(doc: dict) -> list[_Located]:
    """A checked index's rows, addressed fragment by fragment as the index lists them."""
    n = len(META_COLUMNS)
    places = [(fid << 32 | i, path) for fid, path, count in doc["fragments"] for i in range(count)]
    return [
        (dict(zip(META_COLUMNS, row[:n])), address, row[n], path, row[n + 1])
        for row, (address, path) in zip(doc["rows"], places)
    ]


def _read_index(
    ds: lance.LanceDataset, table: list[tuple[int, str, int]], digest: str | None
) -> list[_Located] | None:
    """The version's rows from its index, or None unless the index checks out against the
    manifest's fragments and the digest the commit recorded (see above)."""
    root = local_path(ds.uri)
    if root is None or digest is None:
        return None
    doc = _index_doc(root, ds.version)
    if doc is None or [tuple(f) for f in doc["fragments"]] != table:
        return None
    located = _index_rows(doc)
    return located if _rows_digest(m for m, *_ in located) == digest else None


def _write_index(ds: lance.LanceDataset, table: list[tuple[int, str, int]], rows: list[_Located]) -> None:
    """Best effort: a failure only means the next open scans. Writes only inside the dataset."""
    root = local_path(ds.uri)
    props = _commit_properties(ds)
    if root is None or props is None or len(rows) != sum(count for *_, count in table):
        return
    schema = {k.decode(): v.decode() for k, v in (ds.schema.metadata or {}).items() if k.startswith(_PROP.encode())}
    doc = {
        "index_format": _INDEX_FORMAT,
        "version": ds.version,
        "schema": schema,
        "properties": {k: props[k] for k in _INDEXED_PROPERTIES if k in props},
        "manifest": _manifest_digest(_manifest_path(root, ds.version)),
        "fragments": [list(f) for f in table],
        "rows": [[m[c] for c in META_COLUMNS] + [pos, stored] for m, _, pos, _, stored in rows],
    }
    folder = os.path.join(root, *_INDEX_DIR)
    if os.path.realpath(folder) != os.path.join(os.path.realpath(root), *_INDEX_DIR):
        return  # a link out of the dataset: write nothing there
    with contextlib.suppress(OSError):  # derived data: not flushed to the disk before the rename
        write_text(os.path.join(folder, f"{ds.version}.json"), json.dumps(doc, separators=(",", ":")), sync=False)


def _manifest_versions(root: str) -> dict[int, str]:
    """Version -> manifest path of each version a local dataset lists (``_versions/<n>.manifest``,
    or the 20-digit ``u64::MAX - n`` names of Lance's newer layout); empty if none."""
    folder = os.path.join(root, "_versions")
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):  # a link: not the dataset's own versions
            return {}
        names = os.listdir(folder)
    except OSError:
        return {}
    out = {}
    for name in names:
        digits, dot, ext = name.partition(".")
        if ext == "manifest" and dot and digits.isascii() and digits.isdigit() and len(digits) <= 20:
            out[(1 << 64) - 1 - int(digits) if len(digits) == 20 else int(digits)] = os.path.join(folder, name)
    return out


def _manifest_path(root: str, version: int) -> str | None:
    """The manifest file of one version, under either of the names ``_manifest_versions`` reads."""
    folder = os.path.join(root, "_versions")
    for name in (f"{(1 << 64) - 1 - version:020d}.manifest", f"{version}.manifest"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _manifest_digest(path: str | None) -> str | None:
    """Hash of a manifest file's bytes: binds an index to the manifest it was made from, so an
    index outliving its dataset (a copied or recreated directory) is never read alone."""
    try:
        data = read_bytes(path, limit=_MAX_INDEX_BYTES, follow_links=False) if path else None
    except OSError:
        return None
    return hash_bytes(data) if data is not None else None


def _indexed_reader(dataset: Dataset, version: Version | None) -> _IndexedReader | None:
    """A reader for a local dataset's latest (or numbered) version built from its index alone,
    or None when that takes Lance: object storage, a tag, no index, or one that does not
    check out (see the comment on the version index)."""
    root = local_path(dataset.uri)
    if root is None or dataset.opened or not (version is None or type(version) is int):
        return None
    listed = _manifest_versions(root)
    number = max(listed, default=None) if version is None else version
    if number not in listed:
        return None
    doc = _index_doc(root, number)
    if (
        doc is None
        or type(doc.get("manifest")) is not str
        or doc["manifest"] != _manifest_digest(listed[number])
        or any(row[-2] is None or row[-1] is None for row in doc["rows"])  # a local read needs every position
        or doc["schema"].get(_FORMAT_KEY) != str(FORMAT_VERSION)
        or doc["schema"].get(_COMPRESSION_KEY, "none") not in ("none", *_COMPRESSIONS)
    ):
        return None
    located = _index_rows(doc)
    if _rows_digest(m for m, *_ in located) != doc["properties"].get(_PROP + "rows"):
        return None
    return _IndexedReader(dataset, number, doc, located)


def _entries(ds: lance.LanceDataset) -> OrderedDict[str, _Entry]:
    """Every tensor of the checked-out version, in saved order (reads no tensor bytes)."""
    return _build_entries(_located(ds)[0])


def _checked_entries(ds: lance.LanceDataset, use_index: bool) -> tuple[OrderedDict[str, _Entry], list[Problem]]:
    rows, agree = _located(ds, use_index)
    entries = _build_entries(rows)
    problems = _problems(entries, _compression(ds) is not None)
    if not agree:
        problems.append(Problem("", -1, "", f"the rows differ from what commit {ds.version} recorded "
                                f"({_PROP}rows): they were rewritten after the commit"))
    return entries, problems


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
    root = local_path(ds.uri)
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


def _not_a_directory(ds: lance.LanceDataset | _Reader, path: str) -> str:
    return (
        f"{path} of {ds.uri} is not a directory (a symbolic link?); only files inside the "
        f"dataset are read"
    )


def _not_regular(ds: lance.LanceDataset | _Reader, path: str) -> str:
    return (
        f"data file {path} of version {ds.version} of {ds.uri} is not a regular file (a symbolic "
        f"link, FIFO, device or directory); only regular files inside the dataset are read"
    )


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
    file holding every byte its rows claim. Object storage goes through Lance's blob API.
    Choose a reader with ``_reader(ds)``: the seed format has a reader of its own.
    """

    writable = True  # whether new versions may be saved on top of this format

    def __init__(self, ds: lance.LanceDataset):
        self.ds = ds
        self.uri: str = ds.uri
        self.version: int = ds.version
        self.codec = _compression(ds)
        self.root = local_path(ds.uri)
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

    def entries(self) -> OrderedDict[str, _Entry]:
        """Every tensor of the version, in saved order, as its rows claim (unchecked)."""
        return _entries(self.ds)

    def checked(self, use_index: bool = True) -> tuple[OrderedDict[str, _Entry], list[Problem]]:
        """Every tensor of the version and the problems of its metadata (see ``_entry_problem``)."""
        entries, problems = _checked_entries(self.ds, use_index)
        if problems and use_index:  # never blame the rows for their derived index: ask the rows
            entries, problems = _checked_entries(self.ds, use_index=False)
        return entries, problems

    def properties(self) -> dict[str, str] | None:
        """The version's commit properties (None if its commit cannot be read)."""
        return _commit_properties(self.ds)

    def bad_hash(self, row: _Row, chunk: torch.Tensor) -> str | None:
        """The content hash of ``chunk`` (the row's bytes) if it differs from the recorded one."""
        got = hash_bytes(memoryview(chunk.numpy()))
        return got if got != row.hash else None

    def file_of(self, row: _Row) -> str:
        return self.path_of(row.file)

    def path_of(self, file: str) -> str:
        """The full path or URI of a data file named in the manifest."""
        base = self.root if self.root is not None else self.uri.rstrip("/")
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
                    raise CorruptionError(_not_a_directory(self, data)) from None
                raise
        try:
            fd = os.open(row.file, flags, dir_fd=self._dir)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptionError(_not_regular(self, path)) from None
            raise CorruptionError(
                f"data file {path} of version {self.version} of {self.uri} cannot be "
                f"opened ({err.strerror}); restore it or load another version"
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CorruptionError(_not_regular(self, path))
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
                f"version {self.version} claims bytes {row.position}..{row.position + row.stored}; "
                f"the file was truncated or the metadata is crafted. Run verify() on {self.uri}"
            )
        return fd

    def check(self, rows: Iterable[_Row]) -> None:
        """Before anything is allocated or written: each local file exists, is regular and
        holds its chunk; a compressed chunk's frame decompresses to exactly its size."""
        for row in rows:
            if row.stored:
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
                            f"records {row.size} bytes; run verify() on {self.uri}"
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
        got = self._fill(row, dst) if row.stored else 0
        if got != want or (whole and want != row.stored):
            raise CorruptionError(
                f"chunk {row.chunk} at {self.file_of(row)} holds {got} bytes, expected "
                f"{want}; run verify() on {self.uri}"
            )

    def _fill(self, row: _Row, dst: torch.Tensor) -> int:
        """Copy the start of the stored payload into ``dst``; the bytes copied."""
        if (fd := self._local(row)) is not None:
            _pread_exact(fd, self.file_of(row), row.position, dst)
            return dst.numel()
        (blob,) = self.ds.take_blobs("data", addresses=[row.address])
        view, got = memoryview(dst.numpy()), 0
        while got < dst.numel():
            n = blob.readinto(view[got : got + _PIECE])
            if not n:
                break
            got += n
        return got

    def _decompress(self, row: _Row, dst: torch.Tensor) -> None:
        packed = torch.empty(row.stored, dtype=torch.uint8)
        self._read_stored(row, packed)
        try:
            raw = zstandard.ZstdDecompressor().decompress(memoryview(packed.numpy()), max_output_size=row.size)
        except zstandard.ZstdError as err:
            raise CorruptionError(
                f"chunk {row.chunk} at {self.file_of(row)} does not decompress ({err}); "
                f"run verify() on {self.uri}"
            ) from None
        if len(raw) != row.size:
            raise CorruptionError(f"chunk {row.chunk} at {self.file_of(row)} decompresses to "
                                  f"{len(raw)} bytes, expected {row.size}")
        dst.copy_(readonly_bytes(raw))


class _IndexedReader(_Reader):
    """Reads a local version as its version index describes it, without opening the dataset
    in Lance (see the comment on the version index): the same rows, checks and bytes as
    ``_Reader``; Lance is opened only if something asks for ``ds``."""

    def __init__(self, dataset: Dataset, version: int, doc: dict, located: list[_Located]):
        self.dataset = dataset
        self.uri = dataset.uri
        self.version = version
        self.codec = _codec(doc["schema"].get(_COMPRESSION_KEY, "none"))
        self.root = local_path(dataset.uri)
        self._located = located
        self._properties: dict[str, str] = doc["properties"]
        self._dir = None
        self._files = {}

    @property
    def ds(self) -> lance.LanceDataset:  # type: ignore[override]
        return self.dataset.checkout(self.version)

    def entries(self) -> OrderedDict[str, _Entry]:
        return _build_entries(self._located)

    def checked(self, use_index: bool = True) -> tuple[OrderedDict[str, _Entry], list[Problem]]:
        entries = self.entries()
        return entries, _problems(entries, self.codec is not None)

    def properties(self) -> dict[str, str] | None:
        return dict(self._properties)


class _SeedReader(_Reader):
    """Reads a dataset written by the Lance docs example: one row per tensor (``name``,
    ``shape``, float64 ``value`` list), read through Lance's reader. It records no hashes,
    compression or commit properties of ours, and takes no new versions."""

    writable = False

    def __init__(self, ds: lance.LanceDataset):
        super().__init__(ds)
        self.codec = None  # whatever its schema says: values are never ours to decode
        self.root = None  # nor read from the data files directly

    def entries(self) -> OrderedDict[str, _Entry]:
        table = self.ds.to_table(columns=["name", "shape"], with_row_address=True)
        out: OrderedDict[str, _Entry] = OrderedDict()
        for index, row in enumerate(table.to_pylist()):
            shape = list(row["shape"] or [])
            name = row["name"]
            if (not isinstance(name, str) or name in out or len(shape) > _MAX_DIMS
                    or any(s is None or s < 0 for s in shape)):  # fmt: skip
                raise CorruptionError(
                    f"row {index} of {self.ds.uri} (version {self.ds.version}) repeats the name {name!r} "
                    f"or has shape {shape[:10]}, which is not a list of non-negative sizes"
                )
            nbytes = stored_nbytes("float64", shape)
            out[name] = _Entry(name, "float64", shape, nbytes, None, [],
                               [_Row(0, 0, nbytes, "", row["_rowaddr"], index, None, "", nbytes)])
        return out

    def checked(self, use_index: bool = True) -> tuple[OrderedDict[str, _Entry], list[Problem]]:
        return self.entries(), []  # each row was checked as it was read

    def properties(self) -> dict[str, str] | None:
        return {}

    def bad_hash(self, row: _Row, chunk: torch.Tensor) -> str | None:
        return None  # nothing recorded to check against

    def _fill(self, row: _Row, dst: torch.Tensor) -> int:
        value = self.ds.take([row.index], columns=["value"]).column(0).combine_chunks()
        src = readonly_bytes(value.flatten().to_numpy(zero_copy_only=False))
        dst[: min(src.numel(), dst.numel())].copy_(src[: dst.numel()])
        return src.numel()


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
    got = reader.bad_hash(row, chunk)
    if got is not None:
        raise CorruptionError(
            f"tensor {e.name!r} (chunk {row.chunk}) of version {reader.version} in {reader.uri} "
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
    if verify:
        for e, row, dst in jobs:
            _check_row(reader, e, row, dst)
    return out


