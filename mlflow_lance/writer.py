"""The write pipeline: a new version from a state dict, in the order torch.distributed.checkpoint
uses (plan, write, commit), each step its own function so that distributed.py can run them on
several ranks.

1. ``prepare``: check and flatten the state dict (a checkpoint dict becomes tensors by path
   plus a spec); nothing is written if any entry cannot be stored.
2. ``reusable_base``: the parent version's schema and the rows a new version may reuse.
3. ``plan_version`` (plan.py): which fragments to reuse, which rows to write, in what units.
4. ``write_units``: the new data files, written (parallel ``write_fragments`` calls) and
   flushed while the next ones are written.
5. ``commit_version``: one Lance ``Overwrite`` commit naming every fragment (retried on top of
   concurrent writers' versions), flushed, then the version's index (index.py).

``write_version`` is steps 1-4 and returns ``Written``; ``store.save_state_dict`` is
``write_version`` then ``commit_version``. What a commit records (``VersionInfo``, the
summary in its transaction properties) is read back here too.

Nothing here knows about MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NoReturn

import pyarrow as pa
import torch
import zstandard

from . import encodings, fs, index, tree
from .dataset import (
    Dataset,
    check_format,
    fragment_table,
    open_lance,
    retrying,
    schema_of,
    utc,
)
from .errors import WeightsError
from .format import (
    COMPRESSION_KEY,
    FORMAT_VERSION,
    MAX_PROPERTY_BYTES,
    PROP,
    STORAGE_VERSION,
    Entry,
    Located,
    check_compression,
    codec,
    max_zstd_ratio,
    rows_digest,
    schema,
)
from .fs import StorageOptions, durable, lance_target, local_path, unreachable
from .plan import RowData, Unit, plan_version
from .readers import (
    THREADS,
    describe,
    write_index,
)
from .tensors import (
    DEFAULT_CHUNK_BYTES,
    DTYPES,
    find_ties,
    no_cyclic_gc,
    to_rows,
    unit_batch,
    validate_state_dict,
)

if TYPE_CHECKING:  # Lance is imported where a verb writes or opens a dataset: a local load
    import lance  # through the version index never imports it (see index.py)
    from lance.fragment import FragmentMetadata

_PARALLEL_WRITE_BYTES = 64 << 20
# Data files are flushed (fsync) several at once: the file system commits concurrent flushes
# together (ext4 here: ResNet-50's 42 largest tensors, a file each, take 0.23 s one after
# another, 0.06 s from 8 threads).
_FLUSH_THREADS = 8
_CALL_BYTES = 64 << 20
_COMMIT_ATTEMPTS = 64


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
class Written:
    """A new version's data files, written (and flushed) but not committed yet: a version is
    saved in two steps, ``write_version`` then ``commit_version``, so that a writer can name
    the version in MLflow after its bytes are down, or commit data files that several
    processes wrote (distributed.py). Until committed, the files are orphans that
    ``gc`` reclaims once they are older than its grace period.

    ``units`` are the new version's fragments in order (rows' metadata only: the payloads are
    dropped once written) and ``fragments`` their Lance metadata: reused from ``parent`` or
    written.
    """

    dataset: Dataset
    parent: int | None
    schema: pa.Schema
    units: list[Unit]
    fragments: list[FragmentMetadata]
    changed: list[str]
    removed: list[str]
    spec: dict | None
    flush: bool
    container: str | None = None  # as Prepared's

    @property
    def metas(self) -> list[dict]:
        """Every row's metadata, in the version's order."""
        return [meta for unit in self.units for meta, _ in unit.rows]

    @property
    def bytes_written(self) -> int:
        return sum(
            f.files[0].file_size_bytes or 0 for f, u in zip(self.fragments, self.units, strict=True) if u.reused is None
        )


@no_cyclic_gc()
def write_version(
    state_dict: Mapping[str, Any] | Prepared,
    uri: str | os.PathLike | Dataset,
    *,
    storage_options: StorageOptions = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    compression: str | None = None,
    sync_files: bool | None = None,
) -> Written:
    """The first step of ``save_state_dict``: plan the new version against the latest one and
    write (and flush) the data files of what changed; nothing is committed (see ``Written``).
    Arguments as ``save_state_dict``'s."""
    prepared = prepare(state_dict)
    dataset = Dataset.of(uri, storage_options)
    parent = dataset.existing()
    new_schema, previous = reusable_base(dataset, parent, compression)
    ties = find_ties(prepared.tensors)
    tensors = [to_rows(name, t, tie=ties.get(name), chunk_bytes=chunk_bytes) for name, t in prepared.tensors.items()]
    reusable = reusable_fragments(parent)
    units, changed = plan_version(tensors, previous, {fid: f.physical_rows for fid, f in reusable.items()})
    flush = flushes(dataset, sync_files)
    fragments = write_units(units, dataset, new_schema, reusable, create=parent is None, flush=flush)
    return Written(
        dataset,
        parent.version if parent else None,
        new_schema,
        [u.written() for u in units],
        fragments,
        changed,
        [n for n in previous if n not in prepared.tensors],
        prepared.spec,
        flush,
        prepared.container,
    )


