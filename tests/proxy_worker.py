"""A client of a proxying `mlflow server` with nothing but MLFLOW_TRACKING_URI, for the
transport tests.

usage:
  python proxy_worker.py log <registered model name> <seed> <rounds> <start unix time>
      logs ``rounds`` models (seeds seed*100+round) and prints one JSON line per round
  python proxy_worker.py save <dataset uri> <megabytes>
      prints "writing" and saves a fresh state dict of that size, in a loop (to be killed)
"""

import json
import sys
import time
import warnings

warnings.simplefilter("ignore")

import mlflow  # noqa: E402
import torch  # noqa: E402
from model_zoo import SmallCNN, trained  # noqa: E402

import mlflow_lance  # noqa: E402

if sys.argv[1] == "log":
    name, seed, rounds, start = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    mlflow.set_experiment(f"proxy-writers-{name}")
    while time.time() < start:
        time.sleep(0.001)
    for r in range(rounds):
        model = trained(SmallCNN(), seed * 100 + r)
        with mlflow.start_run() as run:
            info = mlflow_lance.log_model(model, name="model", registered_model_name=name)
        flavor = info.flavors["mlflow_lance"]
        print(
            json.dumps(
                {
                    "run_id": run.info.run_id,
                    "seed": seed * 100 + r,
                    "lance_version": flavor["lance_version"],
                    "model_version": str(info.registered_model_version),
                }
            ),
            flush=True,
        )
else:
    uri, megabytes = sys.argv[2], int(sys.argv[3])
    for i in range(1000):
        sd = {f"t{j}": torch.full((megabytes << 18,), float(i * 10 + j)) for j in range(4)}
        print("writing", flush=True)
        mlflow_lance.save_state_dict(sd, uri, message=f"save {i}")
        print("saved", i, flush=True)
