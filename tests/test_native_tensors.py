"""Quantized and sparse tensors stored natively (as dense component rows, never pickled), and
modules with parametrizations: bit-exact state dicts, equal outputs, dedup, crafted refusals."""

from __future__ import annotations

import os
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from torch import nn
from torch.ao import quantization as tq
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

import mlflow_lance as ml
from conftest import run_fuzzer
from mlflow_lance import store, tree
from mlflow_lance.errors import CorruptionError

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # torch.ao's deprecation warnings
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class Static(nn.Module):
    """Static (post-training) quantization: a per-channel qint8 Conv2d and Linear, quint8 activations."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv, self.fc = nn.Conv2d(2, 3, 3), nn.Linear(12, 2)

    def forward(self, x):
        x = self.conv(self.quant(x))
        return self.dequant(self.fc(x.reshape(x.shape[0], -1)))


class Symmetric(nn.Module):
    """A user's own parametrization."""

    def forward(self, x):
        return x.triu() + x.triu(1).transpose(-1, -2)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def dynamic(per_channel: bool = False) -> nn.Module:
    spec = {nn.Linear: tq.per_channel_dynamic_qconfig} if per_channel else {nn.Linear}
    return quiet(tq.quantize_dynamic, mlp(), spec, dtype=torch.qint8)


def static() -> nn.Module:
    torch.manual_seed(0)
    model = Static().eval()
    model.qconfig = tq.get_default_qconfig("fbgemm")
    prepared = quiet(tq.prepare, model)
    prepared(torch.randn(8, 2, 4, 4))
    return quiet(tq.convert, prepared)


def embedding() -> nn.Module:  # per-channel with float zero points (quint8, float qparams)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4))
    return quiet(tq.quantize_dynamic, model, {nn.Embedding: tq.float_qparams_weight_only_qconfig})


def parametrized() -> nn.Module:
    torch.manual_seed(0)
    custom = nn.Linear(4, 4)
    parametrize.register_parametrization(custom, "weight", Symmetric())
    model = nn.Sequential(
        weight_norm(nn.Linear(4, 4)), orthogonal(nn.Linear(4, 4)), spectral_norm(nn.Linear(4, 4)), custom
    )
    model(torch.randn(2, 4))  # a training step of spectral norm's power iteration: u and v move
    return model.eval()


QUANTIZED = {"dynamic": dynamic, "dynamic per channel": lambda: dynamic(True), "static": static}
INPUTS = {"dynamic": (5, 8), "dynamic per channel": (5, 8), "static": (3, 2, 4, 4), "parametrized": (5, 4)}


def same(a, b) -> bool:
    """Bit-exact equality of state-dict values: tensors (quantized, sparse), tuples, dtypes."""
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if not isinstance(a, torch.Tensor):
        return a == b
    if (a.dtype, a.layout, a.shape, a.is_quantized) != (b.dtype, b.layout, b.shape, b.is_quantized):
        return False
    if a.is_quantized:
        if a.qscheme() != b.qscheme() or not torch.equal(a.int_repr(), b.int_repr()):
            return False
        if a.qscheme() == torch.per_tensor_affine:
            return (a.q_scale(), a.q_zero_point()) == (b.q_scale(), b.q_zero_point())
        return (
            a.q_per_channel_axis() == b.q_per_channel_axis()
            and same(a.q_per_channel_scales(), b.q_per_channel_scales())
            and same(a.q_per_channel_zero_points(), b.q_per_channel_zero_points())
        )
    if a.layout == torch.sparse_coo:
        return (
            a.is_coalesced() == b.is_coalesced() and same(a._indices(), b._indices()) and same(a._values(), b._values())
        )
    if a.layout != torch.strided:
        parts = (torch.Tensor.crow_indices, torch.Tensor.col_indices)
        if a.layout in (torch.sparse_csc, torch.sparse_bsc):
            parts = (torch.Tensor.ccol_indices, torch.Tensor.row_indices)
        return all(same(p(a), p(b)) for p in parts) and same(a.values(), b.values())
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def same_state(a, b) -> bool:
    return list(a) == list(b) and all(same(a[k], b[k]) for k in a)


