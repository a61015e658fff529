"""The Lance weight store's verbs: save a version, load one (as a state dict or into a module),
list, diff, tag, verify and garbage-collect versions. How a dataset is laid out is format.py,
how a version is read readers.py. Each verb takes a dataset URI, or a ``Dataset`` handle
(dataset.py) so that several verbs on one dataset open it once.

A new version is a Lance ``Overwrite`` commit whose fragment list reuses every fragment
whose rows are all unchanged since the latest version (same name, dtype, shape and content
hash, in the same order) and adds new fragments for the rest: a version costs the changed
bytes, plus the other tensors of the runs they were packed in (at most 1 MiB per run; see
plan.py).

Nothing here knows about MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc as python_gc  # store.gc is the verb
import json
import logging
import os
import re
import struct
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

import numpy as np
import pyarrow as pa
import torch
import zstandard

from . import cleanup, fs, index, tree
from .dataset import (
    Dataset,
    available,
    check_format,
    checkout,
    commit_properties,
    fragment_table,
    lance_call,
    open_lance,
    recorded_digest,
    retrying,
    tag_list,
    version_list,
)
from .errors import CommittedError, CorruptionError, VersionNotFoundError, WeightsError
from .format import (
    COMPRESSION_KEY,
    FORMAT_VERSION,
    MAX_PROPERTY_BYTES,
    PROP,
    STORAGE_VERSION,
    Entry,
    Located,
    Problem,
    Version,
    check_tag_name,
    max_zstd_ratio,
    raise_problems,
    rows_digest,
    schema,
    select,
)
from .fs import StorageOptions, durable, lance_target, local_path, unreachable
from .plan import RowData, Unit, plan_version
from .readers import (
    THREADS,
    VersionReader,
    check_row,
    describe,
    device_of,
    materialize,
    open_version,
    write_index,
)
from .tensors import (
    DEFAULT_CHUNK_BYTES,
    META_COLUMNS,  # noqa: F401 (tests use store.META_COLUMNS)
    dtype_from_name,
    find_ties,
    to_rows,
    uint8_view,
    unit_batch,
    validate_state_dict,
)

if TYPE_CHECKING:  # Lance is imported where a verb writes or opens a dataset: a local load
    import lance  # through the version index never imports it (see index.py)
    from lance.fragment import FragmentMetadata

__all__ = [
    "CommittedError",
    "CorruptionError",
    "Dataset",
    "Diff",
    "GcReport",
    "LoadResult",
    "Prepared",
    "Problem",
    "VerifyReport",
    "VersionInfo",
    "VersionNotFoundError",
    "WeightsError",
    "Written",
    "commit_version",
    "diff",
    "gc",
    "latest_version",
    "load_into",
    "load_state_dict",
    "prepare",
    "reindex",
    "resolve_version",
    "save_state_dict",
    "tag",
    "tags",
    "untag",
    "verify",
    "version_properties",
    "versions",
    "write_version",
]

_logger = logging.getLogger(__name__)

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
class Diff:
    """Names added, removed, changed and unchanged from version ``a`` to version ``b``."""

    a: int
    b: int
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]


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
    """What ``gc`` removed (or, dry, would remove)."""

    removed_versions: list[int]
    bytes_removed: int  # everything freed, orphans included
    kept_tagged: list[int]
    orphan_files: int = 0  # files no version named (what killed saves left)
    orphan_bytes: int = 0
    # why each version that stays stays, every reason that holds: "latest", "keep_last",
    # "tag:<name>", "older_than" (newer than the cutoff), "grace" (superseded less than grace
    # ago), "not_a_candidate" (outside ``candidates``: the caller decided to keep it)
    kept: dict[int, list[str]] = field(default_factory=dict)


class LoadResult(NamedTuple):
    """Like ``nn.Module.load_state_dict``'s return value."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# --------------------------------------------------------------------------- public API


