"""The MLflow flavor against a real `mlflow server` process (SQLite backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from model_zoo import SmallCNN, TwoInputs, tiny_gpt2, trained

import mlflow_lance as ml
from conftest import BIN, free_port, stop, wait_http

HERE = Path(__file__).resolve().parent
ZOO = [str(HERE / "model_zoo.py")]
IMAGES = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype("float32")


def predict(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def in_fresh_process(code: str) -> dict:
    """Run code in a new interpreter (same environment) and return the JSON it prints last."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(HERE)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_model_uri_loads_the_version_its_run_logged(tracking):
    name = "cnn-uris"
    client = MlflowClient()
    runs = []
    for seed in (1, 2):  # two versions: each URI must find its own
        model = trained(SmallCNN(), seed)
        with mlflow.start_run() as run:
            info = ml.log_model(model, name="model", registered_model_name=name, code_paths=ZOO, input_example=IMAGES)
        runs.append((run.info.run_id, info, predict(model, IMAGES)))
    (run1, info1, want1), (run2, info2, want2) = runs
    assert int(info1.registered_model_version) == 1 and int(info2.registered_model_version) == 2
    flavor = info2.flavors["mlflow_lance"]
    assert flavor["lance_version"] == 2 and flavor["tensors_changed"] < flavor["tensors"] + 1
    client.set_registered_model_alias(name, "champion", "1")
    with pytest.warns(FutureWarning):
        client.transition_model_version_stage(name, "1", "Production")
    uris = {
        f"runs:/{run1}/model": want1,
        info1.model_uri: want1,  # models:/<model_id>
        f"models:/{name}/1": want1,
        f"models:/{name}/2": want2,
        f"models:/{name}/latest": want2,
        f"models:/{name}/Production": want1,
        f"models:/{name}@champion": want1,
        f"runs:/{run2}/model": want2,
    }
    got = in_fresh_process(f"""
        import json, warnings, numpy as np, mlflow, mlflow_lance
        warnings.simplefilter("ignore")
        x = np.array({IMAGES.tolist()!r}, dtype="float32")
        out = {{}}
        for uri in {list(uris)!r}:
            a = mlflow.pyfunc.load_model(uri).predict(x)
            import torch
            with torch.no_grad():
                b = mlflow_lance.load_model(uri)(torch.from_numpy(x)).numpy()
            out[uri] = [a.tolist(), b.tolist()]
        print(json.dumps(out))
    """)
    for uri, want in uris.items():
        pyfunc_pred, module_pred = (np.array(v, dtype="float32") for v in got[uri])
        np.testing.assert_array_equal(pyfunc_pred, want, err_msg=uri)
        np.testing.assert_array_equal(module_pred, want, err_msg=uri)
    # the weights are in Lance, never in MLflow's artifact store
    artifacts = Path(tracking["root"]) / "artifacts"
    sizes = [p.stat().st_size for p in artifacts.rglob("*") if p.is_file()]
    assert max(sizes) < 64 * 1024 and not any(p.suffix == ".lance" for p in artifacts.rglob("*"))


def test_load_state_dict_dispatches_on_the_uri(tracking):
    model = trained(SmallCNN(), 3)
    with mlflow.start_run() as run:
        info = ml.log_model(model, name="model", registered_model_name="cnn-sd")
    want = model.state_dict()
    for uri in (f"runs:/{run.info.run_id}/model", "models:/cnn-sd/1", info.model_uri):
        got = ml.load_state_dict(uri)
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    flavor = info.flavors["mlflow_lance"]
    direct = ml.load_state_dict(flavor["lance_uri"], flavor["lance_version"], names="head.")
    assert list(direct) == ["head.weight", "head.bias"]
    with pytest.raises(ValueError, match="do not pass version"):
        ml.load_state_dict("models:/cnn-sd/1", 1)
    props = ml.versions(flavor["lance_uri"])[-1].properties
    assert props["mlflow.run_id"] == run.info.run_id and props["mlflow.model_id"] == info.model_id


