"""mlflow_lance against mlflow.pytorch on a ~124M-parameter model, in one run.

Run:  python benchmarks/bench_mlflow.py [--repeat 3] [--versions 10] [--cold 5] [--first 3]

Model: GPT-2 small (random init from a config, no download) with a 10-class head. Both
flavors log with the same settings (no input example, no signature, fixed pip requirements
so that neither runs MLflow's requirement inference) to the same `mlflow server` (SQLite
backend, proxied artifacts on local disk), started on 127.0.0.1 for the run; the Lance
datasets live on the same disk (MLFLOW_LANCE_ROOT). Printed: median log_model and pyfunc
load times and their ratios, then the bytes on disk after N versions where only the head
changes.

Then three sets of whole-process rows, each contender run ``--cold`` times interleaved (medians
of the wall time of a fresh ``python -c``, imports included):
- cold ``load_model("models:/<name>@champion")`` of the registered model above and one forward
  pass, against ``mlflow.pytorch.load_model`` of the same model logged by ``mlflow.pytorch``;
- cold ``load_state_dict`` of GPT-2 small's state dict from a local dataset and a sum over its
  tensors, against safetensors ``load_file``;
and the first ``log_model`` of a fresh 6-layer GPT-2 on MLflow's embedded defaults (no server,
no environment variables; ``--first`` fresh models, interleaved with ``mlflow.pytorch``), with
where its time goes: hashing, Lance writes, commit, version index, the flavor's own files and
pins, the registry bookkeeping and MLflow's calls.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class Classifier(torch.nn.Module):
    """A pretrained-style body plus a small task head: the part a fine-tune changes."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.body = GPT2Model(GPT2Config())
        self.head = torch.nn.Linear(768, 10)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(input_ids).last_hidden_state[:, -1])


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
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
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--versions", type=int, default=10)
    ap.add_argument("--cold", type=int, default=5, help="runs of each cold-process contender")
    ap.add_argument("--first", type=int, default=3, help="fresh models for the first-log_model rows")
    ap.add_argument("--first-log-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.first_log_child:
        return first_log_child(Path(args.first_log_child), args.first)
    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(prefix="bench_mlflow_"))
    atexit.register(shutil.rmtree, root, True)  # ~8 GB of models and artifacts: never leave them behind
    os.chdir(root)
    os.environ["MLFLOW_LANCE_ROOT"] = str(root / "lance")
    import mlflow
    import mlflow.pytorch

    import mlflow_lance

    server, url = start_server(root)
    mlflow.set_tracking_uri(url)
    try:
        run_benchmark(args, root, mlflow, mlflow_lance)
        cold_rows(args, root, url, mlflow, mlflow_lance)
        first_log_rows(args, root)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()