_paused = [0, False]  # saves and loads in progress, and whether the cyclic GC was enabled before them
_pause_lock = threading.Lock()


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a save or load runs (nested and in
    several threads alike; restored as it was when the last one ends). A version of many
    small tensors creates a few objects per tensor, and each full collection walks every
    object alive: with 20,000 tensors, half of a save went to collections that found
    nothing. Memory freed by reference counting is freed as before."""
    with _pause_lock:
        if not _paused[0]:
            _paused[1] = python_gc.isenabled()
            python_gc.disable()
        _paused[0] += 1
    try:
        yield
    finally:
        with _pause_lock:
            _paused[0] -= 1
            if not _paused[0] and _paused[1]:
                python_gc.enable()


def save_state_dict(
    state_dict: Mapping[str, Any] | Prepared,
    uri: str | os.PathLike | Dataset,
    *,
    message: str | None = None,
    properties: Mapping[str, str] | None = None,
    storage_options: StorageOptions = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    compression: str | None = None,
    sync_files: bool | None = None,
) -> VersionInfo:
    """Save ``state_dict`` as a new version of the weights dataset at ``uri``.

    Only tensors whose bytes, dtype or shape differ from the latest version are written; the
    rest reuse that version's data files. A checkpoint dict (tensors nested in dicts, lists
    and tuples next to numbers, strings and None: an optimizer's state dict, an epoch counter)
    is stored too: its tensors as rows named by their path, the rest as JSON with the version;
    it loads back equal. The version is durable when this returns (see ``sync_files``).

    Args:
        state_dict: name -> tensor, or a checkpoint dict, or what ``prepare`` returned (not
            checked again).
        uri: a dataset URI (a path, ``file://``, ``s3://``, ``gs://``, ``az://``) or a Dataset.
        message: stored with the version (``versions()`` shows it).
        properties: str -> str, stored with the version.
        storage_options: for object storage; merged over what the environment gives.
        chunk_bytes: tensors larger than this are split into rows of at most this size.
        compression: ``"zstd"`` for a new dataset (fixed per dataset); the default stores raw
            bytes, which load fastest (memory-mapped, no decode).
        sync_files: flush data files, manifest, commit, version index and their directories
            (fsync) before returning, as ``torch.distributed.checkpoint``'s ``FileSystemWriter``
            does. Default: True unless MLFLOW_LANCE_FSYNC=0 (scratch use). On object storage a
            completed PUT is durable already.

    Returns:
        The new version's VersionInfo (number, bytes written, names changed, ...).

    Raises:
        TypeError / ValueError: a value that is not a storable tensor, a bad key, bad
            properties; nothing is written.
        WeightsError: ``uri`` holds something else than a weights dataset of this format.
        OSError / PermissionError / ConnectionError: the write failed; nothing was committed.

    Example:
        >>> info = save_state_dict(model.state_dict(), "weights.lance", message="epoch 3")
        >>> info.version, info.bytes_written
    """
    props = _check_properties(properties)
    written = write_version(
        state_dict,
        uri,
        storage_options=storage_options,
        chunk_bytes=chunk_bytes,
        compression=compression,
        sync_files=sync_files,
    )
    return commit_version(written, message=message, properties=props)


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
        return sum(f.files[0].file_size_bytes or 0 for f, u in zip(self.fragments, self.units) if u.reused is None)


@_no_cyclic_gc()
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


@_no_cyclic_gc()
def commit_version(
    written: Written, *, message: str | None = None, properties: Mapping[str, str] | None = None
) -> VersionInfo:
    """The second step of ``save_state_dict``: commit written data files as one new version
    (retried on top of versions other writers committed meanwhile), flush the commit when the
    files were flushed, and write the version's index. Arguments as ``save_state_dict``'s."""
    import lance

    props = _check_properties(properties)
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
    return _version_info(dataset.uri, ds.version, _now(ds), txn_props, ())


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


@_no_cyclic_gc()
def load_state_dict(
    uri: str | os.PathLike | Dataset,
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
    device = device_of(map_location)
    reader = open_version(Dataset.of(uri, storage_options), version, index_alone=not verify)
    entries, found = reader.entries, reader.problems()
    raise_problems(reader.uri, reader.version, found)
    selected = select(entries, names)
    sources = {entries[name].tie or name: None for name in selected}  # ordered, unique
    with reader:
        if device.type == "cpu":
            loaded = materialize(reader, [entries[s] for s in sources], verify=verify)
        else:  # one at a time: host memory holds one tensor on its way to the device
            loaded = {s: materialize(reader, [entries[s]], verify=verify)[s].to(device) for s in sources}
    out = OrderedDict((name, loaded[entries[name].tie or name]) for name in selected)
    spec = tree_spec(reader) if names is None else None
    if spec is None:  # a flat state dict: an OrderedDict, as state_dict() gives, or the dict saved
        return dict(out) if names is None and reader.properties().get(PROP + "container") == "dict" else out
    try:
        return tree.unflatten(spec, out)
    except (ValueError, TypeError, RecursionError) as err:
        raise CorruptionError(f"version {reader.version} of {reader.uri}: its {PROP}tree property: {err}") from None


@_no_cyclic_gc()
def load_into(
    module: torch.nn.Module,
    uri: str | os.PathLike | Dataset,
    version: Version | None = None,
    *,
    strict: bool = True,
    storage_options: StorageOptions = None,
    verify: bool = False,
) -> LoadResult:
    """Read a version straight into ``module``'s parameters and buffers, tensor by tensor.

    Bytes go from the data files into the parameters' memory without an intermediate state
    dict, so peak memory stays near one tensor. Keys, shapes, the version's metadata and every
    data file are checked before anything is written. A module whose state dict is not flat
    tensors (torch.ao's quantized modules: packed parameters) is given the loaded state dict
    through its own ``load_state_dict`` instead.

    Args:
        module: the module to fill (its tensors may be of another dtype or on another device:
            they are cast and moved).
        uri: a dataset URI or a Dataset.
        version: a version number or a tag (default: the latest).
        strict: refuse missing and unexpected keys, as ``nn.Module.load_state_dict`` does.
        storage_options: for object storage.
        verify: each chunk is read into a staging buffer and hashed before it is copied in, so
            the module never holds unverified bytes (a corrupt chunk raises; tensors copied
            before it keep their new values).

    Returns:
        LoadResult(missing_keys, unexpected_keys), as ``nn.Module.load_state_dict``.

    Raises:
        RuntimeError: keys or shapes do not match (worded as ``load_state_dict`` words it),
            before anything is written.
        VersionNotFoundError / CorruptionError: as ``load_state_dict``.

    Example:
        >>> load_into(model, "weights.lance", verify=True)
    """
    targets = module.state_dict(keep_vars=True)
    if not tree.is_flat(targets):  # quantized modules: packed parameters, which their own loaders fill
        state = load_state_dict(uri, version, storage_options=storage_options, verify=verify)
        return LoadResult(*module.load_state_dict(state, strict=strict))
    reader = open_version(Dataset.of(uri, storage_options), version, index_alone=not verify)
    entries, found = reader.entries, reader.problems()
    raise_problems(reader.uri, reader.version, found)
    missing, unexpected = _check_targets(module, reader, entries, targets, strict)
    with reader, torch.no_grad():
        dsts = {name: targets[name].detach() for name in entries if name in targets}
        reader.check_stored(row for name in dsts for row in entries[entries[name].tie or name].rows)
        done = _read_in_place(reader, entries, dsts, verify)
        _copy_the_rest(reader, entries, dsts, done, verify)
    return LoadResult(missing, unexpected)


def reindex(uri: str | os.PathLike | Dataset, *, storage_options: StorageOptions = None) -> list[int]:
    """Write the version index of every version that lacks one that checks out; the versions
    indexed. An explicit repair (``mlflow-lance sync`` runs it): a load never writes an index,
    so a dataset whose indexes are missing (written before they existed, or deleted) decodes
    its rows on every load until this runs. A version whose rows break a rule or differ from
    what its commit recorded gets none."""
    dataset = Dataset.of(uri, storage_options)
    ds = dataset.lance
    if not check_format(ds, FORMAT_VERSION):
        return []  # the Lance docs example's format has no index
    done = []
    for v in version_list(ds):
        version = checkout(ds, v["version"])
        table = fragment_table(version)
        digest = recorded_digest(version)
        if digest is None or index.matching(dataset.uri, dataset.storage_options, version.version, table, digest):
            continue
        reader = describe(dataset, version, rows_themselves=True)
        if not reader.problems():
            write_index(dataset, version, reader.located, table)
            done.append(version.version)
    return done


def check_fits(
    module: torch.nn.Module,
    uri: str | os.PathLike | Dataset,
    version: Version | None = None,
    *,
    strict: bool = True,
    storage_options: StorageOptions = None,
) -> None:
    """Raise (as ``load_into`` would, before it writes anything) unless the version's tensors
    fit ``module``'s keys and shapes; reads metadata only, so ``module`` may be on the meta
    device."""
    reader = open_version(Dataset.of(uri, storage_options), version)
    entries, found = reader.entries, reader.problems()
    raise_problems(reader.uri, reader.version, found)
    targets = module.state_dict(keep_vars=True)
    flat = targets if tree.is_flat(targets) else tree.flatten(targets)[0]  # as a save names them
    _check_targets(module, reader, entries, flat, strict)


def versions(uri: str | os.PathLike | Dataset, *, storage_options: StorageOptions = None) -> list[VersionInfo]:
    """Every version still stored, oldest first, with what each one wrote and changed."""
    dataset = Dataset.of(uri, storage_options)
    ds = dataset.lance
    check_format(ds, FORMAT_VERSION)  # refuses a dataset that holds no weights
    by_version: dict[int, list[str]] = {}
    for name, t in tag_list(ds).items():
        by_version.setdefault(t["version"], []).append(name)
    out = []
    for v in version_list(ds):
        n = v["version"]
        try:
            txn = lance_call(lambda n=n: ds.read_transaction(n), ds.uri, f"the commit of version {n}")
        except CorruptionError:
            if _removed_since_listed(ds, n):
                continue
            raise
        props = dict(txn.transaction_properties or {}) if txn is not None else {}
        tags = tuple(sorted(by_version.get(n, ())))
        if PROP + "tensors" not in props:  # written by something else: derive the figures
            try:
                entries = describe(dataset, checkout(ds, n)).entries
            except (CorruptionError, VersionNotFoundError):
                if _removed_since_listed(ds, n):
                    continue
                raise
            total = sum(e.nbytes for e in entries.values() if e.tie is None)
            props = {
                PROP + "tensors": str(len(entries)),
                PROP + "bytes": str(total),
                PROP + "bytes_written": str(total),
                PROP + "changed": json.dumps(list(entries)),
            }
        out.append(_version_info(ds.uri, n, _aware(v["timestamp"]), props, tags))
    return out


def _removed_since_listed(ds: lance.LanceDataset, version: int) -> bool:
    """Whether ``version``, listed a moment ago and unreadable now, is no longer listed: a gc
    beside this read removed it. It is gone, not damaged: left out of the listing, and logged."""
    if any(v["version"] == version for v in version_list(ds)):
        return False  # still there and cannot be read: that is damage
    _logger.info(
        "version %d of %s was removed (by a gc beside this read) after it was listed; left out", version, ds.uri
    )
    return True


def diff(
    uri: str | os.PathLike | Dataset,
    a: Version,
    b: Version | None = None,
    *,
    storage_options: StorageOptions = None,
) -> Diff:
    """Tensor names added, removed, changed and unchanged from version ``a`` to ``b`` (default latest)."""
    dataset = Dataset.of(uri, storage_options)
    ra, rb = describe(dataset, dataset.checkout(a)), describe(dataset, dataset.checkout(b))
    ea, eb = ra.entries, rb.entries
    common = [n for n in eb if n in ea]
    same = {n for n in common if ea[n].key == eb[n].key and ra.hashed and rb.hashed}  # no hashes: unknown
    return Diff(
        a=ra.version,
        b=rb.version,
        added=[n for n in eb if n not in ea],
        removed=[n for n in ea if n not in eb],
        changed=[n for n in common if n not in same],
        unchanged=[n for n in common if n in same],
    )


def tag(uri: str | os.PathLike | Dataset, name: str, version: int, *, storage_options: StorageOptions = None) -> None:
    """Point tag ``name`` at ``version`` (moving it if it exists); tagged versions survive gc.

    On a local disk the tag is durable when this returns (see ``save_state_dict``)."""
    check_tag_name(name)
    dataset = Dataset.of(uri, storage_options)
    ds = dataset.lance
    target = checkout(ds, version).version

    def set_tag() -> None:  # another writer may create or move the same tag in between: retried
        if name in tag_list(ds):
            ds.tags.update(name, target)
        else:
            ds.tags.create(name, target)

    lance_call(
        lambda: retrying(set_tag, retry=lambda err: not isinstance(err, WeightsError), attempts=8, pause=0.01),
        ds.uri,
        f"tag {name!r}",
        retry_vanished=False,
    )
    root = local_path(dataset.uri)
    if root is not None and durable():
        folder = os.path.join(root, "_refs", "tags")
        fs.sync_files([os.path.join(folder, f"{name}.json")])
        fs.sync_dirs([folder, os.path.dirname(folder), root])


def untag(uri: str | os.PathLike | Dataset, name: str, *, storage_options: StorageOptions = None) -> None:
    """Remove tag ``name``; the version it pointed at may then be garbage-collected.
    VersionNotFoundError if there is no such tag (also when another process removed it first)."""
    ds = Dataset.of(uri, storage_options).lance
    missing = VersionNotFoundError(f"tag {str(name)[:200]!r} does not exist in {ds.uri}; {available(ds)}")
    if name not in tag_list(ds):
        raise missing
    try:
        lance_call(lambda: ds.tags.delete(name), ds.uri, f"tag {str(name)[:200]!r}", retry_vanished=False)
    except CorruptionError as err:
        if "not found" in str(err).lower() or "does not exist" in str(err).lower():
            raise missing from None  # another process removed it first: gone is done
        raise


def tags(uri: str | os.PathLike | Dataset, *, storage_options: StorageOptions = None) -> dict[str, int]:
    """Tag name -> version number."""
    ds = Dataset.of(uri, storage_options).lance
    return {name: t["version"] for name, t in sorted(tag_list(ds).items())}


def verify(
    uri: str | os.PathLike | Dataset,
    version: Version | None = None,
    *,
    storage_options: StorageOptions = None,
    progress: Callable[[int], object] | None = None,
) -> VerifyReport:
    """Check a version: its metadata (rows consistent with each other, with the data files and
    with its commit) and the content hash of every chunk. The rows are decoded from the data
    files themselves (in a child process: a corrupt file is a problem reported, never a crash),
    not taken from the version index.

    Args:
        uri: a dataset URI or a Dataset.
        version: a version number or a tag (default: the latest).
        storage_options: for object storage.
        progress: called with the bytes of each chunk checked (for progress bars).

    Returns:
        A VerifyReport: ``ok``, and each problem (tensor, chunk, file, what is wrong).

    Raises:
        VersionNotFoundError: no such version or tag.

    Example:
        >>> report = verify("weights.lance")
        >>> report.ok, [p.detail for p in report.problems]
    """
    dataset = Dataset.of(uri, storage_options)
    try:
        ds = dataset.checkout(version)
    except CorruptionError as err:  # the dataset's files are not what they must be
        return VerifyReport(
            dataset.uri, version if isinstance(version, int) else -1, 0, 0, 0, [Problem("", -1, "", str(err))]
        )
    try:
        reader = describe(dataset, ds, rows_themselves=True)
        entries, found = reader.entries, reader.problems()
    except CorruptionError as err:  # the version's rows themselves cannot be read
        return VerifyReport(ds.uri, ds.version, 0, 0, 0, [Problem("", -1, "", str(err))])
    found += _commit_problems(ds, entries)
    bad = {p.name for p in found}
    buf = torch.empty(0, dtype=torch.uint8)
    chunks = nbytes = 0
    with reader:
        found = [dataclasses.replace(p, file=reader.path_of(p.file)) if p.file else p for p in found]
        for e in entries.values():
            chunks += len(e.rows)
            if e.name in bad:
                continue
            for row in e.rows:
                try:
                    reader.check_stored([row])
                    if buf.numel() < row.size:
                        buf = torch.empty(row.size, dtype=torch.uint8)
                    dst = buf[: row.size]
                    reader.read_many([(row, dst)])
                except (OSError, CorruptionError) as err:
                    found.append(Problem(e.name, row.chunk, reader.file_of(row), f"unreadable: {err}"))
                    continue
                nbytes += row.size
                if progress is not None:
                    progress(row.size)
                if (got := reader.bad_hash(row, dst)) is not None:
                    found.append(
                        Problem(
                            e.name,
                            row.chunk,
                            reader.file_of(row),
                            f"content hash {got} != recorded {row.hash[:64]}",
                        )
                    )
    return VerifyReport(ds.uri, ds.version, len(entries), chunks, nbytes, found)


def latest_version(uri: str | os.PathLike | Dataset, *, storage_options: StorageOptions = None) -> int:
    """The newest version number (reads the manifest pointer only; for a handle, the version
    it opened)."""
    return Dataset.of(uri, storage_options).lance.version


def resolve_version(
    uri: str | os.PathLike | Dataset, version: Version | None, *, storage_options: StorageOptions = None
) -> int:
    """The version number a number or tag (None: latest) stands for; raises if none."""
    return Dataset.of(uri, storage_options).checkout(version).version


def version_properties(
    uri: str | os.PathLike | Dataset, version: Version, *, storage_options: StorageOptions = None
) -> dict[str, str]:
    """The ``properties`` one version was saved with (reads that version's transaction only);
    WeightsError if they are malformed."""
    ds = Dataset.of(uri, storage_options).checkout(version)
    props = commit_properties(ds)
    if props is None:
        raise WeightsError(f"the commit of version {ds.version} of {ds.uri} cannot be read")
    return dict(_summary(ds.uri, ds.version, props)["properties"])


def gc(
    uri: str | os.PathLike | Dataset,
    *,
    keep_last: int | None = None,
    older_than: timedelta | None = None,
    grace: timedelta = timedelta(minutes=30),
    candidates: Collection[int] | None = None,
    ignore_tags: Collection[str] = (),
    dry_run: bool = False,
    storage_options: StorageOptions = None,
) -> GcReport:
    """Delete old versions, the data files only they use, and the files no version names.

    A version is removed when it is not among the ``keep_last`` newest, is older than
    ``older_than`` (when given), is one of ``candidates`` (when given: the caller has
    decided which versions nothing references), carries no tag (counting those in
    ``ignore_tags`` as removed already), and was superseded more than ``grace`` ago. The
    grace period protects writers: a save reuses the data files of the version that was
    latest when it started, so that version must outlive any save in flight. The latest
    version is always kept. Files no version names (a killed save's) go once they are older
    than ``grace``. Deletes stay inside the dataset (see cleanup.py). ``dry_run`` reports
    what would go and deletes nothing. The report says why each version kept stays
    (``GcReport.kept``).

    This is the store's gc, which knows nothing of MLflow; ``mlflow_lance.gc`` asks MLflow
    what it still references before calling it.
    """
    dataset = Dataset.of(uri, storage_options)
    doomed, kept = _gc_select(dataset.lance, keep_last, older_than, grace, candidates, ignore_tags)
    swept = cleanup.sweep(dataset, doomed, grace=grace, dry_run=dry_run)
    old = {v: why for v, why in kept.items() if "latest" not in why and "keep_last" not in why}
    kept_tagged = sorted(v for v, why in old.items() if any(r.startswith("tag:") for r in why))
    return GcReport(swept.versions, swept.bytes_removed, kept_tagged, swept.orphans, swept.orphan_bytes, kept)


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
    if compression is not None and compression != existing:
        raise ValueError(
            f"{dataset.uri} was created with compression={existing!r}; compression is fixed per "
            f"dataset, so pass compression=None or save to a new URI"
        )
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
    for unit, frag, (fid, path, _) in zip(units, fragments, table):
        if unit.reused is None:
            fresh.append(frag)
            located += [Located(meta, fid << 32 | i, None, path, None) for i, (meta, _) in enumerate(unit.rows)]
        else:
            located += [
                Located(meta, fid << 32 | i, old.position, path, old.stored)
                for i, ((meta, _), old) in enumerate(zip(unit.rows, unit.old))
            ]
    if fresh:  # their blob positions: a scan of the blob descriptors only (a third of a full scan)
        blobs = ds.scanner(columns=["data"], with_row_address=True, fragments=fresh).to_table()
        data = blobs["data"].combine_chunks()
        found = dict(
            zip(
                blobs["_rowaddr"].to_pylist(),
                zip(data.field("position").to_pylist(), data.field("size").to_pylist()),
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
    codec = (schema.metadata or {}).get(COMPRESSION_KEY.encode()) == b"zstd"
    from lance.fragment import write_fragments

    calls = _write_calls(units)
    target, opts = lance_target(uri, storage_options)

    def write(call: list[int], mode: str = "create" if create else "append") -> list[FragmentMetadata]:
        # A compressor per call: one ZstdCompressor used by two threads at once fails.
        compressor = zstandard.ZstdCompressor(level=3)
        pack = (lambda p: _zstd(p, compressor)) if codec else (lambda p: p)
        batches = (unit_batch(schema, [(m, pack(p)) for m, p in units[i]]) for i in call)
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
    for call, frags in zip(calls, results):
        k = len(units[call[0]])
        if len(frags) != len(call) or any(f.physical_rows != k for f in frags):
            raise WeightsError(f"Lance wrote {len(frags)} fragments for {len(call)} files of {k} rows at {uri}")
        for i, frag in zip(call, frags):
            written[i] = frag
    return written


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


def _check_properties(properties: Mapping[str, str] | None) -> dict[str, str]:
    props = dict(properties or {})
    for k, v in props.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"properties must map str to str; {k!r}: {v!r} is not (convert values with str())")
    return props


# --------------------------------------------------------------------------- a version's summary


def _now(ds: lance.LanceDataset) -> datetime:
    return _aware(ds.versions()[-1]["timestamp"]) if ds.versions() else datetime.now(timezone.utc)


def _aware(ts: datetime) -> datetime:
    return ts.astimezone(timezone.utc)


def _version_info(uri: str, version: int, ts: datetime, props: Mapping[str, str], tags: tuple[str, ...]) -> VersionInfo:
    """A version's summary from its commit properties; WeightsError names a malformed one."""
    return VersionInfo(version=version, timestamp=ts, tags=tags, **_summary(uri, version, props))


def _summary(uri: str, version: int, props: Mapping[str, str]) -> dict:
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


# --------------------------------------------------------------------------- loading


def tree_spec(reader: VersionReader) -> dict | None:
    """The checkpoint-dict spec saved with the checked-out version, if it holds one."""
    props = reader.properties()
    if props is None:
        raise CorruptionError(f"the commit of version {reader.version} of {reader.uri} cannot be read")
    text = props.get(PROP + "tree")
    if text is None:
        return None
    try:
        return tree.decode(text)
    except ValueError as err:
        raise CorruptionError(f"version {reader.version} of {reader.uri}: {err}") from None


def _check_targets(
    module: torch.nn.Module,
    ds: VersionReader,
    entries: Mapping[str, Entry],
    targets: Mapping[str, torch.Tensor],
    strict: bool,
) -> tuple[list[str], list[str]]:
    """The module's keys the version lacks and the version's keys the module lacks; before
    anything is written, RuntimeError (worded as ``nn.Module.load_state_dict`` words it) for
    those ``strict`` refuses and for every shape mismatch."""
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
    return missing, unexpected


def _read_in_place(
    reader: VersionReader, entries: Mapping[str, Entry], dsts: Mapping[str, torch.Tensor], verify: bool
) -> set[str]:
    """Read each tensor whose memory can take the stored bytes as they are (untied, on the
    CPU, contiguous, of the stored dtype) straight into it; their names. With ``verify`` each
    chunk goes through a staging buffer and is hashed before it is copied in."""
    direct = [
        name
        for name, dst in dsts.items()
        if entries[name].tie is None
        and dst.device.type == "cpu"
        and dst.is_contiguous()
        and dst.dtype == dtype_from_name(entries[name].dtype, key=name)
    ]
    jobs = [
        (entries[name], row, uint8_view(dsts[name])[row.offset : row.offset + row.size])
        for name in direct
        for row in entries[name].rows
    ]
    if verify:
        stage = torch.empty(max((row.size for _, row, _ in jobs), default=0), dtype=torch.uint8)
        for e, row, dst in jobs:
            chunk = stage[: row.size]
            reader.read_many([(row, chunk)])
            check_row(reader, e, row, chunk)
            np.copyto(dst.numpy(), chunk.numpy())  # a plain memcpy (uint8 copy_ is ~50x slower here)
    else:
        reader.read_many([(row, dst) for _, row, dst in jobs])
    return set(direct)


def _copy_the_rest(
    reader: VersionReader,
    entries: Mapping[str, Entry],
    dsts: Mapping[str, torch.Tensor],
    done: set[str],
    verify: bool,
) -> None:
    """The tensors ``_read_in_place`` left (another dtype or device, non-contiguous, tied):
    through a CPU tensor, or for a tie, from its source once that is in the module."""
    done = set(done)
    for name, dst in dsts.items():
        if name in done:
            continue
        e = entries[name]
        source = e.tie or name
        if source in done and source in dsts:
            src = dsts[source]
        else:
            src = materialize(reader, [entries[source]], verify=verify)[source]
        if not (src.data_ptr() == dst.data_ptr() and src.device == dst.device):
            dst.copy_(src)
        done.add(name)


# --------------------------------------------------------------------------- verify and gc


def _commit_problems(ds: lance.LanceDataset, entries: Mapping[str, Entry]) -> list[Problem]:
    """What the version's commit records and its rows disagree on (nothing for commits that
    other writers made without mlflow-lance's properties)."""
    props = commit_properties(ds) or {}
    if PROP + "tensors" not in props:
        return []
    try:
        summary = _summary(ds.uri, ds.version, props)
    except WeightsError as err:
        return [Problem("", -1, "", str(err))]
    total = sum(e.nbytes for e in entries.values() if e.tie is None)
    if (summary["num_tensors"], summary["total_bytes"]) != (len(entries), total):
        return [
            Problem(
                "",
                -1,
                "",
                f"the commit records {summary['num_tensors']} tensors of "
                f"{summary['total_bytes']} bytes; the rows hold {len(entries)} of {total}",
            )
        ]
    return []


def _gc_select(
    ds: lance.LanceDataset,
    keep_last: int | None,
    older_than: timedelta | None,
    grace: timedelta,
    candidates: Collection[int] | None = None,
    ignore_tags: Collection[str] = (),
) -> tuple[list[int], dict[int, list[str]]]:
    """(versions to remove, why each other version stays: see ``GcReport.kept``), as if the
    tags in ``ignore_tags`` (about to be removed) were gone."""
    if keep_last is None and older_than is None and candidates is None:
        raise ValueError("gc needs keep_last=N and/or older_than=timedelta(...) to know what to remove")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    check_format(ds, FORMAT_VERSION)  # refuses a dataset that holds no weights
    all_versions = version_list(ds)
    tags: dict[int, list[str]] = {}
    for name, t in sorted(tag_list(ds).items()):
        if name not in ignore_tags:
            tags.setdefault(t["version"], []).append(name)
    latest = all_versions[-1]["version"] if all_versions else None
    newest = {v["version"] for v in all_versions[-(keep_last or 1) :]}
    now = datetime.now(timezone.utc)
    cutoff = now - older_than if older_than is not None else None
    superseded = {  # when each version stopped being the latest
        v["version"]: _aware(nxt["timestamp"]) for v, nxt in zip(all_versions, all_versions[1:])
    }
    doomed, kept = [], {}
    for v in all_versions:
        version = v["version"]
        why = ["latest"] if version == latest else ["keep_last"] if version in newest else []
        why += [f"tag:{name}" for name in tags.get(version, ())]
        if candidates is not None and version not in candidates:
            why.append("not_a_candidate")
        if cutoff is not None and _aware(v["timestamp"]) >= cutoff:
            why.append("older_than")
        if version in superseded and superseded[version] > now - grace:
            why.append("grace")
        if why:
            kept[version] = why
        else:
            doomed.append(version)
    return doomed, kept
