"""Worker processes of tests/test_distributed.py: real torch.distributed (gloo on CPU) ranks,
started with ``torch.multiprocessing`` spawn. Each scenario is a function ``(rank, world,
port, tmp, *args)``; rank 0 writes what the test checks to files in ``tmp``."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DIM, VOCAB, STEPS_BEFORE, STEPS_AFTER = 16, 11, 2, 2


def run(fn, world: int, tmp: str, *args, deaths: bool = False, timeout: float = 300) -> list[int | None]:
    """Run ``fn`` on ``world`` spawned ranks (raises what a rank raised); with ``deaths``, a rank
    may die without the others being stopped: every rank's exit code (None: still running at
    ``timeout``, then killed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if not deaths:
        mp.spawn(fn, args=(world, port, tmp, *args), nprocs=world, join=True)
        return [0] * world
    ctx = mp.spawn(fn, args=(world, port, tmp, *args), nprocs=world, join=False)
    codes = []
    for p in ctx.processes:
        p.join(timeout)
        codes.append(p.exitcode)
        if p.exitcode is None:
            p.kill()
    return codes


def init(rank: int, world: int, port: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(DIM)
        self.up = torch.nn.Linear(DIM, 2 * DIM)
        self.down = torch.nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Tiny(torch.nn.Module):
    """A small transformer-shaped model (embedding, blocks, head) with odd sizes, so that
    FSDP shards are uneven."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def finish() -> None:
    """Leave together, then exit at once: an interpreter's shutdown that destroys gloo and DDP
    threads one by one can abort (SIGABRT, "terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fsdp_model(seed: int = 0):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Tiny()
    for b in model.blocks:
        fully_shard(b)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    """This rank's part of the global batch of ``step`` (the same global batch at any world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, VOCAB, (4, 6), generator=g)
    return data.chunk(world)[rank]


def train(model, opt, steps: range, rank: int, world: int) -> None:
    for step in steps:
        x = batch(step, rank, world)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def full_state(model, opt) -> dict:
    """The whole (unsharded) model and optimizer state, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return _copied({"model": dict(msd), "optimizer": osd})  # step counters are the live tensors


def _copied(state):
    if isinstance(state, dict):
        return {k: _copied(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_copied(v) for v in state)
    return state.detach().clone() if isinstance(state, torch.Tensor) else state


def sharded_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optimizer": osd}


def restore(model, opt, stored: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, opt, model_state_dict=stored["model"], optim_state_dict=stored["optimizer"])


def flat_tensors(state, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a nested state by path (DTensors gathered whole)."""
    out = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(flat_tensors(v, f"{prefix}{k}/"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(flat_tensors(v, f"{prefix}{i}/"))
    elif isinstance(state, torch.Tensor):
        out[prefix[:-1]] = state.full_tensor() if hasattr(state, "full_tensor") else state
    return out


def same(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ in dtype, shape or bits (empty: bit-identical)."""
    fa, fb = flat_tensors(a), flat_tensors(b)
    bad = sorted(set(fa) ^ set(fb))
    for k in set(fa) & set(fb):
        x, y = fa[k], fb[k]
        if (
            x.dtype != y.dtype
            or x.shape != y.shape
            or not torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))
        ):
            bad.append(k)
    return bad


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def dump(tmp: str, name: str, value) -> None:
    with open(os.path.join(tmp, name), "w") as f:
        json.dump(value, f)


# --------------------------------------------------------------------------- scenarios


def fsdp_first(rank: int, world: int, port: int, tmp: str, uri: str) -> None:
    """Train 2 steps at ``world``, save (sharded) with a full reference, train 2 more and
    keep the uninterrupted result."""
    from mlflow_lance import distributed

    init(rank, world, port)
    model, opt = fsdp_model()
    train(model, opt, range(STEPS_BEFORE), rank, world)
    info = distributed.save({**sharded_state(model, opt), "step": STEPS_BEFORE}, uri, message="fsdp")
    reference = full_state(model, opt)
    train(model, opt, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), rank, world)
    final = full_state(model, opt)
    if rank == 0:
        torch.save(reference, os.path.join(tmp, "reference.pt"))
        torch.save(final, os.path.join(tmp, "final.pt"))
        dump(tmp, "first.json", {"version": info.version, "bytes_written": info.bytes_written})
    finish()


def fsdp_reshard(rank: int, world: int, port: int, tmp: str, uri: str, version: int, resave: bool) -> None:
    """Load ``version`` at ``world`` into a fresh model (resharding); check it against the
    reference; optionally save it again at this world size and reload that; then go on
    training and check against the uninterrupted run."""
    from mlflow_lance import distributed

    init(rank, world, port)
    reference = torch.load(os.path.join(tmp, "reference.pt"), weights_only=True)
    model, opt = fsdp_model(seed=1)  # other initial weights: everything must come from the version
    train(model, opt, range(1), rank, world)  # the optimizer has state to overwrite
    stored = distributed.load(sharded_state(model, opt), uri, version)
    restore(model, opt, stored)
    result = {"step": stored["step"], "loaded": same(full_state(model, opt), reference)}
    if resave:
        info = distributed.save({**sharded_state(model, opt), "step": stored["step"]}, uri, message=f"at {world}")
        again, again_opt = fsdp_model(seed=2)
        train(again, again_opt, range(1), rank, world)
        restore(again, again_opt, distributed.load(sharded_state(again, again_opt), uri, info.version))
        result.update(resaved=info.version, reloaded=same(full_state(again, again_opt), reference))
        result["unchanged_bytes_written"] = distributed.save(
            {**sharded_state(model, opt), "step": stored["step"]}, uri
        ).bytes_written
    else:
        train(model, opt, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), rank, world)
        final = torch.load(os.path.join(tmp, "final.pt"), weights_only=True)
        result["resumed"] = same(full_state(model, opt), final)
    if rank == 0:
        dump(tmp, f"reshard{world}.json", result)
    finish()


