"""Mutate a real checkpoint's state and load each mutant with ``load_checkpoint`` (the seeded
fuzzer of tests/test_untrusted_state.py, run as a child under a memory cap so that a SIGSEGV,
an abort or a runaway allocation is seen).

Usage: state_fuzz_worker.py SEED CASES (in a scratch working directory). Case i of seed s
makes the same mutations every run: one to three of replacing a leaf of the checkpoint's
``rng``, ``optimizer``, ``scheduler``, ``step``, ``model`` or ``extra.rng_by_rank`` entries with
a value from a pool of wrong kinds and edge values, nudging a number, changing one word of
a tensor or list, deleting a key or adding one. Before each case it prints ``case <i>`` to
stderr. Each load must end in the restored state (then every generator draws finite
numbers, and numpy's generator holds the stored words) or in the package's error with the
model, optimizer, scheduler and generators as they were. At the end it prints one JSON line:
the cases run, how they ended, and each that ended otherwise ("bad").
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
from test_untrusted_state import Parts, same

import mlflow_lance as ml
from mlflow_lance import checkpoint

POOL = [
    None, True, -1, 0, 1, 3, 623, 624, 625, 700, -5000, 10**8, 2**31, 2**32, 2**63 - 1, -(2**63),
    0.5, float("nan"), float("inf"), "", "x", "MT19937", [], [1] * 625, [0] * 625, {}, {"a": 1},
    torch.zeros(624, dtype=torch.uint32), torch.ones(624, dtype=torch.float64), torch.arange(624),
    torch.zeros(5056, dtype=torch.uint8), torch.zeros(10, dtype=torch.uint8), torch.tensor(1.0),
    torch.tensor([1.0, 2.0]), torch.zeros(3, 3), torch.tensor(True), [torch.zeros(16, dtype=torch.uint8)],
]  # fmt: skip
ROOTS = ("rng", "optimizer", "scheduler", "step", "model", "extra")


def leaves(node: object, path: tuple = ()) -> list[tuple]:
    """The paths of every value below ``node`` (containers and leaves alike)."""
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += leaves(v, (*path, k))
    elif isinstance(node, list):  # a long list (Python's 625 words): its ends
        for i in range(len(node)) if len(node) <= 5 else (0, 1, 2, len(node) - 2, len(node) - 1):
            out += leaves(node[i], (*path, i))
    return out


def get(tree: dict, path: tuple) -> object:
    for k in path:
        tree = tree[k]
    return tree


def mutate(tree: dict, rng: random.Random) -> None:
    path = rng.choice([p for p in leaves(tree) if p and p[0] in ROOTS])
    parent, key = get(tree, path[:-1]), path[-1]
    value = parent[key]
    op = rng.randrange(5)
    if op == 0 or (op == 1 and type(value) not in (int, float)):
        parent[key] = copy.deepcopy(rng.choice(POOL))
    elif op == 1:
        parent[key] = value + rng.choice([-700, -1, 1, 624, 10**6]) * rng.choice([1, 0.5])
    elif op == 2 and (value if isinstance(value, list) else isinstance(value, torch.Tensor) and value.dim()):
        i = rng.randrange(len(value))
        value = value.clone() if isinstance(value, torch.Tensor) else list(value)
        value[i] = rng.choice(POOL[:16]) if isinstance(value, list) else rng.choice([0, 1, extreme(value.dtype)])
        parent[key] = value
    elif op == 3 and isinstance(parent, dict):
        del parent[key]
    elif isinstance(parent, dict):
        parent[f"unknown{rng.randrange(3)}"] = copy.deepcopy(rng.choice(POOL))
    else:
        parent[key] = None


def extreme(dtype: torch.dtype) -> float | int | bool:
    """The value of ``dtype`` farthest from what a generator or optimizer state holds."""
    if dtype == torch.bool:
        return True
    return float("nan") if dtype.is_floating_point or dtype.is_complex else torch.iinfo(dtype).max


def draws() -> list[float]:
    return [
        float(np.random.random()), float(np.random.standard_normal()), random.random(), random.gauss(0, 1),
        *torch.rand(2).tolist(), *torch.randn(2).tolist(),
    ]  # fmt: skip


def main() -> None:
    seed, cases = int(sys.argv[1]), int(sys.argv[2])
    parts = Parts(Path.cwd() / "model")
    parts.good["extra"] = {"rng_by_rank": [parts.good["rng"], checkpoint._rng_state()]}
    pristine = parts.snapshot()
    outcomes: dict[str, int] = {}
    bad = []
    for case in range(cases):
        print(f"case {case}", file=sys.stderr, flush=True)
        rng = random.Random(f"{seed}-{case}")
        tree = copy.deepcopy(parts.good)
        for _ in range(rng.randint(1, 3)):
            mutate(tree, rng)
        parts.model.load_state_dict(pristine["model"])
        parts.optimizer.load_state_dict(copy.deepcopy(pristine["optimizer"]))
        parts.scheduler.load_state_dict(copy.deepcopy(pristine["scheduler"]))
        torch.manual_seed(case), np.random.seed(case), random.seed(case)
        try:
            parts.write(tree)
        except (TypeError, ValueError):  # not storable: no checkpoint to load
            outcomes["unsaved"] = outcomes.get("unsaved", 0) + 1
            continue
        before = parts.snapshot()
        try:
            parts.load(tree)
        except Exception as err:  # noqa: BLE001 (judged below)
            ours = isinstance(err, ml.WeightsError) or "parameter groups differ" in str(err)
            after = parts.snapshot()
            changed = [k for k in before if not same(before[k], after[k])]
            if not ours or changed:
                bad.append({"case": case, "error": f"{type(err).__name__}: {str(err)[:300]}", "changed": changed})
            outcomes["refused"] = outcomes.get("refused", 0) + 1
            continue
        restored = np.array_equal(np.random.get_state()[1], tree["rng"]["numpy"]["keys"].numpy())
        drawn = draws()
        if not restored or not all(math.isfinite(x) for x in drawn):
            bad.append({"case": case, "error": "returned, but the generators are not the stored ones", "draws": drawn})
        outcomes["correct"] = outcomes.get("correct", 0) + 1
    print(json.dumps({"cases": cases, "outcomes": outcomes, "bad": bad}))


if __name__ == "__main__":
    main()
