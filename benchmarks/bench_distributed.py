"""Sharded checkpoints against torch.distributed.checkpoint (DCP), like with like, in one run.

Run:  python benchmarks/bench_distributed.py [--worlds 2 4] [--layers 2] [--repeat 6] [--settle 2]
                                              [--json benchmarks/results/distributed.json]

At each world size of ``--worlds``, that many ranks (spawned processes, gloo on the CPU) train
GPT-2 (from a config, ``--layers`` blocks) sharded with FSDP2 ``fully_shard`` and AdamW. Each
round: one training step (every tensor changes), then, in an order that changes from round to
round, each contender saves the same sharded state (``get_state_dict``) to a new place, durably
(the order cycles through all 6, so each goes first, second and last, before and after each
other, equally often):

- ``mlflow_lance.distributed.save``: every rank writes its shards as Lance data files and fsyncs
  them, rank 0 commits one version (fsync'ed), as a new version of one dataset per run;
- ``dcp.save`` with its default ``FileSystemWriter`` (``sync_files=True``: it fsyncs its data
  and metadata files);
- the floor: each rank writes the bytes of its shards to a new file and fsyncs it and its directory.

Then, after one more training step (so that every tensor changed again), each saves without
blocking, and the time the caller is blocked is timed (and, apart, the time until the save is
durable): ours stages the shards (a CPU copy, as ``log_checkpoint(blocking=False)`` does; (*)
that call also makes its MLflow calls first, which this does not time) and writes and commits
on a background thread; ``dcp.async_save`` stages and saves on its thread, with a gloo group of
its own, as DCP advises.
Then each loads the latest into the sharded model's state (``distributed.load`` / ``dcp.load``;
warm page cache: the files were just written). A call is timed on rank 0 from a barrier before it
to a barrier after it, so the time is the slowest rank's. ``os.sync()`` and a pause of --settle
seconds come before each timed call; between rounds the older checkpoints are removed, untimed
(``store.prune`` for the dataset). Medians of --repeat rounds after one untimed warm-up round; goals
are on the median of per-round ratios.

Then: the checkpoints the largest world saved are loaded at the smallest (resharded, interleaved);
in this process with no process group, the model part of the largest world's version is read
whole as ``load_model`` reads it, against the same tensors saved by one process; 10 checkpoints
of a model with about 90 % of its weights frozen are saved at the smallest world, by both, and
their bytes on disk compared; and rank 0's part alone: the commit of one version from the data
files of N ranks (2 to 64), which is all that grows with the number of ranks. This 2-core VM is
shared and noisy (4 ranks share 2 cores): compare the ratios of one run with the floor beside
them, not seconds across runs. No GPU here: the NCCL/CUDA path (device to pinned host memory) is
not measured by this run.
"""

from __future__ import annotations

import argparse
import itertools
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
from bench_checkpoint import REPO, du, gpt2, machine, tensors_of, train_step, versions

