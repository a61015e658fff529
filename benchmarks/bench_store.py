"""Store speed, size and memory against torch.save, safetensors and the Lance docs example, like with like.

Run:  python benchmarks/bench_store.py [--repeat 5] [--models gpt2,resnet50,llama] [--settle 4]
                                       [--skip-docs-example] [--small 5000,20000,100000]
                                       [--json benchmarks/results/store.json]

Three state dicts, random values, no download: GPT-2 small (124M parameters, 148 fp32
tensors, from a config), a ResNet-50-shaped one (320 tensors, 102 MB fp32 with BatchNorm
statistics; benchmarks/shapes.py) and a LLaMA-shaped bf16 one (146 tensors, 2.08 GB). Then
``--small``: state dicts of 5,000, 20,000 and 100,000 tensors of 64 float32 values, where the
cost is per tensor, not per byte (durable saves and loads against safetensors, the raw-write
floor beside).

Saves, in two tables that each compare like with like:

- **durable** (on the disk when the call returns): ``save_state_dict`` (durable by default:
  it fsyncs its data files, manifest, commit, version index and their directories),
  safetensors ``save_file`` + fsync of the file and its directory, ``torch.save`` + the same
  fsyncs, and the floor: the state dict's tensor bytes written to a new file + the same fsyncs;
- **not durable**: ``save_state_dict(sync_files=False)``, ``save_file``, ``torch.save`` and the
  floor without any fsync.

All eight run interleaved: one untimed warm-up round, then ``--repeat`` timed rounds, each
contender once per round in an order that rotates from round to round; medians. Every save
writes to a new path, and the output is deleted untimed afterwards (the durable ones' latest
outputs are kept for the loads). Before each timed save, ``os.sync()`` and ``--settle`` seconds
of pause: no contender inherits another's dirty pages or the page cache another freed a moment
before (on this VM a fresh page costs far more than a reused one; see the raw-write floor).

Loads (reads do not fsync) run interleaved with a warm page cache, as before; then versions
of our dataset that change one tensor, and an identical re-save, against our durable first save.
GPT-2 also gets the partial-load, peak-memory and docs-example figures, and on a machine with
CUDA, GPU loads. On a shared machine the figures are noisy: compare the ratios of one run.

Everything is written under one temp dir, removed at exit. The printed tables, the goals, the
machine, its load and the package versions go to ``--json``.
"""

from __future__ import annotations

import argparse
import atexit
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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from docs_example import docs_load_state_dict, docs_save_model  # benchmarks/: the script's own folder
from shapes import llama_state_dict, module_for, resnet50_state_dict, small_tensors_state_dict

import mlflow_lance as ml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

FSYNC_ENV = "MLFLOW_LANCE_FSYNC"
MIB = 1 << 20


# --------------------------------------------------------------------------- report: tables, goals, JSON


def cell(value: Any, unit: str) -> str:
    """A table cell as printed: ``unit`` is "s" (seconds), "x" (a ratio), "B" (bytes), "%" or ""."""
    if value is None:
        return ""
    if unit == "s":
        return f"{value:.4f}" if abs(value) < 0.1 else f"{value:.3f}"
    if unit == "x":
        return f"{value:.3f}x" if abs(value) < 10 else f"{value:.1f}x"
    if unit == "B":
        return f"{value:,}"
    if unit == "%":
        return f"{value:.3g} %"
    return str(value)


@dataclass
class Table:
    """A printed table with raw numbers: ``units`` says how each column prints (see ``cell``)."""

    title: str
    columns: list[str]
    units: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        """The table as printed: its title, then a markdown table."""
        header = ["| " + " | ".join(self.columns) + " |", "|---" * len(self.columns) + "|"]
        lines = [f"**{self.title}**", "", *header]
        lines += ["| " + " | ".join(cell(v, u) for v, u in zip(row, self.units, strict=True)) + " |"
                  for row in self.rows]  # fmt: skip
        return "\n".join(lines)