def test_tied_transformer_and_multi_input_models(tracking):
    gpt = trained(tiny_gpt2(), 4)
    gpt.lm_head.weight = gpt.transformer.wte.weight  # keep the tie after `trained`
    tokens = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype="int64")
    with mlflow.start_run():
        info = ml.log_model(gpt, name="gpt", registered_model_name="gpt-tied", input_example=tokens)
    assert info.flavors["mlflow_lance"]["bytes"] < sum(
        v.numel() * v.element_size() for v in gpt.state_dict().values()
    )  # the tied matrix stored once
    loaded = ml.load_model("models:/gpt-tied/1")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        want = gpt(torch.from_numpy(tokens)).logits.numpy()
        np.testing.assert_array_equal(loaded(torch.from_numpy(tokens)).logits.numpy(), want)
    np.testing.assert_array_equal(mlflow.pyfunc.load_model("models:/gpt-tied/1").predict(tokens)["logits"], want)

    two = trained(TwoInputs(), 5)
    inputs = {"a": np.ones((2, 3), dtype="float32"), "b": np.full((2, 2), 2.0, dtype="float32")}
    with mlflow.start_run():
        ml.log_model(two, name="two", registered_model_name="two-inputs", input_example=inputs, code_paths=ZOO)
    pred = mlflow.pyfunc.load_model("models:/two-inputs/1").predict(inputs)
    with torch.no_grad():
        np.testing.assert_array_equal(pred, two(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy())


def test_map_location_and_prediction_device(tracking, monkeypatch):
    model = trained(SmallCNN(), 6)
    with mlflow.start_run():
        ml.log_model(model, name="model", registered_model_name="cnn-device")
    on_meta = ml.load_model("models:/cnn-device/1", map_location="meta")
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "meta")
    raw = mlflow.pyfunc.load_model("models:/cnn-device/1").get_raw_model()
    assert {p.device.type for p in raw.parameters()} == {"meta"}
    raw = mlflow.pyfunc.load_model("models:/cnn-device/1", model_config={"device": "cpu"}).get_raw_model()
    assert all(torch.equal(a, b) for a, b in zip(raw.state_dict().values(), model.state_dict().values(), strict=True))
    if torch.cuda.is_available():
        gpu = ml.load_model("models:/cnn-device/1", map_location="cuda")
        assert torch.equal(gpu.head.weight.cpu(), model.head.weight)


