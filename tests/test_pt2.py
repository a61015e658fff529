"""serialization_format="pt2": the torch.export program in MLflow without its weights, the
weights in Lance; loads with pickle refused, predicts as mlflow.pytorch's pt2 model does."""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import cloudpickle
import lance
import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import mlflow_lance as ml
from mlflow_lance import program
from mlflow_lance.errors import CorruptionError, WeightsError

X = np.random.default_rng(0).standard_normal((3, 4)).astype("float32")
X7 = np.random.default_rng(1).standard_normal((7, 4)).astype("float32")


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()


class Attention(torch.nn.Module):
    """Tied embeddings, a non-persistent mask buffer and a constant the graph lifts."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.att = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("mask", torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        n = x.shape[1]
        return self.head(self.att(h, h, h, attn_mask=self.mask[:n, :n])[0]) + torch.tensor(0.5)


class ShapeBranch(torch.nn.Module):
    """A branch on a size: the program carries guards."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + y[: x.shape[0]] if x.shape[0] > 2 else self.lin(x)


class Branchy(torch.nn.Module):
    """A data-dependent branch: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


def conf(path: Path) -> dict:
    return yaml.safe_load((path / "MLmodel").read_text())["flavors"]["mlflow_lance"]


def _refused(*args, **kwargs):
    raise AssertionError("something was unpickled")


@contextmanager
def no_unpickling(monkeypatch):
    """Pickle refused, and every way to unpickle patched to fail."""
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with (
        mock.patch.object(pickle, "loads", _refused),
        mock.patch.object(pickle, "load", _refused),
        mock.patch.object(pickle, "Unpickler", _refused),
        mock.patch.object(cloudpickle, "loads", _refused),
        mock.patch.object(torch, "load", _refused),
        mock.patch.object(torch.jit, "load", _refused),
    ):
        yield


def test_pt2_predicts_bit_for_bit_as_mlflow_pytorchs_pt2_model_and_loads_as_the_same_type(tmp_path, monkeypatch):
    model = mlp()
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ml.save_model(model, str(ours), serialization_format="pt2", input_example=X, pip_requirements=[])
    mlflow.pytorch.save_model(model, str(theirs), serialization_format="pt2", input_example=X, pip_requirements=[])
    assert conf(ours)["exported_program"] == "data/exported_program.zip"
    assert not (ours / "data" / "skeleton.pkl").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # mlflow.pytorch's pt2 loads so too
    for data in (X7, pd.DataFrame(X7, index=range(10, 17))):  # another batch size: the batch is dynamic
        a = mlflow.pyfunc.load_model(str(ours)).predict(data)
        b = mlflow.pyfunc.load_model(str(theirs)).predict(data)
        assert type(a) is type(b)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    a, b = ml.load_model(str(ours)), mlflow.pytorch.load_model(str(theirs))  # the raw models
    assert type(a).__mro__[1:] == type(b).__mro__[1:]  # ExportedProgram.module(): a GraphModule
    with torch.no_grad():
        assert torch.equal(a(torch.from_numpy(X7)), b(torch.from_numpy(X7)))
    assert ml.load_state_dict(str(ours)).keys() == model.state_dict().keys()


def test_the_program_carries_no_weights(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 1024), torch.nn.Linear(1024, 1024)).eval()  # 4 MB of weights
    ml.save_model(model, str(tmp_path / "m"), serialization_format="pt2", input_example=X, pip_requirements=[])
    size = (tmp_path / "m" / "data" / "exported_program.zip").stat().st_size
    assert size < 100_000
    with zipfile.ZipFile(tmp_path / "m" / "data" / "exported_program.zip") as z:
        assert sorted(z.namelist()) == ["meta.json", "program.json"]


def test_a_default_save_with_an_input_example_is_pt2_and_loads_with_nothing_unpickled(tmp_path, monkeypatch):
    model = Attention().eval()
    tokens = np.random.default_rng(0).integers(0, 16, (2, 6))
    ml.save_model(model, str(tmp_path / "m"), input_example=tokens, pip_requirements=[])
    assert "exported_program" in conf(tmp_path / "m")
    for f in (tmp_path / "m").rglob("*"):  # no file MLflow keeps is a pickle (Lance's files are not ours)
        if f.is_file() and "weights.lance" not in f.parts:
            assert not f.read_bytes().startswith(b"\x80"), f
    with zipfile.ZipFile(tmp_path / "m" / "data" / "exported_program.zip") as z:
        for name in z.namelist():
            if name.endswith(".json"):
                json.loads(z.read(name))
            else:
                assert name.startswith("constants/")  # raw bytes
    more = torch.from_numpy(np.random.default_rng(1).integers(0, 16, (5, 6)))
    with torch.no_grad():  # eager attention takes a fused kernel: close; the program in memory: equal
        want = program.export(model, (torch.from_numpy(tokens),)).module()(more)
        assert torch.allclose(want, model(more), atol=1e-5)
    with no_unpickling(monkeypatch):
        loaded = ml.load_model(str(tmp_path / "m"))
        with torch.no_grad():
            assert torch.equal(loaded(more), want)
        assert loaded.head.weight is loaded.emb.weight  # still tied
        assert np.array_equal(mlflow.pyfunc.load_model(str(tmp_path / "m")).predict(more.numpy()), want.numpy())


def test_a_model_in_train_mode_is_exported_in_eval_mode_by_default_and_as_it_is_when_pt2_is_named(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 2)).train()
    ml.save_model(model, str(tmp_path / "a"), input_example=X, pip_requirements=[])
    ml.save_model(model, str(tmp_path / "b"), input_example=X, serialization_format="pt2", pip_requirements=[])
    assert model.training and all(m.training for m in model.modules())  # its modes are restored
    x = torch.from_numpy(X7)
    with torch.no_grad():
        want = model.eval()(x)
        assert torch.equal(ml.load_model(str(tmp_path / "a"))(x), want)  # no dropout: as load_model always gave
        named = ml.load_model(str(tmp_path / "b"))
        assert not torch.equal(named(x), named(x))  # dropout, as mlflow.pytorch's pt2 export keeps it


def test_without_an_input_example_or_with_pickle_named_the_skeleton_stays(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ml.save_model(mlp(), str(tmp_path / "a"), pip_requirements=[])
        ml.save_model(mlp(), str(tmp_path / "b"), input_example=X, serialization_format="pickle", pip_requirements=[])
    assert not [w for w in caught if "mlflow_lance" in str(w.message)]
    assert "skeleton" in conf(tmp_path / "a") and "skeleton" in conf(tmp_path / "b")


def test_a_model_export_cannot_trace_falls_back_to_the_skeleton_with_a_warning_saying_why(tmp_path):
    with pytest.warns(UserWarning, match=r"pickled skeleton, not as a torch.export \(pt2\) program, because export"):
        ml.save_model(Branchy(), str(tmp_path / "a"), input_example=X, pip_requirements=[])
    assert "skeleton" in conf(tmp_path / "a")
    with pytest.warns(UserWarning, match="the input example is not an array or tensor"):
        ml.save_model(mlp(), str(tmp_path / "b"), input_example=pd.DataFrame(X), pip_requirements=[])
    assert "skeleton" in conf(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(ml.load_model(str(tmp_path / "b"))(torch.from_numpy(X)), mlp()(torch.from_numpy(X)))


def test_a_factory_wins_over_the_default_and_conflicts_with_pt2_named(tmp_path):
    kwargs = {"in_features": 4, "out_features": 2}
    ml.save_model(
        torch.nn.Linear(4, 2),
        str(tmp_path / "a"),
        input_example=X,
        model_factory="torch.nn:Linear",
        factory_kwargs=kwargs,
        pip_requirements=[],
    )
    assert conf(tmp_path / "a")["model_factory"] == "torch.nn:Linear"
    assert not (tmp_path / "a" / "data" / "exported_program.zip").exists()
    with pytest.raises(ValueError, match="pt2' and model_factory both name the architecture"):
        ml.save_model(
            torch.nn.Linear(4, 2),
            str(tmp_path / "b"),
            input_example=X,
            serialization_format="pt2",
            model_factory="torch.nn:Linear",
            factory_kwargs=kwargs,
            pip_requirements=[],
        )
    assert not (tmp_path / "b").exists()


def test_pt2_named_is_refused_where_no_program_can_be_stored_and_nothing_is_written(tmp_path):
    cases = [
        (torch.jit.script(mlp()), X, "not supported for torch.jit.ScriptModule"),
        (mlp(), pd.DataFrame(X), "input_example is required"),
        (mlp(), None, "input_example is required"),
        (Branchy(), X, "cannot be stored as a torch.export program"),
    ]
    for i, (model, example, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            ml.save_model(
                model, str(tmp_path / str(i)), serialization_format="pt2", input_example=example, pip_requirements=[]
            )
        assert not (tmp_path / str(i)).exists()


@pytest.mark.slow  # two logs through a server: 10-35 s here
def test_a_second_version_with_one_changed_tensor_writes_one_row(tracking):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.ReLU(), torch.nn.Linear(256, 512)).eval()
    infos = []
    for step in range(2):
        if step:
            with torch.no_grad():
                model[2].weight.add_(1.0)  # 512 KiB: a data file of its own
        with mlflow.start_run():
            infos.append(
                ml.log_model(
                    model, name="m", registered_model_name="pt2-dedup", input_example=X, serialization_format="pt2"
                )
            )
    first, second = (i.flavors["mlflow_lance"] for i in infos)
    assert "exported_program" in second and second["lance_version"] == first["lance_version"] + 1
    assert second["tensors_changed"] == 1
    uri = second["lance_uri"]

    def files(fragment) -> tuple:
        return tuple(d.path for d in fragment.data_files())

    old = {files(f) for f in lance.dataset(uri, version=first["lance_version"]).get_fragments()}
    new = [f for f in lance.dataset(uri, version=second["lance_version"]).get_fragments() if files(f) not in old]
    assert sum(f.count_rows() for f in new) == 1  # the new version's one new data file holds one row
    with torch.no_grad():
        got = ml.load_model(infos[1].model_uri)(torch.from_numpy(X7))
        assert torch.equal(got, model(torch.from_numpy(X7)))
        assert not torch.equal(ml.load_model(infos[0].model_uri)(torch.from_numpy(X7)), got)


def _rewrite(path: Path, edit) -> None:
    """Rewrite the program file with ``edit(members)`` applied to its members (name -> bytes)."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    edit(members)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    path.write_bytes(buf.getvalue())


