"""mlflow_lance against mlflow.pytorch on a ~124M-parameter model, like with like, in one run.

Run:  python benchmarks/bench_mlflow.py [--repeat 3] [--versions 10] [--cold 5] [--first 3] [--settle 4]
                                        [--json benchmarks/results/mlflow.json]

Model: GPT-2 small (random init from a config, no download) with a 10-class head. Both
flavors log with the same settings (no input example, no signature, fixed pip requirements
so that neither runs MLflow's requirement inference) to the same `mlflow server` (SQLite
backend, proxied artifacts on local disk), started on 127.0.0.1 for the run; the Lance
datasets live on the same disk (MLFLOW_LANCE_ROOT).

``mlflow.pytorch.log_model`` writes its pickle through MLflow's artifact store, which fsyncs
nothing; ``mlflow_lance.log_model`` is durable by default (it fsyncs the version before MLflow
names it). So the ratio compares ``mlflow_lance`` with MLFLOW_LANCE_FSYNC=0 against
``mlflow.pytorch``, and our durable (default) figure stands beside it as the cost of
durability; the first call has the raw-write floor beside it too (the model's tensor bytes
written to a new file, with and without fsync of the file and its directory). Three
registered models get ``--versions`` versions each where only the head changes, the three
contenders interleaved (the order rotates from round to round; before each timed call,
``os.sync()`` and ``--settle`` seconds of pause, so that no contender inherits another's dirty
pages or freshly freed memory). Printed: the first and the median later ``log_model``, the
median in-process ``pyfunc.load_model`` and the bytes on disk after the versions.

Then whole-process rows, each contender run ``--cold`` times interleaved (medians of the wall
time of a fresh ``python -c``, imports included):
- cold ``load_model("models:/<name>@champion")`` of the durable registered model above and one
  forward pass, against ``mlflow.pytorch.load_model`` of the same model logged by ``mlflow.pytorch``;
- cold ``load_state_dict`` of GPT-2 small's state dict from a local dataset and a sum over its
  tensors, against safetensors ``load_file``;
and the first ``log_model`` of a fresh 6-layer GPT-2 on MLflow's embedded defaults (no server,
no environment variables; ``--first`` fresh models, each logged by every contender as above,
interleaved), with where our time goes, durable and not: hashing, Lance writes, fsync, commit,
version index, pins, the flavor's own files, the registry bookkeeping and MLflow's calls.

Everything is written under one temp dir, removed at exit. The printed tables, the goals, the
machine, its load and the package versions go to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from bench_store import FSYNC_ENV, Report, cleaned_up_at_exit, du, fsync, remove, settle, write_raw

HERE = Path(__file__).resolve().parent

LOG_COLUMNS = ["", "mlflow_lance, MLFLOW_LANCE_FSYNC=0", "mlflow.pytorch (no fsync)", "ratio",
               "mlflow_lance, durable (default)", "cost of durability (durable / FSYNC=0)",
               "floor: raw write", "floor: raw write + fsync"]  # fmt: skip
LOG_UNITS = ["", "s", "s", "x", "s", "x", "s", "s"]
PYTORCH_PEER = "`mlflow.pytorch.log_model` (pickle through MLflow's artifact store, no fsync)"


class Classifier(torch.nn.Module):
    """A pretrained-style body plus a small task head: the part a fine-tune changes."""

    def __init__(self, layers: int = 12) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.body = GPT2Model(GPT2Config(n_layer=layers))
        self.head = torch.nn.Linear(768, 10)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(input_ids).last_hidden_state[:, -1])


@contextlib.contextmanager
def lance_fsync(durable: bool) -> Iterator[None]:
    """mlflow_lance's fsync switch (MLFLOW_LANCE_FSYNC, unset outside: durable) for one call."""
    os.environ[FSYNC_ENV] = "1" if durable else "0"
    try:
        yield
    finally:
        del os.environ[FSYNC_ENV]


