"""Drop-in parity with mlflow.pytorch: where mlflow.pytorch supports a call, the same model is
logged with both flavors in the same test and the outputs compared (values, types, index,
signature). One test per row of the parity table (issue 10)."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.models import Model, infer_signature

import mlflow_lance as ml
from conftest import raw
from mlflow_lance import flavor, pyfunc_model

HERE = Path(__file__).resolve().parent


class WithParam(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, y: int = 1):
        return self.lin(x) * y


def linear(seed: int = 0, n_in: int = 4, n_out: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out)


def both(tmp_path: Path, model: torch.nn.Module, **kwargs) -> tuple[str, str]:
    """The same model saved with mlflow.pytorch and with mlflow_lance."""
    theirs, ours = str(tmp_path / "pytorch"), str(tmp_path / "lance")
    mlflow.pytorch.save_model(model, theirs, serialization_format="pickle", pip_requirements=[], **kwargs)
    ml.save_model(model, ours, pip_requirements=[], **kwargs)
    return theirs, ours


X = np.arange(12, dtype="float32").reshape(3, 4) / 10


# 1 ------------------------------------------------------------------ TorchScript


@pytest.mark.parametrize("compile_", ["script", "trace"])
def test_1_torchscript_round_trips_without_its_weights_in_the_artifact(tmp_path, compile_):
    model = linear(1)
    program = torch.jit.script(model) if compile_ == "script" else torch.jit.trace(model, torch.from_numpy(X))
    theirs, ours = both(tmp_path, program)
    a = mlflow.pyfunc.load_model(theirs).predict(X)
    b = mlflow.pyfunc.load_model(ours).predict(X)
    np.testing.assert_array_equal(a, b)
    loaded = ml.load_model(ours)
    assert isinstance(loaded, torch.jit.ScriptModule)
    assert torch.equal(loaded(torch.from_numpy(X)), program(torch.from_numpy(X)))


def test_1_a_scripted_mlp_with_10_mb_of_weights_makes_an_artifact_under_100_kb(tmp_path):
    torch.manual_seed(0)
    mlp = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(1000, 2500), torch.nn.ReLU(), torch.nn.Linear(2500, 4)))
    path = tmp_path / "m"
    ml.save_model(mlp, str(path), lance_uri=str(tmp_path / "w.lance"), pip_requirements=[])
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 100_000, size
    x = torch.randn(2, 1000)
    assert torch.equal(ml.load_model(str(path))(x), mlp(x))
    with pytest.raises(PermissionError, match="TorchScript"):
        ml.load_model(str(path), allow_pickle=False)


# 2-5 --------------------------------------------------------------- pyfunc


def test_2_the_signature_is_inferred_from_the_input_example_as_mlflow_pytorch_does(tmp_path):
    theirs, ours = both(tmp_path, linear(2), input_example=np.zeros((3, 4), "f4"))
    assert Model.load(ours).signature is not None
    assert Model.load(ours).signature == Model.load(theirs).signature
    frame = pd.DataFrame(X, columns=list("abcd"))
    theirs2, ours2 = both(tmp_path / "df", linear(2), input_example=frame)
    assert Model.load(ours2).signature == Model.load(theirs2).signature
    bad = pd.DataFrame({"a": ["x", "y", "z"]})  # the schema is enforced when serving
    with pytest.raises(Exception, match="(?i)schema|column|type"):
        mlflow.pyfunc.load_model(ours2).predict(bad)
    _, no_sig = both(tmp_path / "none", linear(2), input_example=np.zeros((3, 4), "f4"), signature=False)
    assert Model.load(no_sig).signature is None


def test_3_and_4_dataframes_come_back_as_dataframes_with_their_index_and_ints_are_cast(tmp_path):
    theirs, ours = both(tmp_path, linear(3))
    frames = [
        pd.DataFrame(X, columns=list("abcd"), index=[10, 20, 30]),
        pd.DataFrame({"a": [1, 2], "b": [3, 4], "c": [5, 6], "d": [7, 8]}, index=["p", "q"]),  # ints
    ]
    for frame in frames:
        a = mlflow.pyfunc.load_model(theirs).predict(frame)
        b = mlflow.pyfunc.load_model(ours).predict(frame)
        assert isinstance(b, pd.DataFrame)
        pd.testing.assert_frame_equal(a, b)
    text = pd.DataFrame({"a": ["x"], "b": [1.0], "c": [1.0], "d": [1.0]})  # mlflow.pytorch: a ValueError
    with pytest.raises(TypeError, match="'a'"):
        flavor._load_pyfunc(os.path.join(ours, "data")).predict(text)


def test_3_frames_of_other_column_types_are_converted_as_mlflow_pytorch_converts_them(tmp_path):
    theirs, ours = both(tmp_path, linear(4, n_in=2))
    days = pd.to_datetime(["2024-01-01", "2024-03-02"])
    frames = {
        "datetime": pd.DataFrame({"a": days, "b": [1.0, 2.0]}),
        "datetime with a time zone": pd.DataFrame({"a": days.tz_localize("UTC"), "b": [1.0, 2.0]}),
        "timedelta": pd.DataFrame({"a": pd.to_timedelta([1, 2], unit="s"), "b": [3, 4]}),
        "bool": pd.DataFrame({"a": [True, False], "b": [1, 2]}),
        "category": pd.DataFrame({"a": pd.Categorical([1, 2]), "b": [3, 4]}),
        "numbers as text": pd.DataFrame({"a": ["1", "2"], "b": [3, 4]}),
        "nullable ints": pd.DataFrame({"a": pd.array([1, None], dtype="Int64"), "b": [3, 4]}),
    }
    compared = 0
    for kind, frame in frames.items():
        a = mlflow.pyfunc.load_model(theirs).predict(frame)
        b = mlflow.pyfunc.load_model(ours).predict(frame)
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=kind)  # bit for bit
        compared += 1
    assert compared == len(frames)


def test_3_lists_and_scalars_are_refused_with_mlflow_pytorchs_errors(tmp_path):
    theirs, ours = both(tmp_path, linear(5, n_in=2))
    models = [mlflow.pyfunc.load_model(uri) for uri in (theirs, ours)]
    for data in ([[1.0, 2.0]], 3.0, (1.0, 2.0), pd.Series([1.0, 2.0]), torch.zeros(1, 2), "text"):
        for call in ("predict", "wrapper"):  # what a script calls, and the flavor's own wrapper
            errors = []
            for model in models:
                with pytest.raises(TypeError) as err:
                    (model if call == "predict" else model._model_impl).predict(data)
                errors.append(str(err.value))
            assert errors[0] == errors[1], (type(data).__name__, call, errors)
    assert str(err.value) == "Input data should be pandas.DataFrame or numpy.ndarray"


def test_5_params_are_passed_to_forward(tmp_path):
    model = WithParam()
    signature = infer_signature(X, model(torch.from_numpy(X)).detach().numpy(), params={"y": 1})
    theirs, ours = both(tmp_path, model, signature=signature)
    a = mlflow.pyfunc.load_model(theirs).predict(X, params={"y": 2})
    b = mlflow.pyfunc.load_model(ours).predict(X, params={"y": 2})
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, model(torch.from_numpy(X), y=2).detach().numpy())
    with pytest.raises(ValueError, match="load time"):
        flavor._load_pyfunc(os.path.join(ours, "data")).predict(X, params={"device": "cpu"})


# 6-11 -------------------------------------------------------------- loading and logging


def test_6_a_model_saved_with_another_torch_version_logs_a_warning(tmp_path, caplog):
    path = tmp_path / "m"
    ml.save_model(linear(), str(path), pip_requirements=[])
    doc = yaml.safe_load((path / "MLmodel").read_text())
    doc["flavors"]["mlflow_lance"]["pytorch_version"] = "1.0.0"
    (path / "MLmodel").write_text(yaml.safe_dump(doc))
    with caplog.at_level(logging.WARNING, logger="mlflow_lance.flavor"):
        ml.load_model(str(path))
    assert "1.0.0" in caplog.text and str(torch.__version__) in caplog.text


def test_7_device_and_torch_load_options_are_accepted(tmp_path):
    path = str(tmp_path / "m")
    ml.save_model(linear(7), path, pip_requirements=[])
    for kwargs in ({"device": "cpu"}, {"weights_only": False}, {"weights_only": True, "map_location": "cpu"}):
        assert torch.equal(ml.load_model(path, **kwargs).weight, linear(7).weight)
    with pytest.raises(TypeError, match="'no_such_option'"):
        ml.load_model(path, no_such_option=1)


def test_8_and_9_log_state_dict_takes_checkpoint_dicts_and_load_state_dict_reads_them(tracking):
    model = linear(8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.from_numpy(X)).sum().backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "shape": (3, 4)}
    with mlflow.start_run() as run:
        ml.log_state_dict(model.state_dict(), "model")
        ml.log_state_dict(ckpt, "ckpt")
        mlflow.pytorch.log_state_dict(ckpt, "theirs")
    plain = ml.load_state_dict(f"runs:/{run.info.run_id}/model")
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())
    ours = ml.load_state_dict(f"runs:/{run.info.run_id}/ckpt")
    theirs = mlflow.pytorch.load_state_dict(f"runs:/{run.info.run_id}/theirs")
    assert ours["epoch"] == theirs["epoch"] == 3 and set(ours["optimizer"]["state"]) == {0, 1}
    assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    for k in theirs["optimizer"]["state"][0]:
        assert torch.equal(ours["optimizer"]["state"][0][k], theirs["optimizer"]["state"][0][k])
    assert _types(ours) == _types(theirs) == _types(ckpt)  # OrderedDict, dict, list, tuple at every level
    assert type(plain) is type(model.state_dict())
    env = ml.get_default_conda_env()
    assert any(str(d).startswith("torch") for d in env["dependencies"][-1]["pip"])
    with pytest.raises(TypeError, match="optimizer"):
        ml.save_state_dict({"optimizer": opt}, str(Path(os.environ["MLFLOW_LANCE_ROOT"]) / "x.lance"))
    flat = {"w": torch.ones(2)}  # a plain dict of tensors comes back a plain dict
    ml.save_state_dict(flat, str(Path(os.environ["MLFLOW_LANCE_ROOT"]) / "flat.lance"))
    assert type(ml.load_state_dict(str(Path(os.environ["MLFLOW_LANCE_ROOT"]) / "flat.lance"))) is dict
    for bad in ([torch.ones(1)], torch.ones(1), "w"):  # mlflow.pytorch's words first, then ours
        errors = []
        for log in (mlflow.pytorch.log_state_dict, ml.log_state_dict):
            with mlflow.start_run(), pytest.raises(TypeError) as err:
                log(bad, "bad")
            errors.append(str(err.value))
        assert errors[1].startswith(errors[0]) and len(errors[1]) > len(errors[0]), errors


def test_8_a_log_state_dict_artifact_loads_from_every_uri_mlflow_hands_out(tracking, s3_server, monkeypatch):
    """load_state_dict(mlflow.get_artifact_uri("ckpt")) as mlflow.pytorch's: mlflow-artifacts:/,
    runs:/, the plain path and file:// of the served artifact, and s3:// (an experiment whose
    artifacts go straight to the object store)."""
    for key, value in s3_server["env"].items():
        monkeypatch.setenv(key, value)
    model = linear(17)
    bucket = f"s3://{s3_server['bucket']}/parity-{os.getpid()}-{id(model)}"
    on_s3 = mlflow.create_experiment(f"parity-s3-{id(model)}", artifact_location=bucket)
    forms = []
    for experiment in (None, on_s3):
        with mlflow.start_run(experiment_id=experiment) as run:
            ml.log_state_dict(model.state_dict(), "ckpt")
            mlflow.pytorch.log_state_dict(model.state_dict(), "theirs")
            ours, theirs = mlflow.get_artifact_uri("ckpt"), mlflow.get_artifact_uri("theirs")
        forms.append((ours, theirs))
        forms.append((f"runs:/{run.info.run_id}/ckpt", f"runs:/{run.info.run_id}/theirs"))
    served = forms[0][0]
    assert served.startswith("mlflow-artifacts:/") and forms[2][0].startswith("s3://")
    on_disk = tracking["root"] / "artifacts" / served.split(":/", 1)[1].lstrip("/")
    forms.append((str(on_disk), str(on_disk.parent / "theirs")))
    forms.append((on_disk.as_uri(), (on_disk.parent / "theirs").as_uri()))
    for ours, theirs in forms:
        a, b = mlflow.pytorch.load_state_dict(theirs), ml.load_state_dict(ours)
        assert list(a) == list(b) and all(raw(a[k]) == raw(b[k]) for k in a), ours
    assert len(forms) == 6


def test_18_the_first_log_into_a_new_registered_model_says_so_as_mlflow_pytorch_does(tracking, capfd):
    model, said = linear(18), {}
    for flavor_, name in ((mlflow.pytorch, f"new-theirs-{id(model)}"), (ml, f"new-ours-{id(model)}")):
        for _ in range(2):  # the first creates the model, the second adds a version
            capfd.readouterr()
            with mlflow.start_run():
                extra = {"serialization_format": "pickle"} if flavor_ is mlflow.pytorch else {}
                flavor_.log_model(model, name="m", registered_model_name=name, pip_requirements=[], **extra)
            lines = capfd.readouterr().err.replace(name, "NAME").splitlines()
            said.setdefault(flavor_.__name__, []).append([line for line in lines if "egistered model" in line])
    assert said["mlflow_lance"] == said["mlflow.pytorch"], said
    assert said["mlflow_lance"][0] == ["Successfully registered model 'NAME'."]


def _types(tree) -> object:
    """The container types of a tree, at every level."""
    if isinstance(tree, dict):
        return (type(tree).__name__, {k: _types(v) for k, v in tree.items()})
    if isinstance(tree, (list, tuple)):
        return (type(tree).__name__, [_types(v) for v in tree])
    return type(tree).__name__


def test_10_serialization_format_and_pickle_module_are_accepted_and_pt2_needs_an_example(tmp_path):
    ml.save_model(
        linear(),
        str(tmp_path / "a"),
        serialization_format="pickle",
        pickle_module=pickle,
        pip_requirements=[],
        pickle_protocol=4,
    )
    assert torch.equal(ml.load_model(str(tmp_path / "a")).weight, linear().weight)
    with pytest.raises(ValueError, match="input_example is required"):  # as mlflow.pytorch (tests/test_pt2.py)
        ml.save_model(linear(), str(tmp_path / "b"), serialization_format="pt2", pip_requirements=[])
    with pytest.raises(ValueError, match="'pt2'.*'pickle'"):
        ml.save_model(linear(), str(tmp_path / "b"), serialization_format="onnx", pip_requirements=[])
    assert not (tmp_path / "b").exists()


def test_11_pyfunc_takes_cuda_when_available_and_nothing_says_otherwise(monkeypatch):
    monkeypatch.delenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pyfunc_model.default_device(None) == "cuda"
    assert pyfunc_model.default_device({"device": "cpu"}) == "cpu"
    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cpu")
    assert pyfunc_model.default_device({"device": None}) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MLFLOW_DEFAULT_PREDICTION_DEVICE")
    assert pyfunc_model.default_device({}) == "cpu"


# 12-16 ------------------------------------------------------------- errors and quiet


def test_12_a_factory_that_names_nothing_fails_at_log_time(tracking):
    root = Path(os.environ["MLFLOW_LANCE_ROOT"])
    with mlflow.start_run(), pytest.raises(ImportError, match="no.such.module:make"):
        ml.log_model(linear(), name="model", model_factory="no.such.module:make")
    assert not root.exists() or not any(root.rglob("*.lance"))


def test_13_a_dataset_on_an_endpoint_that_is_down_is_reported_unreachable():
    opts = {
        "aws_endpoint": "http://127.0.0.1:9",
        "allow_http": "true",
        "aws_access_key_id": "a",
        "aws_secret_access_key": "b",
        "aws_region": "us-east-1",
    }
    with pytest.raises(ConnectionError, match="cannot reach"):
        ml.load_state_dict("s3://bucket/w.lance", storage_options=opts)


def test_14_writing_to_a_read_only_dataset_names_the_path_and_writes_nothing(tmp_path):
    uri = HERE.parent / "test-artifacts" / f"read-only-{os.getpid()}.lance"  # a disk that has chattr
    ml.save_state_dict({"w": torch.ones(3)}, str(uri))
    if subprocess.run(["chattr", "-R", "+i", str(uri)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        with pytest.raises(PermissionError, match=f"{uri.name}.*(not permitted|denied)"):
            ml.save_state_dict({"w": torch.zeros(3)}, str(uri))
    finally:
        subprocess.run(["chattr", "-R", "-i", str(uri)], check=True)
    assert [v.version for v in ml.versions(str(uri))] == [1]
    assert torch.equal(ml.load_state_dict(str(uri))["w"], torch.ones(3))
    import shutil

    shutil.rmtree(uri)


def test_15_loading_a_dataset_in_a_fresh_process_does_not_import_mlflow(tmp_path):
    uri = str(tmp_path / "w.lance")
    ml.save_state_dict({"w": torch.ones(3)}, uri)
    code = f"""
        import sys, mlflow_lance
        sd = mlflow_lance.load_state_dict({uri!r})
        print(sd["w"].sum().item(), "mlflow" in sys.modules)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3.0", "False"]