@no_cyclic_gc()
def commit_version(
    written: Written, *, message: str | None = None, properties: Mapping[str, str] | None = None
) -> VersionInfo:
    """The second step of ``save_state_dict``: commit written data files as one new version
    (retried on top of versions other writers committed meanwhile), flush the commit when the
    files were flushed, and write the version's index. Arguments as ``save_state_dict``'s."""
    import lance

    props = check_properties(properties)
    dataset = written.dataset
    txn_props = _transaction_properties(message, props, written)
    ds, txn_file = _commit(
        dataset.uri,
        lance.LanceOperation.Overwrite(written.schema, written.fragments),
        txn_props,
        written.parent or 0,
        dataset.storage_options,
    )
    if written.flush:
        _flush_commit(local_path(dataset.uri), ds.version, txn_file)
    _index_new_version(dataset, ds, written.units, sync=written.flush)
    return version_info(dataset.uri, ds.version, now(ds), txn_props, ())


def flushes(dataset: Dataset, sync_files: bool | None) -> bool:
    """Whether a save to ``dataset`` flushes what it writes (``sync_files``; object storage
    needs no flush)."""
    return (durable() if sync_files is None else sync_files) and local_path(dataset.uri) is not None


def reusable_fragments(parent: lance.LanceDataset | None) -> dict[int, FragmentMetadata]:
    """The parent version's fragments a new version may take over, by id."""
    return {f.fragment_id: f.metadata for f in parent.get_fragments()} if parent else {}


def write_units(
    units: list[Unit],
    dataset: Dataset,
    schema: pa.Schema,
    reusable: Mapping[int, FragmentMetadata],
    *,
    create: bool,
    flush: bool,
) -> list[FragmentMetadata]:
    """Write the units that reuse nothing, one data file each (flushed while the next ones are
    written, when ``flush``); every unit's fragment, in order."""
    uri, storage_options = dataset.uri, dataset.storage_options
    fresh = [u.rows for u in units if u.reused is None]
    with ThreadPoolExecutor(_FLUSH_THREADS) as flusher:  # data files are flushed while the next ones are written
        flushing: list = []
        data = os.path.join(local_path(uri) or "", "data")
        new_files = _write_rows(
            fresh,
            uri,
            schema,
            storage_options,
            create=create,
            written=(
                lambda frags: flushing.extend(
                    flusher.submit(fs.sync_files, [os.path.join(data, f.files[0].path)]) for f in frags
                )
            )
            if flush
            else None,
        )
        for job in flushing:
            job.result()
    written = iter(new_files)
    fragments = [reusable[u.reused] if u.reused is not None else next(written) for u in units]
    if flush and new_files:  # the bytes are on the disk before any manifest names them, and so are their names
        root = local_path(uri)
        fs.sync_dirs([data] + ([root, os.path.dirname(os.path.abspath(root))] if create else []))
    return fragments