def output(model: nn.Module, shape: tuple) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(shape))


# --------------------------------------------------------------------------- the store


@pytest.mark.parametrize("make", [*QUANTIZED.values(), embedding], ids=[*QUANTIZED, "embedding"])
def test_quantized_state_dicts_load_bit_exact_and_never_pickled(tmp_path, make):
    sd = make().state_dict()
    uri = tmp_path / "w.lance"
    info = ml.save_state_dict(sd, uri)
    back = ml.load_state_dict(uri)
    assert same_state(sd, back) and type(back) is OrderedDict
    names = ml.diff(uri, info.version, info.version).unchanged
    assert any(n.endswith("/%.int_repr") for n in names) and any(n.endswith("/%.scale") for n in names)
    assert all(not t.is_quantized for t in ml.load_state_dict(uri, names="").values())  # rows: plain tensors
    fresh = make()
    fresh.load_state_dict(back)  # the module's own loader takes it (module versions kept)
    assert same_state(sd, fresh.state_dict())


def test_quantized_tensors_of_every_scheme(tmp_path):
    x = torch.randn(3, 5)
    sd = quiet(
        lambda: {
            "quint8": torch.quantize_per_tensor(x, 0.05, 7, torch.quint8),
            "qint32": torch.quantize_per_tensor(x, 0.001, -3, torch.qint32),
            "axis1": torch.quantize_per_channel(
                x, torch.rand(5, dtype=torch.float64) + 0.1, torch.arange(5), 1, torch.qint8
            ),
            "empty": torch.quantize_per_tensor(torch.empty(0, 2), 0.5, 0, torch.qint8),
            "dense": x,
        }
    )
    ml.save_state_dict(sd, tmp_path / "w.lance")
    back = ml.load_state_dict(tmp_path / "w.lance")
    assert type(back) is dict and same_state(sd, back)


def sparse_tensors() -> dict:
    eye = torch.eye(4) * torch.arange(1.0, 5.0)
    return {
        "coo": eye.to_sparse(),
        "uncoalesced": torch.sparse_coo_tensor([[1, 0, 1]], [1.0, 2.0, 3.0], (3,)),
        "hybrid": torch.arange(12.0).reshape(4, 3).to_sparse(1),  # one sparse dim, one dense dim
        "no_values": torch.sparse_coo_tensor(torch.empty(2, 0, dtype=torch.long), torch.empty(0), (5, 5)),
        "csr": eye.to_sparse_csr(),
        "csr32": torch.sparse_csr_tensor(
            torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32), [1.5, 2.5], (2, 2)
        ),
        "csc": eye.to_sparse_csc(),
        "bsr": eye.to_sparse_bsr((2, 2)),
        "bsc": eye.to_sparse_bsc((2, 2)),
        "bf16": eye.to(torch.bfloat16).to_sparse(),
    }


def test_sparse_tensors_of_every_layout_load_bit_exact(tmp_path):
    sd = {"dense": torch.ones(2), **sparse_tensors()}
    ml.save_state_dict(sd, tmp_path / "w.lance")
    back = ml.load_state_dict(tmp_path / "w.lance")
    assert same_state(sd, back)
    assert not back["uncoalesced"].is_coalesced() and back["coo"].is_coalesced()
    assert torch.equal(back["uncoalesced"].to_dense(), torch.tensor([2.0, 4.0, 0.0]))


def test_a_checkpoint_dict_with_quantized_and_sparse_parts(tmp_path):
    state = {
        "model": dynamic().state_dict(),
        "emb": {"grad": torch.eye(3).to_sparse()},
        "step": 3,
        "dt": torch.bfloat16,
    }
    ml.save_state_dict(state, tmp_path / "w.lance")
    back = ml.load_state_dict(tmp_path / "w.lance")
    assert same_state(state["model"], back["model"]) and same(state["emb"]["grad"], back["emb"]["grad"])
    assert back["step"] == 3 and back["dt"] is torch.bfloat16