DEFAULT_JSON = REPO / "benchmarks" / "results" / "distributed.json"
SAVES = ("mlflow_lance", "dcp", "floor")
LOADS = ("mlflow_lance", "dcp")
ASYNC = ("mlflow_lance", "dcp")
ORDERS = list(itertools.permutations(SAVES))  # every order once in 6 rounds: each goes first and after each


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
    if args["phase"] == "frozen":  # all but the last block's MLP: about 90 % of the weights
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(f"h.{args['layers'] - 1}.mlp."))
    for block in model.h:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(rank)
    train_step(model, None, opt)
    phase = {"main": _rounds, "reshard": _resharded_loads, "frozen": _frozen_bytes}[args["phase"]]
    out = phase(rank, model, opt, work, args, dcp, get_state_dict, distributed, store)
    if rank == 0:
        with open(os.path.join(work, f"{args['phase']}-{world}.json"), "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def _timed(fn, settle: float) -> float:
    """Seconds of ``fn()`` on the slowest rank: from a barrier before it to one after it."""
    dist.barrier()
    os.sync()
    time.sleep(settle)
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _rounds(rank, model, opt, work, args, dcp, get_state_dict, distributed, store) -> dict:
    """Blocking saves, async saves (the time the caller is blocked) and loads, interleaved."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow_lance import tree, writer

    uri = os.path.join(work, "run.lance")
    timings: dict[str, list[float]] = {f"save/{k}": [] for k in SAVES} | {f"load/{k}": [] for k in LOADS}
    timings |= {f"async/{k}": [] for k in ASYNC} | {f"async-done/{k}": [] for k in ASYNC}
    dcp_dirs: list[str] = []
    pool = ThreadPoolExecutor(1)  # as log_checkpoint(blocking=False): one background writer per process
    group = distributed.checkpoint_group()
    dcp_group = dist.new_group(backend="gloo")  # DCP's advice for async_save: a gloo group of its own
    settle = args["settle"]

    def ours_async(state: dict):
        flat, spec = tree.flatten(state)
        shards = distributed.stage(flat, clone=True)  # the copy training may run on from
        return pool.submit(
            distributed.write_and_commit, shards, uri, writer.commit_version, group=group, what="save", spec=spec
        )

    for round_ in range(args["repeat"] + 1):
        train_step(model, None, opt)
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optimizer": osd}
        order = ORDERS[round_ % len(ORDERS)]
        took = {}
        for name in order:
            if name == "mlflow_lance":
                took[name] = _timed(lambda state=state: distributed.save(state, uri), settle)
            elif name == "dcp":
                path = os.path.join(work, f"dcp{round_}")
                dcp_dirs.append(path)
                took[name] = _timed(lambda state=state, path=path: dcp.save(state, checkpoint_id=path), settle)
            else:
                path = os.path.join(work, f"floor{round_}")
                took[name] = _timed(lambda state=state, path=path: _floor(state, path, rank), settle)
        train_step(model, None, opt)  # every tensor changes again: each async save writes it all
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optimizer": osd}
        for name in ASYNC if round_ % 2 == 0 else ASYNC[::-1]:
            future = []
            if name == "mlflow_lance":
                blocked = _timed(lambda future=future, state=state: future.append(ours_async(state)), settle)
            else:
                path = os.path.join(work, f"dcp{round_}a")
                dcp_dirs.append(path)
                call = lambda future=future, state=state, path=path: future.append(  # noqa: E731
                    dcp.async_save(state, checkpoint_id=path, process_group=dcp_group)
                )
                blocked = _timed(call, settle)
            start = time.perf_counter() - blocked
            future[0].result()
            dist.barrier()
            took[f"async/{name}"], took[f"async-done/{name}"] = blocked, time.perf_counter() - start
        loads = {}
        for name in LOADS if round_ % 2 == 0 else LOADS[::-1]:
            msd, osd = get_state_dict(model, opt)
            target = {"model": msd, "optimizer": osd}
            if name == "mlflow_lance":
                loads[name] = _timed(lambda target=target: distributed.load(target, uri), settle)
            else:
                loads[name] = _timed(lambda target=target: dcp.load(target, checkpoint_id=dcp_dirs[-1]), settle)
        if round_ > 0:  # the first round warms up
            for name, t in took.items():
                timings[name if "/" in name else f"save/{name}"].append(t)
            for name, t in loads.items():
                timings[f"load/{name}"].append(t)
        dist.barrier()
        if rank == 0:  # untimed: keep only the latest of each
            store.prune(uri, keep_last=1, grace=timedelta(0))
            for old in dcp_dirs[:-1]:
                shutil.rmtree(old, ignore_errors=True)
            del dcp_dirs[:-1]
            shutil.rmtree(os.path.join(work, f"floor{round_}"), ignore_errors=True)
        dist.barrier()
    pool.shutdown()
    state_bytes = sum(t.numel() * t.element_size() for t in tensors_of({"model": get_state_dict(model, opt)[0]}))
    return {"timings": timings, "model_bytes": state_bytes, "uri": uri, "dcp": dcp_dirs[-1]}


def _resharded_loads(rank, model, opt, work, args, dcp, get_state_dict, distributed, store) -> dict:
    """Loads, at this world size, of the checkpoints the largest world saved (interleaved)."""
    saved = json.loads(Path(work, f"main-{args['saved_at']}.json").read_text())
    timings: dict[str, list[float]] = {f"reshard/{k}": [] for k in LOADS}
    for round_ in range(args["repeat"] + 1):
        for name in LOADS if round_ % 2 == 0 else LOADS[::-1]:
            msd, osd = get_state_dict(model, opt)
            target = {"model": msd, "optimizer": osd}
            if name == "mlflow_lance":
                t = _timed(lambda target=target: distributed.load(target, saved["uri"]), args["settle"])
            else:
                t = _timed(lambda target=target: dcp.load(target, checkpoint_id=saved["dcp"]), args["settle"])
            if round_ > 0:
                timings[f"reshard/{name}"].append(t)
    return {"timings": timings}


def _frozen_bytes(rank, model, opt, work, args, dcp, get_state_dict, distributed, store) -> dict:
    """Bytes on disk of 10 checkpoints (one training step apart) of a model whose backbone is
    frozen: one dataset against DCP's 10 directories."""
    uri = os.path.join(work, "frozen.lance")
    for step in range(10):
        train_step(model, None, opt)
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optimizer": osd}
        distributed.save(state, uri)
        dcp.save(state, checkpoint_id=os.path.join(work, "frozen-dcp", str(step)))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(p.numel() for p in model.parameters())
    return {"mlflow_lance": du(uri), "dcp": du(os.path.join(work, "frozen-dcp")), "trained": trained}


def single_process_loads(work: str, world: int, repeat: int) -> dict:
    """In this process, no process group: the model part of the version ``world`` ranks saved,
    read whole as ``load_model`` reads it (``store.read_state_dict`` of the model's tensors),
    against the same tensors saved by one process (a dataset of its own). A tensor whose chunks
    several ranks wrote is assembled in fresh memory; one saved whole comes back as a lazy map
    of its data file, read at first use: so each is timed alone and then with a first pass over
    every byte (a sum per tensor, as a first forward pass would touch them). Interleaved; warm
    page cache."""
    from mlflow_lance import store, tree

    model = tree.subtree_prefix("model")
    sharded = json.loads(Path(work, f"main-{world}.json").read_text())["uri"]
    whole = os.path.join(work, "unsharded.lance")
    store.save_state_dict(store.read_state_dict(sharded, names=model), whole)
    timings: dict[str, list[float]] = {f"{k}/{how}": [] for k in ("sharded", "unsharded") for how in ("load", "used")}
    for round_ in range(repeat + 1):
        for name, uri in (("sharded", sharded), ("unsharded", whole))[:: 1 if round_ % 2 == 0 else -1]:
            start = time.perf_counter()
            state = store.read_state_dict(uri, names=model) if name == "sharded" else store.read_state_dict(uri)
            loaded = time.perf_counter() - start
            for t in state.values():
                t.sum()
            if round_ > 0:
                timings[f"{name}/load"].append(loaded)
                timings[f"{name}/used"].append(time.perf_counter() - start)
            del state
    return timings


def commit_scaling(work: str, ranks: tuple[int, ...] = (2, 4, 8, 16, 64), repeat: int = 3) -> dict:
    """Seconds of rank 0's one commit of a version whose data files N ranks wrote (one per rank,
    as a rank with one shard run writes): the fragments are written here, untimed, then
    ``writer.commit_version`` is timed (the Lance commit, its fsyncs, the version index), for
    a first version and for the next one on top of it. Medians of ``repeat``."""
    from mlflow_lance import writer

    out: dict[int, dict[str, float]] = {}
    for n in ranks:
        first, next_ = [], []
        for r in range(repeat):
            uri = os.path.join(work, f"commit-{n}-{r}.lance")
            for times in (first, next_):
                state = {f"rank{i}/w": torch.randn(80_000) for i in range(n)}  # 320 KB: a fragment each
                written = writer.write_version(state, uri)
                start = time.perf_counter()
                writer.commit_version(written)
                times.append(time.perf_counter() - start)
            shutil.rmtree(uri, ignore_errors=True)
        out[n] = {"first": statistics.median(first), "next": statistics.median(next_)}
    return out


def _spawn(world: int, work: str, conf: dict) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(world, port, work, conf), nprocs=world, join=True)
    return json.loads(Path(work, f"{conf['phase']}-{world}.json").read_text())


