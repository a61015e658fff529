"""The Lightning and Hugging Face integrations with the real frameworks, on tiny models (CPU):
resume continues bit-identically, retention keeps what ModelCheckpoint / Trainer would keep,
and a LoRA fine-tune writes only its adapters and their optimizer state after the first
checkpoint. Resumes run in the test's process, with fresh Trainers and freshly built models
(seeded differently, so that only the checkpoint can make them equal)."""

from __future__ import annotations

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_lance as ml
from mlflow_lance import checkpoint

torch.set_num_threads(1)


def live_steps(run_id: str) -> list[int]:
    """Steps of the run's checkpoints MLflow still lists."""
    return sorted(int(m.tags[checkpoint._STEP_TAG]) for m in checkpoint._checkpoints(MlflowClient(), run_id, "checkpoint"))


# --------------------------------------------------------------------------- Lightning

L = pytest.importorskip("lightning.pytorch")
from mlflow_lance.integrations.lightning import MLflowLanceCheckpoint

SCORES = [3.0, 1.0, 4.0, 0.5]  # a made-up validation score per epoch: best two are epochs 1 and 3


class TinyModule(L.LightningModule):
    """Dropout, a shuffled loader and a scheduler: resuming exactly needs every state restored."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(16, 1))  # fmt: skip

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))
        self.log("score", SCORES[self.current_epoch % len(SCORES)])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


def loaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    return (torch.utils.data.DataLoader(data, batch_size=8, shuffle=True),
            torch.utils.data.DataLoader(data, batch_size=16))  # fmt: skip


def fit(tmp_path, seed: int, epochs: int, callbacks: list, ckpt_path: str | None = None):
    L.seed_everything(seed, verbose=False)
    module = TinyModule()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", deterministic=True, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=callbacks)  # fmt: skip
    trainer.fit(module, *loaders(), ckpt_path=ckpt_path)
    return module, trainer


def test_lightning_fit_resumes_from_a_checkpoint_uri_bit_identically(tracking, tmp_path):
    with mlflow.start_run():
        straight, _ = fit(tmp_path, 0, 4, [MLflowLanceCheckpoint()])
    with mlflow.start_run() as run:
        fit(tmp_path, 0, 2, [MLflowLanceCheckpoint()])
    assert live_steps(run.info.run_id) == [8]  # 4 batches an epoch; save_top_k=1 keeps the latest
    with mlflow.start_run():
        resumed, trainer = fit(tmp_path, 123, 4, [MLflowLanceCheckpoint()], ckpt_path=f"runs:/{run.info.run_id}/checkpoint")
    assert trainer.global_step == 16 and trainer.current_epoch == 4
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4  # StepLR stepped once an epoch, across the two fits


def test_lightning_save_top_k_keeps_exactly_the_k_best(tracking, tmp_path):
    with mlflow.start_run() as run:
        fit(tmp_path, 0, 4, [MLflowLanceCheckpoint(monitor="score", mode="min", save_top_k=2)])
    assert live_steps(run.info.run_id) == [8, 16]  # epochs 1 and 3 (scores 1.0 and 0.5), 4 steps an epoch
    with mlflow.start_run() as run:
        fit(tmp_path, 0, 4, [MLflowLanceCheckpoint(monitor="score", mode="max", save_top_k=1, save_last=True)])
    assert live_steps(run.info.run_id) == [12, 16]  # the best (4.0 at epoch 2) and the last
    with mlflow.start_run() as run:
        fit(tmp_path, 0, 2, [MLflowLanceCheckpoint(every_n_train_steps=3, save_top_k=-1)])
    assert live_steps(run.info.run_id) == [3, 6]
