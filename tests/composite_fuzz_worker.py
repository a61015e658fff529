"""Mutate the components and descriptions of real quantized and sparse tensors and rebuild
each mutant with ``composite.compose`` (the seeded fuzzer of tests/test_native_tensors.py, run
as a child under a memory cap so that a SIGSEGV, an abort or a runaway allocation is seen).

Usage: composite_fuzz_worker.py SEED CASES. Case i of seed s makes the same mutations every
run: one to three of changing one element of a component (to an edge value, NaN, a negative
or huge number), flattening, shortening, doubling, widening or retyping a component, and
replacing an entry of the description with a value of a wrong kind or an edge value. Before
each case it prints ``case <i>`` to stderr. Each mutant must be refused with ValueError or
built into a tensor that dequantizes (quantized) or, if it is small, turns dense (sparse).
At the end it prints one JSON line: the cases run, how they ended, and each that ended
otherwise ("bad").
"""

from __future__ import annotations

import json
import random
import sys
import warnings

import torch

from mlflow_lance import composite

INTS = [0, 1, -1, 2, 3, 5, 7, 1 << 31, (1 << 63) - 1, -(1 << 63), 1 << 62]
VALUES = [*INTS, True, None, "sparse_csr", "per_channel_affine", "qint32", "quint8", [], [3, 3], [1 << 62, 4]]


def seeds() -> list[torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    scales = torch.rand(6, dtype=torch.float64) + 0.1
    return [
        torch.quantize_per_tensor(x, 0.1, 3, torch.quint8),
        torch.quantize_per_channel(x, scales, torch.zeros(6, dtype=torch.long), 1, torch.qint8),
        (torch.eye(4) * 2).to_sparse(),
        torch.sparse_coo_tensor([[1, 0, 1]], [1.0, 2.0, 3.0], (3,)),
        torch.randn(4, 3).to_sparse(1),
        torch.eye(4).to_sparse_csr(),
        torch.eye(4).to_sparse_csc(),
        torch.eye(4).to_sparse_bsr((2, 2)),
        torch.eye(4).to_sparse_bsc((2, 2)),
    ]


def mutate_tensor(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    kind = rng.randrange(7)
    if kind == 0 and t.numel():
        t = t.clone()
        flat = t.reshape(-1)
        if t.is_floating_point():
            flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30])
        else:
            info = torch.iinfo(t.dtype)
            flat[rng.randrange(flat.numel())] = min(max(rng.choice(INTS), info.min), info.max)
        return t
    if kind == 1:
        return t.reshape(-1)
    if kind == 2:
        return t[: max(t.shape[0] - 1, 0)] if t.dim() else t
    if kind == 3:
        return t.to(rng.choice([torch.int32, torch.int64, torch.int8, torch.uint8, torch.float32, torch.float64]))
    if kind == 4:
        return t.unsqueeze(rng.randrange(t.dim() + 1))
    if kind == 5:
        return torch.cat([t, t]) if t.dim() else t
    return torch.empty((0,) + tuple(t.shape[1:]), dtype=t.dtype)


def main(seed: int, cases: int) -> dict:
    warnings.simplefilter("ignore")
    pool = seeds()
    outcomes: dict[str, int] = {}
    bad = []
    for i in range(cases):
        print(f"case {i}", file=sys.stderr, flush=True)
        rng = random.Random(f"{seed}/{i}")
        info, parts = composite.decompose(rng.choice(pool), "x")
        for _ in range(rng.randrange(1, 4)):
            if rng.random() < 0.4:
                info = {**info, rng.choice([*info, "axis", "size", "coalesced"]): rng.choice(VALUES)}
            else:
                part = rng.choice(list(parts))
                parts = {**parts, part: mutate_tensor(rng, parts[part])}
        try:
            out = composite.compose(info, parts, "x")
            if out.is_quantized:
                out.dequantize()
            elif out.numel() <= 1 << 16:  # small enough to make dense: every index is read
                out.to_dense()
            outcome = "built"
        except ValueError:
            outcome = "refused"
        except Exception as err:  # noqa: BLE001 (every other ending is what the fuzzer looks for)
            outcome = "bad"
            bad.append({"case": i, "error": f"{type(err).__name__}: {str(err)[:200]}", "info": repr(info)[:200]})
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return {"cases": cases, "outcomes": outcomes, "bad": bad}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
