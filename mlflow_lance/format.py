"""The on-disk format of a weights dataset, as data: its schema, the types a version's rows are
read into, and the rules a version must obey before any of its bytes is read. Pure: nothing
here reads or writes a file, and nothing imports Lance or MLflow.

Layout: one row per tensor chunk (see tensors.py), in the state dict's key order. Each Lance
fragment (one data file) holds either one row of a large tensor or a run of small, single-row
tensors (packing, see plan.py). The ``data`` column is a Lance blob column in file format
2.0: the raw bytes of a chunk sit contiguously (64-byte aligned) in its data file, so a
reader can map them, read them with ``preadv`` or fetch them with one ranged GET.

Everything a version's rows claim is input, not a promise: ``problems`` lists every claim
that cannot hold, and a load refuses the version before it allocates anything.
"""

from __future__ import annotations

import fnmatch
import json
import operator
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import pyarrow as pa
import torch

from .errors import CorruptionError, VersionNotFoundError
from .tensors import DTYPES, META_COLUMNS, SCHEMA_FIELDS, check_key, hash_bytes, stored_nbytes, tensor_key

FORMAT_VERSION = 1
FORMAT_KEY = "mlflow_lance.format"  # schema metadata: the format a dataset was written in
COMPRESSION_KEY = "mlflow_lance.compression"  # schema metadata: the payload codec, or "none"
PROP = "mlflow_lance."  # prefix of our commit (transaction) properties
STORAGE_VERSION = "2.0"  # Lance file format whose blob payloads sit contiguous in the data file
#: "zstd": every payload one zstd frame; "auto": each payload the smallest of encodings.py's
#: full encodings (byte-grouped zstd) or a zstd frame, told apart by their magic numbers.
COMPRESSIONS = ("zstd", "auto")
MAX_DIMS = 64
MAX_PROPERTY_BYTES = 16 << 20  # a commit property larger than this is malformed
#: A zstd chunk may claim at most this many times its stored bytes (env MLFLOW_LANCE_MAX_ZSTD_RATIO
#: raises it); a save stores a chunk that would compress further as raw zstd blocks instead.
DEFAULT_MAX_ZSTD_RATIO = 1024
ZSTD_RATIO_ENV = "MLFLOW_LANCE_MAX_ZSTD_RATIO"

Version = int | str  # a version number or a tag name


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a version: a tensor's chunk (``chunk`` -1: the whole tensor, or
    with ``name`` empty the whole version) and the data file involved, if any."""

    name: str
    chunk: int
    file: str
    detail: str


class Located(NamedTuple):
    """One stored row as read from the dataset (a scan) or from its version index."""

    meta: dict  # the metadata columns (tensors.META_COLUMNS)
    address: int  # Lance row address: fragment id << 32 | row in the fragment
    position: int | None  # byte position of the payload in its data file (None: unknown)
    file: str  # the data file, a plain name in the dataset's data/ directory
    stored: int | None  # payload bytes in the file (differs from the size when compressed)


class Row(NamedTuple):
    """Where one chunk of a stored tensor lives."""

    chunk: int
    offset: int  # byte offset of the chunk inside the tensor
    size: int  # bytes of the tensor this chunk covers
    hash: str
    address: int  # Lance row address (fragment id << 32 | row)
    index: int  # position of the row in the version
    position: int | None  # byte position of the payload inside its data file
    file: str  # the data file, relative to the dataset's data/ directory
    stored: int  # payload bytes in the file (differs from `size` when compressed)


@dataclass
class Entry:
    """One stored tensor of a version, built from the small metadata columns only."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    tie: str | None  # the name of the tensor this one is tied to (stored once, under that name)
    meta: list[dict]
    rows: list[Row]

    @property
    def key(self) -> tuple:
        """Equal keys mean identical stored content (what a save deduplicates by)."""
        return tensor_key(self.meta)


def schema(compression: str | None) -> pa.Schema:
    """Schema of a new dataset. ``data`` is a blob column: each payload is stored contiguous.

    Compression is ours, per payload (zstd, or with "auto" an encodings.py blob), recorded in
    the schema: Lance's own encodings leave one-value pages uncompressed, and our layout has
    one value per data file.
    """
    check_compression(compression)
    data = pa.field("data", pa.large_binary(), nullable=False, metadata={"lance-encoding:blob": "true"})
    return pa.schema(
        [*SCHEMA_FIELDS, data],
        metadata={FORMAT_KEY: str(FORMAT_VERSION), COMPRESSION_KEY: compression or "none"},
    )