@dataclass
class Goal:
    """A target from the README's "Performance" section: ``value`` <= ``target`` is met."""

    goal: str
    peer: str  # what the figure is compared with
    value: float
    unit: str
    target: float
    met: bool = field(init=False)

    def __post_init__(self) -> None:
        self.met = self.value <= self.target


class Report:
    """The tables and goals of one run: printed as they come, then written as JSON with the
    date, the machine, its load at the start and the end, the package versions, the
    parameters and the timed samples behind the medians (``samples``: name -> seconds)."""

    def __init__(self, benchmark: str, parameters: dict[str, Any]) -> None:
        self.benchmark, self.parameters = benchmark, parameters
        self.started = datetime.now(timezone.utc)
        self.load_start = os.getloadavg()
        self.tables: list[Table] = []
        self.goals: list[Goal] = []
        self.samples: dict[str, list[float]] = {}

    def table(self, title: str, columns: list[str], units: list[str], rows: list[list[Any]]) -> None:
        """Add a table and print it."""
        self.tables.append(Table(title, columns, units, rows))
        print("\n" + self.tables[-1].markdown(), flush=True)

    def goal(self, goal: str, peer: str, value: float, unit: str, target: float) -> None:
        """Add a goal, evaluated now."""
        self.goals.append(Goal(goal, peer, value, unit, target))

    def figures(self) -> dict[str, Any]:
        """The tables, goals and samples as JSON-ready data (what ``extend`` takes)."""
        return {"tables": [asdict(t) for t in self.tables], "goals": [asdict(g) for g in self.goals],
                "samples": self.samples}  # fmt: skip

    def extend(self, figures: dict[str, Any]) -> None:
        """Add the tables, goals and samples that another process's report printed and returned
        (its ``figures()``)."""
        self.tables += [Table(**t) for t in figures["tables"]]
        for g in figures["goals"]:
            self.goal(g["goal"], g["peer"], g["value"], g["unit"], g["target"])
        self.samples |= figures["samples"]

    def write(self, path: Path) -> None:
        """Print the goals, then write the run's JSON to ``path``."""
        print("\n" + Table("goals", ["goal", "compared with", "this run", "target", ""], ["", "", "", "", ""],
                           [[g.goal, g.peer, cell(g.value, g.unit), cell(g.target, g.unit),
                             "met" if g.met else "**missed**"] for g in self.goals]).markdown())  # fmt: skip
        result = {
            "benchmark": self.benchmark,
            "date": self.started.isoformat(timespec="seconds"),
            "seconds_total": round((datetime.now(timezone.utc) - self.started).total_seconds(), 1),
            "parameters": self.parameters,
            "machine": machine()
            | {
                "loadavg_start": [round(x, 2) for x in self.load_start],
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            },
            "versions": versions(),
            **self.figures(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nfigures written to {path}")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))  # fmt: skip
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "memory_bytes": mem_kb * 1024, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def versions() -> dict[str, Any]:
    """The packages measured, and this checkout's commit (``dirty``: mlflow_lance/ had
    uncommitted changes when it ran)."""
    import lance
    import mlflow
    import safetensors
    import transformers

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    return {"torch": torch.__version__, "pylance": lance.__version__, "mlflow": mlflow.__version__,
            "safetensors": safetensors.__version__, "transformers": transformers.__version__,
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "mlflow_lance"))}  # fmt: skip


def cleaned_up_at_exit(prefix: str) -> Path:
    """A new temp dir, removed when the process exits (a SIGTERM, e.g. from ``timeout``, too)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return work


# --------------------------------------------------------------------------- files


def fsync(path: Path) -> None:
    """Flush a file's bytes, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_raw(tensors: list[torch.Tensor], path: Path) -> None:
    """The floor of any save: the tensors' bytes, one after another, to a new file."""
    with open(path, "wb") as f:
        f.writelines(t.reshape(-1).view(torch.uint8).numpy() for t in tensors)


