"""Training checkpoints against their peers, like with like, in one run: GPT-2 (from a config) + AdamW.

Run:  python benchmarks/bench_checkpoint.py [--layers 6] [--repeat 3] [--settle 4]
                                             [--json benchmarks/results/checkpoint.json]

Training time blocked per checkpoint, medians of --repeat rounds after one untimed warm-up round.
Every contender runs once per round, after a training step (so each checkpoint holds new weights
and optimizer state), in an order that rotates from round to round:

1. **durable** (on the disk when the call returns): ``log_checkpoint(blocking=True)``;
   ``save_state_dict`` of the same state (the store alone, no MLflow); ``torch.save`` + fsync of
   its file and directory; ``torch.distributed.checkpoint.save`` with its default
   ``FileSystemWriter`` (``sync_files=True``: it fsyncs its data and metadata files, not the
   directory); the floor: the same tensor bytes written to a new file + fsync of it and its directory.
2. **not durable**: the same five with syncing off (MLFLOW_LANCE_FSYNC=0, ``sync_files=False``,
   no fsync, ``FileSystemWriter(sync_files=False)``, no fsync).
3. **asynchronous** (durable): ``log_checkpoint(blocking=False)`` and ``dcp.async_save``, each
   waited for before the next checkpoint as a trainer would, beside a plain ``clone()`` of the
   state (the staging floor); the time until written is reported too.

Then the bytes that 10 checkpoints of a model with a frozen backbone take: one Lance dataset for
the run against 10 full ``torch.save`` files and 10 DCP directories.

Each contender writes every checkpoint to a new place and keeps only its latest: untimed, the
peers delete the one before and the Lance datasets drop their older versions (``mlflow_lance.gc``).
Before each timed call, ``os.sync()`` and a pause of --settle seconds: no contender inherits another's
dirty pages, nor memory another freed a moment before (this VM's balloon reports freed pages to the
host; in one test a 1 GB staging copy took 0.2 s right after another freed 1 GB and 0.8-1.0 s after
a 4 s pause, though not steadily so; without the pause, the contender that came before decided).
DCP runs in this one process without a process group (``dcp.save`` then saves as a single
process). MLflow is embedded (SQLite in the temp dir): ``log_checkpoint`` also logs a model per
checkpoint, which ``save_state_dict`` does not, so their difference is what the MLflow side costs.

This 2-core VM is shared and noisy: compare the ratios of one run and the raw-write floor beside
them, not seconds across runs. The goals are given as the ratio of the medians and as the median
of the per-round ratios (a round's contenders run within about 90 s of each other). Everything is
written under one temp dir, removed at exit; the figures, the machine and its load go to --json.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch

FSYNC_ENV = "MLFLOW_LANCE_FSYNC"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "benchmarks" / "results" / "checkpoint.json"


# --------------------------------------------------------------------------- model and files


def gpt2(layers: int) -> torch.nn.Module:
    """GPT-2 small's shapes with ``layers`` blocks, random weights (no download)."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config(n_layer=layers)).train()


def train_step(model: torch.nn.Module, head: torch.nn.Module | None, opt: torch.optim.Optimizer) -> None:
    """One optimizer step on random tokens: AdamW then changes every trained tensor."""
    ids = torch.randint(0, 50257, (1, 16))
    out = model(input_ids=ids).last_hidden_state
    loss = (head(out) if head is not None else out).float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def tensors_of(tree: Any) -> list[torch.Tensor]:
    """Every tensor in a tree of dicts, lists and tuples, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors_of(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors_of(v)]
    return []


def du(path: str) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def fsync(path: str) -> None:
    """Flush a file's bytes, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str) -> None:
    """Delete a file or a directory tree."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


@contextlib.contextmanager
def lance_fsync(durable: bool) -> Iterator[None]:
    """mlflow-lance's fsync switch (MLFLOW_LANCE_FSYNC) set for the duration of a call."""
    before = os.environ.get(FSYNC_ENV)
    os.environ[FSYNC_ENV] = "1" if durable else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[FSYNC_ENV]
        else:
            os.environ[FSYNC_ENV] = before


