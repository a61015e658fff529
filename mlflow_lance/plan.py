"""The save plan: which fragments a new version reuses whole from its parent, and which rows
it writes into which new fragments. Pure: it reads no dataset and writes nothing, so it is tested
without Lance (tests/test_packing.py); writer.py writes and commits what it plans.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .format import Entry, Row
from .tensors import TensorRows

# Packing. Lance writes one data file per fragment, and each file costs time to write (~0.15
# ms here) and a footer read whenever its fragment is scanned: one file per tensor made the
# first save of a ResNet-50 state dict (320 tensors, 278 under 256 KiB) 2.4-3.4x safetensors.
# So a run of consecutive new tensors smaller than PACK_TENSOR_BYTES shares one fragment, up
# to PACK_RUN_BYTES of payload per run. A later version reuses a run only as a whole:
# changing one tensor of a run rewrites the run, so runs are kept small (the measurements
# behind these two figures are in the README, "Performance"), and a version that rewrites a
# run splits it into runs of changed and of unchanged tensors: from then on, tensors that
# change every version (LoRA adapters, a trained head) no longer rewrite frozen neighbours.
PACK_TENSOR_BYTES = 256 << 10
PACK_RUN_BYTES = 1 << 20

RowData = tuple[dict, memoryview]  # one row's metadata and payload
NO_PAYLOAD = memoryview(b"")


@dataclass
class Unit:
    """One fragment of a new version: a parent fragment reused whole, or rows to write."""

    rows: list[RowData]
    reused: int | None = None  # the parent's fragment id, when reused
    old: list[Row] = field(default_factory=list)  # where the reused rows lie in it

    def written(self) -> Unit:
        """This unit once its rows are written: their metadata, without the payloads."""
        return Unit([(meta, NO_PAYLOAD) for meta, _ in self.rows], self.reused, self.old)


def plan_version(
    tensors: list[TensorRows], previous: Mapping[str, Entry], fragment_rows: Mapping[int, int]
) -> tuple[list[Unit], list[str]]:
    """The new version's fragments, in order, and the names added or changed.

    Unchanged tensors (same name and key as in ``previous``) keep their rows wherever whole
    parent fragments (``fragment_rows``: id -> rows) hold exactly a stretch of them; every
    other tensor is written, small single-row ones packed into runs.
    """
    same = {t.name: previous[t.name] for t in tensors if t.name in previous and previous[t.name].key == t.key}
    keep = reusable_tensors(tensors, same, fragment_rows)
    units: list[Unit] = []
    run: list[RowData] = []
    run_bytes = 0
    run_changed = False
    for t in tensors:
        rows = list(zip(t.meta, t.payloads, strict=True))
        packable = t.name not in keep and len(rows) == 1 and t.nbytes < PACK_TENSOR_BYTES
        changed = t.name not in same  # changed tensors and rewritten unchanged ones never share a run,
        if run and (not packable or run_bytes + t.nbytes > PACK_RUN_BYTES or changed != run_changed):
            units.append(Unit(run))  # so tensors that keep changing (adapters, a head) stop dragging
            run, run_bytes = [], 0  # frozen neighbours into every later version
        run_changed = changed
        if packable:
            run.append(rows[0])
            run_bytes += t.nbytes
        elif t.name in keep:
            for row, old in zip(rows, same[t.name].rows, strict=True):
                if units and units[-1].reused == old.address >> 32:
                    units[-1].rows.append(row)
                    units[-1].old.append(old)
                else:
                    units.append(Unit([row], old.address >> 32, [old]))
        else:
            units += [Unit([row]) for row in rows]
    if run:
        units.append(Unit(run))
    return units, [t.name for t in tensors if t.name not in same]


def reusable_tensors(
    tensors: list[TensorRows], same: Mapping[str, Entry], fragment_rows: Mapping[int, int]
) -> set[str]:
    """Names of unchanged tensors whose rows can all be taken over in whole parent fragments:
    a fragment is reused only when the new version's rows at that place are exactly its rows,
    in order (a run of which one tensor changed, or was removed or moved, is rewritten)."""
    keep = set(same)
    while True:
        addresses = [
            (t.name, same[t.name].rows[i].address if t.name in keep else None)
            for t in tensors
            for i in range(len(t.meta))
        ]
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
        drop = {name for (name, _), c in zip(addresses, covered, strict=True) if not c} & keep
        if not drop:
            return keep
        keep -= drop
