"""A tiny deterministic training loop for the checkpoint tests: shuffling (torch's RNG),
dropout, numpy and python random all take part, so a resume is bit-identical only if every
one of them is restored.

usage: python train_worker.py straight STEPS            -> trains STEPS steps, prints the state's digest
       python train_worker.py checkpoint STEPS          -> trains STEPS steps, logs a checkpoint, prints its run
       python train_worker.py resume STEPS URI          -> load_checkpoint(URI), trains STEPS more, prints the digest
       python train_worker.py crash                     -> logs async checkpoints in a loop until killed
"""

import hashlib
import json
import random
import sys

import mlflow
import numpy as np
import torch

import mlflow_lance

torch.set_num_threads(1)


def setup():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)
    return model, opt, sched, data


def train(model, opt, sched, data, steps):
    x, y = data
    for _ in range(steps):
        idx = torch.randperm(64)[:16]
        noise = float(np.random.rand()) * 1e-3 + random.random() * 1e-3
        loss = ((model(x[idx]) - y[idx]) ** 2).mean() + noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return float(loss)


def digest(model, opt):
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.numpy().tobytes())
    for s in opt.state_dict()["state"].values():
        for t in s.values():
            h.update(t.numpy().tobytes() if isinstance(t, torch.Tensor) else repr(t).encode())
    h.update(repr((torch.rand(1).item(), np.random.rand(), random.random())).encode())
    return h.hexdigest()


mode = sys.argv[1]
model, opt, sched, data = setup()
if mode == "straight":
    train(model, opt, sched, data, int(sys.argv[2]))
    print(json.dumps({"digest": digest(model, opt)}))
elif mode == "checkpoint":
    with mlflow.start_run() as run:
        loss = train(model, opt, sched, data, int(sys.argv[2]))
        mlflow_lance.log_checkpoint(
            model, opt, step=int(sys.argv[2]), scheduler=sched, metrics={"loss": loss}, extra={"cursor": 1234}
        )
    print(json.dumps({"run_id": run.info.run_id}))
elif mode == "resume":
    state = mlflow_lance.load_checkpoint(sys.argv[3], model, opt, sched)
    assert state["extra"] == {"cursor": 1234}, state
    train(model, opt, sched, data, int(sys.argv[2]))
    print(json.dumps({"digest": digest(model, opt), "step": state["step"]}))
elif mode == "crash":
    with mlflow.start_run() as run:
        print(json.dumps({"run_id": run.info.run_id}), flush=True)
        step = 0
        while True:
            step += 1
            with torch.no_grad():
                model[0].weight.fill_(step)  # each checkpoint's weights say which step it is
            handle = mlflow_lance.log_checkpoint(model, opt, step=step, blocking=False)
            print(json.dumps({"staged": step}), flush=True)
