"""Training checkpoints: bit-exact resume in a fresh process, async writes and their errors,
retention by step and metric with gc reclaiming the rest, frozen parts costing nothing, and
SIGKILL during an async write losing nothing earlier."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_lance as ml
from conftest import report
from mlflow_lance import bindings, checkpoint

HERE = Path(__file__).resolve().parent


def worker(*args: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / "train_worker.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # 22 s in the last full run
def test_resuming_in_a_fresh_process_continues_bit_identically(tracking):
    env = {"MLFLOW_TRACKING_URI": tracking["url"]}
    straight = worker("straight", "10", env=env)
    run = worker("checkpoint", "5", env=env)
    resumed = worker("resume", "5", f"runs:/{run['run_id']}/checkpoint", env=env)
    assert resumed["step"] == 5
    assert resumed["digest"] == straight["digest"]
    different = worker("straight", "9", env=env)
    assert different["digest"] != straight["digest"]  # the digest does tell states apart


def small(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def step_once(model, opt) -> None:
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_async_checkpoints_stage_copies_and_surface_background_errors(tracking, monkeypatch):
    model, opt = small()
    with mlflow.start_run() as run:
        step_once(model, opt)
        handle = ml.log_checkpoint(model, opt, step=1, blocking=False, metrics={"loss": 1.0})
        want = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():  # training goes on while the write runs: the checkpoint is the staged state
            for p in model.parameters():
                p.add_(1)
        ckpt = handle.result(timeout=120)
        ml.wait_for_checkpoints()
    got = ml.load_model(ckpt.model_uri)
    assert all(torch.equal(got.state_dict()[k], v) for k, v in want.items())
    lm = MlflowClient().get_logged_model(ckpt.model_id)
    assert lm.source_run_id == run.info.run_id and {m.key for m in lm.metrics or []} == {"loss"}
    pyfunc = mlflow.pyfunc.load_model(ckpt.model_uri)  # a checkpoint serves like a model
    assert pyfunc.predict(torch.zeros(1, 16).numpy()).shape == (1, 2)

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(checkpoint.flavor, "_log", broken)
    with mlflow.start_run():
        ml.log_checkpoint(model, opt, step=2, blocking=False)
        with pytest.raises(OSError, match="disk on fire") as raised:  # its own type, not a RuntimeError
            ml.log_checkpoint(model, opt, step=3, blocking=False)  # raised by the next call
        assert type(raised.value) is OSError
        if sys.version_info >= (3, 11):
            assert "earlier log_checkpoint(blocking=False)" in raised.value.__notes__[0]
        ml.log_checkpoint(model, opt, step=4, blocking=False)
        with pytest.raises(OSError, match="disk on fire"):
            ml.wait_for_checkpoints()  # ... or at flush
        ml.wait_for_checkpoints()  # each error surfaces once


def test_retention_keeps_the_last_and_the_best_and_gc_reclaims_the_rest(tracking):
    model, opt = small(1)
    losses = [5.0, 1.0, 4.0, 0.5, 3.0, 2.0]  # best two: steps 4 and 2; last: step 6
    client = MlflowClient()
    with mlflow.start_run() as run:
        infos = []
        for step, loss in enumerate(losses, 1):
            step_once(model, opt)
            infos.append(
                ml.log_checkpoint(
                    model,
                    opt,
                    step=step,
                    metrics={"val_loss": loss},
                    keep_last=1,
                    keep_best=("val_loss", "min", 2),
                )
            )
            if step == 3:
                mlflow.register_model(infos[-1].model_uri, "kept-checkpoint")  # registered: never deleted
    live = sorted(
        int(m.tags[checkpoint._STEP_TAG]) for m in checkpoint._checkpoints(client, run.info.run_id, "checkpoint")
    )
    assert live == [2, 3, 4, 6]
    uri = infos[0].lance_uri
    before = {v.version for v in ml.versions(uri)}
    (result,) = ml.gc(uri, grace=timedelta(0))
    assert set(result.removed_versions) == {1, 5} and result.bytes_removed > 0
    assert {v.version for v in ml.versions(uri)} == before - {1, 5}
    state = ml.load_checkpoint(f"runs:/{run.info.run_id}/checkpoint")
    assert state["step"] == 6 and state["metrics"] == {"val_loss": 2.0}


def test_frozen_parameters_cost_nothing_after_the_first_checkpoint(tracking):
    torch.manual_seed(0)
    backbone, head = torch.nn.Linear(256, 256), torch.nn.Linear(256, 4)
    for p in backbone.parameters():
        p.requires_grad_(False)
    model = torch.nn.Sequential(backbone, head)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    head_bytes = sum(p.numel() * p.element_size() for p in head.parameters())
    with mlflow.start_run():
        written = []
        for step in range(1, 4):
            model(torch.randn(8, 256)).sum().backward()
            opt.step()
            opt.zero_grad()
            ckpt = ml.log_checkpoint(model, opt, step=step)
            written.append(
                next(v for v in ml.versions(ckpt.lance_uri) if v.version == ckpt.lance_version).bytes_written
            )
    backbone_bytes = sum(p.numel() * p.element_size() for p in backbone.parameters())
    assert written[0] > backbone_bytes
    for w in written[1:]:  # the head, its two Adam moments, step counters, RNG states: no backbone
        assert w < 3 * head_bytes + 64 * 1024 < backbone_bytes, written


def _first_json(stream) -> dict:
    for line in stream:
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError("the worker printed no JSON line")


@pytest.mark.slow
def test_sigkill_during_async_writes_loses_no_earlier_checkpoint(tracking):
    """20 workers logging background checkpoints, each SIGKILLed at a random moment of its
    second checkpoint's write. The kill is timed from the worker's own lines: "staged 2"
    means checkpoint 1 is written (log_checkpoint waits for the one in flight), and the kill
    lands within as long again as checkpoint 1 took, so a slow machine moves the window."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking["url"]}
    rng = random.Random(7)
    checked = 0
    killed_running = []
    client = MlflowClient()
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "train_worker.py"), "crash"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        run_id = _first_json(proc.stdout)["run_id"]
        assert _first_json(proc.stdout) == {"staged": 1}
        staged_1 = time.monotonic()
        assert _first_json(proc.stdout) == {"staged": 2}
        took = time.monotonic() - staged_1
        time.sleep(rng.uniform(0, took))
        proc.send_signal(signal.SIGKILL)
        killed_running.append(proc.wait() == -signal.SIGKILL)
        steps = []
        for m in checkpoint._checkpoints(client, run_id, "checkpoint"):  # every finished one loads exactly
            step = int(m.tags[checkpoint._STEP_TAG])
            model = torch.nn.Sequential(
                torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
            )
            state = ml.load_checkpoint(f"models:/{m.model_id}", model, restore_rng=False)
            assert state["step"] == step and torch.equal(model[0].weight, torch.full((32, 8), float(step)))
            conf = ml.load_state_dict(f"models:/{m.model_id}")
            assert conf["step"] == step
            steps.append(step)
            checked += 1
        assert 1 in steps  # written before the kill: it must have survived it
        finished = checkpoint._checkpoints(client, run_id, "checkpoint")
        uri = bindings.flavor_conf(f"models:/{finished[0].model_id}")["lance_uri"]
        assert all(ml.verify(uri, v.version).ok for v in ml.versions(uri))  # the in-flight one too
    assert all(killed_running), killed_running  # each kill hit a running worker, not an exited one
    # each check above asserts: a run that gets here found none lost or corrupt
    report(
        "reliability.json", "async_checkpoint_kills", {"trials": len(killed_running), "checkpoints_checked": checked}
    )