# --------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    """One way to take a checkpoint: ``run`` takes one and returns (seconds blocked, seconds until
    written); the samples of the timed rounds collect in ``blocked`` and ``written``."""

    key: str
    table: str  # "durable", "volatile" or "async"
    label: str
    run: Callable[[], tuple[float, float]]
    blocked: list[float] = field(default_factory=list)
    written: list[float] = field(default_factory=list)


class Checkpointers:
    """The contenders' checkpoint calls on one model and optimizer. Each writes to a new place
    under ``work`` and keeps only its latest checkpoint (what is older goes untimed)."""

    def __init__(self, work: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        import mlflow_lance

        self.ml = mlflow_lance
        self.work, self.model, self.opt = work, model, opt
        self.step = 0
        self.latest: dict[str, str] = {}  # peer -> its latest checkpoint's path
        self.logged: list[str] = []  # the run's checkpoint model ids, oldest first
        self.state_uri = f"{work}/state.lance"

    def state(self) -> dict[str, Any]:
        """What torch.save and DCP checkpoint: the model's and the optimizer's state dicts."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def _new_path(self, key: str) -> str:
        folder = f"{self.work}/{key}"
        os.makedirs(folder, exist_ok=True)
        return f"{folder}/{self.step}"

    def _keep_only(self, key: str, path: str) -> None:
        if key in self.latest:
            remove(self.latest[key])
        self.latest[key] = path

    def log_checkpoint(self, durable: bool, blocking: bool = True) -> tuple[float, float]:
        """``log_checkpoint`` to the active run; the run's older checkpoints are deleted and
        gc'ed afterwards, untimed."""
        with lance_fsync(durable):
            t0 = time.perf_counter()
            result = self.ml.log_checkpoint(self.model, self.opt, step=self.step, blocking=blocking)
            blocked = time.perf_counter() - t0
            ckpt = result if blocking else result.result()
            written = time.perf_counter() - t0
        from mlflow import MlflowClient

        client = MlflowClient()
        for model_id in self.logged:
            client.delete_logged_model(model_id)
        self.logged = [ckpt.model_id]
        self.ml.gc(ckpt.lance_uri, grace=timedelta(0))
        return blocked, written

    def save_state_dict(self, durable: bool) -> tuple[float, float]:
        """The store alone: a version of a dataset of its own, no MLflow."""
        t0 = time.perf_counter()
        self.ml.save_state_dict(self.state(), self.state_uri, sync_files=durable)
        seconds = time.perf_counter() - t0
        self.ml.gc(self.state_uri, keep_last=1, grace=timedelta(0))
        return seconds, seconds

    def torch_save(self, durable: bool) -> tuple[float, float]:
        key = "torch.save+fsync" if durable else "torch.save"
        path = self._new_path(key) + ".pt"
        t0 = time.perf_counter()
        torch.save(self.state(), path)
        if durable:
            fsync(path)
            fsync(os.path.dirname(path))
        seconds = time.perf_counter() - t0
        self._keep_only(key, path)
        return seconds, seconds

    def dcp_save(self, durable: bool) -> tuple[float, float]:
        from torch.distributed.checkpoint import FileSystemWriter, save

        key = "dcp.save" if durable else "dcp.save-nosync"
        path = self._new_path(key)
        t0 = time.perf_counter()
        save(self.state(), storage_writer=FileSystemWriter(path, sync_files=durable))
        seconds = time.perf_counter() - t0
        self._keep_only(key, path)
        return seconds, seconds

    def dcp_async_save(self) -> tuple[float, float]:
        """``dcp.async_save`` with its defaults (a ``FileSystemWriter`` for the path, which fsyncs)."""
        from torch.distributed.checkpoint import async_save

        path = self._new_path("dcp.async_save")
        t0 = time.perf_counter()
        future = async_save(self.state(), checkpoint_id=path)
        blocked = time.perf_counter() - t0
        future.result()
        written = time.perf_counter() - t0
        self._keep_only("dcp.async_save", path)
        return blocked, written

    def raw_write(self, durable: bool) -> tuple[float, float]:
        """The floor: the state's tensor bytes written to a new file (+ fsync of it and its directory)."""
        key = "raw+fsync" if durable else "raw"
        path = self._new_path(key) + ".bin"
        views = [t.detach().reshape(-1).view(torch.uint8).numpy() for t in tensors_of(self.state())]
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.writelines(view.data for view in views)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if durable:
            fsync(os.path.dirname(path))
        seconds = time.perf_counter() - t0
        self._keep_only(key, path)
        return seconds, seconds

    def clone(self) -> tuple[float, float]:
        """The staging floor: a ``clone()`` of every tensor of the state."""
        t0 = time.perf_counter()
        copies = [t.clone() for t in tensors_of(self.state())]
        seconds = time.perf_counter() - t0
        del copies
        return seconds, seconds


