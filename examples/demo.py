"""The main demo, on embedded defaults: local SQLite tracking and a local Lance dataset.

    python examples/demo.py [--dir DIR] [--runs 4]

A small CNN's body is "pretrained" once; each MLflow run then fine-tunes only the head and
logs the model with mlflow_lance.log_model into one registered model. Only the head's bytes
are written per run. The best run gets the alias @champion, which is then loaded back with
mlflow.pyfunc and mlflow_lance, checked bit for bit, and verified.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


class SmallCNN(torch.nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 3, padding=1),
            torch.nn.BatchNorm2d(64),
            torch.nn.ReLU(),
            torch.nn.Conv2d(64, 256, 3, padding=1),
            torch.nn.BatchNorm2d(256),
            torch.nn.ReLU(),
            torch.nn.Conv2d(256, 256, 3, padding=1),
            torch.nn.BatchNorm2d(256),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def finetune_head(model: SmallCNN, x: torch.Tensor, y: torch.Tensor, steps: int = 20) -> float:
    """A few optimizer steps on the head only; the body stays frozen (and deduplicated)."""
    model.features.eval()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.5)
    with torch.no_grad():
        feats = model.features(x)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model.head(feats), y)
        loss.backward()
        opt.step()
    return float(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="working directory (default: a new temp dir)")
    ap.add_argument("--runs", type=int, default=4)
    args = ap.parse_args()
    root = (args.dir or Path(tempfile.mkdtemp(prefix="mlflow_lance_demo_"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    warnings.filterwarnings("ignore")
    import mlflow

    import mlflow_lance

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")  # embedded: no server to start
    mlflow.set_experiment("demo")
    name = "demo-cnn"
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    raw = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    print(
        f"model: {raw:,} bytes of weights in {len(model.state_dict())} tensors; tracking: {mlflow.get_tracking_uri()}"
    )

    losses = {}
    for i in range(args.runs):
        with mlflow.start_run(run_name=f"head-finetune-{i}"):
            loss = finetune_head(model, x, y)
            mlflow.log_metric("loss", loss)
            t0 = time.perf_counter()
            info = mlflow_lance.log_model(model, name="model", registered_model_name=name, input_example=x[:2].numpy())
            flavor = info.flavors["mlflow_lance"]
            losses[info.registered_model_version] = loss
            print(
                f"run {i}: loss {loss:.3f}, model version {info.registered_model_version} = Lance version "
                f"{flavor['lance_version']}, {flavor['tensors_changed']} of {flavor['tensors']} tensors "
                f"changed, {flavor['bytes_written']:,} bytes written, logged in {time.perf_counter() - t0:.2f}s"
            )
    best = min(losses, key=losses.get)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, "champion", best)
    mlflow_lance.sync(name)  # refresh the history table with the alias

    uri = flavor["lance_uri"]
    lance_bytes = du(Path(uri))
    print(
        f"\n{args.runs} versions in one Lance dataset: {lance_bytes:,} bytes on disk = "
        f"{lance_bytes / raw:.2f}x one model (mlflow.pytorch would store {args.runs}x)"
    )

    champion = mlflow_lance.load_model(f"models:/{name}@champion")
    want = mlflow_lance.load_state_dict(f"models:/{name}/{best}")
    assert all(torch.equal(a, want[k]) for k, a in champion.state_dict().items())
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    sample = x[:4].numpy()
    with torch.no_grad():
        np.testing.assert_allclose(pyfunc.predict(sample), champion(torch.from_numpy(sample)).numpy())
    report = mlflow_lance.verify(uri, int(client.get_model_version(name, best).tags["lance.version"]))
    print(
        f"@champion = model version {best}: loaded with mlflow_lance and mlflow.pyfunc, bit-exact; "
        f"verify: {'OK' if report.ok else report.problems}"
    )
    print(f"sidecar: {uri}.yaml\nUI: mlflow ui --backend-store-uri sqlite:///{root}/mlflow.db  (Models -> {name})")
    assert report.ok


if __name__ == "__main__":
    main()