def _flush_commit(root: str, version: int, txn_file: str) -> None:
    """Flush a local commit: its transaction file and manifest, their directories and the
    dataset's root (which holds those directories' names after a first commit)."""
    manifest = next(
        (p for name in index.manifest_names(version) if os.path.isfile(p := os.path.join(root, "_versions", name))),
        None,
    )
    fs.sync_files([os.path.join(root, "_transactions", txn_file), *([manifest] if manifest else [])])
    fs.sync_dirs([os.path.join(root, "_transactions"), os.path.join(root, "_versions"), root])


# --------------------------------------------------------------------------- saving


@dataclass(frozen=True)
class Prepared:
    """A state dict (or checkpoint dict) checked and flattened for saving, once: its tensors
    by name and the spec of the tree they came from (None for a flat state dict)."""

    tensors: Mapping[str, torch.Tensor]
    spec: dict | None
    container: str | None = None  # "dict": a flat state dict given as a plain dict (loads back as one)


def prepare(state_dict: Mapping[str, Any] | Prepared) -> Prepared:
    """Check and flatten what ``save_state_dict`` saves (a Prepared is returned as it is);
    TypeError / ValueError naming the first key that cannot be saved."""
    if isinstance(state_dict, Prepared):
        return state_dict
    spec = None
    if isinstance(state_dict, Mapping) and not tree.is_flat(state_dict):  # a checkpoint dict
        state_dict, spec = tree.flatten(state_dict)
    container = "dict" if spec is None and type(state_dict) is dict else None
    validate_state_dict(state_dict)
    if not state_dict:
        raise ValueError("the state dict holds no tensor; there is nothing to save")
    return Prepared(state_dict, spec, container)


class CompressionMismatch(ValueError):
    """A ``compression=`` other than the one an existing dataset was created with (fixed per
    dataset: its versions share data files)."""

    def __init__(self, uri: str, existing: str | None, wanted: str):
        self.uri, self.existing, self.wanted = uri, existing or "none", wanted
        super().__init__(
            f"{uri} was created with compression={self.existing!r}, and compression is fixed when a "
            f"dataset is created, so it cannot take compression={wanted!r}. Pass compression=None "
            f"to keep {self.existing!r}, or write to a new dataset: another URI (save_state_dict, "
            f"lance_uri=), another registered model name (log_model), a new run (log_checkpoint)"
        )


def check_dataset_compression(dataset: Dataset, compression: str | None) -> None:
    """Raise ``CompressionMismatch`` early (before anything is logged) when ``dataset`` exists
    and was created with another compression than ``compression`` (None: any).

    Args:
        dataset: where the weights go.
        compression: what the caller asked for (see ``format.check_compression``).

    Raises:
        ValueError: ``compression`` is not a compression; CompressionMismatch: see above.
    """
    wanted = check_compression(compression)
    if compression is None or (ds := dataset.existing()) is None or not check_format(ds, FORMAT_VERSION):
        return
    recorded = (schema_of(ds).metadata or {}).get(COMPRESSION_KEY.encode(), b"none").decode("utf-8", "replace")
    if codec(recorded) != wanted:
        raise CompressionMismatch(dataset.uri, codec(recorded), compression)


def reusable_base(
    dataset: Dataset, parent: lance.LanceDataset | None, compression: str | None
) -> tuple[pa.Schema, Mapping[str, Entry]]:
    """The new version's schema, and the parent's tensors whose rows it may reuse: all whose
    metadata is consistent (none for a new dataset). Compression is fixed per dataset."""
    if parent is None:
        return schema(compression), {}
    reader = describe(dataset, parent)
    if not reader.writable:
        raise WeightsError(
            f"{dataset.uri} holds weights in the Lance docs example's layout, which cannot take new "
            f"versions; load it with load_state_dict() and save to a new URI"
        )
    existing = reader.codec
    if check_compression(compression) != existing and compression is not None:
        raise CompressionMismatch(dataset.uri, existing, compression)
    previous, found = reader.entries, reader.problems()
    bad = {p.name for p in found}
    return schema(existing), {n: e for n, e in previous.items() if n not in bad}  # never reuse those rows