def raw_floor(tensors: list[torch.Tensor], path: Path, durable: bool) -> Callable[[], float]:
    """The floor of a first ``log_model``: seconds to write the tensors' bytes to the new file
    ``path`` (+ fsync of it and its directory); the file is deleted afterwards, untimed."""

    def write() -> float:
        t0 = time.perf_counter()
        write_raw(tensors, path)
        if durable:
            fsync(path)
            fsync(path.parent)
        seconds = time.perf_counter() - t0
        remove(path)
        return seconds

    return write


def one_round(contenders: dict[str, Callable[[], float]], shift: int, pause: float,
              times: dict[str, list[float]]) -> None:  # fmt: skip
    """Each contender once, starting at the ``shift``-th, each after ``settle(pause)``; the
    seconds each returns (its timed part) go to ``times``."""
    order = list(contenders)
    for name in order[shift:] + order[:shift]:
        settle(pause)
        times.setdefault(name, []).append(contenders[name]())


def log_row(label: str, med: dict[str, float], floors: bool) -> list[Any]:
    """A row of LOG_COLUMNS from the contenders' seconds: lance, lance-nosync, pytorch, raw, raw+fsync."""
    return [label, med["lance-nosync"], med["pytorch"], med["lance-nosync"] / med["pytorch"], med["lance"],
            med["lance"] / med["lance-nosync"], med["raw"] if floors else None,
            med["raw+fsync"] if floors else None]  # fmt: skip