def run_benchmark(args, root: Path, mlflow, mlflow_lance) -> None:
    torch.manual_seed(0)
    model = Classifier().eval()
    raw = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    reqs = mlflow_lance.get_default_pip_requirements()
    print(f"model: GPT-2 small + head, {raw / 1e6:.0f} MB raw, {len(model.state_dict())} tensors; "
          f"repeat={args.repeat}, versions={args.versions}; tracking: mlflow server, proxied artifacts")

    def log(flavor: str, registered: str, n: int) -> list[float]:
        mlflow.set_experiment(registered)
        times = []
        for i in range(n):
            with torch.no_grad():
                model.head.weight.add_(0.01)  # a fine-tuning step that touches only the head
            with mlflow.start_run():
                t0 = time.perf_counter()
                if flavor == "lance":
                    mlflow_lance.log_model(model, name="model", registered_model_name=registered)
                else:
                    mlflow.pytorch.log_model(model, name="model", registered_model_name=registered,
                                             serialization_format="pickle", pip_requirements=reqs)
                times.append(time.perf_counter() - t0)
        return times

    def load(registered: str) -> float:
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            mlflow.pyfunc.load_model(f"models:/{registered}/latest")
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    # Warm the server and both code paths once, registry included (first requests create
    # tables and the server's registry store, first calls import and initialise: ~6 s once,
    # which would land on whichever flavor logs first), so that "first" below means the
    # first version of a model.
    mlflow.set_experiment("warm-up")
    with mlflow.start_run():
        tiny = torch.nn.Linear(2, 2)
        mlflow_lance.log_model(tiny, name="tiny", lance_uri=str(root / "warmup.lance"),
                               registered_model_name="warm-up-lance")  # fmt: skip
        mlflow.pytorch.log_model(tiny, name="tiny-pt", serialization_format="pickle", pip_requirements=reqs,
                                 registered_model_name="warm-up-pytorch")  # fmt: skip

    ours = log("lance", "lance-model", args.versions)
    theirs = log("pytorch", "pytorch-model", args.versions)
    ours_load, theirs_load = load("lance-model"), load("pytorch-model")

    lance_bytes = du(root / "lance")
    ids = {e.name: e.experiment_id for e in mlflow.search_experiments()}
    ours_artifacts = du(root / "artifacts" / ids["lance-model"])
    theirs_bytes = du(root / "artifacts" / ids["pytorch-model"])

    first_ours, first_theirs = ours[0], theirs[0]
    med_ours, med_theirs = statistics.median(ours[1:] or ours), statistics.median(theirs[1:] or theirs)
    print("\nseconds (log_model: first call, then median of the rest; load: median)")
    print(f"  log_model first      mlflow_lance {first_ours:8.3f}   mlflow.pytorch {first_theirs:8.3f}   "
          f"ratio {first_ours / first_theirs:.3f}  (target <= 0.5)")
    print(f"  log_model next       mlflow_lance {med_ours:8.3f}   mlflow.pytorch {med_theirs:8.3f}   "
          f"ratio {med_ours / med_theirs:.3f}  (target <= 0.5)")
    print(f"  pyfunc.load_model    mlflow_lance {ours_load:8.3f}   mlflow.pytorch {theirs_load:8.3f}   "
          f"ratio {ours_load / theirs_load:.3f}  (target <= 0.5)")
    total_ours = lance_bytes + ours_artifacts
    print(f"\nbytes on disk after {args.versions} versions (only the head changed between them)")
    print(f"  mlflow_lance    {total_ours:>14,}  = {total_ours / raw:.3f}x one model "
          f"(Lance {lance_bytes:,} + MLflow artifacts {ours_artifacts:,}; target <= 1.2x)")
    print(f"  mlflow.pytorch  {theirs_bytes:>14,}  = {theirs_bytes / raw:.3f}x one model")


# --------------------------------------------------------------------------- cold processes