def _transaction_properties(message: str | None, props: dict[str, str], written: Written) -> dict[str, str]:
    """What the new version's commit records: the summary ``VersionInfo`` is read back from,
    the digest its rows are checked against, the checkpoint spec and the message."""
    metas = written.metas
    summary = {
        "format": str(FORMAT_VERSION),
        "message": message or "",
        "properties": json.dumps(props, sort_keys=True),
        "parent": "" if written.parent is None else str(written.parent),
        "tensors": str(len(dict.fromkeys(m["name"] for m in metas))),
        "bytes": str(sum(m["nbytes"] for m in metas if m["chunk"] == 0 and m["alias"] is None)),
        "bytes_written": str(written.bytes_written),
        "changed": json.dumps(written.changed),
        "removed": json.dumps(written.removed),
        "rows": rows_digest(metas),
    }
    txn_props = {PROP + k: v for k, v in summary.items()}
    if written.spec is not None:
        txn_props[PROP + "tree"] = tree.encode(written.spec)
    if written.container is not None:
        txn_props[PROP + "container"] = written.container
    if message:
        txn_props["lance.commit.message"] = message
    return txn_props


def _commit(
    uri: str,
    operation: lance.LanceOperation.BaseOperation,
    properties: dict[str, str],
    read_version: int,
    storage_options: StorageOptions,
) -> tuple[lance.LanceDataset, str]:
    """Commit, retrying when concurrent writers got there first; the new version and the name
    of its transaction file.

    The version is a complete fragment list, so it stays valid on top of any newer version:
    a retry commits the same files against the new latest (jittered backoff, 64 tries).
    """
    target, opts = lance_target(uri, storage_options)
    import lance
    from lance.commit import CommitConflictError

    base = [read_version]

    def commit() -> tuple[lance.LanceDataset, str]:
        txn = lance.Transaction(base[0], operation, uuid=str(uuid.uuid4()), transaction_properties=properties)
        return lance.LanceDataset.commit(target, txn, storage_options=opts), f"{base[0]}-{txn.uuid}.txn"

    def conflict(err: Exception) -> bool:
        text = str(err).lower()
        return isinstance(err, CommitConflictError) or (
            isinstance(err, (OSError, ValueError)) and ("conflict" in text or "already exists" in text)
        )

    def rebase() -> None:
        base[0] = open_lance(uri, storage_options).version

    try:
        return retrying(commit, retry=conflict, attempts=_COMMIT_ATTEMPTS, pause=0.02, between=rebase)
    except (CommitConflictError, OSError, ValueError) as err:
        _raise_write_error(uri, err)


def _index_new_version(dataset: Dataset, ds: lance.LanceDataset, units: list[Unit], *, sync: bool) -> None:
    """Write the version index of a just-committed version, scanning only its new fragments
    (files this save wrote itself, so Lance reads them in this process)."""
    fragments = ds.get_fragments()
    if len(fragments) != len(units):
        return
    table = fragment_table(ds, fragments)
    located: list[Located] = []
    fresh = []
    for unit, frag, (fid, path, _) in zip(units, fragments, table, strict=True):
        if unit.reused is None:
            fresh.append(frag)
            located += [Located(meta, fid << 32 | i, None, path, None) for i, (meta, _) in enumerate(unit.rows)]
        else:
            located += [
                Located(meta, fid << 32 | i, old.position, path, old.stored)
                for i, ((meta, _), old) in enumerate(zip(unit.rows, unit.old, strict=True))
            ]
    if fresh:  # their blob positions: a scan of the blob descriptors only (a third of a full scan)
        blobs = ds.scanner(columns=["data"], with_row_address=True, fragments=fresh).to_table()
        data = blobs["data"].combine_chunks()
        found = dict(
            zip(
                blobs["_rowaddr"].to_pylist(),
                zip(data.field("position").to_pylist(), data.field("size").to_pylist(), strict=True),
                strict=True,
            )
        )
        for i, r in enumerate(located):
            if (blob := found.get(r.address)) is not None:
                located[i] = Located(r.meta, r.address, blob[0], r.file, blob[1])
    with contextlib.suppress(OSError, WeightsError):  # derived data: the next load decodes the rows instead
        write_index(dataset, ds, located, table, sync=sync)


