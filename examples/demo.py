"""mlflow-lance end to end on embedded defaults: a local Lance dataset, nothing else to start.

    python examples/demo.py [--dir DIR]

Saves a small CNN's weights, fine-tunes its head, saves again (only the head is written),
loads both versions back, checks them bit for bit and verifies every content hash.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import mlflow_lance as ml


class SmallCNN(torch.nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.BatchNorm2d(128), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )  # fmt: skip
        self.head = torch.nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="where to put the dataset (default: a temp dir)")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="mlflow_lance_demo_"))
    uri = root / "small_cnn.lance"

    torch.manual_seed(0)
    model = SmallCNN()
    t0 = time.perf_counter()
    v1 = ml.save_state_dict(model.state_dict(), uri, message="initial weights")
    print(f"version {v1.version}: {v1.num_tensors} tensors, {v1.total_bytes:,} bytes, "
          f"wrote {v1.bytes_written:,} bytes in {time.perf_counter() - t0:.3f}s")

    with torch.no_grad():  # "fine-tune" the head only
        model.head.weight.add_(0.01)
        model.head.bias.add_(0.01)
    v2 = ml.save_state_dict(model.state_dict(), uri, message="head fine-tuned", properties={"epoch": "1"})
    print(f"version {v2.version}: changed {list(v2.changed)}, wrote {v2.bytes_written:,} bytes "
          f"({v2.bytes_written / v1.bytes_written:.1%} of the first version)")
    ml.tag(uri, "baseline", v1.version)

    restored = SmallCNN()
    ml.load_into(restored, uri)  # latest
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values()))
    baseline = ml.load_state_dict(uri, "baseline")
    assert not torch.equal(baseline["head.weight"], model.head.weight)
    heads = ml.load_state_dict(uri, names="head.")
    print(f"partial load of {list(heads)}; latest loaded bit-exact; tag 'baseline' -> version {v1.version}")

    d = ml.diff(uri, v1.version, v2.version)
    print(f"diff {d.a}->{d.b}: changed {d.changed}, unchanged {len(d.unchanged)} tensors")
    report = ml.verify(uri)
    print(f"verify: {report.chunks} chunks, {report.bytes:,} bytes, {'OK' if report.ok else report.problems}")
    print(f"dataset: {uri} ({du(uri):,} bytes on disk for {len(ml.versions(uri))} versions)")
    assert report.ok


if __name__ == "__main__":
    main()