def contenders(c: Checkpointers) -> list[Contender]:
    """Every contender of the three tables, in table order."""
    return [
        Contender("log_checkpoint", "durable", "`log_checkpoint(blocking=True)`", lambda: c.log_checkpoint(True)),
        Contender(
            "save_state_dict",
            "durable",
            "`save_state_dict` of the same state (no MLflow)",
            lambda: c.save_state_dict(True),
        ),
        Contender("torch.save", "durable", "`torch.save` + fsync (file and directory)", lambda: c.torch_save(True)),
        Contender(
            "dcp.save",
            "durable",
            "`dcp.save` (default `FileSystemWriter`, `sync_files=True`)",
            lambda: c.dcp_save(True),
        ),
        Contender(
            "raw",
            "durable",
            "floor: the tensor bytes to a new file + fsync (file and directory)",
            lambda: c.raw_write(True),
        ),
        Contender(
            "log_checkpoint",
            "volatile",
            "`log_checkpoint(blocking=True)`, MLFLOW_LANCE_FSYNC=0",
            lambda: c.log_checkpoint(False),
        ),
        Contender(
            "save_state_dict",
            "volatile",
            "`save_state_dict(sync_files=False)` of the same state (no MLflow)",
            lambda: c.save_state_dict(False),
        ),
        Contender("torch.save", "volatile", "`torch.save`", lambda: c.torch_save(False)),
        Contender(
            "dcp.save",
            "volatile",
            "`dcp.save`, `FileSystemWriter(sync_files=False)`",
            lambda: c.dcp_save(False),
        ),
        Contender("raw", "volatile", "floor: the tensor bytes to a new file", lambda: c.raw_write(False)),
        Contender(
            "log_checkpoint",
            "async",
            "`log_checkpoint(blocking=False)`",
            lambda: c.log_checkpoint(True, blocking=False),
        ),
        Contender("dcp.async_save", "async", "`dcp.async_save` (default writer, fsyncs)", c.dcp_async_save),
        Contender("clone", "async", "floor: `clone()` of the state (the staging copy)", c.clone),
    ]


# --------------------------------------------------------------------------- the run


def timed_rounds(c: Checkpointers, repeat: int, settle: float) -> tuple[list[Contender], list[list[float]]]:
    """One untimed warm-up round (the run's first, full checkpoint among it), then ``repeat``
    timed rounds; the order rotates so that no contender always follows the same one, and each
    timed call comes after a training step, ``os.sync()`` and ``settle`` seconds.
    Returns the contenders with their samples and the load average before each timed round."""
    all_ = contenders(c)
    loads: list[list[float]] = []
    for r in range(-1, repeat):
        shift = (r * len(all_)) // repeat if r >= 0 else 0
        if r >= 0:
            loads.append([round(x, 2) for x in os.getloadavg()])
        for one in all_[shift:] + all_[:shift]:
            train_step(c.model, None, c.opt)
            c.step += 1
            os.sync()
            time.sleep(settle)
            blocked, written = one.run()
            if r >= 0:
                one.blocked.append(blocked)
                one.written.append(written)
        print(f"round {r + 1}/{repeat}{' (warm-up)' if r < 0 else ''} done", file=sys.stderr, flush=True)
    return all_, loads