def _ratio_goal(goal: str, peer: str, ours: list[float], theirs: list[float], target: float) -> dict:
    """A goal on the median of per-round ratios (the rounds are interleaved)."""
    value = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    return {"goal": goal, "peer": peer, "value": value, "unit": "x", "target": target, "met": value <= target}


def _world_tables(world: int, timings: dict[str, list[float]]) -> list[dict]:
    med = {k: statistics.median(v) for k, v in timings.items()}
    return [
        {
            "title": f"durable sharded save, {world} ranks (seconds, slowest rank)",
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
            "title": f"async save, {world} ranks: seconds the caller is blocked, and to durable (slowest rank)",
            "columns": ["contender", "blocked", "vs dcp.async_save", "until durable"],
            "units": ["", "s", "x", "s"],
            "rows": [
                [label, med[f"async/{k}"], med[f"async/{k}"] / med["async/dcp"], med[f"async-done/{k}"]]
                for k, label in (
                    ("mlflow_lance", "stage (CPU copy) + write_and_commit on a background thread (*)"),
                    ("dcp", "dcp.async_save (thread, its own gloo group)"),
                )
            ],
        },
        _load_table(f"sharded load at {world} ranks, warm page cache (seconds, slowest rank)", med, "load"),
    ]


def _load_table(title: str, med: dict[str, float], kind: str) -> dict:
    """Our load against ``dcp.load``: medians of ``<kind>/<contender>``."""
    return {
        "title": title,
        "columns": ["contender", "median", "vs dcp.load"],
        "units": ["", "s", "x"],
        "rows": [
            [label, med[f"{kind}/{k}"], med[f"{kind}/{k}"] / med[f"{kind}/dcp"]]
            for k, label in (("mlflow_lance", "mlflow_lance.distributed.load"), ("dcp", "dcp.load"))
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="world sizes (processes)")
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 blocks")
    parser.add_argument("--repeat", type=int, default=6, help="timed rounds after one warm-up (6: every order once)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of pause before each timed call")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the run's figures go")
    args = parser.parse_args()
    worlds = sorted(set(args.worlds))
    if worlds[0] < 2 or args.layers < 1 or args.repeat < 1 or args.settle < 0:
        parser.error("--worlds must be >= 2, --layers and --repeat >= 1, --settle >= 0")
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    work = tempfile.mkdtemp(prefix="bench-dist-")
    conf = {"layers": args.layers, "repeat": args.repeat, "settle": args.settle}
    tables, goals, samples = [], [], {}
    try:
        for world in worlds:
            got = _spawn(world, work, {**conf, "phase": "main"})
            t = got["timings"]
            samples[world] = t
            model_bytes = got["model_bytes"]
            tables += _world_tables(world, t)
            goals += [  # issue 19's goals, at every world size measured
                _ratio_goal(
                    f"{world} ranks: blocking save <= 1.0x dcp.save",
                    "dcp.save",
                    t["save/mlflow_lance"],
                    t["save/dcp"],
                    1.0,
                ),
                _ratio_goal(
                    f"{world} ranks: time blocked by an async save <= 1.2x dcp.async_save's",
                    "dcp.async_save",
                    t["async/mlflow_lance"],
                    t["async/dcp"],
                    1.2,
                ),
                _ratio_goal(
                    f"{world} ranks: load <= 1.0x dcp.load", "dcp.load", t["load/mlflow_lance"], t["load/dcp"], 1.0
                ),
            ]
        big, small = worlds[-1], worlds[0]
        t = _spawn(small, work, {**conf, "phase": "reshard", "saved_at": big})["timings"]
        samples[f"{big}->{small}"] = t
        med = {k: statistics.median(v) for k, v in t.items()}
        title = f"resharded load: saved at {big} ranks, loaded at {small} (seconds, slowest rank)"
        tables.append(_load_table(title, med, "reshard"))
        goals.append(
            _ratio_goal(
                f"resharded load ({big} -> {small} ranks) <= 1.1x dcp.load",
                "dcp.load",
                t["reshard/mlflow_lance"],
                t["reshard/dcp"],
                1.1,
            )
        )
        single = single_process_loads(work, big, args.repeat)
        samples["single-process"] = single
        med = {k: statistics.median(v) for k, v in single.items()}
        tables.append(
            {
                "title": f"one process, no process group: the model part of the version {big} ranks saved (seconds)",
                "columns": ["version", "load", "load + a pass over every byte", "vs unsharded (with the pass)"],
                "units": ["", "s", "s", "x"],
                "rows": [
                    [
                        f"saved by {big} ranks (chunks from {big} writers, assembled)",
                        med["sharded/load"],
                        med["sharded/used"],
                        med["sharded/used"] / med["unsharded/used"],
                    ],
                    [
                        "the same tensors saved by one process (lazy maps)",
                        med["unsharded/load"],
                        med["unsharded/used"],
                        1.0,
                    ],
                ],
            }
        )
        goals.append(
            _ratio_goal(
                f"one-process load of the model saved at {big} ranks, then used, <= 1.1x the same saved unsharded",
                "unsharded save",
                single["sharded/used"],
                single["unsharded/used"],
                1.1,
            )
        )
        frozen = _spawn(small, work, {**conf, "phase": "frozen"})
        share = frozen["mlflow_lance"] / frozen["dcp"]
        tables.append(
            {
                "title": f"10 checkpoints, {small} ranks, {1 - frozen['trained']:.0%} of the weights frozen (bytes)",
                "columns": ["contender", "bytes", "vs DCP"],
                "units": ["", "B", "x"],
                "rows": [
                    ["mlflow_lance: one dataset, 10 versions", frozen["mlflow_lance"], share],
                    ["dcp.save: 10 directories", frozen["dcp"], 1.0],
                ],
            }
        )
        goals.append(
            {
                "goal": "10 checkpoints with a frozen backbone: bytes <= 0.4x DCP's 10 directories",
                "peer": "dcp.save",
                "value": share,
                "unit": "x",
                "target": 0.4,
                "met": share <= 0.4,
            }
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
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
        "args": {**conf, "worlds": worlds},
        "machine": machine(),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "versions": versions(),
        "model_bytes": model_bytes,
        "tables": tables,
        "goals": goals,
        "samples": samples,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