def test_a_spec_without_composites_stays_format_1():
    _, spec = tree.flatten({"a": torch.ones(1), "n": 2})
    assert spec["format"] == tree.SPEC_FORMAT
    _, spec = tree.flatten({"a": torch.eye(2).to_sparse()})
    assert spec["format"] == tree.SPEC_FORMAT_COMPOSITE


def test_an_unchanged_quantized_or_sparse_version_writes_nothing(tmp_path):
    uri = tmp_path / "w.lance"
    model = static()
    sd = {**model.state_dict(), **sparse_tensors()}
    first = ml.save_state_dict(sd, uri)
    again = ml.save_state_dict({**model.state_dict(), **sparse_tensors()}, uri)
    assert first.changed and again.changed == () and again.bytes_written == 0
    changed = dict(sd, coo=(torch.eye(4) * 9).to_sparse())
    third = ml.save_state_dict(changed, uri)
    assert set(third.changed) == {"coo/%.values"}  # its indices are the same: not rewritten either


# --------------------------------------------------------------------------- the flavor


@pytest.mark.parametrize("name", [*QUANTIZED, "parametrized"])
def test_save_model_and_load_model_predict_exactly(tmp_path, name):
    model = parametrized() if name == "parametrized" else QUANTIZED[name]()
    ml.save_model(model, str(tmp_path / "m"))
    back = ml.load_model(str(tmp_path / "m"))
    assert same_state(model.state_dict(), back.state_dict())
    assert torch.equal(output(model, INPUTS[name]), output(back, INPUTS[name]))
    torch.manual_seed(1)
    x = torch.randn(INPUTS[name]).numpy()
    assert np.array_equal(mlflow.pyfunc.load_model(str(tmp_path / "m")).predict(x), output(model, INPUTS[name]).numpy())


def test_parametrized_modules_stay_parametrized(tmp_path):
    model = parametrized()
    ml.save_model(model, str(tmp_path / "m"))
    back = ml.load_model(str(tmp_path / "m"))
    for original, loaded in zip(model, back, strict=True):
        assert parametrize.is_parametrized(loaded, "weight")
        assert type(loaded).__name__ == "ParametrizedLinear" and torch.equal(original.weight, loaded.weight)
    assert torch.equal(back[2].parametrizations.weight[0]._u, model[2].parametrizations.weight[0]._u)
    assert isinstance(back[3].parametrizations.weight[0], Symmetric)
    big = nn.Linear(256, 256)
    parametrize.register_parametrization(big, "weight", Symmetric())
    ml.save_model(big, str(tmp_path / "big"))
    skeleton = tmp_path / "big" / "data" / "skeleton.pkl"
    assert skeleton.stat().st_size < 16_000  # 256 KB of weights: the skeleton holds none


def test_quantized_skeletons_hold_no_weights(tmp_path):
    def model(width: int) -> nn.Module:
        return quiet(tq.quantize_dynamic, nn.Sequential(nn.Linear(width, width)), {nn.Linear}, dtype=torch.qint8)

    sizes = []
    for width in (4, 512):
        ml.save_model(model(width), str(tmp_path / str(width)))
        sizes.append((tmp_path / str(width) / "data" / "skeleton.pkl").stat().st_size)
    assert abs(sizes[0] - sizes[1]) < 1000  # 256 KB of int8 weights more: the same skeleton


def test_a_factory_built_quantized_module_is_filled_by_its_own_loader(tmp_path):
    model = dynamic()
    uri = tmp_path / "w.lance"
    ml.save_state_dict(model.state_dict(), uri)
    fresh = quiet(tq.quantize_dynamic, nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), {nn.Linear})
    assert ml.load_into(fresh, uri) == ([], [])
    assert same_state(model.state_dict(), fresh.state_dict())


@pytest.mark.slow  # ~12 s here: MLflow's logging and pyfunc loading
def test_log_model_of_a_quantized_model_through_pyfunc(tracking):
    model = static()
    x = torch.randn(3, 2, 4, 4)
    with mlflow.start_run():
        info = ml.log_model(model, name="q")
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(ml.load_model(info.model_uri)(x), expected)
    assert np.array_equal(mlflow.pyfunc.load_model(info.model_uri).predict(x.numpy()), expected.numpy())