def _edit_json(name: str, change):
    def edit(members: dict) -> None:
        doc = json.loads(members[name])
        change(doc)
        members[name] = json.dumps(doc).encode()

    return edit


def _first_node(doc: dict) -> dict:
    return doc["graph_module"]["graph"]["nodes"][0]


def test_a_truncated_or_crafted_program_is_a_clear_error_and_nothing_of_it_runs(tmp_path, monkeypatch):
    ml.save_model(
        Attention().eval(),
        str(tmp_path / "m"),
        serialization_format="pt2",
        input_example=np.zeros((2, 6), "int64"),
        pip_requirements=[],
    )
    program_file = tmp_path / "m" / "data" / "exported_program.zip"
    good = program_file.read_bytes()
    marker = tmp_path / "ran"
    evil = f"__import__('os').system('touch {marker}')"
    cases = [
        (lambda p: p.write_bytes(good[: len(good) // 2]), "not an mlflow_lance exported program"),
        (lambda p: p.write_bytes(b"\x80\x04K\x01."), "not an mlflow_lance exported program"),
        (lambda p: _rewrite(p, lambda m: m.pop("program.json")), "has no member 'program.json'"),
        (lambda p: _rewrite(p, _edit_json("meta.json", lambda d: d.update(version=99))), "version 99"),
        (
            lambda p: _rewrite(p, lambda m: m.update({"constants/0": m["constants/0"][:-1]})),
            "holds .* bytes, not what its shape needs",
        ),
        (
            lambda p: _rewrite(
                p, _edit_json("program.json", lambda d: _first_node(d).update(target="torch.serialization.os.system"))
            ),
            "call target 'torch.serialization.os.system'",
        ),
        (
            lambda p: _rewrite(p, _edit_json("program.json", lambda d: d.update(guards_code=[evil]))),
            "guard",
        ),
        (
            lambda p: _rewrite(
                p,
                _edit_json(
                    "program.json",
                    lambda d: d["graph_module"]["graph"]["sym_int_values"].update(
                        {"s": {"as_expr": {"expr_str": evil, "hint": None}}}
                    ),
                ),
            ),
            "shape expression",
        ),
        (
            lambda p: _rewrite(
                p,
                _edit_json(
                    "program.json",
                    lambda d: d["graph_module"]["module_call_graph"][0]["signature"].update(
                        in_spec=json.dumps(
                            [1, {"type": "builtins.dict", "context": json.dumps([{"__enum__": 1, "fqn": "os:x"}])}]
                        )
                    ),
                ),
            ),
            "names a module to import",
        ),
    ]
    for damage, message in cases:
        program_file.write_bytes(good)
        damage(program_file)
        with no_unpickling(monkeypatch), pytest.raises(CorruptionError, match=message):
            ml.load_model(str(tmp_path / "m"))
        assert not marker.exists()
    _rewrite(program_file, _edit_json("meta.json", lambda d: d["buffers"].append("ghost")))
    with pytest.raises(WeightsError, match=r"do not fit the program .* missing \['ghost'\]"):
        ml.load_model(str(tmp_path / "m"))
    program_file.write_bytes(good)
    with no_unpickling(monkeypatch):
        ml.load_model(str(tmp_path / "m"))


def test_a_program_exported_on_another_device_is_moved_to_the_one_it_loads_on(tmp_path):
    model = mlp()
    ml.save_model(model, str(tmp_path / "m"), serialization_format="pt2", input_example=X, pip_requirements=[])
    _rewrite(
        tmp_path / "m" / "data" / "exported_program.zip", _edit_json("meta.json", lambda d: d.update(device="cuda"))
    )
    with torch.no_grad():  # (the pass runs on a CPU program here: this machine has no GPU)
        assert torch.equal(ml.load_model(str(tmp_path / "m"))(torch.from_numpy(X7)), model(torch.from_numpy(X7)))


def test_check_accepts_what_export_makes(tmp_path):
    for model, inputs in [
        (mlp(), (torch.from_numpy(X),)),
        (Attention().eval(), (torch.zeros(2, 6, dtype=torch.int64),)),
        (torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval(), (torch.zeros(2, 3, 8, 8),)),
    ]:
        data = program.dump(program.export(model, inputs), list(model.state_dict()))
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            program.check(z.read("program.json"), "test")
    model = ShapeBranch()
    data = program.dump(program.export(model, (torch.randn(3, 4), torch.randn(5, 2))), list(model.state_dict()))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert json.loads(z.read("program.json"))["guards_code"]  # size comparisons, accepted
    loaded = program.load(data, "test", model.state_dict(), torch.device("cpu"), untrusted=True)
    x, y = torch.randn(4, 4), torch.randn(6, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x, y), model(x, y))
    assert os.path.basename(program.PROGRAM_FILE) == "exported_program.zip"
