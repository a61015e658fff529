"""Reads and plans never write (issue 18): after every read verb, and after a dry-run gc, the
dataset's files (bytes and names, its version index and sidecar included), its Lance tags
and the registry's tags and descriptions are exactly what they were. A missing index or
sidecar stays missing: only a save, gc, sync or log writes them."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_lance as ml
from mlflow_lance import lifecycle, sidecar, store
from mlflow_lance.checkpoint import read_checkpoint
from mlflow_lance.cli import main as cli


def files(uri: str) -> dict[str, bytes]:
    """Every file of the dataset and its sidecar, with its bytes."""
    root = Path(uri)
    found = {str(p.relative_to(root.parent)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    side = Path(sidecar.sidecar_uri(uri))
    if side.exists():
        found[side.name] = side.read_bytes()
    return found


def registry() -> dict:
    client = MlflowClient()
    out = {}
    for rm in client.search_registered_models():
        out[rm.name] = (dict(rm.tags or {}), rm.description)
        for mv in client.search_model_versions(f"name = '{rm.name}'"):
            out[f"{rm.name}/{mv.version}"] = (dict(mv.tags or {}), mv.description)
    return out


@pytest.fixture
def logged(tracking, tmp_path):
    """A registered model with two versions (one via plain MLflow), a checkpoint run, a tag."""
    name = f"readonly-{tmp_path.name}"  # the session's server outlives this test: a model of its own
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with mlflow.start_run() as run:
        first = ml.log_model(net, name="model", registered_model_name=name)
        with torch.no_grad():
            net[2].bias.add_(1)
        second = ml.log_model(net, name="model")
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        ckpt = ml.log_checkpoint(net, opt, step=1)
    mlflow.register_model(f"models:/{second.model_id}", name)  # plain MLflow: no pin yet
    mlflow.register_model(f"models:/{first.model_id}", f"plain-{name}")  # a model with no binding tag yet
    uri = first.flavors["mlflow_lance"]["lance_uri"]
    ml.tag(uri, "best", 1)
    return {
        "name": name,
        "uri": uri,
        "run": run.info.run_id,
        "first": first,
        "second": second,
        "ckpt": ckpt,
        "net": net,
    }


def reads(w: dict, tmp_path: Path) -> dict:
    uri = w["uri"]
    holder = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    return {
        "load latest": lambda: ml.load_state_dict(uri),
        "load numbered, verified": lambda: ml.load_state_dict(uri, 1, verify=True),
        "load a tag": lambda: ml.load_state_dict(uri, "best"),
        "load by glob": lambda: ml.load_state_dict(uri, names="2.*"),
        "load by run id": lambda: ml.load_state_dict(uri, run_id=w["run"], model_id=w["first"].model_id),
        "load_into": lambda: ml.load_into(holder, uri, 1),
        "load_into verified": lambda: ml.load_into(holder, uri, 1, verify=True),
        "versions": lambda: ml.versions(uri),
        "diff": lambda: ml.diff(uri, 1),
        "tags": lambda: ml.tags(uri),
        "verify": lambda: ml.verify(uri),
        "latest_version": lambda: store.latest_version(uri),
        "resolve_version": lambda: store.resolve_version(uri, "best"),
        "version_properties": lambda: store.version_properties(uri, 1),
        "models:/ state dict": lambda: ml.load_state_dict(f"models:/{w['name']}/1"),
        "load_model models:/": lambda: ml.load_model(f"models:/{w['name']}/2"),
        "load_model runs:/": lambda: ml.load_model(f"runs:/{w['run']}/model"),
        "pyfunc": lambda: mlflow.pyfunc.load_model(f"models:/{w['name']}/1").predict(torch.zeros(1, 8).numpy()),
        "read_checkpoint": lambda: read_checkpoint(w["ckpt"].model_uri),
        "gc dry run": lambda: ml.gc(uri, grace=timedelta(0), dry_run=True),
        "gc --all dry run": lambda: ml.gc(all=True, grace=timedelta(0), keep_last=1, dry_run=True),
        "store gc dry run": lambda: store.prune(uri, keep_last=1, grace=timedelta(0), dry_run=True),
        "plan": lambda: lifecycle.survey(uri, lifecycle.References()),
        "cli versions": lambda: cli(["versions", uri]) == 0 or 1 / 0,
        "cli diff": lambda: cli(["diff", uri, "1"]) == 0 or 1 / 0,
        "cli verify": lambda: cli(["verify", uri, "--version", "best"]) == 0 or 1 / 0,
        "cli export": lambda: cli(["export", uri, str(tmp_path / "out.safetensors")]) == 0 or 1 / 0,
        "cli gc dry run": lambda: cli(["gc", "--all", "--dry-run", "--grace-minutes", "0"]) == 0 or 1 / 0,
    }


@pytest.mark.slow  # 56 s in the last full run
@pytest.mark.parametrize("without", ["nothing", "the index and the sidecar"])
def test_no_read_and_no_dry_run_leaves_a_trace(logged, tmp_path, without):
    uri = logged["uri"]
    if without != "nothing":
        shutil.rmtree(Path(uri) / "_mlflow_lance")
        Path(sidecar.sidecar_uri(uri)).unlink()
    before, tags, reg = files(uri), ml.tags(uri), registry()
    for name, read in reads(logged, tmp_path).items():
        read()
        assert files(uri) == before, f"{name} wrote into the dataset"
        assert ml.tags(uri) == tags, f"{name} changed a tag"
        assert registry() == reg, f"{name} changed the registry"
    assert without == "nothing" or not (Path(uri) / "_mlflow_lance").exists()


def test_sync_is_the_repair_that_writes_missing_indexes(logged):
    """A dataset whose indexes are gone decodes its rows on each load (a read writes none);
    ``sync`` writes them back, after which a load reads the index alone again."""
    uri = logged["uri"]
    before = {p.name: p.read_bytes() for p in (Path(uri) / "_mlflow_lance" / "index").iterdir()}
    shutil.rmtree(Path(uri) / "_mlflow_lance")
    ml.load_state_dict(uri)
    assert not (Path(uri) / "_mlflow_lance").exists()
    (report,) = ml.sync(uri)
    assert report.reindexed == sorted(int(n.split(".")[0]) for n in before)
    after = {p.name: p.read_bytes() for p in (Path(uri) / "_mlflow_lance" / "index").iterdir()}
    assert after == before  # the same index a save writes, byte for byte
    assert ml.sync(uri)[0].reindexed == []
