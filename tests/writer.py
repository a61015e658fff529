"""One trainer process for the concurrency tests: once trained and in its run, it creates
<go file>.<seed>.ready and waits for <go file> to exist (the test creates it when every
writer is ready, however long their imports took), then logs.

usage: python writer.py <registered model name> <seed> <go file>
Prints one JSON line: run id, Lance URI and version, model version.
"""

import json
import sys
import time
import warnings
from pathlib import Path

warnings.simplefilter("ignore")

import mlflow  # noqa: E402
from model_zoo import SmallCNN, trained  # noqa: E402

import mlflow_lance  # noqa: E402

name, seed, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
model = trained(SmallCNN(), seed)
mlflow.set_experiment(f"writers-{name}")
with mlflow.start_run() as run:
    Path(f"{go}.{seed}.ready").touch()
    while not go.exists():
        time.sleep(0.001)
    info = mlflow_lance.log_model(model, name="model", registered_model_name=name)
flavor = info.flavors["mlflow_lance"]
print(
    json.dumps(
        {
            "run_id": run.info.run_id,
            "seed": seed,
            "uri": flavor["lance_uri"],
            "lance_version": flavor["lance_version"],
            "model_version": str(info.registered_model_version),
        }
    )
)
