"""The Lance weight store's verbs: save a version, load one (as a state dict or into a module),
list, diff, tag, verify and garbage-collect versions. How a version is written is writer.py,
how a dataset is laid out format.py, how a version is read readers.py, what gc deletes
cleanup.py. Each verb takes a dataset URI, or a ``Dataset`` handle (dataset.py) so that
several verbs on one dataset open it once.

A new version is a Lance ``Overwrite`` commit whose fragment list reuses every fragment
whose rows are all unchanged since the latest version (same name, dtype, shape and content
hash, in the same order) and adds new fragments for the rest: a version costs the changed
bytes, plus the other tensors of the runs they were packed in (at most 1 MiB per run; see
plan.py).

Nothing here knows about MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from . import cleanup, fs, index, tree
from .dataset import (
    Dataset,
    available,
    check_format,
    checkout,
    commit_properties,
    fragment_table,
    lance_call,
    recorded_digest,
    retrying,
    tag_list,
    utc,
    version_list,
)
from .errors import CommittedError, CorruptionError, VersionNotFoundError, WeightsError
from .format import (
    FORMAT_VERSION,
    PROP,
    Entry,
    Problem,
    Version,
    check_tag_name,
    raise_problems,
    select,
)
from .fs import StorageOptions, durable, local_path
from .readers import (
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
    dtype_from_name,
    no_cyclic_gc,
    uint8_view,
)
from .writer import Prepared, VersionInfo, check_properties, commit_summary, commit_version, version_info, write_version

if TYPE_CHECKING:  # Lance is imported where a verb writes or opens a dataset: a local load
    import lance  # through the version index never imports it (see index.py)

__all__ = [
    "CommittedError",
    "CorruptionError",
    "Dataset",
    "Diff",
    "GcReport",
    "LoadResult",
    "Problem",
    "VerifyReport",
    "VersionInfo",
    "VersionNotFoundError",
    "WeightsError",
    "diff",
    "latest_version",
    "load_into",
    "prune",
    "read_state_dict",
    "reindex",
    "resolve_version",
    "save_state_dict",
    "tag",
    "tags",
    "untag",
    "verify",
    "version_properties",
    "versions",
]

_logger = logging.getLogger(__name__)


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
    """What ``prune`` removed (or, dry, would remove)."""

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
        compression: for a new dataset (fixed per dataset): ``"zstd"`` (each payload one zstd
            frame) or ``"auto"`` (each tensor byte-grouped and zstd-compressed where that saves
            bytes: ~0.68x raw for bf16 weights, 0.85x for fp32; see docs/storage.md) or
            ``"none"`` (raw bytes, which load fastest: memory-mapped, no decode). None (the
            default): raw for a new dataset, whatever it was created with for an existing one.
            Any other value than an existing dataset's raises ``writer.CompressionMismatch``
            (a ValueError).
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
    props = check_properties(properties)
    written = write_version(
        state_dict,
        uri,
        storage_options=storage_options,
        chunk_bytes=chunk_bytes,
        compression=compression,
        sync_files=sync_files,
    )
    return commit_version(written, message=message, properties=props)


@no_cyclic_gc()
def read_state_dict(
    uri: str | os.PathLike | Dataset,
    version: Version | None = None,
    *,
    map_location: str | torch.device | None = None,
    names: str | Iterable[str] | None = None,
    storage_options: StorageOptions = None,
    verify: bool = False,
) -> OrderedDict[str, torch.Tensor]:
    """Load a version of the weights dataset at ``uri`` as a state dict.

    The version comes back as an ordered state dict, or as the checkpoint dict it was saved
    as. Local datasets come back memory-mapped copy-on-write (lazy, no copy; see the README on
    what a map shares with its file). Tied tensors come back as one tensor under each name. A
    version whose metadata is inconsistent raises CorruptionError before anything is read.
    ``mlflow_lance.load_state_dict`` takes MLflow model URIs too and calls this for a dataset.

    Args:
        uri: a dataset URI (a path, ``file://``, ``s3://``, ``gs://``, ``az://``) or a Dataset.
        version: a version number or a tag (default: the latest).
        map_location: the device the tensors go to (default CPU); on another device they are
            read one at a time, so host memory holds one tensor on its way there.
        names: a list of keys, or one string that is a prefix or a glob; only their bytes are
            read (a selection always comes back as a flat OrderedDict).
        storage_options: for object storage.
        verify: recompute every content hash (CorruptionError on a mismatch) and return fresh
            memory instead of maps.

    Returns:
        An OrderedDict of tensors in saved order; a plain dict if a plain dict was saved; the
        checkpoint dict if one was saved (and ``names`` is not given).

    Raises:
        VersionNotFoundError: no such version or tag, or a key in ``names`` that is not stored
            (the message lists what exists).
        CorruptionError: the version's files or metadata are damaged or crafted; nothing loaded.
        FileNotFoundError: nothing was saved at ``uri``.
        WeightsError: ``uri`` holds something else than a weights dataset of this format.

    Example:
        >>> sd = read_state_dict("weights.lance", "best", names="encoder.*")
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


@no_cyclic_gc()
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
        state = read_state_dict(uri, version, storage_options=storage_options, verify=verify)
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
    """Write the version index of every version that lacks one that checks out.

    An explicit repair (``mlflow-lance sync`` runs it): a load never writes an index, so a
    dataset whose indexes are missing (written before they existed, or deleted) decodes its
    rows on every load until this runs. A version whose rows break a rule or differ from what
    its commit recorded gets none; so does a dataset written by the Lance docs example.

    Args:
        uri: a dataset URI or a Dataset.
        storage_options: for object storage.

    Returns:
        The numbers of the versions indexed (empty if none lacked an index).

    Raises:
        FileNotFoundError: nothing was saved at ``uri``.
        WeightsError: ``uri`` holds something else than a weights dataset of this format.

    Example:
        >>> reindex("weights.lance")
        [1, 2]
    """
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
    """List every version still stored, oldest first, with what each one wrote and changed.

    A version removed by a ``prune`` running beside this call, after it was listed, is left
    out. For a dataset written by the Lance docs example the figures are derived from its rows.

    Args:
        uri: a dataset URI or a Dataset.
        storage_options: for object storage.

    Returns:
        A VersionInfo per version: number, timestamp, message, properties, tensors, total and
        written bytes, the names changed and removed, the parent version and the tags.

    Raises:
        FileNotFoundError: nothing was saved at ``uri``.
        WeightsError: ``uri`` holds something else than a weights dataset of this format.
        CorruptionError: a version's commit or rows cannot be read.

    Example:
        >>> [(v.version, v.message, v.bytes_written) for v in versions("weights.lance")]
    """
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
        out.append(version_info(ds.uri, n, utc(v["timestamp"]), props, tags))
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
    """Compare two versions: the tensor names added, removed, changed and unchanged.

    Tensors are compared by dtype, shape and content hashes (metadata only: no tensor bytes
    are read). A version without hashes (the Lance docs example's) has every common name in
    ``changed``, since whether it changed is unknown.

    Args:
        uri: a dataset URI or a Dataset.
        a: the version compared from: a number or a tag.
        b: the version compared to: a number or a tag (default: the latest).
        storage_options: for object storage.

    Returns:
        A Diff: the two version numbers, and the names ``added``, ``removed``, ``changed`` and
        ``unchanged`` from ``a`` to ``b``.

    Raises:
        VersionNotFoundError: no such version or tag.
        CorruptionError: a version's metadata cannot be read.

    Example:
        >>> d = diff("weights.lance", 1, 3)
        >>> d.changed
    """
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
    """Point tag ``name`` at ``version``, moving the tag if it exists.

    Tagged versions survive ``prune`` and ``gc``; loads take the tag wherever they take a
    version. On a local disk the tag is durable when this returns (see ``save_state_dict``).
    Another writer creating or moving the same tag at the same time is retried over.

    Args:
        uri: a dataset URI or a Dataset.
        name: the tag: letters, digits, '.', '_' and '-', not all digits, at most 200 characters.
        version: the version number to tag.
        storage_options: for object storage.

    Raises:
        ValueError: ``name`` is not a valid tag name.
        VersionNotFoundError: no such version.

    Example:
        >>> tag("weights.lance", "best", 3)
    """
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

    Args:
        uri: a dataset URI or a Dataset.
        name: the tag.
        storage_options: for object storage.

    Raises:
        VersionNotFoundError: there is no such tag (also when another process removed it first).

    Example:
        >>> untag("weights.lance", "best")
    """
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
    """List the dataset's tags.

    Args:
        uri: a dataset URI or a Dataset.
        storage_options: for object storage.

    Returns:
        Tag name -> version number, sorted by name.

    Example:
        >>> tags("weights.lance")
        {'best': 3}
    """
    ds = Dataset.of(uri, storage_options).lance
    return {name: t["version"] for name, t in sorted(tag_list(ds).items())}


def verify(
    uri: str | os.PathLike | Dataset,
    version: Version | None = None,
    *,
    storage_options: StorageOptions = None,
    progress: Callable[[int], object] | None = None,
) -> VerifyReport:
    """Check a version's metadata and the content hash of every chunk.

    The metadata: rows consistent with each other, with the data files and with the
    version's commit. The rows are decoded from the data
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
    """Return the newest version number.

    Reads the manifest pointer only. For a Dataset handle, the version it opened.

    Args:
        uri: a dataset URI or a Dataset.
        storage_options: for object storage.

    Returns:
        The version number.

    Raises:
        FileNotFoundError: nothing was saved at ``uri``.

    Example:
        >>> latest_version("weights.lance")
        3
    """
    return Dataset.of(uri, storage_options).lance.version


def resolve_version(
    uri: str | os.PathLike | Dataset, version: Version | None, *, storage_options: StorageOptions = None
) -> int:
    """Return the version number that a number or a tag stands for.

    Args:
        uri: a dataset URI or a Dataset.
        version: a version number, a tag, or None for the latest.
        storage_options: for object storage.

    Returns:
        The version number.

    Raises:
        VersionNotFoundError: no such version or tag.
        TypeError / ValueError: ``version`` is neither an int nor a valid tag name.

    Example:
        >>> resolve_version("weights.lance", "best")
        3
    """
    return Dataset.of(uri, storage_options).checkout(version).version


def version_properties(
    uri: str | os.PathLike | Dataset, version: Version, *, storage_options: StorageOptions = None
) -> dict[str, str]:
    """Return the ``properties`` one version was saved with.

    Reads that version's commit (its transaction) only.

    Args:
        uri: a dataset URI or a Dataset.
        version: a version number or a tag.
        storage_options: for object storage.

    Returns:
        The properties, str -> str (those given to ``save_state_dict``; none of the package's own).

    Raises:
        VersionNotFoundError: no such version or tag.
        WeightsError: the commit cannot be read, or its properties are malformed.

    Example:
        >>> version_properties("weights.lance", 3)
        {'epoch': '3'}
    """
    ds = Dataset.of(uri, storage_options).checkout(version)
    props = commit_properties(ds)
    if props is None:
        raise WeightsError(f"the commit of version {ds.version} of {ds.uri} cannot be read")
    return dict(commit_summary(ds.uri, ds.version, props)["properties"])


def prune(
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

    This is gc without MLflow (it knows nothing of runs or model versions);
    ``mlflow_lance.gc`` asks MLflow what it still references, then calls this.

    Args:
        uri: a dataset URI or a Dataset.
        keep_last: keep at least the newest N versions (N >= 1).
        older_than: remove only versions older than this.
        grace: keep versions superseded less than this long ago, and files younger than this.
        candidates: remove only these versions (at least one of ``keep_last``, ``older_than``
            and ``candidates`` is required).
        ignore_tags: tags to count as removed already (their removal is under way).
        dry_run: report what would go; delete nothing.
        storage_options: for object storage.

    Returns:
        A GcReport: versions removed, bytes freed (orphans included), old versions kept for a
        tag, orphan files and bytes, and why each version kept stays (``kept``).

    Raises:
        ValueError: none of ``keep_last``, ``older_than`` and ``candidates`` given, or
            ``keep_last`` < 1.
        FileNotFoundError: nothing was saved at ``uri``.
        WeightsError: ``uri`` holds something else than a weights dataset of this format.

    Example:
        >>> report = prune("weights.lance", keep_last=5)
        >>> report.removed_versions, report.bytes_removed
    """
    dataset = Dataset.of(uri, storage_options)
    doomed, kept = cleanup.choose_versions(dataset.lance, keep_last, older_than, grace, candidates, ignore_tags)
    swept = cleanup.sweep(dataset, doomed, grace=grace, dry_run=dry_run)
    old = {v: why for v, why in kept.items() if "latest" not in why and "keep_last" not in why}
    kept_tagged = sorted(v for v, why in old.items() if any(r.startswith("tag:") for r in why))
    return GcReport(swept.versions, swept.bytes_removed, kept_tagged, swept.orphans, swept.orphan_bytes, kept)


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
        summary = commit_summary(ds.uri, ds.version, props)
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