def whole_process(scripts: dict[str, str], runs: int, env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Median wall time of ``python -c script`` per contender, runs interleaved."""
    times: dict[str, list[float]] = {k: [] for k in scripts}
    for _ in range(runs):
        for name, script in scripts.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", script], env=env, cwd=cwd, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


FORWARD = "m.eval(); import torch; torch.manual_seed(0); m(torch.randint(0, 50257, (1, 16)))"


def cold_rows(args, root: Path, url: str, mlflow, mlflow_lance) -> None:
    client = mlflow.MlflowClient()
    for name in ("lance-model", "pytorch-model"):
        latest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        client.set_registered_model_alias(name, "champion", str(latest))
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    models = whole_process({
        "mlflow_lance": f"import mlflow_lance; m = mlflow_lance.load_model('models:/lance-model@champion'); {FORWARD}",
        "mlflow.pytorch": f"import mlflow.pytorch; m = mlflow.pytorch.load_model('models:/pytorch-model@champion'); {FORWARD}",
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
    print(f"\ncold processes (whole-process wall time, median of {args.cold} interleaved runs)")
    ratio = models["mlflow_lance"] / models["mlflow.pytorch"]
    print(f"  load_model('models:/...@champion') + forward   mlflow_lance {models['mlflow_lance']:7.3f}   "
          f"mlflow.pytorch {models['mlflow.pytorch']:7.3f}   ratio {ratio:.3f}  (target <= 0.6)")
    extra = loads["mlflow_lance"] - loads["safetensors"]
    print(f"  load_state_dict + sum (GPT-2 small, local)      mlflow_lance {loads['mlflow_lance']:7.3f}   "
          f"safetensors    {loads['safetensors']:7.3f}   +{extra:.3f} s  (target <= +0.5 s)")


# --------------------------------------------------------------------------- the first log_model


def first_log_rows(args, root: Path) -> None:
    """Run the first-log_model rows in a fresh process on MLflow's embedded defaults."""
    child = root / "embedded"
    child.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_LANCE"))}
    subprocess.run([sys.executable, __file__, "--first-log-child", str(child), "--first", str(args.first)],
                   env=env, cwd=child, check=True)  # fmt: skip


class Timers:
    """Wall time spent in named functions (patched in place), summed over calls."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, owner: object, attr: str, label: str) -> None:
        inner = getattr(owner, attr)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        spent, self.spent = self.spent, {}
        return spent


def first_log_child(root: Path, n: int) -> None:
    warnings.filterwarnings("ignore")
    os.chdir(root)
    import mlflow
    import mlflow.pytorch
    from transformers import GPT2Config

    import mlflow_lance
    from mlflow_lance import flavor, registry, store

    class Small(Classifier):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            from transformers import GPT2Model

            self.body = GPT2Model(GPT2Config(n_layer=6))
            self.head = torch.nn.Linear(768, 10)

    reqs = mlflow_lance.get_default_pip_requirements()
    timers = Timers()
    for owner, attr, label in [
        (store, "to_rows", "hash"), (store, "_write_rows", "write"), (store, "_commit", "commit"),
        (store, "_index_new_version", "index"), (store, "save_state_dict", "store"),
        (flavor, "save_model", "flavor"), (registry, "after_log", "registry"),
    ]:  # fmt: skip
        timers.wrap(owner, attr, label)
    mlflow.set_experiment("first-log")
    with mlflow.start_run():  # warm both code paths (imports, the store's first tables)
        tiny = torch.nn.Linear(2, 2)
        mlflow_lance.log_model(tiny, name="tiny")
        mlflow.pytorch.log_model(tiny, name="tiny-pt", serialization_format="pickle", pip_requirements=reqs)
    timers.take()
    ours: list[float] = []
    theirs: list[float] = []
    parts: list[dict[str, float]] = []
    for i in range(n):
        torch.manual_seed(100 + i)
        model = Small().eval()
        with mlflow.start_run():
            t0 = time.perf_counter()
            mlflow_lance.log_model(model, name="model")
            ours.append(time.perf_counter() - t0)
            parts.append(timers.take())
        with mlflow.start_run():
            t0 = time.perf_counter()
            mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", pip_requirements=reqs)
            theirs.append(time.perf_counter() - t0)
    raw = sum(v.numel() * v.element_size() for v in Small().state_dict().values())
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"\nfirst log_model of a fresh GPT-2 (6 layers, {raw / 1e6:.0f} MB), embedded defaults "
          f"({mlflow.get_tracking_uri()}), median of {n}")
    print(f"  mlflow_lance {a:7.3f}   mlflow.pytorch {b:7.3f}   ratio {a / b:.3f}  (target <= 0.5)")
    med = {k: statistics.median(p.get(k, 0.0) for p in parts) for k in parts[0]}
    store_rest = med["store"] - med["hash"] - med["write"] - med["commit"] - med["index"]
    rows = [("hashing (to_rows)", med["hash"]), ("Lance data files (write)", med["write"]),
            ("commit", med["commit"]), ("version index", med["index"]),
            ("rest of the store (open, plan, checks)", store_rest),
            ("flavor files, skeleton, pins", med["flavor"] - med["store"]),
            ("registry bookkeeping (after_log)", med.get("registry", 0.0)),
            ("MLflow calls (logged model, artifacts, run)", a - med["flavor"] - med.get("registry", 0.0))]  # fmt: skip
    print("  where mlflow_lance's time goes (medians over the fresh models):")
    for label, secs in rows:
        print(f"    {label:<46} {secs:7.3f} s  {100 * secs / a:5.1f} %")


if __name__ == "__main__":
    main()