def _raise_write_error(uri: str, err: Exception) -> NoReturn:
    """Raise what a failed write means for the user (nothing was committed), else ``err``."""
    if (gone := unreachable(uri, err)) is not None:
        raise gone from err
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
    if isinstance(err, OSError):
        raise OSError(
            f"writing a new version to {uri!r} failed ({' '.join(text.split())[:300]}). Nothing was committed "
            f"and earlier versions are intact."
        ) from err
    raise err


def _write_rows(
    units: list[list[RowData]],
    uri: str,
    schema: pa.Schema,
    storage_options: StorageOptions,
    *,
    create: bool,
    written: Callable[[list[FragmentMetadata]], object] | None = None,
) -> list[FragmentMetadata]:
    """Write each unit (a list of rows) into a data file of its own: one fragment per unit,
    returned in ``units``' order; ``written`` is called with the fragments of each
    ``write_fragments`` call as soon as it returns (a save flushes them meanwhile).

    Large saves are split into byte-balanced groups written by parallel ``write_fragments``
    calls. Each call writes at most _CALL_BYTES of the units of one group that have the same
    number of rows k, cut into files of k rows (``max_rows_per_file``).
    """
    if not units:
        return []
    codec = (schema.metadata or {}).get(COMPRESSION_KEY.encode(), b"none")
    from lance.fragment import write_fragments

    calls = _write_calls(units)
    target, opts = lance_target(uri, storage_options)

    def write(call: list[int], mode: str = "create" if create else "append") -> list[FragmentMetadata]:
        # A compressor per call: one ZstdCompressor used by two threads at once fails.
        compressor = zstandard.ZstdCompressor(level=3)

        def pack(meta: dict, payload: memoryview) -> bytes | memoryview:
            if codec == b"auto":
                return _encoded(meta, payload, compressor)
            return _zstd(payload, compressor) if codec == b"zstd" else payload

        batches = (unit_batch(schema, [(m, pack(m, p)) for m, p in units[i]]) for i in call)
        try:
            frags = write_fragments(
                pa.RecordBatchReader.from_batches(schema, batches),
                target,
                schema=schema,
                mode=mode,
                max_rows_per_file=len(units[call[0]]),
                data_storage_version=STORAGE_VERSION,
                storage_options=opts,
            )
        except OSError as err:  # another writer created the dataset since we looked
            if mode == "create" and "already exists" in str(err):
                return write(call, "append")
            _raise_write_error(uri, err)
        if written is not None:
            written(frags)
        return frags

    threads = min(THREADS, len(calls)) if sum(map(_unit_bytes, units)) >= _PARALLEL_WRITE_BYTES else 1
    if threads == 1:
        results = [write(call) for call in calls]
    else:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(write, calls))
    written: list[FragmentMetadata | None] = [None] * len(units)
    for call, frags in zip(calls, results, strict=True):
        k = len(units[call[0]])
        if len(frags) != len(call) or any(f.physical_rows != k for f in frags):
            raise WeightsError(f"Lance wrote {len(frags)} fragments for {len(call)} files of {k} rows at {uri}")
        for i, frag in zip(call, frags, strict=True):
            written[i] = frag
    return written


def _encoded(meta: dict, payload: memoryview, compressor: zstandard.ZstdCompressor) -> bytes:
    """A payload of a ``compression="auto"`` dataset: the encoding ``encodings.choose`` picks
    for it (byte-grouped zstd, aligned or not; see docs/storage.md), or a zstd frame (``_zstd``)
    where that picks raw, where the row is not whole elements (a split tensor's chunk), or
    where the encoding would be more than ``max_zstd_ratio()`` times smaller than the payload.
    """
    size = encodings.element_size_of(DTYPES[meta["dtype"]].itemsize)
    if len(payload) % size == 0:
        choice = encodings.choose(payload, meta["dtype"], size)
        if choice.encoding != encodings.RAW:
            blob = encodings.encode(payload, size, encoding=choice.encoding, flags=choice.flags)
            if len(payload) <= max_zstd_ratio() * len(blob):
                return blob
    return _zstd(payload, compressor)


