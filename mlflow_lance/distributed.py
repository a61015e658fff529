"""Sharded saves and loads under ``torch.distributed``: every rank writes its own shards as
Lance data files, in parallel; one commit makes them one version; a load at any world size
reads only the bytes each rank's shards overlap.

No new on-disk format: a weights dataset already stores a tensor as rows that each hold a
byte range (a chunk) of the tensor's row-major bytes. A DTensor sharded on dim 0 (FSDP2's
``fully_shard``, tensor parallel's column-wise layers) holds exactly such a range on each
rank, so a rank's shard becomes a chunk row of the global tensor, written by that rank: the
version loads in one process like any other (``load_state_dict``, ``load_model``), with no
consolidation step. A DTensor sharded otherwise (row-wise TP, ``Partial``) is first
redistributed to dim-0 shards when it is staged (one collective over its mesh). Plain
tensors (DDP, optimizer step counters) and replicated DTensor placements are the same on
every rank that holds them: each distinct byte range is written once, by the holder with the
fewest bytes to write so far.

The call order of a save, every rank taking part (as ``torch.distributed.checkpoint``'s
planner, storage writer and coordinator):

1. ``stage``: each rank's shards as CPU tensors with their place in the global tensors
   (copied when the caller goes on training meanwhile).
2. layout: every rank's shard list is all-gathered; each rank derives the same global plan
   (``plan_chunks``): chunk numbers, and which rank writes which chunk.
3. parent: rank 0 names the dataset's latest version; every rank reads its index.
4. write: each rank hashes its chunks and writes those that changed since the parent (a chunk
   unchanged since then keeps its data file), and flushes them.
5. gather: rank 0 gathers every rank's fragments (or its error: then nothing is committed).
6. commit: rank 0 commits one version (``save``), or logs the MLflow model whose save
   commits it (flavor.py, checkpoint.py); the result is broadcast, and an error on any rank
   raises on every rank.

A rank that dies mid-save leaves no version: its peers' collectives fail (gloo notices the
closed connection) and rank 0 commits nothing; the files written so far are orphans that
``gc`` reclaims after its grace period.

Collectives run on a gloo group of their own (``checkpoint_group``), so that a background
(``blocking=False``) save never mixes its messages with the training's collectives, and so
that they move CPU objects whatever the training backend is.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, wait
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from . import store, tree, writer
from .dataset import Dataset
from .errors import WeightsError
from .format import Entry, Version, raise_problems, select
from .plan import NO_PAYLOAD, Unit, plan_version
from .readers import VersionReader, check_row, open_version
from .tensors import (
    DEFAULT_CHUNK_BYTES,
    TensorRows,
    dtype_from_name,
    dtype_name,
    find_ties,
    hash_bytes,
    stored_nbytes,
    tensor_bytes,
    uint8_view,
    validate_state_dict,
)
from .writer import Written

__all__ = [
    "Shard",
    "active",
    "checkpoint_group",
    "collective",
    "from_rank0",
    "load",
    "plan_chunks",
    "save",
    "settle",
    "stage",
    "track",
    "unwrapped",
    "write",
    "write_and_commit",
]

TIMEOUT_ENV = "MLFLOW_LANCE_DIST_TIMEOUT"  # seconds a rank waits for its peers in a save (default 1800)
_GROUPS: dict[tuple, Any] = {}
_IN_FLIGHT: list[Future] = []  # background saves whose collectives may still run


def track(future: Future) -> None:
    """Register a background save (checkpoint.py's ``blocking=False``): the next collective
    entry point waits for it, so that two threads never run collectives on one group at once."""
    _IN_FLIGHT[:] = [f for f in _IN_FLIGHT if not f.done()] + [future]


def settle() -> None:
    """Wait until every tracked background save is done (its error surfaces where it was
    started, not here)."""
    for future in list(_IN_FLIGHT):
        wait([future])
    _IN_FLIGHT[:] = [f for f in _IN_FLIGHT if not f.done()]


# --------------------------------------------------------------------------- process groups


def active(group: Any = None) -> bool:
    """Whether a process group of more than one rank is initialised (saves are collective)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def collective(model: torch.nn.Module) -> bool:
    """Whether saving ``model`` takes every rank: a process group is initialised and the model
    holds DTensors (FSDP2, tensor parallel: even on a mesh of one rank, whose tensors only
    ``get_state_dict`` / ``set_state_dict`` read and fill), or it is wrapped by
    ``DistributedDataParallel`` over more than one rank. A plain module (``ddp.module`` on rank
    0 alone, as before) is saved by the rank that calls."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if any(_is_dtensor(t) for t in model.state_dict().values()):
        return True
    return active() and isinstance(model, DistributedDataParallel)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module a ``DistributedDataParallel`` wraps (its state dict's names), else ``model``."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def checkpoint_group(group: Any = None) -> Any:
    """A gloo group over the ranks of ``group`` (default: all), created once per group, on
    which saves exchange their plans and results. Collective over the ranks of ``group`` (and
    only them): each calls it, in the same order, the first time."""
    import torch.distributed as dist

    ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
    if ranks not in _GROUPS:
        text = os.environ.get(TIMEOUT_ENV, "")
        seconds = int(text) if text.isdigit() and int(text) > 0 else 1800
        _GROUPS[ranks] = dist.new_group(
            list(ranks), backend="gloo", timeout=timedelta(seconds=seconds), use_local_synchronization=True
        )
    return _GROUPS[ranks]


def _rank(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_rank(group)


def agree(error: BaseException | None, group: Any, what: str, outcome: str = "; nothing was committed") -> None:
    """Every rank learns whether any rank failed at ``what``; each then raises (the failing
    rank its own error, the others a RuntimeError naming that rank and its error, then
    ``outcome``)."""
    import torch.distributed as dist

    texts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(texts, None if error is None else f"{type(error).__name__}: {error}", group=group)
    if error is not None:
        raise error
    failed = [(r, t) for r, t in enumerate(texts) if t is not None]
    if failed:
        r, text = failed[0]
        raise RuntimeError(f"{what} failed on rank {r} ({text}){outcome}")


def share(value: Any, error: BaseException | None, group: Any, what: str) -> Any:
    """Rank 0's ``value`` on every rank, or rank 0's ``error`` raised on every rank."""
    import torch.distributed as dist

    box = [(value, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, group=group, group_src=0)
    if error is not None:
        raise error
    got, text = box[0]
    if text is not None:
        raise RuntimeError(f"{what} failed on rank 0 ({text})")
    return got


def from_rank0(compute: Callable[[], Any], group: Any, what: str) -> Any:
    """``compute()`` run on rank 0 alone (the MLflow side of a save or load); its result on
    every rank, or its error raised on every rank."""
    value, error = None, None
    if _rank(group) == 0:
        try:
            value = compute()
        except Exception as err:  # noqa: BLE001 (raised on every rank by share)
            error = err
    return share(value, error, group, what)


# --------------------------------------------------------------------------- staging


@dataclass(frozen=True)
class Shard:
    """One rank's part of a tensor: ``data`` (a contiguous CPU tensor) holds the bytes
    ``start`` .. ``start + data.nbytes`` of the global tensor of ``shape`` (row-major)."""

    data: torch.Tensor
    shape: tuple[int, ...]
    start: int


def stage(flat: Mapping[str, torch.Tensor], *, clone: bool = True) -> OrderedDict[str, Shard]:
    """Each tensor of a flat state dict as this rank's ``Shard`` of it, on the CPU.

    A DTensor not sharded on dim 0 only (or replicated) is redistributed to dim-0 shards first
    (a collective over its device mesh: every rank stages together). Plain tensors are whole
    (start 0). ``clone`` copies even CPU tensors, so that training may change them meanwhile;
    on CUDA the copy goes to pinned memory and is waited for before this returns.
    """
    validate_state_dict({k: v.to_local() if _is_dtensor(v) else v for k, v in flat.items()})
    out: OrderedDict[str, Shard] = OrderedDict()
    copies = []
    for name, t in flat.items():
        shape: tuple[int, ...] = tuple(t.shape)
        start = 0
        if _is_dtensor(t):
            t, start = _row_shard(name, t)
        t = t.detach()
        if t.device.type != "cpu":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
            host.copy_(t, non_blocking=True)
            copies.append(host)
            t = host
        elif clone or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        out[name] = Shard(t, shape, start)
    if copies and torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def _is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def _rows_of(t: Any) -> tuple:
    """``t``'s placements with every sharding turned into a shard of dim 0 (of whole rows)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as DShard

    if t.ndim == 0:
        return tuple(Replicate() for _ in t.placements)
    rows = [p if isinstance(p, Replicate) or (type(p) is DShard and p.dim == 0) else DShard(0) for p in t.placements]
    return tuple(rows)


def _boxed(t: Any) -> bool:
    """Whether each rank's part of DTensor ``t`` is one box of the global tensor (Shard and
    Replicate placements); FSDP over tensor parallelism (``_StridedShard``) is not."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as DShard

    return all(type(p) in (DShard, Replicate) for p in t.placements)


def _row_shard(name: str, t: Any) -> tuple[torch.Tensor, int]:
    """A DTensor's local part as a contiguous range of its global bytes: (local tensor, start)."""
    from .compat import compute_local_shape_and_global_offset

    rows = _rows_of(t)
    if rows != tuple(t.placements):
        t = t.redistribute(t.device_mesh, rows)
    local = t.to_local()
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(local.shape) != tuple(shape) or tuple(shape[1:]) != tuple(t.shape[1:]) or any(offset[1:]):
        raise ValueError(
            f"tensor {name!r}: its local shard {tuple(local.shape)} at offset {tuple(offset)} of "
            f"{tuple(t.shape)} is not a run of whole rows; placements {t.placements} are not supported"
        )
    row_bytes = local.element_size()
    for s in t.shape[1:]:
        row_bytes *= s
    return local, (offset[0] if t.ndim else 0) * row_bytes


# --------------------------------------------------------------------------- the global plan


@dataclass(frozen=True)
class Chunk:
    """One row of the version: bytes ``start`` .. ``start + size`` of tensor ``name``, written
    by rank ``owner`` (``tie``: the row of a tensor tied to that name)."""

    name: str
    index: int
    start: int
    size: int
    dtype: str
    shape: tuple[int, ...]
    owner: int
    tie: str | None = None


Layout = list[tuple[str, str, tuple[int, ...], int, int]]  # name, dtype, shape, start, size


def layout_of(shards: Mapping[str, Shard]) -> Layout:
    """What a rank tells the others about its shards."""
    return [
        (name, dtype_name(s.data.dtype, key=name), s.shape, s.start, s.data.numel() * s.data.element_size())
        for name, s in shards.items()
    ]


def plan_chunks(layouts: list[Layout], ties: Mapping[str, str], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Chunk]:
    """The rows of the version every rank's shards make, in order, and who writes each.

    Pure (every rank computes the same plan from the same gathered layouts). Tensors come in
    rank 0's order; each tensor's distinct byte ranges in order, cut at ``chunk_bytes``. A range
    held by several ranks (replicated) is written by the rank that wrote the range before it,
    while that rank holds it and stays within an even share of all the bytes (so that runs of
    small tensors pack into few files), else by the holder with the fewest bytes planned so
    far (the lowest rank on a tie). ``ties`` (rank 0's: name -> the name it is tied to)
    become one empty row each, written by rank 0. Raises ValueError naming the first tensor
    whose shards disagree (another dtype or shape on some rank, overlapping or missing bytes),
    or a tensor only some ranks hold.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    names = [entry[0] for entry in layouts[0]]
    for r, lay in enumerate(layouts[1:], 1):
        if set(e[0] for e in lay) != set(names):
            odd = sorted(set(e[0] for e in lay) ^ set(names))
            raise ValueError(
                f"rank {r} saves other tensors than rank 0 ({odd[:5]} are not on both); every rank must save "
                f"the same state dict keys (use torch.distributed.checkpoint.state_dict.get_state_dict)"
            )
    held: dict[str, dict[tuple[int, int], list[int]]] = {n: {} for n in names}
    kind: dict[str, tuple[str, tuple[int, ...]]] = {}
    for r, lay in enumerate(layouts):
        for name, dtype, shape, start, size in lay:
            if kind.setdefault(name, (dtype, tuple(shape))) != (dtype, tuple(shape)):
                raise ValueError(
                    f"tensor {name!r} is {kind[name][0]} {list(kind[name][1])} on one rank and {dtype} "
                    f"{list(shape)} on rank {r}"
                )
            if size or stored_nbytes(dtype, list(shape)) == 0:
                held[name].setdefault((start, size), []).append(r)
    total = sum(size for name, pieces in held.items() if name not in ties for (_, size) in pieces)
    target = total / len(layouts)  # bytes each rank would write with the writes spread evenly
    load = [0] * len(layouts)
    out: list[Chunk] = []
    for name in names:
        dtype, shape = kind[name]
        if name in ties:
            out.append(Chunk(name, 0, 0, 0, dtype, shape, 0, ties[name]))
            continue
        end = 0
        for (start, size), holders in sorted(held[name].items()):
            if start != end:
                raise ValueError(
                    f"tensor {name!r}: the ranks' shards {'overlap' if start < end else 'leave a gap'} at "
                    f"byte {min(start, end)}; save every shard of it exactly once"
                )
            last = out[-1].owner if out else None
            if last in holders and load[last] + size <= max(target, size):
                owner = last  # runs of replicated tensors stay with one writer: its small ones pack into one file
            else:
                owner = min(holders, key=lambda r: (load[r], r))
            load[owner] += size
            cuts = range(start, start + size, chunk_bytes) if size else [start]
            for at in cuts:
                out.append(Chunk(name, 0, at, min(chunk_bytes, start + size - at), dtype, shape, owner))
            end = start + size
        whole = stored_nbytes(dtype, list(shape))
        if end != whole:
            raise ValueError(f"tensor {name!r}: the ranks' shards cover {end} of its {whole} bytes")
    numbered, first = [], {}
    for c in out:
        first.setdefault(c.name, len(numbered))
        numbered.append(Chunk(c.name, len(numbered) - first[c.name], c.start, c.size, c.dtype, c.shape, c.owner, c.tie))
    return numbered


def _ties(shards: Mapping[str, Shard]) -> dict[str, str]:
    """Names whose shard is the very same tensor as an earlier name's (tied weights)."""
    return find_ties({n: s.data for n, s in shards.items()})


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Segment:
    """A stretch of consecutive rows one rank wrote, as sent to rank 0: where it starts in the
    version, and per unit (fragment) its rows' metadata, the parent fragment it reuses and
    where its rows lie in it, or the new fragment's JSON."""

    first: int
    units: list[tuple[list[dict], int | None, list, str | None]]
    changed: list[str]


def write(
    shards: Mapping[str, Shard],
    uri: str | os.PathLike | Dataset,
    *,
    spec: dict | None = None,
    group: Any = None,
    storage_options: Mapping[str, str] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    compression: str | None = None,
    sync_files: bool | None = None,
    failed: BaseException | None = None,
) -> Written | None:
    """Steps 2 to 5 of a save (see the module docstring), collectively on ``group`` (a
    ``checkpoint_group``): every rank writes its chunks; rank 0 gets the ``Written`` version to
    commit (``writer.commit_version``), the other ranks None. ``spec`` is rank 0's tree spec.
    A rank whose staging ``failed`` passes its error: every rank then raises before writing."""
    import torch.distributed as dist

    rank, size = _rank(group), dist.get_world_size(group)
    error: BaseException | None = failed
    mine, dataset = None, None
    try:
        dataset = Dataset.of(uri, storage_options)
        if failed is None:
            mine = (layout_of(shards), _ties(shards) if rank == 0 else {})
    except BaseException as err:  # noqa: BLE001 (raised on every rank by agree)
        error = err
    layouts: list = [None] * size
    dist.all_gather_object(layouts, mine, group=group)
    agree(error, group, "staging the save")
    chunks: list[Chunk] = []
    parent: int | None = None
    try:
        chunks = plan_chunks([lay for lay, _ in layouts], layouts[0][1], chunk_bytes)
        if rank == 0:
            existing = dataset.existing()
            parent = existing.version if existing is not None else None
    except BaseException as err:  # noqa: BLE001 (raised on every rank by share)
        error = err
    parent = share(parent, error, group, "planning the save")
    segments: list[_Segment] = []
    try:
        segments, new_schema = _write_mine(shards, chunks, rank, dataset, parent, compression, sync_files)
    except BaseException as err:  # noqa: BLE001 (raised on every rank by agree)
        error = err
    gathered: list | None = [None] * size if rank == 0 else None
    dist.gather_object(None if error else segments, gathered, group=group, group_dst=0)
    agree(error, group, "writing the save")
    if rank != 0:
        return None
    return _assemble(dataset, parent, new_schema, chunks, [s for got in gathered for s in got], spec, sync_files)


def write_and_commit(
    shards: Mapping[str, Shard],
    uri: str | os.PathLike | Dataset,
    commit: Callable[[Written], Any],
    *,
    group: Any,
    what: str,
    failed: BaseException | None = None,
    **options: Any,
) -> Any:
    """``write``, then ``commit`` of the written version on rank 0 (``writer.commit_version``, or
    logging the MLflow model whose save commits it); its result on every rank, or the first
    error (a rank-0-only failure too: every rank raises, none waits for a message that never
    comes). ``options`` are ``write``'s."""
    result, error = None, None
    try:
        written = write(shards, uri, group=group, failed=failed, **options)
        if written is not None:
            result = commit(written)
    except Exception as err:  # noqa: BLE001 (raised on every rank by share)
        error = err
    return share(result, error, group, what)


def _write_mine(
    shards: Mapping[str, Shard],
    chunks: list[Chunk],
    rank: int,
    dataset: Dataset,
    parent_version: int | None,
    compression: str | None,
    sync_files: bool | None,
) -> tuple[list[_Segment], Any]:
    """Hash and write this rank's chunks that changed since the parent; its segments."""
    parent = dataset.checkout(parent_version) if parent_version is not None else None
    new_schema, previous = writer.reusable_base(dataset, parent, compression)
    reusable = writer.reusable_fragments(parent)
    fragment_rows = {fid: f.physical_rows for fid, f in reusable.items()}
    flush = writer.flushes(dataset, sync_files)
    segments: list[tuple[int, list[Unit], list[str]]] = []
    i = 0
    while i < len(chunks):
        if chunks[i].owner != rank:
            i += 1
            continue
        j = i
        while j < len(chunks) and chunks[j].owner == rank:
            j += 1
        items = _items(shards, chunks[i:j])
        units, changed = plan_version(items, _previous_rows(previous, items), fragment_rows)
        segments.append((i, units, changed))
        i = j
    every = [u for _, units, _ in segments for u in units]
    fragments = iter(writer.write_units(every, dataset, new_schema, reusable, create=parent is None, flush=flush))
    out = []
    for first, units, changed in segments:
        sent = []
        for u in units:
            f = next(fragments)
            sent.append(
                ([m for m, _ in u.rows], u.reused, u.old, None if u.reused is not None else json.dumps(f.to_json()))
            )
        out.append(_Segment(first, sent, changed))
    return out, new_schema


def _items(shards: Mapping[str, Shard], chunks: list[Chunk]) -> list[TensorRows]:
    """This rank's chunks as rows, a run of consecutive chunks of one tensor per item."""
    items: list[TensorRows] = []
    for c in chunks:
        if c.tie is not None:
            payload = NO_PAYLOAD
        else:
            s = shards[c.name]
            payload = tensor_bytes(s.data)[c.start - s.start : c.start - s.start + c.size]
        meta = {
            "name": c.name,
            "chunk": c.index,
            "offset": c.start,
            "nbytes": stored_nbytes(c.dtype, list(c.shape)),
            "dtype": c.dtype,
            "shape": list(c.shape),
            "hash": hash_bytes(payload),
            "alias": c.tie,
        }
        if items and items[-1].name == c.name:
            items[-1].meta.append(meta)
            items[-1].payloads.append(payload)
        else:
            items.append(TensorRows(c.name, [meta], [payload]))
    return items


def _previous_rows(previous: Mapping[str, Entry], items: list[TensorRows]) -> dict[str, Entry]:
    """The parent's rows at the same chunks as each item's, as entries (what an unchanged
    item may keep: plan_version compares their keys)."""
    out = {}
    for t in items:
        e = previous.get(t.name)
        chunks = [m["chunk"] for m in t.meta]
        if e is not None and chunks[-1] < len(e.rows):
            out[t.name] = Entry(
                e.name, e.dtype, e.shape, e.nbytes, e.tie, [e.meta[c] for c in chunks], [e.rows[c] for c in chunks]
            )
    return out


def _assemble(
    dataset: Dataset,
    parent: int | None,
    new_schema: Any,
    chunks: list[Chunk],
    segments: list[_Segment],
    spec: dict | None,
    sync_files: bool | None,
) -> Written:
    """Rank 0: every rank's segments as one version to commit, checked against the plan."""
    from lance.fragment import FragmentMetadata

    segments = sorted(segments, key=lambda s: s.first)
    parent_ds = dataset.checkout(parent) if parent is not None else None
    reusable = writer.reusable_fragments(parent_ds)
    units: list[Unit] = []
    fragments = []
    changed: dict[str, None] = {}
    for s in segments:
        for metas, reused, old, fragment in s.units:
            units.append(Unit([(m, NO_PAYLOAD) for m in metas], reused, old))
            fragments.append(reusable[reused] if fragment is None else FragmentMetadata.from_json(fragment))
        changed.update(dict.fromkeys(s.changed))
    got = [(m["name"], m["chunk"], m["offset"]) for u in units for m, _ in u.rows]
    if got != [(c.name, c.index, c.start) for c in chunks]:
        raise WeightsError(f"the ranks wrote {len(got)} rows, not the {len(chunks)} planned; nothing was committed")
    previous = writer.reusable_base(dataset, parent_ds, None)[1]
    names = dict.fromkeys(c.name for c in chunks)
    return Written(
        dataset,
        parent,
        new_schema,
        units,
        fragments,
        [n for n in names if n in changed],
        [n for n in previous if n not in names],
        spec,
        writer.flushes(dataset, sync_files),
    )


# --------------------------------------------------------------------------- saving


def save(
    state: Mapping[str, Any],
    uri: str | os.PathLike | Dataset,
    *,
    group: Any = None,
    message: str | None = None,
    properties: Mapping[str, str] | None = None,
    storage_options: Mapping[str, str] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    compression: str | None = None,
    sync_files: bool | None = None,
) -> store.VersionInfo:
    """Save a sharded state dict (or checkpoint dict) as one new version; every rank calls it.

    Each rank writes its own shards in parallel (replicated tensors once in all), only what
    changed since the dataset's latest version; rank 0 commits. The version loads like any
    other: whole in one process (``load_state_dict``), or resharded at any world size
    (``load``). With no process group (or one rank) this is ``store.save_state_dict``.

    Args:
        state: name -> tensor or DTensor (``get_state_dict``'s model state dict), or a
            checkpoint dict of them (``{"model": ..., "optimizer": ..., "step": 3}``); every
            rank passes the same keys.
        uri: the dataset (every rank must reach the same one: a shared file system or object
            storage).
        group: the ranks that save (default: all).
        message / properties / storage_options / chunk_bytes / compression / sync_files: as
            ``save_state_dict``'s.

    Returns:
        The version's VersionInfo, on every rank.

    Raises:
        ValueError: the ranks' shards disagree (named), on every rank, before anything is written.
        RuntimeError: another rank failed (its error is named); nothing was committed.

    Example:
        >>> model_sd, optim_sd = get_state_dict(model, optimizer)
        >>> save({"model": model_sd, "optimizer": optim_sd, "step": 100}, "s3://bucket/ckpt.lance")
    """
    if not active(group):
        return store.save_state_dict(
            state,
            uri,
            message=message,
            properties=properties,
            storage_options=storage_options,
            chunk_bytes=chunk_bytes,
            compression=compression,
            sync_files=sync_files,
        )
    settle()
    cg = checkpoint_group(group)
    shards, spec, failed = OrderedDict(), None, None
    try:
        flat, spec = _flatten(state)
        shards = stage(flat, clone=False)
    except Exception as err:  # noqa: BLE001 (raised on every rank by write)
        failed = err
    return write_and_commit(
        shards,
        uri,
        lambda written: writer.commit_version(written, message=message, properties=properties),
        group=cg,
        what="committing the save",
        failed=failed,
        spec=spec,
        storage_options=storage_options,
        chunk_bytes=chunk_bytes,
        compression=compression,
        sync_files=sync_files,
    )


def _flatten(state: Mapping[str, Any]) -> tuple[OrderedDict[str, torch.Tensor], dict | None]:
    """A state's tensors by name and its tree spec (None for a flat state dict)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict or checkpoint dict, got {type(state).__name__}")
    if tree.is_flat(state):
        return OrderedDict(state), None
    return tree.flatten(state)


# --------------------------------------------------------------------------- loading


def load(
    state: Mapping[str, Any],
    uri: str | os.PathLike | Dataset,
    version: Version | None = None,
    *,
    storage_options: Mapping[str, str] | None = None,
    verify: bool = False,
    strict: bool = True,
    skip: tuple[str, ...] = (),
) -> Any:
    """Fill ``state``'s tensors in place from a version, resharding: each rank reads only the
    bytes its own shards cover, whatever the world size the version was saved at (or none).

    Each rank reads on its own (pass the same ``version`` on every rank): not collective,
    except for a state with FSDP over tensor parallelism (``_StridedShard`` placements), whose
    tensors are read as whole-row shards and redistributed into place; then every rank of the
    default group calls (read errors are agreed first; a device error while redistributing,
    such as running out of memory, is not).
    A DTensor's local shard is read as the rows it spans (a dim-0 shard: exactly its bytes; a
    shard of other dims: the rows it crosses, then sliced). Then hand the state to
    ``set_state_dict`` (checkpoint.py does).

    Args:
        state: what ``save`` was given, as this rank holds it now: tensors and DTensors
            (``get_state_dict``'s), in a flat state dict or a checkpoint dict; its tensors are
            overwritten (cast to their dtype).
        uri / version / storage_options: the version (default: the latest).
        verify: read whole chunks and check their content hashes before copying.
        strict: refuse tensors of ``state`` the version lacks (else they keep their values).
        skip: name prefixes (``tree.subtree_prefix("optimizer")``) of stored tensors not to
            read when ``state`` lacks them: None in the returned tree.

    Returns:
        The stored tree (a checkpoint dict's numbers and strings as saved) with ``state``'s own
        tensors in it; stored tensors ``state`` lacks are read whole (unless skipped).

    Raises:
        WeightsError: a tensor missing from the version (``strict``), or stored with another shape.
        CorruptionError: as ``load_state_dict``.

    Example:
        >>> model_sd, optim_sd = get_state_dict(model, optimizer)
        >>> stored = load({"model": model_sd, "optimizer": optim_sd}, "ckpt.lance")
        >>> set_state_dict(model, optimizer, model_state_dict=stored["model"], optim_state_dict=stored["optimizer"])
    """
    flat, _ = _flatten(state)
    # FSDP over tensor parallelism (known from the state alone, so the same on every rank):
    # such a DTensor's part is read as whole-row shards into host memory, then redistributed
    # into place (collectives over its mesh) once every rank has read without error
    strided = [n for n, t in flat.items() if _is_dtensor(t) and not _boxed(t)]
    error, reader, rows = None, None, {}
    try:
        reader = open_version(Dataset.of(uri, storage_options), version, index_alone=not verify)
        entries = reader.entries
        raise_problems(reader.uri, reader.version, reader.problems())
        _check_state(reader, entries, flat, strict)
        with reader, torch.no_grad():
            for name, t in flat.items():
                if name in entries:
                    e = entries[entries[name].tie or name]
                    if name in strided:
                        rows[name] = _read_rows(reader, e, t, verify)
                    else:
                        _read_local(reader, e, t, verify)
    except Exception as err:  # noqa: BLE001 (raised below; with strided tensors, on every rank)
        error = err
    if strided:  # no rank goes on to the collectives below while another has failed
        settle()  # a background save's collectives run on the same group
        agree(error, checkpoint_group(), "loading the sharded state", outcome="")
    elif error is not None:
        raise error
    if rows:
        from torch.distributed.tensor import DTensor
    with torch.no_grad():
        for name in list(rows):
            t, part = flat[name], rows.pop(name)  # one stand-in at a time
            stand_in = DTensor.from_local(
                part.to(t.device), t.device_mesh, _rows_of(t), run_check=False, shape=t.shape, stride=t.stride()
            )
            t.to_local().copy_(stand_in.redistribute(t.device_mesh, t.placements).to_local())
            del stand_in, part
    filled: dict[str, Any] = {n: t for n, t in flat.items() if n in entries}
    filled.update(dict.fromkeys(n for n in entries if n not in filled and n.startswith(skip)))
    rest = [n for n in entries if n not in filled]
    if rest:
        filled.update(store.read_state_dict(reader.uri, reader.version, names=rest, storage_options=storage_options))
    spec = store.tree_spec(reader)
    return (
        tree.unflatten(spec, filled) if spec is not None else OrderedDict((n, filled[n]) for n in select(entries, None))
    )


def _check_state(reader: VersionReader, entries: Mapping[str, Entry], flat: Mapping[str, Any], strict: bool) -> None:
    """Refuse a state the version cannot fill: a tensor it lacks (``strict``), or another shape."""
    missing = [n for n in flat if n not in entries]
    if missing and strict:
        raise WeightsError(
            f"version {reader.version} of {reader.uri} has no tensor {missing[0]!r} (and {len(missing) - 1} more "
            f"missing); pass strict=False to keep their current values"
        )
    for name, t in flat.items():
        if name in entries and list(t.shape) != entries[name].shape:
            raise WeightsError(
                f"tensor {name!r} is stored with shape {entries[name].shape}, but this state's is {list(t.shape)}"
            )


def _read_rows(reader: VersionReader, e: Entry, t: Any, verify: bool) -> torch.Tensor:
    """This rank's part of stored tensor ``e`` as ``t`` would hold it in whole-row shards
    (``_rows_of(t)``), in host memory: the local tensor of a stand-in for ``t``."""
    from .compat import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, _rows_of(t))
    part = torch.empty(shape, dtype=t.dtype)
    _read_box(reader, e, part, (tuple(shape), tuple(offset)), verify)
    return part


def _read_local(reader: VersionReader, e: Entry, t: torch.Tensor, verify: bool) -> None:
    """Copy what ``t`` (a tensor, or this rank's shard of a DTensor) holds of stored tensor ``e``."""
    if _is_dtensor(t):
        _read_box(reader, e, t.to_local(), _box(t), verify)
    else:
        _read_box(reader, e, t, (tuple(t.shape), (0,) * t.ndim), verify)


def _read_box(reader: VersionReader, e: Entry, local: torch.Tensor, box: tuple, verify: bool) -> None:
    """Copy into ``local`` the box (shape, offset) of stored tensor ``e`` it holds."""
    dtype = dtype_from_name(e.dtype, key=e.name)
    shape, offset = box
    if local.numel() == 0:
        return
    row = dtype.itemsize
    for s in e.shape[1:]:
        row *= s
    first, rows = (offset[0], shape[0]) if e.shape else (0, 1)
    whole_rows = list(shape[1:]) == e.shape[1:]  # a dim-0 shard (FSDP2, a strided stand-in): one byte range
    if whole_rows and local.dtype == dtype and local.is_contiguous() and local.device.type == "cpu":
        read_span(reader, e, first * row, uint8_view(local), verify)  # straight into place
        return
    band = torch.empty([rows, *e.shape[1:]] if e.shape else [], dtype=dtype)
    read_span(reader, e, first * row, uint8_view(band), verify)
    part = (
        band[(slice(None), *(slice(o, o + s) for o, s in zip(offset[1:], shape[1:], strict=True)))] if e.shape else band
    )
    local.copy_(part.reshape(local.shape))


def _box(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from .compat import compute_local_shape_and_global_offset

    if not _boxed(t):  # load() gives such a tensor a stand-in first
        raise ValueError(f"a DTensor with placements {t.placements} is not one box of the global tensor")
    return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)


def read_span(reader: VersionReader, e: Entry, start: int, dst: torch.Tensor, verify: bool) -> None:
    """Fill ``dst`` (flat uint8) with bytes ``start`` .. ``start + dst.numel()`` of stored tensor
    ``e``, reading only the chunks (and, uncompressed and not verified, only the bytes of
    them) that range covers."""
    stop = start + dst.numel()
    rows = [r for r in e.rows if r.offset < stop and r.offset + r.size > start]
    reader.check_stored(rows)
    jobs = []
    for r in rows:
        lo, hi = max(start, r.offset), min(stop, r.offset + r.size)
        if reader.codec or verify:
            whole = torch.empty(r.size, dtype=torch.uint8)
            reader.read_many([(r, whole)])
            if verify:
                check_row(reader, e, r, whole)
            dst[lo - start : hi - start].copy_(whole[lo - r.offset : hi - r.offset])
        else:
            part = r._replace(position=(r.position or 0) + lo - r.offset, size=hi - lo, stored=hi - lo)
            jobs.append((part, dst[lo - start : hi - start]))
    reader.read_many(jobs)
