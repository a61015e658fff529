"""A Lightning job as users launch one: ``torchrun --nproc-per-node N lightning_worker.py
STRATEGY OUT [CKPT]``, gloo on CPU, ``MLflowLanceCheckpoint`` logging to the run named by
``MLFLOW_TRACKING_URI``. STRATEGY is ``model_parallel`` (FSDP2 applied in ``configure_model``,
sharded over every rank), ``ddp``, or ``single`` (one device, started without torchrun).

Without CKPT: fit A trains 3 epochs, logging a checkpoint per epoch; fit B, a fresh module
seeded differently, resumes from A's first checkpoint (``models:/<id>``) and trains to the
same end. Rank 0 writes ``OUT/result.json`` (the run, the checkpoints, whether B ended bit for
bit where A did) and A's final weights, whole, to ``OUT/final.pt``. With CKPT: one fit resumes
from it at this world size and trains one more epoch; rank 0 writes ``OUT/resumed.json`` (the
step it resumed at, whether its weights were the checkpoint's then) and ``OUT/resumed.pt``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import lightning.pytorch as L
import mlflow
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from mlflow_lance import checkpoint
from mlflow_lance.integrations.lightning import MLflowLanceCheckpoint

STRATEGY, OUT = sys.argv[1], Path(sys.argv[2])
CKPT = sys.argv[3] if len(sys.argv) > 3 else None


class Net(L.LightningModule):
    """Dropout (each rank seeds its own generator), a scheduler, and a shuffled loader."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(16, 1),
        )
        self.started: dict[str, torch.Tensor] | None = None
        self.started_optimizer: dict[str, dict[str, torch.Tensor]] | None = None

    def configure_model(self) -> None:
        torch.manual_seed(1000 + self.global_rank)  # each rank its own dropout masks from here on
        if STRATEGY == "model_parallel":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[3]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def on_train_start(self) -> None:
        self.started = whole(self)
        opt = self.trainer.optimizers[0]
        self.started_optimizer = {
            name: {k: full(v) for k, v in opt.state[p].items()} for name, p in self.named_parameters()
        }

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


def whole(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights, whole, on every rank (a DTensor's shards gathered)."""
    return {k: full(v) for k, v in module.state_dict().items()}


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def fit(seed: int, epochs: int, callback: MLflowLanceCheckpoint, ckpt_path: str | None = None) -> Net:
    L.seed_everything(seed, verbose=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = {
        "model_parallel": lambda: ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
        "ddp": DDPStrategy,
        "single": lambda: "auto",
    }[STRATEGY]()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=OUT,
        callbacks=[callback],
        use_distributed_sampler=False,  # ours, seeded apart from the module's initialisation
    )
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
    module = Net()
    sampler = torch.utils.data.DistributedSampler(data, world, int(os.environ.get("RANK", "0")), shuffle=True, seed=0)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler), ckpt_path=ckpt_path)
    return module


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    if CKPT is not None:
        module = fit(1, 4, MLflowLanceCheckpoint(save_top_k=0), ckpt_path=CKPT)
        done = whole(module)
        if rank == 0:
            stored = checkpoint.read_checkpoint(CKPT)
            optimizer = stored["optimizer"]["state"]
            result = {
                "started_at_checkpoint": same(module.started, dict(stored["model"])),
                "optimizer_at_checkpoint": module.started_optimizer.keys() == optimizer.keys()
                and all(same(module.started_optimizer[k], optimizer[k]) for k in optimizer),
                "steps": module.global_step,
            }
            (OUT / "resumed.json").write_text(json.dumps(result))
            torch.save(done, OUT / "resumed.pt")
        return
    with mlflow.start_run() if rank == 0 else nullcontext():
        a = fit(0, 3, MLflowLanceCheckpoint(save_top_k=-1))
        run_id = mlflow.active_run().info.run_id if rank == 0 else None
    final = whole(a)
    box = [run_id]
    dist.broadcast_object_list(box, src=0)
    models = sorted(
        mlflow.search_logged_models(filter_string=f"source_run_id = '{box[0]}'", output_format="list"),
        key=lambda m: int(m.tags["mlflow_lance.checkpoint.step"]),
    )
    first = f"models:/{models[0].model_id}"
    b = fit(1, 3, MLflowLanceCheckpoint(save_top_k=0), ckpt_path=first)
    resumed = whole(b)
    if rank == 0:
        torch.save(final, OUT / "final.pt")
        result = {
            "run_id": box[0],
            "checkpoints": [(m.model_id, int(m.tags["mlflow_lance.checkpoint.step"])) for m in models],
            "b_started_at_first": same(b.started, dict(checkpoint.read_checkpoint(first)["model"])),
            "ranks_rng_differ": ranks_rng_differ(checkpoint.read_checkpoint(first)),
            "b_equals_a": same(resumed, final),
            "b_steps": b.global_step,
        }
        (OUT / "result.json").write_text(json.dumps(result))


def ranks_rng_differ(stored: dict) -> bool:
    """Whether the checkpoint kept each rank's own generators, and they differ."""
    by_rank = stored.get("rng_by_rank") or stored["extra"].get("rng_by_rank") or []
    return len(by_rank) == 2 and not torch.equal(by_rank[0]["torch"], by_rank[1]["torch"])


if __name__ == "__main__":
    main()