def ddp_and_tp(rank: int, world: int, port: int, tmp: str, ddp_uri: str, tp_uri: str) -> None:
    """DDP: replicated tensors written once. TP: column- and row-wise sharded Linear layers."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    from mlflow_lance import distributed

    init(rank, world, port)
    torch.manual_seed(0)
    plain = Tiny()
    ddp = DistributedDataParallel(plain)
    first = distributed.save(get_model_state_dict(ddp), ddp_uri)
    plain.head.weight.data.add_(1.0)  # a fine-tuned head: only it is written again
    second = distributed.save(get_model_state_dict(ddp), ddp_uri)

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    tp = Tiny()
    for b in tp.blocks:
        parallelize_module(b, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    tp_info = distributed.save(get_model_state_dict(tp), tp_uri)
    lonely = distributed.save({"only": torch.ones(3)}, os.path.join(tmp, "one.lance"))  # rank 1 writes nothing
    torch.manual_seed(5)
    fresh = Tiny()
    for b in fresh.blocks:
        parallelize_module(b, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    distributed.load(get_model_state_dict(fresh), tp_uri, tp_info.version)
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in plain.state_dict().items()}, os.path.join(tmp, "ddp.pt"))
        torch.save(flat_tensors(get_model_state_dict(tp)), os.path.join(tmp, "tp.pt"))
        dump(
            tmp,
            "ddp_tp.json",
            {
                "first_written": first.bytes_written,
                "second_written": second.bytes_written,
                "second_changed": list(second.changed),
                "tp_reloaded": same(get_model_state_dict(fresh), get_model_state_dict(tp)),
                "tp_version": tp_info.version,
                "lonely_version": lonely.version,
            },
        )
    else:
        flat_tensors(get_model_state_dict(tp))  # full_tensor is collective
        same(get_model_state_dict(fresh), get_model_state_dict(tp))
    finish()


def killed(rank: int, world: int, port: int, tmp: str, uri: str, victim: int, point: str) -> None:
    """Rank ``victim`` is SIGKILLed at ``point`` of a save; the others must fail, not commit."""
    from mlflow_lance import distributed, writer

    init(rank, world, port)
    model, opt = fsdp_model(seed=3)
    train(model, opt, range(1), rank, world)
    if rank == victim:
        original = getattr(writer, point) if hasattr(writer, point) else getattr(distributed, point)

        def die(*args, **kwargs):
            if point == "write_units":
                original(*args, **kwargs)  # its data files are down: orphans for gc
            os.kill(os.getpid(), signal.SIGKILL)

        setattr(writer if hasattr(writer, point) else distributed, point, die)
    try:
        distributed.save(sharded_state(model, opt), uri)
        outcome = "committed"
    except Exception as err:  # noqa: BLE001 (the test checks which)
        outcome = f"{type(err).__name__}: {err}"[:500]
    dump(tmp, f"killed{rank}.json", {"outcome": outcome})
    os._exit(0)  # the process group is broken: do not wait for the dead peer at exit


def mlflow_checkpoints(rank: int, world: int, port: int, tmp: str, tracking_uri: str) -> None:
    """Every rank calls the everyday API with an FSDP2 model: log_checkpoint (blocking, then in
    the background with retention), log_model into a registered model, and load_checkpoint
    into a fresh model and optimizer, then training goes on bit-identically."""
    import mlflow

    import mlflow_lance as ml

    init(rank, world, port)
    mlflow.set_tracking_uri(tracking_uri)
    if rank == 0:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("dist", artifact_location=f"{tmp}/artifacts"))
    model, opt = fsdp_model()
    train(model, opt, range(STEPS_BEFORE), rank, world)
    where = f"file://{tmp}/ckpt.lance"  # rank 0 resolves it (to a path) for every rank
    first = ml.log_checkpoint(model, opt, step=STEPS_BEFORE, metrics={"loss": 2.0}, lance_uri=where)
    train(model, opt, range(STEPS_BEFORE, STEPS_BEFORE + 1), rank, world)
    handle = ml.log_checkpoint(
        model, opt, step=STEPS_BEFORE + 1, metrics={"loss": 1.0}, blocking=False, keep_last=1, lance_uri=where
    )
    reference = full_state(model, opt)  # staged already: training goes on while it writes
    train(model, opt, range(STEPS_BEFORE + 1, STEPS_BEFORE + 2), rank, world)
    second = handle.result()
    after = full_state(model, opt)
    info = ml.log_model(model, name="final", registered_model_name="dist-model")
    try:  # fails on rank 0 alone, after every rank wrote its shards: every rank raises, none hangs
        ml.log_model(model, name="broken", code_paths=[f"{tmp}/no-such-code"])
        broken = "logged"
    except Exception as err:  # noqa: BLE001 (the test checks which)
        broken = type(err).__name__ + (": rank 0" if "rank 0" in str(err) else "")
    ddp = torch.nn.parallel.DistributedDataParallel(Tiny())  # rank 0's initial weights on every rank
    ddp_info = ml.log_model(ddp, name="ddp")
    torch.manual_seed(123)
    fresh, fresh_opt = fsdp_model(seed=7)  # nothing trained: the optimizer has no state yet
    restored = ml.load_checkpoint(second.model_uri, fresh, fresh_opt)
    loaded = same(full_state(fresh, fresh_opt), reference)  # the state as staged, not as trained since
    train(fresh, fresh_opt, range(STEPS_BEFORE + 1, STEPS_BEFORE + 2), rank, world)
    caught_up = same(full_state(fresh, fresh_opt), after)
    train(model, opt, range(STEPS_BEFORE + 2, STEPS_BEFORE + 4), rank, world)
    train(fresh, fresh_opt, range(STEPS_BEFORE + 2, STEPS_BEFORE + 4), rank, world)
    result = {
        "first": [first.model_id, first.run_id, first.lance_version],
        "second": [second.model_id, second.run_id, second.lance_version, list(second.deleted), second.model_uri],
        "model": [info.model_id, info.model_uri, info.registered_model_version],
        "ddp": ddp_info.model_uri,
        "broken": broken,
        "restored_step": restored["step"],
        "loaded": loaded,
        "caught_up": caught_up,
        "resumed": same(full_state(fresh, fresh_opt), full_state(model, opt)),
    }
    dump(tmp, f"mlflow{rank}.json", result)
    if rank == 0:
        torch.save(reference, os.path.join(tmp, "reference.pt"))
        torch.save(after, os.path.join(tmp, "after.pt"))
        torch.save(dict(ddp.module.state_dict()), os.path.join(tmp, "ddp.pt"))
    finish()


def on_s3(rank: int, world: int, port: int, tmp: str, uri: str, opts: dict) -> None:
    """FSDP2 saved twice to a dataset on S3 (each rank PUTs its own files), then loaded back
    resharded on every rank."""
    from mlflow_lance import distributed

    init(rank, world, port)
    model, opt = fsdp_model()
    train(model, opt, range(1), rank, world)
    first = distributed.save(sharded_state(model, opt), uri, storage_options=opts)
    train(model, opt, range(1, 2), rank, world)
    second = distributed.save(sharded_state(model, opt), uri, storage_options=opts)
    again, again_opt = fsdp_model(seed=4)
    train(again, again_opt, range(1), rank, world)
    restore(again, again_opt, distributed.load(sharded_state(again, again_opt), uri, storage_options=opts))
    whole = full_state(model, opt)  # collective: on every rank
    result = {"versions": [first.version, second.version], "loaded": same(full_state(again, again_opt), whole)}
    dump(tmp, f"s3_{rank}.json", result)
    if rank == 0:
        torch.save(whole, os.path.join(tmp, "s3.pt"))
    finish()


def frozen(rank: int, world: int, port: int, tmp: str, uri: str) -> None:
    """FSDP2 with the embedding and the first block frozen: the second checkpoint writes only
    the trained shards and their optimizer state, on every rank."""
    from torch.distributed.fsdp import fully_shard

    from mlflow_lance import distributed

    init(rank, world, port)
    torch.manual_seed(0)
    model = Tiny()
    for p in [*model.emb.parameters(), *model.blocks[0].parameters()]:
        p.requires_grad_(False)
    for b in model.blocks:
        fully_shard(b)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, opt, range(1), rank, world)
    first = distributed.save(sharded_state(model, opt), uri)
    train(model, opt, range(1, 2), rank, world)
    second = distributed.save(sharded_state(model, opt), uri)
    if rank == 0:
        dump(
            tmp,
            "frozen.json",
            {"first": first.bytes_written, "second": second.bytes_written, "changed": list(second.changed)},
        )
    finish()


# --------------------------------------------------------------------------- standing ranks


def lifecycle_ranks(rank: int, world: int, port: int, tmp: str, commands: list, results) -> None:
    """Ranks that stay up for tests/test_lifecycle_model.py. Each command is ``(states,
    keep_last, blocking)``: the ranks log one checkpoint per state (name -> numpy array, the
    whole weights of ``torch.nn.Sequential(Linear(8, 6), ReLU(), Linear(6, 2))``) of an FSDP2
    model to a new run, and each answers ``(rank, [(model id, run id, dataset, version,
    deleted ids), ...])``, or ``(rank, error text)``. ``None`` stops them."""
    import mlflow
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from mlflow_lance import checkpoint

    init(rank, world, port)
    while (command := commands[rank].get()) is not None:
        states, keep_last, blocking = command
        try:
            net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
            fully_shard(net)
            out = []
            for step, state in enumerate(states):
                whole = {k: torch.from_numpy(v) for k, v in state.items()}
                set_model_state_dict(net, whole, options=StateDictOptions(full_state_dict=True))
                got = checkpoint.log_checkpoint(net, step=step, keep_last=keep_last, blocking=blocking)
                got = got if blocking else got.result()
                out.append((got.model_id, got.run_id, got.lance_uri, got.lance_version, list(got.deleted)))
            if rank == 0:
                mlflow.end_run()
            results.put((rank, out))
        except Exception as err:  # noqa: BLE001 (the test raises it)
            results.put((rank, f"{type(err).__name__}: {err}"))
    finish()


def two_d(rank: int, world: int, port: int, tmp: str, uri: str) -> None:
    """FSDP2 over tensor parallelism on a 2 x 2 mesh (``_StridedShard`` placements): the model
    and AdamW state saved, then loaded into a fresh 2-D model and a fresh FSDP-only one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from mlflow_lance import distributed

    init(rank, world, port)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))

    def model(seed: int, tp: bool):
        torch.manual_seed(seed)
        net = Tiny()
        for b in net.blocks:
            if tp:
                parallelize_module(b, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
            fully_shard(b, mesh=mesh["dp"] if tp else None)
        if tp:  # VOCAB (odd) rows: uneven strided shards
            parallelize_module(net, mesh["tp"], {"head": ColwiseParallel(output_layouts=Replicate())})
        fully_shard(net, mesh=mesh["dp"] if tp else None)
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2)

    net, opt = model(0, tp=True)
    train(net, opt, range(STEPS_BEFORE), mesh["dp"].get_local_rank(), 2)
    placements = sorted({str(t.placements) for t in sharded_state(net, opt)["model"].values()})
    head = sharded_state(net, opt)["model"]["head.weight"]
    uneven = "_StridedShard" in str(head.placements) and head.shape[0] % world != 0
    info = distributed.save(sharded_state(net, opt), uri)
    expected = full_state(net, opt)
    results = {"placements": placements, "version": info.version, "uneven": uneven}
    for label, tp in (("2d", True), ("fsdp", False)):
        fresh, fresh_opt = model(7, tp=tp)
        train(fresh, fresh_opt, range(1), mesh["dp"].get_local_rank(), 2)  # optimizer state to fill
        state = sharded_state(fresh, fresh_opt)
        restore(fresh, fresh_opt, distributed.load(state, uri, info.version))
        results[label] = same(full_state(fresh, fresh_opt), expected)
    try:  # rank 1 alone asks for a version that does not exist: every rank raises, none hangs
        distributed.load(sharded_state(net, opt), uri, info.version + (rank == 1) * 100)
        results["one_failed"] = "loaded"
    except Exception as err:  # noqa: BLE001 (the test checks which)
        results["one_failed"] = f"{type(err).__name__}: {err}"
    if rank == 0:
        torch.save(flat_tensors(expected), os.path.join(tmp, "two_d.pt"))
        dump(tmp, "two_d.json", results)
    finish()