def _zstd(payload: memoryview, compressor: zstandard.ZstdCompressor) -> bytes:
    """A payload as one zstd frame, at most ``max_zstd_ratio()`` times smaller than the payload.

    A load refuses a chunk that claims more than that ratio, so that a tiny crafted file
    cannot make it allocate gigabytes. A payload that compresses further (zeros) becomes a
    frame whose first ``n / ratio`` bytes are a raw block, followed by the compressed blocks
    of the rest (blocks only refer back within their own data, so they splice): 1 MiB of
    zeros takes 1 KiB instead of ~100 bytes, still decoded by any zstd decoder.
    """
    frame = compressor.compress(payload)
    n, ratio = len(payload), max_zstd_ratio()
    if n <= ratio * max(len(frame), 1):
        return frame
    k = -(-n // ratio)
    out = bytearray(struct.pack("<IBQ", 0xFD2FB528, 0xE0, n))  # magic; single segment, 8-byte content size
    for start in range(0, k, 128 << 10):  # raw blocks (type 0) of at most 128 KiB
        size = min(128 << 10, k - start)
        out += (int(start + size >= n) | size << 3).to_bytes(3, "little") + payload[start : start + size]
    if k < n:
        out += _blocks(zstandard.ZstdCompressor(level=3, write_checksum=False).compress(payload[k:]))
    return bytes(out)


def _blocks(frame: bytes) -> bytes:
    """The blocks of a zstd frame without its header and checksum (RFC 8878, 3.1.1.1)."""
    d = frame[4]
    fcs, single, checksum, did = d >> 6, d >> 5 & 1, d >> 2 & 1, d & 3
    start = 5 + (not single) + (0, 1, 2, 4)[did] + (int(single), 2, 4, 8)[fcs]
    return frame[start : len(frame) - 4 * checksum]


def _unit_bytes(unit: list[RowData]) -> int:
    return sum(len(p) for _, p in unit)


def _write_calls(units: list[list[RowData]]) -> list[list[int]]:
    """Unit indices per ``write_fragments`` call: units spread over THREADS byte-balanced
    groups (one group below _PARALLEL_WRITE_BYTES), then split by row count and into calls
    of at most _CALL_BYTES, in order (so that each call's files can be flushed while the
    next is written)."""
    total = sum(_unit_bytes(u) for u in units)
    n = min(THREADS, len(units)) if total >= _PARALLEL_WRITE_BYTES else 1
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
        for same_rows in by_rows.values():  # cut into calls of at most _CALL_BYTES (at least one unit)
            calls.append([])
            size = 0
            for i in same_rows:
                if calls[-1] and size + _unit_bytes(units[i]) > _CALL_BYTES:
                    calls.append([])
                    size = 0
                calls[-1].append(i)
                size += _unit_bytes(units[i])
    return calls


def check_properties(properties: Mapping[str, str] | None) -> dict[str, str]:
    props = dict(properties or {})
    for k, v in props.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"properties must map str to str; {k!r}: {v!r} is not (convert values with str())")
    return props


# --------------------------------------------------------------------------- a version's summary


def now(ds: lance.LanceDataset) -> datetime:
    return utc(ds.versions()[-1]["timestamp"]) if ds.versions() else datetime.now(timezone.utc)


def version_info(uri: str, version: int, ts: datetime, props: Mapping[str, str], tags: tuple[str, ...]) -> VersionInfo:
    """A version's summary from its commit properties; WeightsError names a malformed one."""
    return VersionInfo(version=version, timestamp=ts, tags=tags, **commit_summary(uri, version, props))


def commit_summary(uri: str, version: int, props: Mapping[str, str]) -> dict:
    """The VersionInfo fields a commit's properties hold, each checked."""
    p = {k[len(PROP) :]: v for k, v in props.items() if k.startswith(PROP)}

    def bad(key: str, why: str) -> WeightsError:
        return WeightsError(
            f"version {version} of {uri} has a malformed commit property {PROP}{key}="
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
        if not isinstance(text, str) or len(text) > MAX_PROPERTY_BYTES:
            raise bad(key, f"not a JSON string of at most {MAX_PROPERTY_BYTES} bytes")
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
