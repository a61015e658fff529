"""A process that saves, logs or syncs in a loop until it is killed (the crash-safety tests).

usage: python crash_worker.py save <dataset uri>
       python crash_worker.py log  <registered model name>
       python crash_worker.py sync <registered model name>
Prints READY once imports are done, so that kills land in the work, not in the imports.
Each saved version's tensors are derived from a counter recorded in its properties.
"""

import sys
import time
import warnings

warnings.simplefilter("ignore")

# Everything a save imports, before READY: the package imports its modules lazily, and the
# store imports Lance only when it first opens a dataset.
import lance  # noqa: E402,F401
import torch  # noqa: E402

import mlflow_lance as ml  # noqa: E402
import mlflow_lance.store  # noqa: E402,F401


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
        if mode == "save":
            ml.save_state_dict(state(k), target, properties={"k": str(k)})
        elif mode == "log":
            import mlflow

            model = torch.nn.Linear(256, 256)
            with torch.no_grad():
                model.weight.fill_(k)
            with mlflow.start_run():
                mlflow.set_tag("k", str(k))
                ml.log_model(model, name="model", registered_model_name=target)
        else:
            ml.sync(target)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
