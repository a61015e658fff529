"""Sharded checkpoints against torch.distributed.checkpoint (DCP), like with like, in one run.

Run:  python benchmarks/bench_distributed.py [--world 2] [--layers 2] [--repeat 3] [--settle 2]
                                              [--json benchmarks/results/distributed.json]

``--world`` ranks (spawned processes, gloo on the CPU) train GPT-2 (from a config, ``--layers``
blocks) sharded with FSDP2 ``fully_shard`` and AdamW. Each round: one training step (every
tensor changes), then, in an order that rotates from round to round, each contender saves the
same sharded state (``get_state_dict``) to a new place, durably:

- ``mlflow_lance.distributed.save``: every rank writes its shards as Lance data files and fsyncs
  them, rank 0 commits one version (fsync'ed), as a new version of one dataset per run;
- ``dcp.save`` with its default ``FileSystemWriter`` (``sync_files=True``: it fsyncs its data
  and metadata files);
- the floor: each rank writes the bytes of its shards to a new file and fsyncs it and its directory.

Then each loads the latest into the sharded model's state (``distributed.load`` / ``dcp.load``;
warm page cache: the files were just written). A call is timed on rank 0 from a barrier before it
to a barrier after it, so the time is the slowest rank's. ``os.sync()`` and a pause of --settle
seconds come before each timed call; between rounds the older checkpoints are removed, untimed
(``store.gc`` for the dataset). Medians of --repeat rounds after one untimed warm-up round. Then,
in this process, rank 0's part alone: the commit of one version from the data files of N ranks
(2 to 64), which is all that grows with the number of ranks. This
2-core VM is shared and noisy: compare the ratios of one run with the floor beside them, not
seconds across runs. No GPU here: the NCCL/CUDA path (device to pinned host memory) is not
measured by this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import REPO, gpt2, machine, tensors_of, train_step, versions  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "distributed.json"
SAVES = ("mlflow_lance", "dcp", "floor")
LOADS = ("mlflow_lance", "dcp")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _floor(state: dict, path: str, rank: int) -> None:
    """This rank's shard bytes to a new file, fsync'ed with its directory."""
    os.makedirs(path, exist_ok=True)
    name = os.path.join(path, f"rank{rank}.bin")
    with open(name, "wb") as f:
        for t in tensors_of(state):
            local = t.to_local() if hasattr(t, "to_local") else t
            f.write(local.detach().contiguous().view(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())
    _fsync(path)


def _rank_main(rank: int, world: int, port: int, work: str, args: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    from mlflow_lance import distributed, store

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = gpt2(args["layers"])
    for block in model.h:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.manual_seed(rank)
    train_step(model, None, opt)
    uri = os.path.join(work, "run.lance")
    timings: dict[str, list[float]] = {f"save/{k}": [] for k in SAVES} | {f"load/{k}": [] for k in LOADS}
    dcp_dirs: list[str] = []

    def timed(fn) -> float:
        dist.barrier()
        os.sync()
        time.sleep(args["settle"])
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - start

    for round_ in range(args["repeat"] + 1):
        train_step(model, None, opt)
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optimizer": osd}
        order = SAVES[round_ % len(SAVES) :] + SAVES[: round_ % len(SAVES)]
        took = {}
        for name in order:
            if name == "mlflow_lance":
                took[name] = timed(lambda: distributed.save(state, uri))
            elif name == "dcp":
                path = os.path.join(work, f"dcp{round_}")
                dcp_dirs.append(path)
                took[name] = timed(lambda path=path: dcp.save(state, checkpoint_id=path))
            else:
                took[name] = timed(lambda: _floor(state, os.path.join(work, f"floor{round_}"), rank))
        loads = {}
        for name in LOADS if round_ % 2 == 0 else LOADS[::-1]:
            msd, osd = get_state_dict(model, opt)
            target = {"model": msd, "optimizer": osd}
            if name == "mlflow_lance":
                loads[name] = timed(lambda target=target: distributed.load(target, uri))
            else:
                loads[name] = timed(lambda target=target: dcp.load(target, checkpoint_id=dcp_dirs[-1]))
        if round_ > 0:  # the first round warms up
            for name, t in took.items():
                timings[f"save/{name}"].append(t)
            for name, t in loads.items():
                timings[f"load/{name}"].append(t)
        dist.barrier()
        if rank == 0:  # untimed: keep only the latest of each
            store.gc(uri, keep_last=1, grace=timedelta(0))
            for old in dcp_dirs[:-1]:
                shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(os.path.join(work, f"floor{round_}"), ignore_errors=True)
        dist.barrier()
    if rank == 0:
        state_bytes = sum(t.numel() * t.element_size() for t in tensors_of({"model": get_state_dict(model, opt)[0]}))
        with open(os.path.join(work, "timings.json"), "w") as f:
            json.dump({"timings": timings, "model_bytes": state_bytes}, f)
    dist.destroy_process_group()


def commit_scaling(work: str, ranks: tuple[int, ...] = (2, 4, 8, 16, 64), repeat: int = 3) -> dict:
    """Seconds of rank 0's one commit of a version whose data files N ranks wrote (one per rank,
    as a rank with one shard run writes): the fragments are written here, untimed, then
    ``store.commit_version`` is timed (the Lance commit, its fsyncs, the version index), for
    a first version and for the next one on top of it. Medians of ``repeat``."""
    from mlflow_lance import store

    out: dict[int, dict[str, float]] = {}
    for n in ranks:
        first, next_ = [], []
        for r in range(repeat):
            uri = os.path.join(work, f"commit-{n}-{r}.lance")
            for times in (first, next_):
                state = {f"rank{i}/w": torch.randn(80_000) for i in range(n)}  # 320 KB: a fragment each
                written = store.write_version(state, uri)
                start = time.perf_counter()
                store.commit_version(written)
                times.append(time.perf_counter() - start)
            shutil.rmtree(uri, ignore_errors=True)
        out[n] = {"first": statistics.median(first), "next": statistics.median(next_)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (processes)")
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 blocks")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of pause before each timed call")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the run's figures go")
    args = parser.parse_args()
    if args.world < 2 or args.layers < 1 or args.repeat < 1 or args.settle < 0:
        parser.error("--world must be >= 2, --layers and --repeat >= 1, --settle >= 0")
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    work = tempfile.mkdtemp(prefix="bench-dist-")
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        conf = {"layers": args.layers, "repeat": args.repeat, "settle": args.settle}
        mp.spawn(_rank_main, args=(args.world, port, work, conf), nprocs=args.world, join=True)
        got = json.loads(Path(work, "timings.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in got["timings"].items()}
    per_round = {
        kind: [a / b for a, b in zip(got["timings"][f"{kind}/mlflow_lance"], got["timings"][f"{kind}/dcp"])]
        for kind in ("save", "load")
    }
    tables = [
        {
            "title": f"durable sharded save, {args.world} ranks (seconds, slowest rank)",
            "columns": ["contender", "median", "vs dcp.save", "vs floor"],
            "units": ["", "s", "x", "x"],
            "rows": [
                [label, med[f"save/{k}"], med[f"save/{k}"] / med["save/dcp"], med[f"save/{k}"] / med["save/floor"]]
                for k, label in (
                    ("mlflow_lance", "mlflow_lance.distributed.save (new version)"),
                    ("dcp", "dcp.save (FileSystemWriter, sync_files=True)"),
                    ("floor", "floor: each rank's shard bytes to one file, then one fsync (no overlap)"),
                )
            ],
        },
        {
            "title": f"sharded load at {args.world} ranks, warm page cache (seconds, slowest rank)",
            "columns": ["contender", "median", "vs dcp.load"],
            "units": ["", "s", "x"],
            "rows": [
                [label, med[f"load/{k}"], med[f"load/{k}"] / med["load/dcp"]]
                for k, label in (("mlflow_lance", "mlflow_lance.distributed.load"), ("dcp", "dcp.load"))
            ],
        },
    ]
    goals = [  # issue 19: a blocking save and a load at the same world size no slower than DCP's
        {
            "goal": f"sharded {kind} <= 1.0x dcp.{kind}, median of per-round ratios",
            "peer": f"dcp.{kind}",
            "value": statistics.median(per_round[kind]),
            "unit": "x",
            "target": 1.0,
            "met": statistics.median(per_round[kind]) <= 1.0,
        }
        for kind in ("save", "load")
    ]
    work = tempfile.mkdtemp(prefix="bench-commit-")
    try:
        commits = commit_scaling(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tables.append(
        {
            "title": "rank 0's commit of one version from N ranks' data files (seconds, durable)",
            "columns": ["ranks (one data file each)", "first version", "a later version"],
            "units": ["", "s", "s"],
            "rows": [[n, c["first"], c["next"]] for n, c in commits.items()],
        }
    )
    for t in tables:
        print(f"\n{t['title']}")
        for row in t["rows"]:
            print("  " + "  ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in row))
    for g in goals:
        print(f"{g['goal']}: {g['value']:.2f}x ({'met' if g['met'] else 'missed'})")
    result = {
        "benchmark": "benchmarks/bench_distributed.py",
        "date": started.isoformat(timespec="seconds"),
        "seconds_total": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "args": {**conf, "world": args.world},
        "machine": machine(),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "versions": versions(),
        "model_bytes": got["model_bytes"],
        "tables": tables,
        "goals": goals,
        "samples": got["timings"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
