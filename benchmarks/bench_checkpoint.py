"""Training checkpoints against the peers, in one run: GPT-2 (from a config, random init) + AdamW.

Run:  python benchmarks/bench_checkpoint.py [--layers 12] [--repeat 3]

1. Training time blocked per checkpoint (median of --repeat, interleaved, a training step
   between checkpoints so every one has new weights and optimizer state):
   a plain ``clone()`` of model + optimizer state (the staging floor), ``log_checkpoint(
   blocking=False)`` (returns once staged), ``log_checkpoint(blocking=True)`` and
   ``torch.save({"model": ..., "optimizer": ...})``.
2. Bytes for 10 checkpoints of a model whose backbone (~90 % of the parameters) is frozen and
   whose head trains, against 10 full checkpoint files (what a logger that uploads each
   ``.ckpt`` stores, e.g. Lightning's ``MLFlowLogger(log_model="all")``; measured as 10x the
   size of one ``torch.save`` of the same state, since each file is a full copy).

Embedded MLflow (SQLite in a temp dir). This 2-core machine is noisy: ratios, not seconds,
are what to compare, and they move by ~10-20 % between runs.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def gpt2(layers: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config(n_layer=layers)).train()


def train_step(model: torch.nn.Module, head: torch.nn.Module | None, opt: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, 50257, (1, 16))
    out = model(input_ids=ids).last_hidden_state
    loss = (head(out) if head is not None else out).float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def du(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-ckpt-")
    atexit.register(shutil.rmtree, work, True)  # ~14 GB of checkpoints: never leave them behind
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    os.environ["MLFLOW_LANCE_ROOT"] = f"{work}/lance"
    import mlflow

    import mlflow_lance as ml

    mlflow.set_experiment("bench-checkpoint")
    model = gpt2(args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, None, opt)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(
        t.numel() * t.element_size() for s in opt.state_dict()["state"].values() for t in s.values()
        if isinstance(t, torch.Tensor))  # fmt: skip
    times: dict[str, list[float]] = {"clone": [], "async": [], "blocking": [], "torch.save": []}
    with mlflow.start_run():
        ml.log_checkpoint(model, opt, step=0)  # the first write of a run is the full model: not timed
        for i in range(args.repeat):
            train_step(model, None, opt)
            t0 = time.perf_counter()
            copy = ({k: v.clone() for k, v in model.state_dict().items()},
                    {k: {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in s.items()}
                     for k, s in opt.state_dict()["state"].items()})  # fmt: skip
            times["clone"].append(time.perf_counter() - t0)
            del copy
            t0 = time.perf_counter()
            ml.log_checkpoint(model, opt, step=3 * i + 1, blocking=False)
            times["async"].append(time.perf_counter() - t0)
            ml.wait_for_checkpoints()
            train_step(model, None, opt)
            t0 = time.perf_counter()
            ml.log_checkpoint(model, opt, step=3 * i + 2)
            times["blocking"].append(time.perf_counter() - t0)
            train_step(model, None, opt)
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f"{work}/ckpt.pt")
            os.sync()  # as much on disk as Lance's commit is
            times["torch.save"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nGPT-2 ({args.layers} layers) + AdamW: {state_bytes / 1e9:.2f} GB of model + optimizer state; "
          f"medians of {args.repeat}\n")  # fmt: skip
    print("| training time blocked per checkpoint | seconds | ratio | target |")
    print("|---|---|---|---|")
    print(f"| `clone()` of the state (the staging floor) | {med['clone']:.3f} | 1.00x | |")
    print(f"| `log_checkpoint(blocking=False)` | {med['async']:.3f} | {med['async'] / med['clone']:.2f}x clone, "
          f"{med['async'] / med['blocking']:.2f}x blocking | <= 1.5x clone, <= 0.35x blocking |")
    print(f"| `log_checkpoint(blocking=True)` | {med['blocking']:.3f} | {med['blocking'] / med['torch.save']:.2f}x "
          f"torch.save | <= 1.0x |")  # fmt: skip
    print(f"| `torch.save({{model, optimizer}})` + sync | {med['torch.save']:.3f} | | |")

    # 2. frozen backbone, trained head: bytes for 10 checkpoints
    backbone = gpt2(args.layers)
    for p in backbone.parameters():
        p.requires_grad_(False)
    n_backbone = sum(p.numel() for p in backbone.parameters())
    head = torch.nn.Linear(768, max(8, n_backbone // 9 // 768))  # ~10 % of all parameters
    model2 = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    opt2 = torch.optim.AdamW(head.parameters(), lr=1e-3)
    with mlflow.start_run():
        for step in range(10):
            train_step(backbone, head, opt2)
            ckpt = ml.log_checkpoint(model2, opt2, step=step)
    lance_bytes = du(ckpt.lance_uri)
    torch.save({"state_dict": model2.state_dict(), "optimizer_states": [opt2.state_dict()]}, f"{work}/one.ckpt")
    file_bytes = 10 * os.path.getsize(f"{work}/one.ckpt")
    n_head = sum(p.numel() for p in head.parameters())
    print(f"\n10 checkpoints, backbone frozen ({n_backbone / (n_backbone + n_head):.0%} of "
          f"{(n_backbone + n_head) / 1e6:.0f}M parameters), head + AdamW trained:\n")
    print("| | bytes | ratio | target |")
    print("|---|---|---|---|")
    print(f"| mlflow_lance (one Lance dataset for the run) | {lance_bytes:,} | {lance_bytes / file_bytes:.2f}x | <= 0.4x |")
    print(f"| 10 full checkpoint files (10 x {file_bytes // 10:,}) | {file_bytes:,} | 1.00x | |")
    floor = file_bytes // 10 + 9 * 3 * n_head * 4
    print(f"| floor: backbone once + 10 x (head + its two AdamW moments) | {floor:,} | {floor / file_bytes:.2f}x | |")


if __name__ == "__main__":
    sys.exit(main())