def remove(path: Path) -> None:
    """Delete a file or a directory tree."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def du(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def rchar() -> int:
    """Bytes this process has read through read syscalls (page cache included)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def settle(seconds: float) -> None:
    """Before a timed write: the dirty pages of whatever came before on the disk, then a pause."""
    os.sync()
    time.sleep(seconds)


# --------------------------------------------------------------------------- the models


def build_model() -> torch.nn.Module:
    """GPT-2 small (124M parameters, 148 tensors) with random weights."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config()).eval()


Built = tuple[dict[str, torch.Tensor], torch.nn.Module]  # a state dict and a module it loads into


def _gpt2() -> Built:
    model = build_model()
    return model.state_dict(), model


def _shaped(build: Callable[[], OrderedDict[str, torch.Tensor]]) -> Callable[[], Built]:
    def make() -> Built:
        sd = build()
        return sd, module_for(sd)

    return make


WORKLOADS = {  # name -> (label, state dict and module builder, the tensor a new version changes)
    "gpt2": ("GPT-2 small, fp32", _gpt2, "h.11.mlp.c_proj.weight"),
    "resnet50": ("ResNet-50-shaped, fp32", _shaped(resnet50_state_dict), "fc.weight"),
    "llama": ("LLaMA-shaped, bf16", _shaped(llama_state_dict), "model.layers.15.mlp.down_proj.weight"),
}


# --------------------------------------------------------------------------- saves


@dataclass
class Save:
    """One way to write the state dict to a new ``path``; the timed samples collect in ``samples``."""

    key: str
    label: str
    write: Callable[[Path], None]
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """The median of the timed samples."""
        return statistics.median(self.samples)


KEPT = ("ml_durable", "st_durable", "pt_durable")  # their latest outputs are what the loads read


def save_contenders(sd: OrderedDict[str, torch.Tensor]) -> list[Save]:
    """The durable four, then the not durable four (see the module's docstring)."""
    from safetensors.torch import save_file

    tensors = list(sd.values())

    def durable(write: Callable[[Path], None]) -> Callable[[Path], None]:
        def write_and_fsync(path: Path) -> None:
            write(path)
            fsync(path)
            fsync(path.parent)

        return write_and_fsync

    def st(path: Path) -> None:
        save_file(sd, path)

    def pt(path: Path) -> None:
        torch.save(sd, path)

    def raw(path: Path) -> None:
        write_raw(tensors, path)

    return [
        Save("ml_durable", "mlflow_lance `save_state_dict` (default: durable)",
             lambda p: ml.save_state_dict(sd, p)),
        Save("st_durable", "safetensors `save_file` + fsync (file and directory)", durable(st)),
        Save("pt_durable", "`torch.save` + fsync (file and directory)", durable(pt)),
        Save("raw_durable", "floor: the tensor bytes to a new file + fsync (file and directory)",
             durable(raw)),
        Save("ml", "mlflow_lance `save_state_dict(sync_files=False)`",
             lambda p: ml.save_state_dict(sd, p, sync_files=False)),
        Save("st", "safetensors `save_file`", st),
        Save("pt", "`torch.save`", pt),
        Save("raw", "floor: the tensor bytes to a new file", raw),
    ]  # fmt: skip


def timed_saves(saves: list[Save], repeat: int, pause: float, tmp: Path) -> dict[str, Path]:
    """An untimed warm-up round, then ``repeat`` timed rounds; the order rotates from round to
    round, each save writes to a new path after ``settle(pause)``, and its output is deleted
    untimed afterwards except the latest of each of KEPT. Returns those latest outputs."""
    latest: dict[str, Path] = {}
    n = 0
    for r in range(-1, repeat):
        shift = (r * len(saves)) // repeat if r >= 0 else 0
        for save in saves[shift:] + saves[:shift]:
            n += 1
            path = tmp / f"{save.key}-{n}"
            settle(pause)
            t0 = time.perf_counter()
            save.write(path)
            seconds = time.perf_counter() - t0
            if r >= 0:
                save.samples.append(seconds)
            if save.key in KEPT:
                if save.key in latest:
                    remove(latest[save.key])
                latest[save.key] = path
            else:
                remove(path)
        what = f"round {r + 1}/{repeat}" if r >= 0 else "the warm-up round"
        print(f"  {what} of saves done", file=sys.stderr, flush=True)
    return latest


# --------------------------------------------------------------------------- loads, versions, extras


def interleaved(contenders: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median seconds of each contender, run in rounds (each contender once per round)."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def workload(sd: OrderedDict[str, torch.Tensor], module: torch.nn.Module, key: str, repeat: int, pause: float,
             tmp: Path, versions: int = 10) -> dict[str, Any]:  # fmt: skip
    """Saves by every contender, loads of what they last wrote, then ``versions`` saves of our
    dataset that change ``key`` and ``repeat`` identical re-saves (durable, as by default)."""
    from safetensors.torch import load_file

    raw_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    saves = save_contenders(sd)
    latest = timed_saves(saves, repeat, pause, tmp)
    uri, st, pt = latest["ml_durable"], latest["st_durable"], latest["pt_durable"]
    r: dict[str, Any] = {"saves": saves, "uri": uri, "st": st}
    r |= interleaved({
        "torch_load_into": lambda: module.load_state_dict(torch.load(pt, weights_only=True, mmap=True)),
        "st_load": lambda: load_file(st),
        "st_load_into": lambda: module.load_state_dict(load_file(st)),
        "ml_load_state_dict": lambda: ml.load_state_dict(uri),
        "ml_load_into": lambda: ml.load_into(module, uri),
        "ml_load_into_verify": lambda: ml.load_into(module, uri, verify=True),
    }, repeat)  # fmt: skip
    r |= {"raw_bytes": raw_bytes, "first_bytes": du(uri), "files": len(list((uri / "data").iterdir()))}

    def timed_save(expected: tuple[str, ...]) -> tuple[float, int]:
        """Seconds of one save of ``sd`` into our dataset, and the bytes it added."""
        before = du(uri)
        settle(pause)
        t0 = time.perf_counter()
        info = ml.save_state_dict(sd, uri)
        seconds = time.perf_counter() - t0
        assert info.changed == expected, info.changed
        return seconds, du(uri) - before

    changed = []
    for _ in range(versions):
        sd[key] = sd[key] + 1
        changed.append(timed_save((key,)))
    identical = [timed_save(()) for _ in range(repeat)]
    r |= {
        "ml_version_1_changed": statistics.median(s for s, _ in changed),
        "growth": int(statistics.median(g for _, g in changed)),
        "ml_identical_save": statistics.median(s for s, _ in identical),
        "identical_growth": int(statistics.median(g for _, g in identical)),
        "changed_bytes": sd[key].numel() * sd[key].element_size(),
        "total_after": du(uri),
        "versions": versions,
        "tensors": len(sd),
    }
    return r


SMALL_KEYS = ("ml_durable", "st_durable", "raw_durable")  # the durable saves the small-tensor rows compare


def small_workload(n: int, repeat: int, pause: float, tmp: Path) -> dict[str, Any]:
    """``n`` tensors of 64 float32 values: durable saves (ours, safetensors + fsync, the
    raw-write floor + fsync) and loads of what they wrote (``load_state_dict`` against
    ``load_file``), interleaved as the other workloads' are."""
    from safetensors.torch import load_file

    sd = small_tensors_state_dict(n)
    saves = [s for s in save_contenders(sd) if s.key in SMALL_KEYS]
    latest = timed_saves(saves, repeat, pause, tmp)
    r: dict[str, Any] = {"saves": saves, "tensors": n, "raw_bytes": sum(v.nbytes for v in sd.values())}
    r |= interleaved({
        "ml_load_state_dict": lambda: ml.load_state_dict(latest["ml_durable"]),
        "st_load": lambda: load_file(latest["st_durable"]),
    }, repeat)  # fmt: skip
    return r


def peak_rss_of_load_into(uri: str) -> dict[str, int]:
    """Peak RSS above baseline while load_into fills a model, measured in a fresh process."""
    code = f"""
import gc, json, threading, time, psutil, torch, sys
sys.path.insert(0, {str(HERE)!r})
from bench_store import build_model
import mlflow_lance as ml
model = build_model(); gc.collect()
p = psutil.Process(); base = p.memory_info().rss; peak = [base]; stop = []
def sample():
    while not stop:
        peak[0] = max(peak[0], p.memory_info().rss); time.sleep(0.0005)
t = threading.Thread(target=sample); t.start()
ml.load_into(model, {uri!r})
stop.append(1); t.join(); peak[0] = max(peak[0], p.memory_info().rss)
largest = max(v.numel() * v.element_size() for v in model.state_dict().values())
print(json.dumps({{"peak_above_baseline": peak[0] - base, "largest_tensor": largest}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpt2_extras(sd: dict, model: torch.nn.Module, tmp: Path, skip_docs: bool) -> dict[str, Any]:
    """GPT-2 only: a partial load's bytes read, load_into's peak RSS, the docs example (which
    fsyncs nothing)."""
    uri = tmp / "extras.lance"
    ml.save_state_dict(sd, uri)
    os.environ["MLFLOW_LANCE_MMAP"] = "0"  # read, not mapped, so that the reads are counted
    io0 = rchar()
    part = ml.load_state_dict(uri, names="h.3.*")
    r: dict[str, Any] = {"partial_read": rchar() - io0}
    del os.environ["MLFLOW_LANCE_MMAP"]
    r["partial_bytes"] = sum(v.numel() * v.element_size() for v in part.values())
    r["partial_tensors"] = len(part)
    r["rss"] = peak_rss_of_load_into(str(uri))
    if not skip_docs:  # slow: run once
        docs = tmp / "docs.lance"
        t0 = time.perf_counter()
        docs_save_model(sd, str(docs))
        r["docs_save"] = time.perf_counter() - t0
        r["docs_bytes"] = du(docs)
        t0 = time.perf_counter()
        model.load_state_dict(docs_load_state_dict(str(docs)))
        r["docs_load_into"] = time.perf_counter() - t0
    return r


def cuda_loads(model: torch.nn.Module, repeat: int, st: Path, uri: Path) -> dict[str, float]:
    """GPU loads against safetensors load_file(device=...), when CUDA is available."""
    from safetensors.torch import load_file

    dev = "cuda"
    gpu_model = model.to(dev)

    def sync(_: object) -> None:
        torch.cuda.synchronize()

    return interleaved({
        "st_load_file_cuda": lambda: sync(load_file(st, device=dev)),
        "ml_load_state_dict_cuda": lambda: sync(ml.load_state_dict(uri, map_location=dev)),
        "st_load_into_cuda": lambda: sync(gpu_model.load_state_dict(load_file(st, device=dev))),
        "ml_load_into_cuda": lambda: sync(ml.load_into(gpu_model, uri)),
    }, repeat)  # fmt: skip


# --------------------------------------------------------------------------- tables and goals


def report_workload(report: Report, label: str, r: dict[str, Any], repeat: int) -> None:
    """The tables of one state dict, and its goals."""
    saves = {s.key: s for s in r["saves"]}
    med = {k: s.median for k, s in saves.items()}
    raw = r["raw_bytes"]
    size = f"{r['tensors']} tensors, {raw:,} bytes"
    rounds = f"median seconds of {repeat} interleaved rounds"
    report.table(
        f"{label} ({size}): first save, durable (on the disk when it returns); {rounds}",
        ["durable", "seconds", "vs safetensors `save_file` + fsync", "vs `torch.save` + fsync",
         "vs raw write + fsync", "vs the same without fsync"],
        ["", "s", "x", "x", "x", "x"],
        [[saves[k].label, med[k], med[k] / med["st_durable"], med[k] / med["pt_durable"],
          med[k] / med["raw_durable"], med[k] / med[k.removesuffix("_durable")]]
         for k in ("ml_durable", "st_durable", "pt_durable", "raw_durable")],
    )  # fmt: skip
    report.table(
        f"{label} ({size}): first save, not durable; {rounds}",
        ["not durable", "seconds", "vs safetensors `save_file`", "vs `torch.save`", "vs raw write"],
        ["", "s", "x", "x", "x"],
        [[saves[k].label, med[k], med[k] / med["st"], med[k] / med["pt"], med[k] / med["raw"]]
         for k in ("ml", "st", "pt", "raw")],
    )  # fmt: skip
    loads = [
        ("`load_into` a model (preadv into the parameters) vs safetensors `load_file` + `load_state_dict`",
         r["ml_load_into"], r["st_load_into"]),
        ("`load_into` vs `torch.load(mmap=True)` + `load_state_dict`",
         r["ml_load_into"], r["torch_load_into"]),
        ("`load_state_dict` (lazy copy-on-write maps) vs safetensors `load_file`",
         r["ml_load_state_dict"], r["st_load"]),
        ("`load_into(verify=True)` vs `load_into`", r["ml_load_into_verify"], r["ml_load_into"]),
    ]  # fmt: skip
    report.table(
        f"{label}: loads, warm page cache; {rounds}",
        ["", "mlflow_lance", "peer", "ratio"],
        ["", "s", "s", "x"],
        [[text, ours, peer, ours / peer] for text, ours, peer in loads],
    )
    first, changed, versions = r["first_bytes"], r["changed_bytes"], r["versions"]
    report.table(
        f"{label}: versions of our dataset (durable, as by default); {r['files']} data files in the first "
        f"version; each version changes one tensor of {changed:,} bytes",
        ["mlflow_lance", "seconds", "vs first save", "bytes added on disk", "beyond the changed tensor bytes",
         "vs the model's raw bytes"],
        ["", "s", "x", "B", "B", "x"],
        [["first save", med["ml_durable"], 1.0, first, first - raw, first / raw],
         [f"a version with 1 tensor changed (median of {versions})", r["ml_version_1_changed"],
          r["ml_version_1_changed"] / med["ml_durable"], r["growth"], r["growth"] - changed,
          r["growth"] / raw],
         [f"an identical re-save (median of {repeat})", r["ml_identical_save"],
          r["ml_identical_save"] / med["ml_durable"], r["identical_growth"], r["identical_growth"],
          r["identical_growth"] / raw],
         [f"{versions + 1} versions on disk", None, None, r["total_after"],
          r["total_after"] - raw - versions * changed, r["total_after"] / raw]],
    )  # fmt: skip
    report.goal(f"{label}: first `save_state_dict` (durable default) <= 1.2x safetensors `save_file` + fsync",
                "safetensors `save_file` + fsync of the file and its directory",
                med["ml_durable"] / med["st_durable"], "x", 1.2)  # fmt: skip
    report.goal(f"{label}: first `save_state_dict(sync_files=False)` <= 1.2x safetensors `save_file`",
                "safetensors `save_file` (no fsync)", med["ml"] / med["st"], "x", 1.2)  # fmt: skip
    report.goal(f"{label}: `load_into` <= 1.1x safetensors `load_file` + `load_state_dict`",
                "safetensors `load_file` + `load_state_dict`", r["ml_load_into"] / r["st_load_into"],
                "x", 1.1)  # fmt: skip
    report.goal(
        f"{label}: a version with 1 tensor changed <= 0.25x the first save",
        "our first save (both durable)",
        r["ml_version_1_changed"] / med["ml_durable"],
        "x",
        0.25,
    )
    report.goal(
        f"{label}: a version with 1 tensor changed adds <= the changed bytes + 1 MiB",
        "the changed tensor's bytes",
        r["growth"] - changed,
        "B",
        MIB,
    )
    report.goal(
        f"{label}: the first version on disk <= raw bytes + 1 %",
        "the tensors' raw bytes",
        100 * (first / raw - 1),
        "%",
        1.0,
    )


def report_small(report: Report, r: dict[str, Any], repeat: int) -> None:
    """The table of one small-tensor workload, and its goals: for 5,000 and 20,000 tensors a
    save and a load each <= 1.5x safetensors', for 100,000 each under 10 s."""
    n = r["tensors"]
    med = {s.key: s.median for s in r["saves"]}
    ours, theirs = r["ml_load_state_dict"], r["st_load"]
    label = f"{n:,} tensors of 64 float32 values"
    report.table(
        f"{label} ({r['raw_bytes']:,} bytes): durable first saves, and loads (warm page cache); "
        f"median seconds of {repeat} interleaved rounds",
        ["", "seconds", "vs safetensors", "vs raw write + fsync"],
        ["", "s", "x", "x"],
        [["mlflow_lance `save_state_dict` (default: durable)", med["ml_durable"],
          med["ml_durable"] / med["st_durable"], med["ml_durable"] / med["raw_durable"]],
         ["safetensors `save_file` + fsync (file and directory)", med["st_durable"], 1.0,
          med["st_durable"] / med["raw_durable"]],
         ["floor: the tensor bytes to a new file + fsync (file and directory)", med["raw_durable"],
          med["raw_durable"] / med["st_durable"], 1.0],
         ["mlflow_lance `load_state_dict` (lazy copy-on-write maps)", ours, ours / theirs, None],
         ["safetensors `load_file`", theirs, 1.0, None]],
    )  # fmt: skip
    if n >= 100_000:
        report.goal(f"{label}: first `save_state_dict` (durable) under 10 s", "seconds", med["ml_durable"], "s", 10.0)
        report.goal(f"{label}: `load_state_dict` under 10 s", "seconds", ours, "s", 10.0)
    else:
        report.goal(f"{label}: first `save_state_dict` (durable) <= 1.5x safetensors `save_file` + fsync",
                    "safetensors `save_file` + fsync of the file and its directory",
                    med["ml_durable"] / med["st_durable"], "x", 1.5)  # fmt: skip
        report.goal(f"{label}: `load_state_dict` <= 1.5x safetensors `load_file`", "safetensors `load_file`",
                    ours / theirs, "x", 1.5)  # fmt: skip


def report_gpt2_extras(report: Report, x: dict[str, Any], r: dict[str, Any]) -> None:
    """GPT-2's partial load, peak memory and docs-example rows, and the peak-memory goal."""
    raw, rss = r["raw_bytes"], x["rss"]
    ours_nosync = next(s.median for s in r["saves"] if s.key == "ml")
    rows = []
    if "docs_save" in x:
        rows += [
            ["docs example: save (fsyncs nothing; ratio: vs our `save_state_dict(sync_files=False)`)",
             x["docs_save"], None, x["docs_save"] / ours_nosync],
            ["docs example: load into the model (ratio: vs our `load_into`)", x["docs_load_into"], None,
             x["docs_load_into"] / r["ml_load_into"]],
            ["docs example: bytes on disk (ratio: vs raw)", None, x["docs_bytes"], x["docs_bytes"] / raw],
        ]  # fmt: skip
    rows += [
        [f"partial load of {x['partial_tensors']} tensors (`h.3.*`): bytes read (ratio: vs theirs)", None,
         x["partial_read"], x["partial_read"] / x["partial_bytes"]],
        ["`load_into` peak RSS above baseline (ratio: vs the largest tensor)", None,
         rss["peak_above_baseline"], rss["peak_above_baseline"] / rss["largest_tensor"]],
    ]  # fmt: skip
    report.table(
        "GPT-2 small only: docs example, partial load, peak memory",
        ["", "seconds", "bytes", "ratio"],
        ["", "s", "B", "x"],
        rows,
    )
    report.goal(
        "GPT-2 small: `load_into` peak RSS above baseline <= 2x the largest tensor",
        "the largest tensor's bytes",
        rss["peak_above_baseline"] / rss["largest_tensor"],
        "x",
        2.0,
    )


def report_cuda(report: Report, label: str, c: dict[str, float], repeat: int) -> None:
    """The GPU loads against safetensors."""
    report.table(f"{label}: CUDA loads; median seconds of {repeat} interleaved rounds",
                 ["", "mlflow_lance", "safetensors", "ratio"], ["", "s", "s", "x"], [
        ["`load_state_dict(map_location=\"cuda\")` vs `load_file(device=\"cuda\")`",
         c["ml_load_state_dict_cuda"], c["st_load_file_cuda"],
         c["ml_load_state_dict_cuda"] / c["st_load_file_cuda"]],
        ["`load_into` a CUDA module vs `load_file(device=\"cuda\")` + `load_state_dict`",
         c["ml_load_into_cuda"], c["st_load_into_cuda"], c["ml_load_into_cuda"] / c["st_load_into_cuda"]],
    ])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds (after one warm-up round of saves)")
    ap.add_argument("--models", default="gpt2,resnet50,llama",
                    help="comma-separated: " + ", ".join(WORKLOADS))  # fmt: skip
    ap.add_argument("--settle", type=float, default=4.0, help="seconds of pause before each timed save")
    ap.add_argument("--skip-docs-example", action="store_true", help="skip the slow docs-example baseline")
    ap.add_argument("--small", default="5000,20000,100000",
                    help="comma-separated tensor counts of the small-tensor workloads (64 float32 values "
                         "each); empty: none")  # fmt: skip
    ap.add_argument("--json", type=Path, default=HERE / "results" / "store.json",
                    help="where the run's figures go")  # fmt: skip
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if args.repeat < 1 or args.settle < 0 or not set(models) <= set(WORKLOADS):
        ap.error(f"--repeat must be >= 1, --settle >= 0, --models among {', '.join(WORKLOADS)}")
    try:
        small = [int(n) for n in args.small.split(",") if n]
    except ValueError:
        ap.error("--small takes comma-separated tensor counts")
    os.environ.pop(FSYNC_ENV, None)  # mlflow_lance's default: durable
    report = Report("benchmarks/bench_store.py", {"repeat": args.repeat, "models": models,
                                                  "settle": args.settle,
                                                  "skip_docs_example": args.skip_docs_example,
                                                  "small": small})  # fmt: skip
    work = cleaned_up_at_exit("bench_store_")
    print(
        f"repeat={args.repeat}, settle={args.settle} s; torch threads {torch.get_num_threads()}; "
        f"{os.cpu_count()} CPUs; rounds interleave every contender, figures are medians"
    )
    for name in models:
        label, build, key = WORKLOADS[name]
        sd, module = build()
        sd = OrderedDict((k, v.detach().clone()) for k, v in sd.items())
        tmp = work / name
        tmp.mkdir()
        print(f"\n{label}: saving and loading", file=sys.stderr, flush=True)
        try:
            r = workload(sd, module, key, args.repeat, args.settle, tmp)
            report_workload(report, label, r, args.repeat)
            report.samples |= {f"{name}/{s.key}": s.samples for s in r["saves"]}
            if name == "gpt2":
                report_gpt2_extras(report, gpt2_extras(sd, module, tmp, args.skip_docs_example), r)
            if torch.cuda.is_available():
                report_cuda(report, label, cuda_loads(module, args.repeat, r["st"], r["uri"]), args.repeat)
            else:
                print(f"\n{label}: CUDA not available here, GPU loads skipped")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        del sd, module
    for n in small:
        tmp = work / f"small{n}"
        tmp.mkdir()
        print(f"\n{n:,} tensors of 64 values: saving and loading", file=sys.stderr, flush=True)
        try:
            r = small_workload(n, args.repeat, args.settle, tmp)
            report_small(report, r, args.repeat)
            report.samples |= {f"small{n}/{s.key}": s.samples for s in r["saves"]}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report.write(args.json)


if __name__ == "__main__":
    main()