def check_compression(compression: object) -> str | None:
    """A ``compression=`` argument, checked: None (a new dataset stores raw bytes, an existing
    one keeps what it was created with), ``"none"`` (raw bytes), ``"zstd"`` or ``"auto"``.

    Args:
        compression: what the caller passed.

    Returns:
        The payload codec it asks for (None: raw bytes, or unspecified when None was given).

    Raises:
        ValueError: anything else.
    """
    if compression is not None and compression not in ("none", *COMPRESSIONS):
        raise ValueError(f"compression must be None, 'none' or one of {COMPRESSIONS}, got {compression!r}")
    return codec(compression) if compression is not None else None


def codec(recorded: str) -> str | None:
    """The payload codec a schema's compression key names (None: raw bytes)."""
    return None if recorded == "none" else recorded


def max_zstd_ratio() -> int:
    """How many times its stored bytes a compressed chunk may claim (see DEFAULT_MAX_ZSTD_RATIO)."""
    text = os.environ.get(ZSTD_RATIO_ENV, "")
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else DEFAULT_MAX_ZSTD_RATIO


def build_entries(rows: Iterable[Located]) -> OrderedDict[str, Entry]:
    """The tensors of a version from its rows, in order (each chunk sized by the next one's
    offset); unchecked: see ``problems``."""
    grouped: dict[str, list[tuple[int, Located]]] = {}
    for index, located in enumerate(rows):
        grouped.setdefault(located.meta["name"], []).append((index, located))
    out: OrderedDict[str, Entry] = OrderedDict()
    for name, group in grouped.items():
        first = group[0][1].meta
        e = out[name] = Entry(name, first["dtype"], first["shape"], first["nbytes"], first["alias"], [], [])
        ends = [located.meta["offset"] for _, located in group[1:]] + [0 if e.tie else e.nbytes]
        for (index, (meta, address, position, file, stored)), end in zip(group, ends, strict=True):
            size = end - meta["offset"]  # a chunk runs to the next chunk's offset
            e.meta.append(meta)
            e.rows.append(
                Row(
                    meta["chunk"],
                    meta["offset"],
                    size,
                    meta["hash"],
                    address,
                    index,
                    position,
                    file,
                    (stored or 0) if position is not None else size,
                )
            )
    return out


def _rows_agree(e: Entry) -> str | None:
    first = e.meta[0]
    same = (first["dtype"], first["shape"], first["nbytes"], first["alias"])
    if any((m["dtype"], m["shape"], m["nbytes"], m["alias"]) != same for m in e.meta):
        return "its rows disagree on dtype, shape, size or tie"
    if [r.index for r in e.rows] != list(range(e.rows[0].index, e.rows[0].index + len(e.rows))):
        return "the name is stored more than once"
    return None


def _tie_problem(e: Entry, entries: Mapping[str, Entry], compressed: bool) -> str | None:
    target = entries.get(e.tie or "")
    if e.tie == e.name:
        return "it is tied to itself"
    if target is None:
        return f"it is tied to {e.tie!r}, which is not stored"
    if target.tie is not None:
        return f"it is tied to {e.tie!r}, which is itself a tie"
    if (target.dtype, target.shape) != (e.dtype, e.shape):
        return f"it is tied to {e.tie!r} of another dtype or shape"
    row = e.rows[0]  # compressed, its empty payload is a (never read) empty zstd frame
    if len(e.rows) != 1 or row.offset or row.chunk or (row.stored and not compressed):
        return "a tie must be one empty row"
    return None


def _chunk_problem(e: Entry, compressed: bool) -> str | None:
    if [r.chunk for r in e.rows] != list(range(len(e.rows))):
        return f"its chunks are numbered {[r.chunk for r in e.rows][:10]}, not 0..{len(e.rows) - 1}"
    smallest = 1 if len(e.rows) > 1 else 0  # only a one-row tensor may be empty
    if e.rows[0].offset != 0 or any(r.size < smallest for r in e.rows):
        return f"its chunk offsets {[r.offset for r in e.rows][:10]} do not tile its {e.nbytes} bytes"
    ratio = max_zstd_ratio() if compressed else 0
    for r in e.rows:
        if (r.position is not None and r.position < 0) or r.stored < 0:
            return f"chunk {r.chunk} has a negative position or size"
        if not compressed and r.stored != r.size:
            return f"chunk {r.chunk} stores {r.stored} bytes, but its part of the tensor takes {r.size}"
        if compressed and r.size > ratio * max(r.stored, 1):
            return (
                f"chunk {r.chunk} claims {r.size} bytes from {r.stored} compressed ones, more than "
                f"{ratio}x (raise {ZSTD_RATIO_ENV} if this dataset is trusted)"
            )
    return None


