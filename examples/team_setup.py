"""The team setup on one machine: a shared tracking server and S3-compatible storage.

    python examples/team_setup.py [--trainers 3]

Starts, on 127.0.0.1 only: an S3-compatible server (moto_server, from ``moto[server]``) with
a bucket, and ``mlflow server`` with a SQLite backend whose default artifact root is on
that bucket (``--no-serve-artifacts``: clients read and write S3 directly, as in production
with a real bucket). Then several trainer processes log into one registered model at the
same moment; the Lance dataset lands next to the artifacts, under ``s3://<bucket>/mlflow/
lance/``. Finally the champion is loaded back and everything is shut down.

For a real deployment replace moto_server by your S3 endpoint (or AWS itself: drop
MLFLOW_S3_ENDPOINT_URL) and SQLite by PostgreSQL/MySQL; the client side is the same.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(url)


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


TRAINER = textwrap.dedent("""
    import sys, time, warnings, torch, mlflow, mlflow_lance
    warnings.simplefilter("ignore")
    seed, start = int(sys.argv[1]), float(sys.argv[2])
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    mlflow.set_experiment("team")
    with mlflow.start_run(run_name=f"trainer-{seed}"):
        while time.time() < start:
            time.sleep(0.001)
        info = mlflow_lance.log_model(model, name="model", registered_model_name="team-model")
    print("RESULT", info.registered_model_version, info.flavors["mlflow_lance"]["lance_version"])
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainers", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="team_setup_"))
    s3_port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": "team-demo-key",
        "AWS_SECRET_ACCESS_KEY": "team-demo-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
    }
    env.pop("MLFLOW_LANCE_ROOT", None)  # the Lance root follows the artifact root
    procs = []
    try:
        procs.append(start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], work / "s3.log", env))
        wait(f"http://127.0.0.1:{s3_port}/moto-api/", procs[-1])
        import boto3

        boto3.client(
            "s3",
            endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket="team-bucket")
        procs.append(
            start(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{work}/mlflow.db",
                    "--default-artifact-root",
                    "s3://team-bucket/mlflow",
                    "--no-serve-artifacts",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                ],
                work / "mlflow.log",
                env,
            )
        )
        wait(f"{env['MLFLOW_TRACKING_URI']}/health", procs[-1])
        print(f"tracking server {env['MLFLOW_TRACKING_URI']}, S3 endpoint {env['MLFLOW_S3_ENDPOINT_URL']}")

        go = time.time() + 8
        trainers = [
            subprocess.Popen(
                [sys.executable, "-c", TRAINER, str(seed), str(go)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for seed in range(args.trainers)
        ]
        for seed, t in enumerate(trainers):
            out, err = t.communicate(timeout=300)
            if t.returncode:
                raise RuntimeError(err[-2000:])
            mv, lv = next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]
            print(f"trainer {seed}: model version {mv} = Lance version {lv}")

        os.environ.update({k: v for k, v in env.items() if k != "PATH"})
        import mlflow
        import torch

        import mlflow_lance

        client = mlflow.MlflowClient()
        client.set_registered_model_alias("team-model", "champion", "1")
        (report,) = mlflow_lance.sync("team-model")
        print(
            f"dataset {report.dataset}: {len(report.model_versions)} model versions pinned, "
            f"{report.runs} runs in the sidecar"
        )
        champion = mlflow_lance.load_model("models:/team-model@champion")
        print(
            f"@champion loaded: {sum(p.numel() for p in champion.parameters()):,} parameters; "
            f"prediction {champion(torch.ones(1, 64)).detach().numpy().round(3).tolist()}"
        )
        keys = boto3.client(
            "s3",
            endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        ).list_objects_v2(Bucket="team-bucket", Prefix="mlflow/lance/")["Contents"]
        print(
            f"s3://team-bucket/mlflow/lance/ holds {len(keys)} objects, e.g. "
            f"{sorted(k['Key'] for k in keys if k['Key'].endswith('.yaml'))}"
        )
        assert len(report.model_versions) == args.trainers
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)


if __name__ == "__main__":
    main()
