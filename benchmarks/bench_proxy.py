"""mlflow_lance through a proxying `mlflow server` against mlflow.pytorch through the same server.

Run:  python benchmarks/bench_proxy.py [--mb 1024] [--rounds 3] [--json benchmarks/results/proxy.json]
        [--compression auto]

The server is an unmodified ``mlflow server`` with its default ``--serve-artifacts`` and a local
``--artifacts-destination`` (SQLite backend), started on 127.0.0.1 for the run. Clients have
nothing but ``MLFLOW_TRACKING_URI``: every byte of both contenders goes through the server's
artifact service. The model is a bf16 stack of 4096 x 4096 linear layers (``--mb`` of weights).

Each timed step runs in a fresh process (imports excluded from the time; the process's peak
RSS reported), the contenders interleaved and their order alternating from round to round:

- first ``log_model`` of a fresh registered model: ``mlflow_lance.log_model`` against
  ``mlflow.pytorch.log_model(serialization_format="pickle")`` (both with fixed pip
  requirements, so that neither runs MLflow's requirement inference);
- a second version where one layer changed;
- ``load_model("models:/<name>/2")``.

``--compression auto`` (or ``zstd``) adds a third contender, ``lance-auto``: ``mlflow_lance``
with ``log_model(..., compression="auto")`` into registered models of its own, timed the same
way, and its ratios against raw ``mlflow_lance`` (fewer bytes through the server against the
encoding and decoding) and the bytes each mlflow_lance contender's round-0 dataset holds.

Floor: one ``MlflowClient.log_artifact`` of a file of the model's size (a single PUT of the
same bytes through the same server), and its download.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

CHILD = r"""
import json, os, resource, sys, time, warnings
warnings.simplefilter("ignore")
import mlflow, torch
import mlflow_lance
step, who, name, mb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
layers = max(1, mb // 32)

def model(seed, changed=None):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16, device="meta")
                              for _ in range(layers)]).to_empty(device="cpu")
    with torch.no_grad():
        for i, layer in enumerate(m):
            torch.manual_seed(seed * 1000 + (i if i != changed else 999))
            layer.weight.normal_()
    return m

reqs = ["torch", "mlflow"]
mlflow.set_experiment("bench-proxy")
if step == "floor":
    path = os.path.join(os.environ["BENCH_TMP"], "floor.bin")
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    with mlflow.start_run() as run:
        t = time.perf_counter()
        mlflow.MlflowClient().log_artifact(run.info.run_id, path)
        put = time.perf_counter() - t
    os.remove(path)
    t = time.perf_counter()
    mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/floor.bin", dst_path=os.environ["BENCH_TMP"])
    get = time.perf_counter() - t
    os.remove(path)
    out = {"put": put, "get": get}
elif step in ("first", "second"):
    m = model(1, changed=None if step == "first" else 0)
    t = time.perf_counter()
    with mlflow.start_run():
        if who.startswith("lance"):
            compression = who.partition("-")[2] or None  # "lance-auto": compression="auto"
            mlflow_lance.log_model(m, name="model", registered_model_name=name, pip_requirements=reqs,
                                   compression=compression)
        else:
            mlflow.pytorch.log_model(m, name="model", registered_model_name=name, pip_requirements=reqs,
                                     serialization_format="pickle")
    out = {"seconds": time.perf_counter() - t}
else:
    t = time.perf_counter()
    loaded = (mlflow_lance if who.startswith("lance") else mlflow.pytorch).load_model(f"models:/{name}/2")
    out = {"seconds": time.perf_counter() - t}
    assert loaded[0].weight.dtype == torch.bfloat16
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def child(env: dict, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=3600, check=False
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=1024, help="megabytes of bf16 weights")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--compression",
        choices=("zstd", "auto"),
        help="also time mlflow_lance with log_model(compression=...) as a third contender",
    )
    args = parser.parse_args()
    contenders = ["lance", "pytorch"] + ([f"lance-{args.compression}"] if args.compression else [])
    from conftest import running_mlflow_server

    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        root = Path(tmp)
        with running_mlflow_server(root, ["--artifacts-destination", str(root / "artifacts")]) as url:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3", "MLFLOW_LANCE_ROOT"))}
            env.update(MLFLOW_TRACKING_URI=url, BENCH_TMP=tmp, MLFLOW_LANCE_CACHE_DIR=str(root / "cache"))
            rows: dict[str, dict[str, list[dict]]] = {}
            for r in range(args.rounds):
                order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
                for step in ("first", "second", "load"):
                    for who in order:
                        result = child(env, step, who, f"{who}-{r}", str(args.mb))
                        rows.setdefault(step, {}).setdefault(who, []).append(result)
                        print(step, who, r, result, flush=True)
                rows.setdefault("floor", {}).setdefault("raw", []).append(child(env, "floor", "raw", "-", str(args.mb)))
            uploaded = sum(p.stat().st_size for p in (root / "artifacts").rglob("*") if p.is_file())
            stored = {
                who: sum(
                    p.stat().st_size
                    for d in (root / "artifacts").rglob("*.lance")
                    if d.is_dir() and f"{who}-0" in d.name
                    for p in (d / "data").rglob("*")
                    if p.is_file()
                )
                for who in contenders
                if who.startswith("lance")
            }
    med = {
        step: {who: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for who, runs in by.items()}
        for step, by in rows.items()
    }
    floor = med["floor"]["raw"]
    lines = [
        f"model: {args.mb} MB of bf16 weights, {max(1, args.mb // 32)} layers; medians of {args.rounds} rounds",
        "| step | mlflow_lance s | mlflow.pytorch s | ratio (goal) | peak RSS MB (ours / theirs) |",
        "|---|---|---|---|---|",
    ]
    goals = {"first": 1.0, "second": 0.1, "load": 1.0}
    for step, goal in goals.items():
        ours, theirs = med[step]["lance"], med[step]["pytorch"]
        ratio = ours["seconds"] / theirs["seconds"]
        mark = "met" if ratio <= goal else "missed"
        lines.append(
            f"| {step} | {ours['seconds']:.2f} | {theirs['seconds']:.2f} | {ratio:.2f}x (<= {goal}x, {mark}) "
            f"| {ours['peak_rss_mb']:.0f} / {theirs['peak_rss_mb']:.0f} |"
        )
    lines.append(
        f"floor: one PUT of {args.mb} MB through the server {floor['put']:.2f} s, its GET {floor['get']:.2f} s"
    )
    if args.compression:
        for step in goals:
            ours, base, theirs = med[step][f"lance-{args.compression}"], med[step]["lance"], med[step]["pytorch"]
            lines.append(
                f"compression={args.compression!r}, {step}: {ours['seconds']:.2f} s, "
                f"{ours['seconds'] / base['seconds']:.2f}x raw mlflow_lance, "
                f"{ours['seconds'] / theirs['seconds']:.2f}x mlflow.pytorch "
                f"(peak RSS {ours['peak_rss_mb']:.0f} MB)"
            )
    for who, n in stored.items():
        lines.append(f"data files of {who}'s round-0 dataset (both versions): {n / 1e6:.1f} MB")
    lines.append(f"bytes in the server's destination after all rounds: {uploaded / 1e6:.0f} MB")
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"medians": med, "rows": rows, "table": lines, "stored": stored, "compression": args.compression}
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
