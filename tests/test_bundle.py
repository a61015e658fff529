"""Self-contained bundles (issue 20, part 1): a model directory that holds its own weights
loads, serves and predicts with the dataset it was logged to and the tracking database both
deleted; checkpoints, TorchScript and factory models bundle too; a crafted source is refused
as a load of it would be; a model whose dataset is out of reach says so and names `bundle`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.models import Model

import mlflow_lance as ml
from conftest import free_port, raw, stop, wait_http
from mlflow_lance import bundle_model, store
from mlflow_lance.errors import CorruptionError

BIN = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).resolve().parents[1] / ".venv")) / "bin"
X = np.arange(12, dtype="float32").reshape(3, 4) / 10


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.fixture
def alone(tmp_path, monkeypatch):
    """An embedded tracking store and Lance root in ``tmp_path/team``, which a test may delete."""
    team = tmp_path / "team"
    team.mkdir()
    monkeypatch.setenv("MLFLOW_LANCE_ROOT", str(team / "lance"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{team}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{team}/mlflow.db")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("bundles", artifact_location=str(team / "artifacts")))
    yield team
    mlflow.set_tracking_uri(None)


def _serve(model_dir: str, data: np.ndarray) -> np.ndarray:
    """Predictions of a real `mlflow models serve` of ``model_dir`` over HTTP."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", model_dir, "--env-manager", "local", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={
            **{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        },
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=120)
        body = json.dumps({"inputs": data.tolist()}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return np.array(json.loads(r.read())["predictions"], dtype="float32")
    finally:
        stop(proc)


def test_a_bundle_loads_and_serves_with_its_dataset_and_the_tracking_database_gone(alone, tmp_path, monkeypatch):
    model = _net(1)
    with mlflow.start_run():
        info = ml.log_model(model, name="model", registered_model_name="churn", input_example=X)
        model[2].weight.data.add_(1.0)  # a second version in the same dataset: the bundle holds the first only
        ml.log_model(model, name="model", registered_model_name="churn")
    expected = mlflow.pyfunc.load_model("models:/churn/1").predict(X)
    cli = subprocess.run(
        [str(BIN / "mlflow-lance"), "bundle", "models:/churn/1", str(tmp_path / "by-cli"), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["bytes"] > 0
    out = bundle_model("models:/churn/1", tmp_path / "bundle")
    assert Model.load(out).signature == Model.load(info.model_uri).signature  # and the example, requirements
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "by-cli"))
    assert [v.version for v in store.versions(os.path.join(out, "data", "weights.lance"))] == [1]
    with pytest.raises(FileExistsError):
        bundle_model("models:/churn/1", out)

    shutil.rmtree(alone)  # the dataset, the artifacts and the tracking database
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/nowhere/mlflow.db")
    for bundled in (out, str(tmp_path / "by-cli")):
        np.testing.assert_array_equal(mlflow.pyfunc.load_model(bundled).predict(X), expected)
        loaded = ml.load_model(bundled)
        assert all(raw(loaded.state_dict()[k]) == raw(v) for k, v in _net(1).state_dict().items())
    np.testing.assert_allclose(_serve(out, X), expected, rtol=1e-6)


def test_checkpoints_torchscript_and_factory_models_bundle(alone, tmp_path):
    model = _net(2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.from_numpy(X)).sum().backward()
    opt.step()
    with mlflow.start_run():
        ckpt = ml.log_checkpoint(model, opt, step=7, metrics={"loss": 0.5})
        scripted = ml.log_model(torch.jit.script(_net(3)), name="scripted")
        factory = ml.log_model(
            torch.nn.Linear(4, 2),
            name="factory",
            model_factory="torch.nn:Linear",
            factory_kwargs={"in_features": 4, "out_features": 2},
        )
    bundles = {
        "ckpt": bundle_model(ckpt.model_uri, tmp_path / "ckpt"),
        "scripted": bundle_model(scripted.model_uri, tmp_path / "scripted"),
        "factory": bundle_model(factory.model_uri, tmp_path / "factory"),
    }
    expected = {
        "scripted": ml.load_model(scripted.model_uri).state_dict(),
        "factory": ml.load_model(factory.model_uri).state_dict(),
    }
    shutil.rmtree(alone)
    fresh = _net(9)
    state = ml.load_checkpoint(bundles["ckpt"], fresh, torch.optim.AdamW(fresh.parameters()), restore_rng=False)
    assert state["step"] == 7 and all(raw(fresh.state_dict()[k]) == raw(v) for k, v in model.state_dict().items())
    whole = ml.load_state_dict(bundles["ckpt"])  # the whole checkpoint: optimizer, counters, metrics
    assert whole["step"] == 7 and whole["metrics"] == {"loss": 0.5} and set(whole["optimizer"]["state"])
    assert all(raw(whole["model"][k]) == raw(v) for k, v in model.state_dict().items())
    for kind in ("scripted", "factory"):
        loaded = ml.load_model(bundles[kind], allow_pickle=kind != "factory")
        assert all(raw(loaded.state_dict()[k]) == raw(v) for k, v in expected[kind].items()), kind


def test_a_crafted_source_is_refused_as_a_load_would_refuse_it(tmp_path):
    src = tmp_path / "model"
    ml.save_model(_net(4), str(src))
    (tmp_path / "secret").write_text("not for the bundle")
    os.symlink(tmp_path / "secret", src / "data" / "extra.txt")  # a link out of the directory
    with pytest.raises(CorruptionError, match="symbolic link"):
        bundle_model(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    os.remove(src / "data" / "extra.txt")
    pointer = src / "data" / "lance.yaml"
    pointer.write_text("lance_uri: ../../elsewhere.lance\nlance_version: 1\n")  # out of the directory
    with pytest.raises(CorruptionError):
        ml.load_model(str(src))
    with pytest.raises(CorruptionError):
        bundle_model(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_whose_dataset_is_out_of_reach_names_it_and_bundle(alone, tmp_path):
    with mlflow.start_run():
        info = ml.log_model(_net(5), name="model")
    dataset = info.flavors["mlflow_lance"]["lance_uri"]
    shutil.rmtree(dataset)  # as on another host, where that path does not exist
    with pytest.raises(FileNotFoundError) as err:
        ml.load_model(info.model_uri)
    assert dataset in str(err.value) and "mlflow-lance bundle" in str(err.value)
    with pytest.raises(FileNotFoundError, match="mlflow-lance bundle"):
        mlflow.pyfunc.load_model(info.model_uri)


def test_log_model_self_contained_keeps_the_weights_in_the_artifacts(alone, tmp_path):
    with mlflow.start_run():
        info = ml.log_model(_net(6), name="model", self_contained=True, input_example=X)
    expected = mlflow.pyfunc.load_model(info.model_uri).predict(X)
    assert info.flavors["mlflow_lance"]["self_contained"] is True
    assert not (alone / "lance").exists()  # nothing written to a shared dataset
    local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "copy"))
    shutil.rmtree(alone)
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(local).predict(X), expected)