def test_models_serve_answers_invocations(tracking):
    model = trained(SmallCNN(), 7)
    with mlflow.start_run():
        ml.log_model(model, name="model", registered_model_name="cnn-serve", code_paths=ZOO)
    MlflowClient().set_registered_model_alias("cnn-serve", "live", "1")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/cnn-serve@live",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},  # its uvicorn
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=120)
        body = json.dumps({"inputs": IMAGES.tolist()}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            got = np.array(json.loads(r.read())["predictions"], dtype="float32")
    finally:
        stop(proc)
    np.testing.assert_allclose(got, predict(model, IMAGES), rtol=1e-6)


def test_embedded_default_without_a_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_LANCE_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    mlflow.set_experiment("Default")
    try:
        model = trained(SmallCNN(), 8)
        with mlflow.start_run():
            info = ml.log_model(model, name="model", registered_model_name="local-cnn")
        uri = info.flavors["mlflow_lance"]["lance_uri"]
        assert uri.startswith(str(tmp_path / "mlruns" / "lance" / "models"))
        loaded = ml.load_model("models:/local-cnn/1")
        assert all(
            torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
        )
    finally:
        mlflow.set_tracking_uri(None)


def test_save_model_to_a_directory_is_self_contained(tmp_path):
    model = trained(SmallCNN(), 9)
    path = tmp_path / "model"
    ml.save_model(model, str(path))
    moved = tmp_path / "moved"
    path.rename(moved)  # the dataset lives inside and is referenced relatively
    loaded = ml.load_model(str(moved))
    assert torch.equal(loaded.head.weight, model.head.weight)
    assert torch.equal(ml.load_state_dict(str(moved))["head.bias"], model.head.bias)


def test_skeleton_size_does_not_grow_with_the_weights(tmp_path):
    from mlflow_lance.skeleton import dump_skeleton

    small, big = torch.nn.Linear(10, 10), torch.nn.Linear(2000, 2000)  # 400 B vs 16 MB of weights
    assert abs(len(dump_skeleton(small)) - len(dump_skeleton(big))) < 64
    assert len(dump_skeleton(big)) < 4096


def test_model_factory_loads_without_pickle(tracking, monkeypatch):
    model = trained(SmallCNN(classes=5), 10)
    with mlflow.start_run():
        ml.log_model(
            model,
            name="model",
            registered_model_name="cnn-factory",
            model_factory="model_zoo:SmallCNN",
            factory_kwargs={"classes": 5},
            code_paths=ZOO,
        )
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    loaded = ml.load_model("models:/cnn-factory/1")
    assert torch.equal(loaded.head.weight, model.head.weight)
    with mlflow.start_run():
        ml.log_model(model, name="model", registered_model_name="cnn-pickled")
    with pytest.raises(PermissionError, match="model_factory"):
        ml.load_model("models:/cnn-pickled/1")
    with pytest.raises(PermissionError):
        ml.load_model("models:/cnn-pickled/1", allow_pickle=False)


def test_bad_input_to_log_model_writes_nothing(tracking):
    with mlflow.start_run() as run:
        with pytest.raises(TypeError, match="torch.nn.Module"):
            ml.log_model({"w": torch.ones(1)}, name="model", registered_model_name="bad")
        with pytest.raises(ValueError, match="package.module:callable"):
            ml.log_model(SmallCNN(), name="model", registered_model_name="bad", model_factory="nocolon")
        with pytest.raises(ValueError, match="JSON"):
            ml.log_model(
                SmallCNN(),
                name="model",
                registered_model_name="bad",
                model_factory="model_zoo:SmallCNN",
                factory_kwargs={"x": object()},
            )
    root = Path(os.environ["MLFLOW_LANCE_ROOT"])
    assert not list(root.rglob("*.lance"))
    assert MlflowClient().search_model_versions("name='bad'") == []
    assert MlflowClient().list_artifacts(run.info.run_id) == []


def test_proxied_artifacts_without_a_lance_root_keep_the_weights_behind_the_server(tracking, monkeypatch):
    monkeypatch.delenv("MLFLOW_LANCE_ROOT")
    model = trained(SmallCNN(), 4)
    with mlflow.start_run():
        info = ml.log_model(model, name="model")
    assert info.flavors["mlflow_lance"]["lance_uri"].startswith("mlflow-artifacts:/lance/experiments/")
    loaded = ml.load_model(info.model_uri).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_a_failure_after_the_commit_keeps_its_type_and_names_the_version(tmp_path, monkeypatch):
    """MLmodel cannot be written after the weights were committed: the error is both the
    original OSError and the package's CommittedError, naming the version nothing references."""
    from mlflow.models import Model

    def full_disk(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Model, "save", full_disk)
    lance_uri = tmp_path / "w.lance"
    with pytest.raises(ml.CommittedError) as info:
        ml.save_model(torch.nn.Linear(3, 2), str(tmp_path / "model"), lance_uri=str(lance_uri))
    assert isinstance(info.value, OSError) and info.value.version == 1 and info.value.uri == str(lance_uri)
    assert "committed as version 1" in str(info.value) and not (tmp_path / "model").exists()
    assert [v.version for v in ml.versions(lance_uri)] == [1]


def test_the_new_model_line_is_rewritten_for_its_own_thread_only(capfd):
    """log_model into a model its binding just created prints MLflow's "Successfully
    registered" line, not "already exists": rewritten in that thread alone, with sys.stderr
    never swapped (another thread printing meanwhile keeps its own words)."""
    import threading

    from mlflow.utils.logging_utils import eprint

    from mlflow_lance import flavor

    exists = "Registered model {!r} already exists. Creating a new version of this model..."
    stderr, inside, printed = sys.stderr, threading.Event(), threading.Event()

    def other_log() -> None:
        inside.wait(30)
        eprint(exists.format("x"))  # the same model, from a thread not inside the context
        printed.set()

    thread = threading.Thread(target=other_log)
    thread.start()
    capfd.readouterr()
    with flavor._new_model_announced("x"):
        assert sys.stderr is stderr
        inside.set()
        assert printed.wait(30)
        eprint(exists.format("y"))  # another model: not this log's
        eprint(exists.format("x"))
    eprint(exists.format("x"))  # after the log
    thread.join()
    assert capfd.readouterr().err.splitlines() == [
        exists.format("x"),
        exists.format("y"),
        "Successfully registered model 'x'.",
        exists.format("x"),
    ]