def test_review_findings_hold(tracking, tmp_path, capsys):
    """Optimizer state follows parameter names when the order and groups are built differently;
    NaN never outranks a real metric; gc --all finds run checkpoint datasets; tied weights are
    staged once; the CLI exports a checkpoint version as flat tensors."""
    model, _ = small(3)
    opt = torch.optim.SGD(
        [
            {"params": [model[0].weight, model[1].weight], "lr": 0.1},
            {"params": [model[0].bias, model[1].bias], "lr": 0.5},
        ],
        momentum=0.9,
    )
    step_once(model, opt)
    with mlflow.start_run() as run:
        first = ml.log_checkpoint(model, opt, step=1, metrics={"loss": 0.1}, keep_best=("loss", "min", 1))
        second = ml.log_checkpoint(model, opt, step=2, metrics={"loss": float("nan")}, keep_best=("loss", "min", 1))
        third = ml.log_checkpoint(model, opt, step=3, metrics={"loss": 0.3}, keep_best=("loss", "min", 1))
    live = {m.model_id for m in checkpoint._checkpoints(MlflowClient(), run.info.run_id, "checkpoint")}
    assert first.model_id in live and third.model_id in live and second.model_id not in live
    fresh, _ = small(4)  # the same parameters, grouped and ordered differently
    opt2 = torch.optim.SGD(
        [
            {"params": [fresh[1].bias, fresh[0].bias], "lr": 0.5},
            {"params": [fresh[1].weight, fresh[0].weight], "lr": 0.1},
        ],
        momentum=0.9,
    )
    ml.load_checkpoint(first.model_uri, fresh, opt2, restore_rng=False)
    by_param = {p: opt.state[q]["momentum_buffer"] for p, q in zip(fresh.parameters(), model.parameters(), strict=True)}
    for p, buf in by_param.items():
        assert torch.equal(opt2.state[p]["momentum_buffer"], buf)
    assert [g["lr"] for g in opt2.param_groups] == [0.5, 0.1]
    results = ml.gc(all=True, grace=timedelta(0))
    assert any(r.dataset.endswith(f"checkpoints/{run.info.run_id}.lance") for r in results)

    emb = torch.nn.Embedding(1000, 64)
    tied = torch.nn.ModuleDict({"emb": emb, "head": torch.nn.Linear(64, 1000, bias=False)})
    tied["head"].weight = emb.weight
    with mlflow.start_run():
        handle = ml.log_checkpoint(tied, None, step=1, blocking=False)
        ckpt = handle.result(timeout=120)
    written = next(v for v in ml.versions(ckpt.lance_uri) if v.version == ckpt.lance_version).bytes_written
    assert written < 1.5 * emb.weight.numel() * 4  # one copy of the tied matrix
    from mlflow_lance.cli import main as cli

    out = tmp_path / "ckpt.safetensors"
    assert cli(["export", first.lance_uri, str(out), "--version", str(first.lance_version)]) == 0
    from safetensors.torch import load_file

    assert "model/0.weight" in load_file(str(out))