@pytest.mark.slow  # ~6 s here, and the MLflow server
def test_checkpoints_of_parametrized_models_and_a_quantized_ones_refusal(tracking):
    model, fresh = parametrized(), parametrized()
    nn.init.zeros_(fresh[0].parametrizations.weight.original1)
    with mlflow.start_run() as run:
        ml.log_checkpoint(model, step=1)
        with pytest.raises(TypeError, match="log_checkpoint takes models whose state dict holds dense tensors"):
            ml.log_checkpoint(dynamic(), step=2)
    ml.load_checkpoint(f"runs:/{run.info.run_id}/checkpoint", fresh)
    assert same_state(model.state_dict(), fresh.state_dict())


# --------------------------------------------------------------------------- crafted versions


def craft(uri: Path, node: dict, tensors: dict) -> None:
    """A version whose spec holds one composite node ``x`` with the given parts, as a crafted
    dataset would (the parts are named as a save names them)."""
    names = {part: f"x/%.{part}" for part in tensors}
    spec = {"format": tree.SPEC_FORMAT_COMPOSITE, "root": {"t": "dict", "v": [["x", {**node, "n": names}]]}}
    store.save_state_dict(store.Prepared({names[p]: t for p, t in tensors.items()}, spec), uri)


Q = {"int_repr": torch.zeros(2, 3, dtype=torch.int8)}
PER_TENSOR = {"quantized": "qint8", "qscheme": "per_tensor_affine"}
PER_CHANNEL = {"quantized": "qint8", "qscheme": "per_channel_affine", "axis": 0}
ONE_SCALE = {"scale": torch.tensor(0.5, dtype=torch.float64), "zero_point": torch.tensor(0)}
TWO_SCALES = {"scale": torch.ones(2, dtype=torch.float64), "zero_point": torch.zeros(2, dtype=torch.long)}
COO = {"layout": "sparse_coo", "size": [3, 3], "coalesced": False}
VALUES = {"values": torch.ones(2)}