def entry_problem(e: Entry, entries: Mapping[str, Entry], compressed: bool) -> str | None:
    """Why ``e``'s metadata cannot be loaded as it claims, or None when it is consistent.

    The rules: one name is one run of rows that agree on dtype, shape, size and tie; dtype ×
    shape is the recorded size; chunks tile exactly that size, each stored with exactly its
    bytes (compressed: at most ``max_zstd_ratio()`` times fewer); a tie names another stored,
    untied tensor of the same dtype and shape.
    """
    if len(e.rows) > 1 and (why := _rows_agree(e)) is not None:
        return why
    try:
        check_key(e.name)
    except (TypeError, ValueError) as err:
        return str(err)
    if e.dtype not in DTYPES:
        return f"dtype {e.dtype!r} is unknown to torch {torch.__version__}"
    if len(e.shape) > MAX_DIMS or any(s is None or s < 0 for s in e.shape):
        return f"shape {e.shape} is not a list of at most {MAX_DIMS} non-negative sizes"
    expected = stored_nbytes(e.dtype, e.shape)
    if e.nbytes != expected:
        return f"it records {e.nbytes} bytes, but {e.dtype} x {e.shape} takes {expected}"
    if e.tie is not None:
        return _tie_problem(e, entries, compressed)
    return _chunk_problem(e, compressed)


def _overlaps(entries: Mapping[str, Entry]) -> list[Problem]:
    """Chunks whose stored bytes overlap another chunk's in the same data file: each payload
    is its own byte range, so a load never allocates more than the files hold."""
    spans: dict[str, list[tuple[int, int, str, int]]] = {}
    for e in entries.values():
        for r in e.rows:
            if r.position is not None and r.stored > 0:
                spans.setdefault(r.file, []).append((r.position, r.position + r.stored, e.name, r.chunk))
    out = []
    for file, ranges in spans.items():
        ranges.sort()
        for (_, end, name, chunk), (start, _, other, other_chunk) in pairwise(ranges):
            if start < end:
                out.append(Problem(other, other_chunk, file, f"its bytes overlap chunk {chunk} of {name[:200]!r}"))
                break
    return out


def problems(entries: Mapping[str, Entry], compressed: bool) -> list[Problem]:
    """Every tensor of the version whose metadata is inconsistent (see ``entry_problem``), and
    every data file whose chunks overlap."""
    out = []
    for e in entries.values():
        detail = entry_problem(e, entries, compressed)
        if detail is not None:
            out.append(Problem(e.name, -1, e.rows[0].file, detail))
    return out + _overlaps(entries)


def raise_problems(uri: str, version: int, found: list[Problem]) -> None:
    """CorruptionError naming the first problem (and how many more), if there are any."""
    if found:
        p = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise CorruptionError(
            f"version {version} of {uri} is corrupt or crafted: "
            f"{f'tensor {p.name[:200]!r}: ' if p.name else ''}{p.detail}{more}. Nothing was "
            f"loaded; run verify() for the full list, or load another version"
        )


def rows_digest(metas: Iterable[Mapping]) -> str:
    """Digest of a version's metadata rows, recorded in its commit to check the index against."""
    return hash_bytes(json.dumps(list(map(_META_VALUES, metas)), separators=(",", ":")).encode())


_META_VALUES = operator.itemgetter(*META_COLUMNS)  # a row's metadata values, in column order


def plain_name(path: str) -> bool:
    """A file name that can only mean a file of its own directory (no separators, no '..')."""
    return path not in ("", ".", "..") and not any(c in path for c in "/\\\0")


def select(entries: Mapping[str, Entry], names: str | Iterable[str] | None) -> list[str]:
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
        raise VersionNotFoundError(
            f"tensor(s) {missing[:10]} not stored in this version ({len(entries)} tensors, e.g. "
            f"{list(entries)[:3]}); pass a prefix or a glob to select by pattern"
        )
    return wanted


_TAG_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def check_tag_name(name: object) -> str:
    """``name`` if it can name a tag: letters, digits, '.', '_', '-' (no path separators, no
    '..', not all digits, at most 200 characters); ValueError saying so otherwise."""
    if not isinstance(name, str) or not _TAG_NAME.fullmatch(name) or name.isdigit() or ".." in name:
        raise ValueError(
            f"tag name {str(name)[:80]!r} is not allowed: use letters, digits, '.', '_' and '-' (not starting "
            f"with '.' or '-', no '..', not all digits, at most 200 characters)"
        )
    return name
