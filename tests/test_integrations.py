"""The Lightning and Hugging Face integrations with the real frameworks, on tiny models (CPU):
resume continues bit-identically, retention keeps what ModelCheckpoint / Trainer would keep,
and a LoRA fine-tune writes only its adapters and their optimizer state after the first
checkpoint. Resumes run in the test's process, with fresh Trainers and freshly built models
(seeded differently, so that only the checkpoint can make them equal)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_lance as ml
from conftest import free_port
from mlflow_lance import bindings, checkpoint


@pytest.fixture(autouse=True)
def _torch_global_state():
    """Lightning's deterministic=True switches torch's global deterministic mode on and leaves
    it on; put it back so that later tests (float4 tensors) run as they do alone."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.set_num_threads(threads)


def live_steps(run_id: str) -> list[int]:
    """Steps of the run's checkpoints MLflow still lists."""
    return sorted(
        int(m.tags[checkpoint._STEP_TAG]) for m in checkpoint._checkpoints(MlflowClient(), run_id, "checkpoint")
    )


def test_the_integrations_package_imports_no_framework():
    code = (
        "import sys, mlflow_lance.integrations; "
        "print(sorted({'lightning', 'transformers', 'peft', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- Lightning

L = pytest.importorskip("lightning.pytorch")
from mlflow_lance.integrations.lightning import MLflowLanceCheckpoint  # noqa: E402 (after the skip)

SCORES = [3.0, 1.0, 4.0, 0.5]  # a made-up validation score per epoch: best two are epochs 1 and 3


class TinyModule(L.LightningModule):
    """Dropout, a shuffled loader and a scheduler: resuming exactly needs every state restored."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
        )

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
    return (
        torch.utils.data.DataLoader(data, batch_size=8, shuffle=True),
        torch.utils.data.DataLoader(data, batch_size=16),
    )


def fit(tmp_path, seed: int, epochs: int, callbacks: list, ckpt_path: str | None = None):
    L.seed_everything(seed, verbose=False)
    module = TinyModule()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.fit(module, *loaders(), ckpt_path=ckpt_path)
    return module, trainer


def test_lightning_fit_resumes_from_a_checkpoint_uri_bit_identically(tracking, tmp_path):
    with mlflow.start_run():
        straight, _ = fit(tmp_path, 0, 4, [MLflowLanceCheckpoint()])
    with mlflow.start_run() as run:
        fit(tmp_path, 0, 2, [MLflowLanceCheckpoint()])
    assert live_steps(run.info.run_id) == [8]  # 4 batches an epoch; save_top_k=1 keeps the latest
    with mlflow.start_run():
        resumed, trainer = fit(
            tmp_path, 123, 4, [MLflowLanceCheckpoint()], ckpt_path=f"runs:/{run.info.run_id}/checkpoint"
        )
    assert trainer.global_step == 16 and trainer.current_epoch == 4
    assert all(
        torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True)
    )
    assert not list(tmp_path.rglob("*.ckpt"))  # no default ModelCheckpoint was added
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
    with mlflow.start_run(), pytest.raises(KeyError, match="found no such metric.*self.log"):
        fit(tmp_path, 0, 1, [MLflowLanceCheckpoint(monitor="val_acc")])


def torchrun(tmp_path, nproc: int | None, *args: str, worker: str = "lightning_worker.py") -> None:
    """A worker script of tests/ as users launch a job (``torchrun``; ``None``: plain python)."""
    worker = str(Path(__file__).with_name(worker))
    launch = [sys.executable, worker]
    if nproc is not None:
        launch[1:1] = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    experiment = mlflow.get_experiment(mlflow.tracking.fluent._get_experiment_id()).name
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MLFLOW_EXPERIMENT_NAME": experiment}
    done = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.mark.slow  # 31 s in the last full run
@pytest.mark.parametrize("strategy", ["model_parallel", "ddp"])
def test_lightning_ranks_log_one_run_and_resume_bit_identically_under_torchrun(tracking, tmp_path, strategy):
    """2 ranks (FSDP2 under ModelParallelStrategy, or DDP): a checkpoint an epoch in one run;
    a fresh module resumed from the first ends bit for bit where the job did; the last loads
    whole in this process. A sharded checkpoint also resumes at world size 1, under
    ModelParallelStrategy and on a plain single-device Trainer (weights and AdamW state)."""
    torchrun(tmp_path, 2, strategy, str(tmp_path))
    got = json.loads((tmp_path / "result.json").read_text())
    assert [step for _, step in got["checkpoints"]] == [4, 8, 12]  # 32 samples / 2 ranks / batch 4
    assert got["ranks_rng_differ"]  # so that only each rank's own generators resume it exactly
    assert got["b_started_at_first"] and got["b_equals_a"] and got["b_steps"] == 12
    client = MlflowClient()
    experiment = mlflow.tracking.fluent._get_experiment_id()
    assert [r.info.run_id for r in client.search_runs([experiment])] == [got["run_id"]]  # one run, not one per rank
    assert len(client.search_logged_models([experiment])) == 3  # one logged model per checkpoint
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    whole = ml.load_model(f"models:/{got['checkpoints'][-1][0]}")  # one process, no process group
    assert whole.state_dict().keys() == final.keys()
    assert all(torch.equal(whole.state_dict()[k], v) for k, v in final.items())
    if strategy != "model_parallel":
        return
    second = f"models:/{got['checkpoints'][1][0]}"
    for nproc, at_one in ((1, "model_parallel"), (None, "single")):
        torchrun(tmp_path, nproc, at_one, str(tmp_path), second)
        resumed = json.loads((tmp_path / "resumed.json").read_text())
        assert resumed == {"started_at_checkpoint": True, "optimizer_at_checkpoint": True, "steps": 24}, at_one


def test_lightning_strategies_with_checkpoints_of_their_own_are_refused_by_name(tracking, tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    class Own(FSDPStrategy):  # FSDP1 without a process group: the check comes before any setup
        def setup_environment(self) -> None:
            raise AssertionError("the callback should have refused this strategy first")

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=Own(), logger=False, callbacks=[MLflowLanceCheckpoint()])
    with pytest.raises(ValueError, match="Own writes its own checkpoints.*ModelParallelStrategy"):
        MLflowLanceCheckpoint().setup(trainer, TinyModule(), "fit")


# --------------------------------------------------------------------------- Hugging Face Trainer

transformers = pytest.importorskip("transformers")
from mlflow_lance.integrations.transformers import MLflowLanceTrainerCallback, resume_training  # noqa: E402


def gpt2(seed: int, **config):
    """A tiny GPT-2 built from a config (no downloads), initialised from ``seed``."""
    torch.manual_seed(seed)
    conf = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 16, **config}
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**conf))


def tokens(n: int = 32, vocab: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, 16), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def hf_trainer(model, tmp_path, seed: int, **args) -> transformers.Trainer:
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        logging_steps=2,
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **{"save_strategy": "steps", **args},
    )
    return transformers.Trainer(
        model=model,
        args=arguments,
        train_dataset=tokens(),
        eval_dataset=tokens(8),
        callbacks=[MLflowLanceTrainerCallback()],
    )


def test_hf_trainer_resumes_mid_epoch_bit_identically_and_keeps_save_total_limit(tracking, tmp_path):
    with mlflow.start_run() as run:  # 8 steps an epoch: step 10 is mid-way through the second
        straight = gpt2(0)
        hf_trainer(straight, tmp_path, 0, max_steps=12, save_steps=2, save_total_limit=2).train()
    assert live_steps(run.info.run_id) == [10, 12]
    assert not list((tmp_path / "hf").glob("checkpoint-*"))  # the Trainer wrote no folders of its own
    (at_10,) = [
        m
        for m in checkpoint._checkpoints(MlflowClient(), run.info.run_id, "checkpoint")
        if m.tags[checkpoint._STEP_TAG] == "10"
    ]
    with mlflow.start_run():
        resumed = gpt2(1)
        trainer = hf_trainer(resumed, tmp_path, 1, max_steps=12, save_steps=2)
        resume_training(trainer, f"models:/{at_10.model_id}")
    assert trainer.state.global_step == 12
    assert all(
        torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True)
    )


def test_hf_metric_for_best_model_keeps_the_best_besides_the_last(tracking, tmp_path):
    with mlflow.start_run() as run:  # the eval loss falls as it trains: "greater is better" makes the first best
        hf_trainer(
            gpt2(0),
            tmp_path,
            0,
            max_steps=8,
            save_steps=2,
            eval_strategy="steps",
            eval_steps=2,
            save_total_limit=1,
            metric_for_best_model="loss",
            greater_is_better=True,
        ).train()
    history = MlflowClient().get_metric_history(run.info.run_id, "eval_loss")
    assert [m.step for m in sorted(history, key=lambda m: -m.value)][:1] == [2]
    assert live_steps(run.info.run_id) == [2, 8]
    for refused in (
        {"load_best_model_at_end": True, "eval_strategy": "steps"},
        {"save_strategy": "best", "eval_strategy": "steps", "metric_for_best_model": "loss"},
    ):
        with pytest.raises(ValueError, match="MLflowLanceTrainerCallback"):
            hf_trainer(gpt2(0), tmp_path, 0, max_steps=2, **{"save_steps": 2, **refused}).train()


def test_hf_trainer_on_2_processes_logs_one_run_that_resumes_in_one(tracking, tmp_path):
    """DDP over 2 CPU processes (torchrun): the main process logs, so one run holds the job's
    checkpoints (mlflow#11782 logs one run per process); a single process resumes from one."""
    torchrun(tmp_path, 2, str(tmp_path), worker="hf_worker.py")
    assert json.loads((tmp_path / "hf.json").read_text()) == {"world": 2, "steps": 8}
    (run,) = MlflowClient().search_runs([mlflow.tracking.fluent._get_experiment_id()])
    assert live_steps(run.info.run_id) == [2, 4, 6, 8]
    assert not list((tmp_path / "hf").glob("checkpoint-*"))
    (at_4,) = [
        m
        for m in checkpoint._checkpoints(MlflowClient(), run.info.run_id, "checkpoint")
        if m.tags[checkpoint._STEP_TAG] == "4"
    ]
    steps_here = []

    class Count(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_here.append(state.global_step)

    with mlflow.start_run():
        trainer = hf_trainer(gpt2(1), tmp_path, 1, max_steps=6, save_steps=2)
        trainer.add_callback(Count())
        resume_training(trainer, f"models:/{at_4.model_id}")
    assert steps_here == [5, 6]  # 4 steps by the 2-process job, 2 here


def lora(seed: int):
    peft = pytest.importorskip("peft")
    base = gpt2(0, n_layer=2, n_embd=64, vocab_size=1024)  # the same base weights each time
    torch.manual_seed(seed)  # ... and adapters initialised from ``seed``
    return peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=4,
            target_modules=["c_attn"],
            fan_in_fan_out=True,
            init_lora_weights="gaussian",
            task_type="CAUSAL_LM",
        ),
    )


def test_peft_lora_checkpoints_after_the_first_write_only_adapters_and_their_optimizer_state(tracking, tmp_path):
    model = lora(0)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    with mlflow.start_run() as run:
        hf_trainer(model, tmp_path, 0, max_steps=6, save_steps=2).train()
    ckpts = sorted(
        checkpoint._checkpoints(MlflowClient(), run.info.run_id, "checkpoint"),
        key=lambda m: int(m.tags[checkpoint._STEP_TAG]),
    )
    written = [v.bytes_written for v in ml.versions(bindings.flavor_conf(f"models:/{ckpts[0].model_id}")["lance_uri"])]
    assert len(written) == 3 and written[0] > base_bytes > 3 * adapters + 256 * 1024
    # the adapters, their two Adam moments, counters and RNG states, no base weights: within the
    # issue's budget of base + n x (adapters + their optimizer state + 256 KB) over the run. The
    # second checkpoint also rewrites the packed runs it splits (adapters apart from frozen
    # neighbours); from the third on, a checkpoint writes the adapters' bytes alone.
    budget = 3 * adapters + 256 * 1024
    assert sum(written[1:]) <= (len(written) - 1) * budget and written[-1] <= budget, (written, adapters)
    with mlflow.start_run():  # a fresh PeftModel resumes from step 4 to the same adapters
        resumed = lora(1)
        resume_training(hf_trainer(resumed, tmp_path, 1, max_steps=6, save_steps=2), f"models:/{ckpts[1].model_id}")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True)
    )


def run_compression(run_id: str) -> bytes:
    """What the run's checkpoint dataset was created with (its schema's compression key)."""
    import lance

    uri = checkpoint._checkpoint_dataset(mlflow.get_run(run_id), None)
    return lance.dataset(uri).schema.metadata[b"mlflow_lance.compression"]


def test_the_callbacks_forward_compression(tracking, tmp_path):
    with mlflow.start_run() as run:
        fit(tmp_path, 0, 2, [MLflowLanceCheckpoint(save_top_k=-1, compression="zstd")])
    assert live_steps(run.info.run_id) == [4, 8] and run_compression(run.info.run_id) == b"zstd"
    with mlflow.start_run() as run:
        trainer = hf_trainer(gpt2(0), tmp_path, 0, max_steps=2, save_steps=2)
        trainer.remove_callback(MLflowLanceTrainerCallback)
        trainer.add_callback(MLflowLanceTrainerCallback(compression="auto"))
        trainer.train()
    assert live_steps(run.info.run_id) == [2] and run_compression(run.info.run_id) == b"auto"