def frozen_backbone_bytes(layers: int, work: str) -> dict[str, Any]:
    """Bytes for 10 checkpoints of a frozen GPT-2 backbone with a trained head (~10 % of the
    parameters) and AdamW: one Lance dataset for the run, against the sum of 10 ``torch.save``
    files (Lightning's checkpoint layout) and of 10 DCP directories, each written then measured."""
    import mlflow
    from torch.distributed.checkpoint import save

    import mlflow_lance as ml

    backbone = gpt2(layers)
    for p in backbone.parameters():
        p.requires_grad_(False)
    n_backbone = sum(p.numel() for p in backbone.parameters())
    head = torch.nn.Linear(768, max(8, n_backbone // 9 // 768))
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    file_bytes = dcp_bytes = 0
    with mlflow.start_run():
        for step in range(10):
            train_step(backbone, head, opt)
            ckpt = ml.log_checkpoint(model, opt, step=step)
            path = f"{work}/frozen-{step}.ckpt"
            torch.save({"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}, path)
            file_bytes += os.path.getsize(path)
            os.remove(path)
            folder = f"{work}/frozen-{step}"
            save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=folder)
            dcp_bytes += du(folder)
            shutil.rmtree(folder)
    n_head = sum(p.numel() for p in head.parameters())
    first_file = file_bytes // 10
    return {
        "parameters": n_backbone + n_head,
        "frozen_fraction": n_backbone / (n_backbone + n_head),
        "mlflow_lance": du(ckpt.lance_uri),
        "torch_save_10_files": file_bytes,
        "dcp_10_directories": dcp_bytes,
        "floor": first_file + 9 * 3 * n_head * 4,  # the backbone once, then the head and its two moments
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_bytes": mem_kb * 1024,
        "python": platform.python_version(),
    }


def versions() -> dict[str, Any]:
    """The packages measured and the commit of this checkout (``mlflow_lance_dirty``: mlflow_lance/
    had uncommitted changes when it ran)."""
    import lance
    import mlflow
    import transformers

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    return {
        "torch": torch.__version__,
        "pylance": lance.__version__,
        "mlflow": mlflow.__version__,
        "transformers": transformers.__version__,
        "commit": git("rev-parse", "HEAD"),
        "mlflow_lance_dirty": bool(git("status", "--porcelain", "--", "mlflow_lance")),
    }


# --------------------------------------------------------------------------- report


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report(done: list[Contender], frozen: dict[str, Any], state_bytes: int, args: argparse.Namespace) -> dict:
    """Print the tables and return the figures, ratios and goals for the JSON."""
    med = {(c.table, c.key): statistics.median(c.blocked) for c in done}
    written = {(c.table, c.key): statistics.median(c.written) for c in done}
    print(
        f"\nGPT-2 ({args.layers} layers) + AdamW: {state_bytes / 1e9:.2f} GB of model + optimizer state; "
        f"training time blocked per checkpoint, medians of {args.repeat}\n"
    )
    for name, title in (("durable", "durable (on the disk when it returns)"), ("volatile", "not durable")):
        ts, dc, raw = med[(name, "torch.save")], med[(name, "dcp.save")], med[(name, "raw")]
        rows = [
            [
                c.label,
                f"{med[(name, c.key)]:.3f}",
                f"{med[(name, c.key)] / ts:.2f}x",
                f"{med[(name, c.key)] / dc:.2f}x",
                f"{med[(name, c.key)] / raw:.2f}x",
            ]
            for c in done
            if c.table == name
        ]
        print(table([title, "seconds", "vs torch.save", "vs dcp.save", "vs raw write"], rows) + "\n")
    da, clone = med[("async", "dcp.async_save")], med[("async", "clone")]
    rows = [
        [
            c.label,
            f"{med[('async', c.key)]:.3f}",
            f"{med[('async', c.key)] / da:.2f}x",
            f"{med[('async', c.key)] / clone:.2f}x",
            f"{written[('async', c.key)]:.3f}",
        ]
        for c in done
        if c.table == "async"
    ]
    header = [
        "asynchronous, durable",
        "seconds blocked",
        "vs dcp.async_save",
        "vs clone",
        "seconds until written",
    ]
    print(table(header, rows) + "\n")
    samples = {(c.table, c.key): c.blocked for c in done}

    def seconds_entry(c: Contender) -> dict[str, Any]:
        entry = {"label": c.label, "median": med[(c.table, c.key)], "samples": c.blocked}
        if c.table == "async":
            entry |= {"until_written_median": written[(c.table, c.key)], "until_written_samples": c.written}
        return entry

    mlflow_part = {}
    for name in ("durable", "volatile"):
        pairs = zip(samples[(name, "log_checkpoint")], samples[(name, "save_state_dict")], strict=True)
        mlflow_part[name] = statistics.median(a - b for a, b in pairs)
    print(
        f"MLflow's part of a blocking `log_checkpoint` (a logged model per checkpoint in embedded SQLite, "
        f"and the checkpoint's own tree): log_checkpoint - save_state_dict, median of the per-round "
        f"differences = {mlflow_part['durable']:+.3f} s durable, {mlflow_part['volatile']:+.3f} s not "
        f"durable\n"
    )

    goals = []
    for text, a, b, target in (
        (
            "durable `log_checkpoint(blocking=True)` <= 1.0x `torch.save` + fsync",
            ("durable", "log_checkpoint"),
            ("durable", "torch.save"),
            1.0,
        ),
        (
            "durable `log_checkpoint(blocking=True)` <= 1.0x `dcp.save`",
            ("durable", "log_checkpoint"),
            ("durable", "dcp.save"),
            1.0,
        ),
        (
            "`log_checkpoint(blocking=False)` blocked <= 1.2x `dcp.async_save`",
            ("async", "log_checkpoint"),
            ("async", "dcp.async_save"),
            1.2,
        ),
    ):
        ratio = med[a] / med[b]
        per_round = [x / y for x, y in zip(samples[a], samples[b], strict=True)]
        paired = statistics.median(per_round)
        verdict = "met" if max(ratio, paired) <= target else "missed" if min(ratio, paired) > target else "on the line"
        goals.append(
            {
                "goal": text,
                "target": target,
                "ratio_of_medians": ratio,
                "median_per_round_ratio": paired,
                "per_round_ratios": per_round,
                "verdict": verdict,
            }
        )
    print(
        table(
            ["goal", "ratio of medians", "median of per-round ratios", ""],
            [
                [
                    g["goal"],
                    f"{g['ratio_of_medians']:.2f}x",
                    f"{g['median_per_round_ratio']:.2f}x",
                    g["verdict"] if g["verdict"] == "met" else f"**{g['verdict']}**",
                ]
                for g in goals
            ],
        )
    )

    files, dirs, lance_b, floor = (
        frozen["torch_save_10_files"],
        frozen["dcp_10_directories"],
        frozen["mlflow_lance"],
        frozen["floor"],
    )
    print(
        f"\n10 checkpoints, backbone frozen ({frozen['frozen_fraction']:.0%} of "
        f"{frozen['parameters'] / 1e6:.0f}M parameters), head + AdamW trained:\n"
    )
    print(
        table(
            ["", "bytes", "vs 10 files", "target"],
            [
                [
                    "mlflow_lance (one Lance dataset for the run)",
                    f"{lance_b:,}",
                    f"{lance_b / files:.2f}x",
                    "<= 0.4x",
                ],
                [
                    "10 full `torch.save` files (what a logger uploading each `.ckpt` stores)",
                    f"{files:,}",
                    "1.00x",
                    "",
                ],
                ["10 DCP directories (`dcp.save` each)", f"{dirs:,}", f"{dirs / files:.2f}x", ""],
                [
                    "floor: backbone once + 10 x (head + its two AdamW moments)",
                    f"{floor:,}",
                    f"{floor / files:.2f}x",
                    "",
                ],
            ],
        )
    )
    return {
        "seconds": {f"{c.table}/{c.key}": seconds_entry(c) for c in done},
        "mlflow_part_seconds": mlflow_part,
        "goals": goals,
        "bytes_10_checkpoints_frozen_backbone": frozen,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="GPT-2 blocks (6: 0.98 GB with AdamW; 12: 1.49 GB)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--settle", type=float, default=4.0, help="seconds of pause before each timed call")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the run's figures go")
    args = parser.parse_args()
    if args.layers < 1 or args.repeat < 1 or args.settle < 0:
        parser.error("--layers and --repeat must be >= 1, --settle >= 0")
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    work = tempfile.mkdtemp(prefix="bench-ckpt-")
    atexit.register(shutil.rmtree, work, True)  # several GB of checkpoints: never leave them behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill by timeout cleans up too
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    os.environ["MLFLOW_LANCE_ROOT"] = f"{work}/lance"
    os.environ.pop(FSYNC_ENV, None)  # mlflow-lance's default: durable
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # dcp in one process, as meant
    import mlflow

    mlflow.set_experiment(experiment_id=mlflow.create_experiment("bench-checkpoint", f"{work}/artifacts"))
    model = gpt2(args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, None, opt)  # the optimizer has its state from here on
    c = Checkpointers(work, model, opt)
    state_bytes = sum(t.numel() * t.element_size() for t in tensors_of(c.state()))
    with mlflow.start_run():
        done, loads = timed_rounds(c, args.repeat, args.settle)
    frozen = frozen_backbone_bytes(args.layers, work)
    figures = report(done, frozen, state_bytes, args)
    result = {
        "benchmark": "benchmarks/bench_checkpoint.py",
        "date": started.isoformat(timespec="seconds"),
        "seconds_total": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "args": {"layers": args.layers, "repeat": args.repeat, "settle": args.settle},
        "machine": machine(),
        "load_average": {
            "start": [round(x, 2) for x in load_start],
            "rounds": loads,
            "end": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": versions(),
        "state_bytes": state_bytes,
        **figures,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
