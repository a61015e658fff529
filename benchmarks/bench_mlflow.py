"""mlflow_lance against mlflow.pytorch on a ~124M-parameter model, in one run.

Run:  python benchmarks/bench_mlflow.py [--repeat 3] [--versions 10]

Model: GPT-2 small (random init from a config, no download) with a 10-class head. Both
flavors log with the same settings (no input example, no signature, fixed pip requirements
so that neither runs MLflow's requirement inference) to the same `mlflow server` (SQLite
backend, proxied artifacts on local disk), started on 127.0.0.1 for the run; the Lance
datasets live on the same disk (MLFLOW_LANCE_ROOT). Printed: median log_model and pyfunc
load times and their ratios, then the bytes on disk after N versions where only the head
changes.
"""

from __future__ import annotations

import argparse
import os
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
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(prefix="bench_mlflow_"))
    os.chdir(root)
    os.environ["MLFLOW_LANCE_ROOT"] = str(root / "lance")
    import mlflow
    import mlflow.pytorch

    import mlflow_lance

    server, url = start_server(root)
    mlflow.set_tracking_uri(url)
    try:
        run_benchmark(args, root, mlflow, mlflow_lance)
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

    # Warm the server and both code paths once (first requests create tables, first calls
    # import and initialise), so that "first" below means the first version of a model.
    mlflow.set_experiment("warm-up")
    with mlflow.start_run():
        tiny = torch.nn.Linear(2, 2)
        mlflow_lance.log_model(tiny, name="tiny", lance_uri=str(root / "warmup.lance"))
        mlflow.pytorch.log_model(tiny, name="tiny-pt", serialization_format="pickle", pip_requirements=reqs)

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


if __name__ == "__main__":
    main()