# --------------------------------------------------------------------------- the run


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """An ``mlflow server`` on a free local port (SQLite, proxied artifacts under ``root``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("mlflow server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="in-process pyfunc loads of each flavor")
    ap.add_argument("--versions", type=int, default=10, help="versions logged by each log_model contender")
    ap.add_argument("--cold", type=int, default=5, help="runs of each cold-process contender")
    ap.add_argument("--first", type=int, default=3, help="fresh models for the first-log_model rows")
    ap.add_argument("--settle", type=float, default=4.0, help="seconds of pause before each timed log_model")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "mlflow.json",
                    help="where the run's figures go")  # fmt: skip
    ap.add_argument("--first-log-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if min(args.repeat, args.versions, args.cold, args.first) < 1 or args.settle < 0:
        ap.error("--repeat, --versions, --cold and --first must be >= 1, --settle >= 0")
    if args.first_log_child:
        return first_log_child(Path(args.first_log_child), args.first, args.settle)
    parameters = {k: getattr(args, k) for k in ("repeat", "versions", "cold", "first", "settle")}
    report = Report("benchmarks/bench_mlflow.py", parameters)
    out = args.json.resolve()
    warnings.filterwarnings("ignore")
    root = cleaned_up_at_exit("bench_mlflow_")  # ~10 GB of models and artifacts: never leave them behind
    os.chdir(root)
    os.environ["MLFLOW_LANCE_ROOT"] = str(root / "lance")
    os.environ.pop(FSYNC_ENV, None)  # mlflow_lance's default: durable
    import mlflow
    import mlflow.pytorch

    import mlflow_lance

    server, url = start_server(root)
    mlflow.set_tracking_uri(url)
    try:
        run_benchmark(args, root, report, mlflow, mlflow_lance)
        cold_rows(args, root, url, report, mlflow, mlflow_lance)
        first_log_rows(args, root, report)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    report.write(out)


def run_benchmark(args: argparse.Namespace, root: Path, report: Report, mlflow: ModuleType,
                  mlflow_lance: ModuleType) -> None:  # fmt: skip
    """``--versions`` versions of GPT-2 small + head logged by each contender through the server,
    in-process pyfunc loads, and the bytes on disk afterwards."""
    torch.manual_seed(0)
    model = Classifier().eval()
    tensors = list(model.state_dict().values())
    raw = sum(v.numel() * v.element_size() for v in tensors)
    reqs = mlflow_lance.get_default_pip_requirements()
    print(
        f"model: GPT-2 small + head, {raw / 1e6:.0f} MB raw, {len(tensors)} tensors; repeat={args.repeat}, "
        f"versions={args.versions}, settle={args.settle} s; tracking: mlflow server, proxied artifacts"
    )

    # Warm the server and both code paths once, registry included (first requests create
    # tables and the server's registry store, first calls import and initialise: ~6 s once,
    # which would land on whichever flavor logs first), so that "first" below means the
    # first version of a model; and write the model's bytes once (untimed), so that no
    # contender makes the process's first large write.
    mlflow.set_experiment("warm-up")
    with mlflow.start_run():
        tiny = torch.nn.Linear(2, 2)
        mlflow_lance.log_model(tiny, name="tiny", lance_uri=str(root / "warmup.lance"),
                               registered_model_name="warm-up-lance")  # fmt: skip
        mlflow.pytorch.log_model(tiny, name="tiny-pt", serialization_format="pickle", pip_requirements=reqs,
                                 registered_model_name="warm-up-pytorch")  # fmt: skip
    raw_floor(tensors, root / "warm.bin", durable=True)()

    registered = {"lance": "lance-durable", "lance-nosync": "lance-nosync", "pytorch": "pytorch-model"}
    experiments = {k: mlflow.set_experiment(name).experiment_id for k, name in registered.items()}

    def logger(key: str) -> Callable[[], float]:
        def log() -> float:
            """A fine-tuning step that touches only the head, then the timed log_model (without
            starting and ending the run around it)."""
            with torch.no_grad():
                model.head.weight.add_(0.01)
            with mlflow.start_run(experiment_id=experiments[key]):
                t0 = time.perf_counter()
                if key == "pytorch":
                    mlflow.pytorch.log_model(model, name="model", registered_model_name=registered[key],
                                             serialization_format="pickle",
                                             pip_requirements=reqs)  # fmt: skip
                else:
                    with lance_fsync(key == "lance"):
                        mlflow_lance.log_model(model, name="model", registered_model_name=registered[key])
                return time.perf_counter() - t0

        return log

    logs = {k: logger(k) for k in registered}
    floors = {"raw": raw_floor(tensors, root / "raw.bin", False),
              "raw+fsync": raw_floor(tensors, root / "raw.bin", True)}  # fmt: skip
    times: dict[str, list[float]] = {}
    for i in range(args.versions):  # the floors beside the first versions only (later ones write the head)
        one_round(logs | floors if i == 0 else logs, (i * len(logs)) // args.versions, args.settle, times)
        print(f"  round {i + 1}/{args.versions} of log_model done", file=sys.stderr, flush=True)
    report.samples |= {f"server log_model/{k}": v for k, v in times.items()}

    def load(name: str) -> float:
        seconds = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            mlflow.pyfunc.load_model(f"models:/{name}/latest")
            seconds.append(time.perf_counter() - t0)
        return statistics.median(seconds)

    ours_load, theirs_load = load(registered["lance"]), load(registered["pytorch"])
    lance_bytes = du(next((root / "lance").rglob(f"{registered['lance']}-*.lance")))
    ours_artifacts = du(root / "artifacts" / experiments["lance"])
    theirs_bytes = du(root / "artifacts" / experiments["pytorch"])

    first = {k: v[0] for k, v in times.items()}
    rows = [log_row("first `log_model` (a new registered model)", first, True)]
    if args.versions > 1:
        later = {k: statistics.median(v[1:]) for k, v in times.items() if k in registered}
        text = f"later `log_model`, median of {args.versions - 1} (only the head changed)"
        rows.append(log_row(text, later, False))
        report.goal("later `log_model` through the server (the head changed), MLFLOW_LANCE_FSYNC=0, "
                    "<= 0.5x `mlflow.pytorch`", PYTORCH_PEER, later["lance-nosync"] / later["pytorch"],
                    "x", 0.5)  # fmt: skip
    report.table(
        f"`log_model` through an `mlflow server` (GPT-2 small + head, {raw / 1e6:.0f} MB, "
        f"{len(tensors)} tensors): seconds, contenders interleaved",
        LOG_COLUMNS,
        LOG_UNITS,
        rows,
    )
    report.table(f"`mlflow.pyfunc.load_model` in process (reads: no fsync): median seconds of {args.repeat}",
                 ["", "mlflow_lance", "mlflow.pytorch", "ratio"], ["", "s", "s", "x"],
                 [["`load_model(\"models:/<name>/latest\")`", ours_load, theirs_load,
                   ours_load / theirs_load]])  # fmt: skip
    report.goal("`mlflow.pyfunc.load_model` in process <= 0.5x `mlflow.pytorch`", "`mlflow.pytorch`'s pyfunc",
                ours_load / theirs_load, "x", 0.5)  # fmt: skip
    total_ours = lance_bytes + ours_artifacts
    report.table(f"bytes on disk after {args.versions} versions (only the head changed between them)",
                 ["", "bytes", "vs one model's raw bytes"], ["", "B", "x"], [
        ["mlflow_lance: Lance dataset + MLflow artifacts", total_ours, total_ours / raw],
        ["mlflow_lance: the Lance dataset", lance_bytes, lance_bytes / raw],
        ["mlflow_lance: MLflow artifacts (MLmodel, skeleton, environment)", ours_artifacts,
         ours_artifacts / raw],
        ["mlflow.pytorch: MLflow artifacts", theirs_bytes, theirs_bytes / raw],
    ])  # fmt: skip
    report.goal(
        f"bytes on disk after {args.versions} versions <= 1.2x one model",
        "one model's raw bytes",
        total_ours / raw,
        "x",
        1.2,
    )


# --------------------------------------------------------------------------- cold processes


def whole_process(scripts: dict[str, str], runs: int, env: dict[str, str],
                  cwd: Path) -> dict[str, list[float]]:  # fmt: skip
    """Wall time of ``python -c script`` per contender, runs interleaved."""
    times: dict[str, list[float]] = {k: [] for k in scripts}
    for _ in range(runs):
        for name, script in scripts.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", script], env=env, cwd=cwd, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            times[name].append(time.perf_counter() - t0)
    return times


FORWARD = "m.eval(); import torch; torch.manual_seed(0); m(torch.randint(0, 50257, (1, 16)))"
LANCE_CHAMPION, PYTORCH_CHAMPION = "models:/lance-durable@champion", "models:/pytorch-model@champion"


def cold_rows(args: argparse.Namespace, root: Path, url: str, report: Report, mlflow: ModuleType,
              mlflow_lance: ModuleType) -> None:  # fmt: skip
    """Whole-process loads: a registered model and one forward pass, a local state dict."""
    client = mlflow.MlflowClient()
    for name in ("lance-durable", "pytorch-model"):
        latest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        client.set_registered_model_alias(name, "champion", str(latest))
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    models = whole_process({
        "mlflow_lance": f"import mlflow_lance; m = mlflow_lance.load_model('{LANCE_CHAMPION}'); {FORWARD}",
        "mlflow.pytorch": f"import mlflow.pytorch as p; m = p.load_model('{PYTORCH_CHAMPION}'); {FORWARD}",
    }, args.cold, env, root)  # fmt: skip

    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in GPT2Model(GPT2Config()).state_dict().items()}
    mlflow_lance.save_state_dict(sd, str(root / "w.lance"))
    save_file(sd, str(root / "w.safetensors"))
    total = "print(sum(float(v.float().sum()) for v in sd.values()))"
    loads = whole_process({
        "mlflow_lance": f"import mlflow_lance; sd = mlflow_lance.load_state_dict('w.lance'); {total}",
        "safetensors": f"from safetensors.torch import load_file; sd = load_file('w.safetensors'); {total}",
    }, args.cold, env, root)  # fmt: skip
    report.samples |= {f"cold load_model/{k}": v for k, v in models.items()}
    report.samples |= {f"cold load_state_dict/{k}": v for k, v in loads.items()}
    m = {k: statistics.median(v) for k, v in models.items()}
    s = {k: statistics.median(v) for k, v in loads.items()}
    report.table(f"cold processes: wall time of a fresh `python -c`, imports included; median of "
                 f"{args.cold} interleaved runs", ["", "mlflow_lance", "peer", "ratio", "difference"],
                 ["", "s", "s", "x", "s"], [
        ["`load_model(\"models:/...@champion\")` + one forward (peer: `mlflow.pytorch.load_model`)",
         m["mlflow_lance"], m["mlflow.pytorch"], m["mlflow_lance"] / m["mlflow.pytorch"],
         m["mlflow_lance"] - m["mlflow.pytorch"]],
        [("`load_state_dict` of GPT-2 small from a local dataset + a sum over its tensors (peer: safetensors "
          "`load_file`)"), s["mlflow_lance"], s["safetensors"], s["mlflow_lance"] / s["safetensors"],
         s["mlflow_lance"] - s["safetensors"]],
    ])  # fmt: skip
    report.goal("cold `load_model(\"models:/...@champion\")` + one forward <= 0.6x `mlflow.pytorch`",
                "`mlflow.pytorch.load_model` + one forward", m["mlflow_lance"] / m["mlflow.pytorch"],
                "x", 0.6)  # fmt: skip
    report.goal("cold `load_state_dict` of a local dataset: whole process <= safetensors + 0.5 s",
                "safetensors `load_file`", s["mlflow_lance"] - s["safetensors"], "s", 0.5)  # fmt: skip


# --------------------------------------------------------------------------- the first log_model


def first_log_rows(args: argparse.Namespace, root: Path, report: Report) -> None:
    """Run the first-log_model rows in a fresh process on MLflow's embedded defaults."""
    child = root / "embedded"
    child.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_LANCE"))}
    subprocess.run([sys.executable, __file__, "--first-log-child", str(child), "--first", str(args.first),
                    "--settle", str(args.settle)], env=env, cwd=child, check=True)  # fmt: skip
    report.extend(json.loads((child / "figures.json").read_text()))


