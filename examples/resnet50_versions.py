"""The Lance docs example's scenario, done right: save a ResNet-50, save a new version, load.

    python examples/resnet50_versions.py [--dir DIR] [--skip-docs-example]

"Deep Learning Artefact Management using Lance" saves a ResNet's state dict as float64
lists, overwrites the whole table for each version and loads everything back with
``take``. Here the same steps run both ways on a ResNet-50-shaped model defined below (no
torchvision, no download): save, fine-tune the classifier, save a new version, load both
versions back, check them bit for bit, and print sizes and times side by side.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


class Bottleneck(torch.nn.Module):
    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * 4
        self.conv1, self.bn1 = torch.nn.Conv2d(cin, mid, 1, bias=False), torch.nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = torch.nn.Conv2d(mid, mid, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = torch.nn.Conv2d(mid, cout, 1, bias=False), torch.nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(torch.nn.Module):
    """torchvision's resnet50 layout: 25.6M parameters, 320 state-dict tensors."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64)
        self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
        cin, layers = 64, []
        for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(cin, mid, stride if b == 0 else 1))
                cin = mid * 4
            layers.append(torch.nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(2048, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--skip-docs-example", action="store_true", help="run only mlflow_lance (faster)")
    args = ap.parse_args()
    import mlflow_lance as ml

    root = args.dir or Path(tempfile.mkdtemp(prefix="resnet50_versions_"))
    torch.manual_seed(0)
    model = ResNet50().eval()
    v1 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # "fine-tune" the classifier for version 2
        model.fc.weight.mul_(0.5)
        model.fc.bias.add_(0.1)
    v2 = {k: v.clone() for k, v in model.state_dict().items()}
    raw = sum(v.numel() * v.element_size() for v in v1.values())
    print(
        f"ResNet-50: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(v1)} tensors, "
        f"{raw / 1e6:.1f} MB"
    )

    rows = []
    uri = root / "resnet50.lance"
    _, save1 = timed(lambda: ml.save_state_dict(v1, uri, message="v1"))
    size1 = du(uri)
    _, save2 = timed(lambda: ml.save_state_dict(v2, uri, message="classifier fine-tuned"))
    fresh = ResNet50()
    _, load = timed(lambda: ml.load_into(fresh, uri, 1))
    assert all(torch.equal(fresh.state_dict()[k], v1[k]) for k in v1)
    ml.load_into(fresh, uri, 2)
    assert all(torch.equal(fresh.state_dict()[k], v2[k]) for k in v2)
    assert ml.verify(uri, 1).ok and ml.verify(uri, 2).ok
    rows.append(("mlflow_lance", save1, save2, load, size1, du(uri)))

    if not args.skip_docs_example:
        from docs_example import docs_load_state_dict, docs_save_model

        docs = str(root / "docs_example.lance")
        _, dsave1 = timed(lambda: docs_save_model(v1, docs))
        dsize1 = du(Path(docs))
        _, dsave2 = timed(lambda: docs_save_model(v2, docs, version=True))
        other = ResNet50()
        _, dload = timed(lambda: other.load_state_dict(docs_load_state_dict(docs, version=1)))
        assert all(torch.equal(other.state_dict()[k].float(), v1[k].float()) for k in v1)
        rows.append(("docs example", dsave1, dsave2, dload, dsize1, du(Path(docs))))
        # mlflow_lance reads the docs example's datasets too
        assert torch.equal(ml.load_state_dict(docs, 2)["fc.bias"].float(), v2["fc.bias"])

    print(f"\n{'':14}{'save v1 s':>11}{'save v2 s':>11}{'load v1 s':>11}{'MB after v1':>13}{'MB after v2':>13}")
    for name, s1, s2, ld, b1, b2 in rows:
        print(f"{name:14}{s1:11.3f}{s2:11.3f}{ld:11.3f}{b1 / 1e6:13.1f}{b2 / 1e6:13.1f}")
    if len(rows) == 2:
        ours, docs_row = rows
        print(
            f"\nmlflow_lance: saves {docs_row[1] / ours[1]:.0f}x faster, a new version {docs_row[2] / ours[2]:.0f}x "
            f"faster, loads {docs_row[3] / ours[3]:.0f}x faster; version 2 added "
            f"{(ours[5] - ours[4]) / 1e6:.1f} MB against {(docs_row[5] - docs_row[4]) / 1e6:.1f} MB"
        )
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