def test_16_small_fetches_print_no_progress_bars(tracking, capfd):
    with mlflow.start_run() as run:
        ml.log_model(linear(), name="model", registered_model_name="quiet-model")
    capfd.readouterr()
    ml.load_model(f"runs:/{run.info.run_id}/model")
    ml.load_state_dict("models:/quiet-model/1")
    from mlflow_lance.cli import main as cli

    assert cli(["versions", "quiet-model"]) == 0
    assert "Downloading artifacts" not in capfd.readouterr().err


def test_17_a_model_without_the_flavor_raises_mlflow_pytorchs_error_with_the_flavor_name_changed(tmp_path):
    """Each flavor's load_model of the other's directory: an MlflowException whose first words
    are the same but for the flavor's name (RESOURCE_DOES_NOT_EXIST); ours then says why and
    what to do."""
    from mlflow.exceptions import MlflowException

    theirs, ours = both(tmp_path, linear())
    with pytest.raises(MlflowException) as pytorchs:
        mlflow.pytorch.load_model(ours)
    with pytest.raises(MlflowException) as lances:
        ml.load_model(theirs)
    assert pytorchs.value.message == 'Model does not have the "pytorch" flavor'
    assert lances.value.message.startswith('Model does not have the "mlflow_lance" flavor: ')
    assert lances.value.error_code == pytorchs.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert "python_function, pytorch" in lances.value.message and "mlflow.pyfunc.load_model()" in lances.value.message
    assert mlflow.pyfunc.load_model(theirs).predict(X).shape == (3, 1)  # what the advice says works