def compressed_ranks(rank: int, world: int, port: int, tmp: str, tracking_uri: str) -> None:
    """Every rank of an FSDP2 job passes compression=: log_checkpoint (blocking and in the
    background) and log_model write their shards with it; another value for the same dataset
    raises on every rank."""
    import mlflow

    import mlflow_lance as ml

    init(rank, world, port)
    mlflow.set_tracking_uri(tracking_uri)
    if rank == 0:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("zdist", artifact_location=f"{tmp}/artifacts"))
    model, opt = fsdp_model()
    train(model, opt, range(STEPS_BEFORE), rank, world)
    where = f"{tmp}/ckpt.lance"
    first = ml.log_checkpoint(model, opt, step=STEPS_BEFORE, lance_uri=where, compression="zstd")
    train(model, opt, range(STEPS_BEFORE, STEPS_BEFORE + 1), rank, world)
    handle = ml.log_checkpoint(model, opt, step=STEPS_BEFORE + 1, blocking=False, lance_uri=where, compression="zstd")
    second = handle.result()
    reference = full_state(model, opt)
    try:
        ml.log_checkpoint(model, opt, step=STEPS_BEFORE + 2, lance_uri=where, compression="none")
        refused = "logged"
    except ValueError as err:
        refused = str(err)
    info = ml.log_model(model, name="final", lance_uri=f"{tmp}/model.lance", compression="auto")
    result = {"versions": [first.lance_version, second.lance_version], "refused": refused, "model": info.model_uri}
    dump(tmp, f"z{rank}.json", result)
    if rank == 0:
        torch.save(reference, os.path.join(tmp, "zreference.pt"))
    finish()