CRAFTED = {
    "axis out of range": ({**PER_CHANNEL, "axis": 2}, {**Q, **TWO_SCALES}, "channel axis 2 is out of range"),
    "negative axis": ({**PER_CHANNEL, "axis": -1}, {**Q, **TWO_SCALES}, "channel axis -1"),
    "scale count": (
        PER_CHANNEL,
        {**Q, "scale": torch.ones(5, dtype=torch.float64), "zero_point": torch.zeros(5, dtype=torch.long)},
        r"2 channels along axis 0, but \[5\] scales",
    ),
    "zero point out of range": (
        PER_TENSOR,
        {**Q, "scale": torch.tensor(0.5, dtype=torch.float64), "zero_point": torch.tensor(500)},
        "out of range for qint8",
    ),
    "non-positive scale": (PER_CHANNEL, {**Q, **TWO_SCALES, "scale": -torch.ones(2, dtype=torch.float64)}, "scale"),
    "values of another dtype": ({**PER_TENSOR, "quantized": "quint8"}, {**Q, **ONE_SCALE}, "must be torch.uint8"),
    "unknown qscheme": ({**PER_TENSOR, "qscheme": "per_tensor_symmetric"}, {**Q, **ONE_SCALE}, "unknown here"),
    "a part missing": (PER_TENSOR, Q, "parts should be"),
    "index out of bounds": (COO, {"indices": torch.tensor([[0, 3], [1, 1]]), **VALUES}, "out of bounds"),
    "negative index": (COO, {"indices": torch.tensor([[0, -1], [1, 1]]), **VALUES}, "out of bounds"),
    "indices for other values": (COO, {"indices": torch.tensor([[0], [1]]), **VALUES}, r"do not index 2 values"),
    "size of other dims": ({**COO, "size": [3]}, {"indices": torch.tensor([[0, 1], [1, 1]]), **VALUES}, "do not fit"),
    "a huge size": (
        {**COO, "size": [1 << 62, 1 << 62]},
        {"indices": torch.tensor([[0, 1], [1, 1]]), **VALUES},
        "is not a list of",
    ),
    "false coalesced claim": (
        {**COO, "coalesced": True},
        {"indices": torch.tensor([[1, 0], [1, 1]]), **VALUES},
        "claims to be coalesced",
    ),
    "unknown layout": ({**COO, "layout": "sparse_jagged"}, {"indices": torch.zeros(2, 2, dtype=torch.long)}, "layout"),
    "csr rows not increasing": (
        {"layout": "sparse_csr", "size": [2, 2]},
        {"crow_indices": torch.tensor([0, 2, 1]), "col_indices": torch.tensor([0, 1]), **VALUES},
        "not a valid tensor of its kind",
    ),
    "csr column out of bounds": (
        {"layout": "sparse_csr", "size": [2, 2]},
        {"crow_indices": torch.tensor([0, 1, 2]), "col_indices": torch.tensor([0, 7]), **VALUES},
        "not a valid tensor of its kind",
    ),
    "csr claims more values than it holds": (
        {"layout": "sparse_csr", "size": [2, 2]},
        {"crow_indices": torch.tensor([0, 1, 1 << 40]), "col_indices": torch.tensor([0, 1]), **VALUES},
        "not a valid tensor of its kind",
    ),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_composite_tensors_are_refused(tmp_path, case):
    node, tensors, message = CRAFTED[case]
    craft(tmp_path / "w.lance", {"t": "composite", "v": node}, tensors)
    with pytest.raises(CorruptionError, match=message):
        ml.load_state_dict(tmp_path / "w.lance")


def test_a_crafted_dtype_name_is_refused(tmp_path):
    spec = {
        "format": 2,
        "root": {"t": "dict", "v": [["w", {"t": "tensor", "n": "w"}], ["d", {"t": "dtype", "v": "os"}]]},
    }
    store.save_state_dict(store.Prepared({"w": torch.ones(1)}, spec), tmp_path / "w.lance")
    with pytest.raises(CorruptionError, match="malformed"):
        ml.load_state_dict(tmp_path / "w.lance")


def test_module_versions_are_kept_and_crafted_ones_refused(tmp_path):
    sd = static().state_dict()
    ml.save_state_dict(sd, tmp_path / "w.lance")
    assert ml.load_state_dict(tmp_path / "w.lance")._metadata == sd._metadata
    root = {"t": "dict", "v": [["w", {"t": "tensor", "n": "w"}]], "c": "OrderedDict", "m": {"": {"version": [1]}}}
    store.save_state_dict(store.Prepared({"w": torch.ones(1)}, {"format": 2, "root": root}), tmp_path / "x.lance")
    with pytest.raises(CorruptionError, match="module versions"):
        ml.load_state_dict(tmp_path / "x.lance")


def test_unsupported_layouts_and_quantizations_are_refused_before_writing(tmp_path):
    quint4 = quiet(torch.quantize_per_tensor, torch.ones(4), 0.1, 0, torch.quint4x2)
    for bad, message in ((torch.ones(2, 2).to_mkldnn(), "layout torch._mkldnn"), (quint4, "quint4x2")):
        with pytest.raises(TypeError, match=message):
            ml.save_state_dict({"w": bad}, tmp_path / "w.lance")
    assert not (tmp_path / "w.lance").exists()


@pytest.mark.slow  # a child process: ~10 s here
def test_fuzz_crafted_composites_are_refused_or_built_never_crash(tmp_path):
    """Seeded mutations of real quantized and sparse tensors' components and descriptions,
    rebuilt in a child under a memory cap: each is refused with ValueError or builds a usable
    tensor; a SIGSEGV, an abort or another exception fails the test naming the case."""
    cases = 1500
    cmd = ["prlimit", "--as=4000000000", sys.executable, str(HERE / "composite_fuzz_worker.py"), "20271207", str(cases)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    report = run_fuzzer(cmd, timeout=300, cwd=tmp_path, env=env)
    assert report["cases"] == cases and report["bad"] == [], report["bad"][:10]
    assert report["outcomes"].get("refused", 0) > cases // 2, report  # the mutations do reach the checks
