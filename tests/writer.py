"""One trainer process for the concurrency tests: waits for a common start time, then logs.

usage: python writer.py <registered model name> <seed> <start unix time>
Prints one JSON line: run id, Lance URI and version, model version.
"""

import json
import sys
import time
import warnings

warnings.simplefilter("ignore")

import mlflow  # noqa: E402
from model_zoo import SmallCNN, trained  # noqa: E402

import mlflow_lance  # noqa: E402

name, seed, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
model = trained(SmallCNN(), seed)
mlflow.set_experiment(f"writers-{name}")
with mlflow.start_run() as run:
    while time.time() < start:
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
