"""A process that saves, logs or syncs in a loop until it is killed (the crash-safety tests).

usage: python crash_worker.py save <dataset uri>
       python crash_worker.py log  <registered model name>
       python crash_worker.py sync <registered model name>
Prints READY once imports are done, then "WRITING <k>" as each save, log or sync starts and
"DONE <k>" once it returned, so that a test times its kills from the worker's own progress
(not from the process start) and knows which calls finished. Each saved version's tensors
are derived from the counter k, recorded in its properties (log: the run's tag "k").
"""

import sys
import time
import warnings

warnings.simplefilter("ignore")

# Everything a save imports, before READY: the package imports its modules lazily, and the
# store imports Lance only when it first opens a dataset.
import lance  # noqa: E402,F401
import mlflow  # noqa: E402
import torch  # noqa: E402

import mlflow_lance as ml  # noqa: E402
import mlflow_lance.flavor  # noqa: E402
import mlflow_lance.lifecycle  # noqa: E402
import mlflow_lance.store  # noqa: E402


def state(k: int) -> dict:
    g = torch.Generator().manual_seed(k)
    return {
        "big": torch.randn(2_000_000, generator=g),  # 8 MB: a save takes long enough to be hit
        "step": torch.tensor([k]),
        "fixed": torch.ones(1000),
    }


def main(mode: str, target: str) -> None:
    k = int(time.time() * 1000) % 10_000_000
    print("READY", flush=True)
    while True:
        k += 1
        print(f"WRITING {k}", flush=True)
        if mode == "save":
            ml.save_state_dict(state(k), target, properties={"k": str(k)})
        elif mode == "log":
            model = torch.nn.Linear(256, 256)
            with torch.no_grad():
                model.weight.fill_(k)
            with mlflow.start_run():
                mlflow.set_tag("k", str(k))
                ml.log_model(model, name="model", registered_model_name=target)
        else:
            ml.sync(target)
        print(f"DONE {k}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