def test_damaged_weights_are_not_laundered_and_planted_files_are_not_built_upon(tmp_path):
    src = tmp_path / "model"
    ml.save_model(torch.nn.Linear(512, 512), str(src))  # a data file that is almost all payload
    planted = src / "data" / "weights.lance.new"  # a dataset a bundle might have been tempted to extend
    shutil.copytree(src / "data" / "weights.lance", planted)
    out = bundle_model(str(src), tmp_path / "out")
    assert [v.version for v in store.versions(os.path.join(out, "data", "weights.lance"))] == [1]
    assert not any(name.startswith(".mlflow_lance_bundle_") for name in os.listdir(tmp_path))  # staging gone
    data = max((src / "data" / "weights.lance" / "data").iterdir(), key=lambda f: f.stat().st_size)
    with open(data, "r+b") as f:  # a damaged byte in the middle of the weights
        f.seek(data.stat().st_size // 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptionError):
        bundle_model(str(src), tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_foreign_pyfunc_loader_and_a_missing_architecture_are_named(tmp_path):
    src = tmp_path / "model"
    ml.save_model(_net(8), str(src))
    text = (src / "MLmodel").read_text()
    (src / "MLmodel").write_text(text.replace("loader_module: mlflow_lance.flavor", "loader_module: evil_module"))
    with pytest.raises(CorruptionError, match="pyfunc loader"):
        bundle_model(str(src), tmp_path / "out")
    (src / "MLmodel").write_text(text)
    os.remove(src / "data" / "skeleton.pkl")
    with pytest.raises(Exception) as err:  # the model's own file is missing: no advice to bundle
        ml.load_model(str(src))
    assert "bundle" not in str(err.value)


def test_an_unreachable_object_store_is_named_with_the_way_to_bundle(tmp_path, monkeypatch):
    src = tmp_path / "model"
    ml.save_model(_net(9), str(src), lance_uri=str(tmp_path / "w.lance"))
    (src / "data" / "lance.yaml").write_text("lance_uri: s3://nowhere/w.lance\nlance_version: 1\n")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(ConnectionError) as err:
        ml.load_model(str(src))
    assert "s3://nowhere/w.lance" in str(err.value) and "mlflow-lance bundle" in str(err.value)