BACKGROUND = "beside the rows above: timed calls in other threads (data-file fsyncs during the writes)"


class Timers:
    """Self time spent in named functions (patched in place), summed over calls of the main
    thread: what a timed function spends in another timed function counts for the inner one.
    Calls from other threads (which overlap the main thread's) count apart, under BACKGROUND."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self._inner: list[float] = []  # per open timed call: the time its timed callees took
        self._lock = threading.Lock()

    def wrap(self, owner: object, attr: str, label: str) -> None:
        inner = getattr(owner, attr)

        def timed(*a: Any, **kw: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                t0 = time.perf_counter()
                try:
                    return inner(*a, **kw)
                finally:
                    with self._lock:
                        self.spent[BACKGROUND] = self.spent.get(BACKGROUND, 0.0) + time.perf_counter() - t0
            self._inner.append(0.0)
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                seconds = time.perf_counter() - t0
                self.spent[label] = self.spent.get(label, 0.0) + seconds - self._inner.pop()
                if self._inner:
                    self._inner[-1] += seconds

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        """The seconds spent per label since the last take."""
        with self._lock:
            spent, self.spent = self.spent, {}
        return spent


PARTS = [  # label, (module name, attribute) timed; what is left of a log_model is MLflow's own calls
    ("check and flatten the state dict (`writer.prepare`)", ("writer", "prepare")),
    ("hashing (`to_rows`)", ("writer", "to_rows")),
    ("Lance data files (`_write_rows`)", ("writer", "_write_rows")),
    ("fsync in the calling thread (`os.fsync`: commit, manifest, index, directories)", ("os", "fsync")),
    ("commit (`_commit`)", ("writer", "_commit")),
    ("version index (`_index_new_version`, its fsyncs apart)", ("writer", "_index_new_version")),
    ("pins (`store.tag`)", ("store", "tag")),
    ("the rest of the store (open, plan, checks, the wait for fsyncs in other threads)", ("store", "save_state_dict")),
    ("the flavor's files, skeleton and environment (`flavor._save`)", ("flavor", "_save")),
    ("registry bookkeeping (`registry.after_log`)", ("registry", "after_log")),
]


def first_log_child(root: Path, n: int, pause: float) -> None:
    """``n`` fresh 6-layer GPT-2s, each logged by every contender (interleaved, the order rotating),
    on MLflow's embedded defaults in ``root``; the figures go to ``root``/figures.json."""
    warnings.filterwarnings("ignore")
    os.chdir(root)
    import mlflow
    import mlflow.pytorch

    import mlflow_lance
    from mlflow_lance import flavor, registry, store, writer

    reqs = mlflow_lance.get_default_pip_requirements()
    timers = Timers()
    modules = {"store": store, "writer": writer, "flavor": flavor, "registry": registry, "os": os}
    for label, (module, attr) in PARTS:
        timers.wrap(modules[module], attr, label)
    mlflow.set_experiment("first-log")
    with mlflow.start_run():  # warm both code paths (imports, the store's first tables)
        tiny = torch.nn.Linear(2, 2)
        mlflow_lance.log_model(tiny, name="tiny")
        mlflow.pytorch.log_model(tiny, name="tiny-pt", serialization_format="pickle", pip_requirements=reqs)

    times: dict[str, list[float]] = {}
    parts: dict[str, list[dict[str, float]]] = {"lance": [], "lance-nosync": []}  # per log: timers.take()
    raw = 0

    def log(key: str, model: torch.nn.Module, name: str) -> float:
        """The timed log_model (without starting and ending the run around it); ours to a new
        dataset ``name`` (an unregistered model's dataset is named after it)."""
        with mlflow.start_run():
            timers.take()
            t0 = time.perf_counter()
            if key == "pytorch":
                mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                         pip_requirements=reqs)  # fmt: skip
            else:
                with lance_fsync(key == "lance"):
                    mlflow_lance.log_model(model, name=name)
            seconds = time.perf_counter() - t0
            if key in parts:
                parts[key].append(timers.take())
            return seconds

    for i in range(n):
        torch.manual_seed(100 + i)
        model = Classifier(layers=6).eval()
        tensors = list(model.state_dict().values())
        raw = sum(v.numel() * v.element_size() for v in tensors)
        if i == 0:  # untimed: no contender makes the process's first large write
            raw_floor(tensors, root / "warm.bin", durable=True)()
        contenders: dict[str, Callable[[], float]] = {
            k: functools.partial(log, k, model, f"{k}-{i}") for k in ("lance", "lance-nosync", "pytorch")
        }
        contenders |= {"raw": raw_floor(tensors, root / "raw.bin", False),
                       "raw+fsync": raw_floor(tensors, root / "raw.bin", True)}  # fmt: skip
        one_round(contenders, (i * len(contenders)) // n, pause, times)
        print(f"  fresh model {i + 1}/{n} logged", file=sys.stderr, flush=True)

    report = Report("first log_model", {})
    report.samples = {f"embedded first log_model/{k}": v for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    report.table(f"first `log_model` of a fresh 6-layer GPT-2 ({raw / 1e6:.0f} MB), MLflow's embedded "
                 f"defaults ({mlflow.get_tracking_uri().split(':')[0]}, no server): median seconds over {n} "
                 f"fresh models, contenders interleaved", LOG_COLUMNS, LOG_UNITS,
                 [log_row("first `log_model` (a new dataset)", med, True)])  # fmt: skip
    report.goal("first `log_model` of a fresh 6-layer GPT-2, embedded defaults, MLFLOW_LANCE_FSYNC=0, "
                "<= 0.5x `mlflow.pytorch`", PYTORCH_PEER, med["lance-nosync"] / med["pytorch"],
                "x", 0.5)  # fmt: skip

    mlflow_calls = "MLflow's own calls (logged model, artifacts, run)"  # what no timer holds
    labels = [label for label, _ in PARTS] + [mlflow_calls, BACKGROUND]

    def medians(key: str) -> list[float]:
        """Per label: the median of its seconds over the fresh models."""
        samples = [p | {mlflow_calls: total - sum(v for k, v in p.items() if k != BACKGROUND)}
                   for p, total in zip(parts[key], times[key], strict=True)]  # fmt: skip
        return [statistics.median(p.get(label, 0.0) for p in samples) for label in labels]

    durable, nosync = medians("lance"), medians("lance-nosync")
    report.table(f"where the first `log_model` of mlflow_lance spends its time (self time of each part; "
                 f"medians over {n} fresh models; shares of the median total)",
                 ["", "durable (default)", "share", "MLFLOW_LANCE_FSYNC=0", "share"],
                 ["", "s", "%", "s", "%"],
                 [[label, a, 100 * a / med["lance"], b, 100 * b / med["lance-nosync"]]
                  for label, a, b in zip(labels, durable, nosync, strict=True)])  # fmt: skip
    (root / "figures.json").write_text(json.dumps(report.figures()))


if __name__ == "__main__":
    main()
