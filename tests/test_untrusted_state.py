"""Untrusted inputs, third round (issue 27): checkpoint state that would corrupt a generator,
pointers to stores that hang or that nothing here reads, half-restored checkpoints, sparse
files in a bundle's source.

Families: 1 every generator state is checked before any generator changes (numpy's MT19937,
Python's ``random``, torch's CPU and CUDA states, Lightning's per-rank states); 2 a refused
checkpoint leaves the model, optimizer, scheduler and generators exactly as they were; 3
optimizer state torch would fail on or garble is our error naming the checkpoint; 4 a
pointer's scheme is checked before any I/O, and a GCS store that does not answer fails within
the stated time; 5 errors name the file that says it; 6 bundles keep holes. A seeded fuzzer
over checkpoint specs (tests/state_fuzz_worker.py) runs in a child under ``prlimit --as``.
Every case is real: checkpoints written by the package, then crafted as someone with write
access to the model directory would write them.
"""

from __future__ import annotations

import copy
import os
import random
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from corpus import record

import mlflow_lance as ml
from conftest import run_fuzzer
from mlflow_lance import checkpoint, fs, modelload

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- a real checkpoint, crafted


class Parts:
    """A model, its Adam optimizer and StepLR scheduler after two steps, and a model
    directory whose pointer each case aims at a crafted version of the same dataset."""

    def __init__(self, path: Path):
        torch.manual_seed(3)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5)
        for _ in range(2):
            self.model(torch.randn(5, 4)).sum().backward()
            self.optimizer.step()
            self.scheduler.step()
        self.path = path
        ml.save_model(self.model, str(path))
        torch.manual_seed(11), np.random.seed(11), random.seed(11)
        self.good = {
            "model": {k: v.detach().clone() + 1 for k, v in self.model.state_dict().items()},  # differs from live
            "step": 2,
            "optimizer": checkpoint._named_optimizer_state(self.model, self.optimizer),
            "scheduler": {**self.scheduler.state_dict(), "last_epoch": 7},
            "rng": checkpoint._rng_state(),
        }
        torch.manual_seed(12), np.random.seed(12), random.seed(12)  # the live generators differ too

    def crafted(self, **parts) -> dict:
        """The good checkpoint with ``parts`` replaced (deep copies: cases never share state)."""
        return {**copy.deepcopy(self.good), **parts}

    def write(self, tree: dict) -> str:
        info = ml.save_state_dict(tree, self.path / "data" / "weights.lance")
        (self.path / "data" / "lance.yaml").write_text(
            yaml.safe_dump({"lance_uri": "weights.lance", "lance_version": info.version})
        )
        return str(self.path)

    def load(self, tree: dict, **kwargs) -> dict:
        return checkpoint.load_checkpoint(self.write(tree), self.model, self.optimizer, self.scheduler, **kwargs)

    def snapshot(self) -> dict:
        """Everything a load may change, copied."""
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "generators": (torch.get_rng_state(), np.random.get_state(), random.getstate()),
        }


def same(a: object, b: object) -> bool:
    """Deep equality where tensors and arrays compare by value (and dtype)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Parts:
    return Parts(tmp_path_factory.mktemp("state") / "model")


def refused_and_untouched(parts: Parts, tree: dict, error: type, match: str) -> str:
    """Load ``tree``: refused with ``error`` matching ``match`` and naming the model directory,
    every part exactly as it was."""
    before = parts.snapshot()
    with pytest.raises(error, match=match) as caught:
        parts.load(tree)
    assert str(parts.path) in str(caught.value)
    after = parts.snapshot()
    for part in before:
        assert same(before[part], after[part]), f"the {part} changed"
    return str(caught.value)


# --------------------------------------------------------------------------- 1: generator states


def numpy_with(**fields) -> dict:
    return {"numpy": fields}


RNG_LIES = {  # (where in rng, value) -> the field the error names
    "numpy pos 1e8 (SIGSEGV at the first draw)": ("numpy.pos", 10**8),
    "numpy pos 700 (words from process memory)": ("numpy.pos", 700),
    "numpy pos -5000": ("numpy.pos", -5000),
    "numpy pos a float": ("numpy.pos", 3.0),
    "numpy keys float64 (cast to zeros)": ("numpy.keys", torch.full((624,), 0.5, dtype=torch.float64)),
    "numpy keys int64": ("numpy.keys", torch.arange(624, dtype=torch.int64)),
    "numpy keys 623 words": ("numpy.keys", torch.arange(1, 624).to(torch.uint32)),
    "numpy keys all zero": ("numpy.keys", torch.zeros(624, dtype=torch.uint32)),
    "numpy keys a list": ("numpy.keys", list(range(624))),
    "numpy kind PCG64": ("numpy.kind", "PCG64"),
    "numpy has_gauss 2": ("numpy.has_gauss", 2),
    "numpy cached nan": ("numpy.cached", float("nan")),
    "numpy cached a string": ("numpy.cached", "x"),
    "python version 2": ("python.version", 2),
    "python internal 624 ints": ("python.internal", [1] * 624),
    "python internal word of 2**32": ("python.internal", [2**32] + [1] * 623 + [3]),
    "python internal negative word": ("python.internal", [-1] + [1] * 623 + [3]),
    "python internal position 625": ("python.internal[-1]", [1] * 624 + [625]),
    "python internal all zero": ("python.internal", [0] * 624 + [3]),
    "python gauss_next a string": ("python.gauss_next", "x"),
    "python gauss_next inf": ("python.gauss_next", float("inf")),
    "torch 10 bytes": ("torch", torch.zeros(10, dtype=torch.uint8)),
    "torch float": ("torch", torch.zeros(5056, dtype=torch.float32)),
    "torch 2-D": ("torch", torch.zeros(2, 2528, dtype=torch.uint8)),
    "torch an invalid mt19937": ("torch", torch.zeros(5056, dtype=torch.uint8)),
    "cuda not a list": ("cuda", "x"),
    "cuda float states": ("cuda", [torch.zeros(16)]),
}


def rng_lie(parts: Parts, lie: str) -> tuple[dict, str]:
    field, value = RNG_LIES[lie]
    rng = copy.deepcopy(parts.good["rng"])
    top, _, leaf = field.partition(".")
    leaf = leaf.removesuffix("[-1]")
    if leaf:
        rng[top][leaf] = value
    else:
        rng[top] = value
    return rng, field


@pytest.mark.parametrize("lie", sorted(RNG_LIES))
def test_1_a_generator_state_that_would_corrupt_a_generator_is_refused_naming_the_field(parts, lie):
    rng, field = rng_lie(parts, lie)
    message = refused_and_untouched(parts, parts.crafted(rng=rng), ml.CorruptionError, "rng state is malformed")
    assert f"rng.{field}" in message, message
    assert parts.load(parts.crafted(rng=rng), restore_rng=False)["step"] == 2  # the rest of it loads
    record("r3-1 generator state", "refused")


def test_1_a_good_generator_state_restores_every_generator_exactly(parts):
    parts.load(parts.crafted())
    stored = parts.good["rng"]
    assert torch.equal(torch.get_rng_state(), stored["torch"])
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    assert kind == "MT19937" and np.array_equal(keys, stored["numpy"]["keys"].numpy()) and pos == stored["numpy"]["pos"]
    assert random.getstate() == (3, tuple(stored["python"]["internal"]), stored["python"]["gauss_next"])
    record("r3-1 generator state", "correct")


def test_1_every_ranks_stored_generators_are_checked_before_anything_is_restored(parts):
    """The per-rank states (a sharded checkpoint's "rng_by_rank", the Lightning integration's
    extra["rng_by_rank"]) are checked with "rng", whichever rank will restore which."""
    bad, _ = rng_lie(parts, "numpy pos 1e8 (SIGSEGV at the first draw)")
    good = parts.good["rng"]
    message = refused_and_untouched(
        parts, parts.crafted(extra={"rng_by_rank": [good, bad]}), ml.CorruptionError, "rng state is malformed"
    )
    assert "extra.rng_by_rank[1].numpy.pos is 100000000" in message
    message = refused_and_untouched(parts, parts.crafted(rng_by_rank={"0": good}), ml.CorruptionError, "not a list")
    assert "rng_by_rank is dict" in message
    record("r3-1 generator state", "refused", 2)


def test_1_the_lightning_resume_checks_each_ranks_state_before_lightning_restores(parts, monkeypatch):
    """``Trainer.fit(ckpt_path=...)`` goes through the IO's load_checkpoint: a malformed rank
    entry is refused there, before Lightning restores the module from what it returns."""
    pytest.importorskip("lightning")
    from mlflow_lance.integrations.lightning import _MLflowLanceIO

    class Base:
        def load_checkpoint(self, path, map_location=None, weights_only=None):
            raise AssertionError("not a models:/ path")

    bad, _ = rng_lie(parts, "python internal position 625")
    parts.write(parts.crafted(extra={"lightning": {"epoch": 1}, "rng_by_rank": [parts.good["rng"], bad]}))
    read = checkpoint.read_checkpoint
    monkeypatch.setattr(checkpoint, "read_checkpoint", lambda uri: read(str(parts.path)))  # models:/ -> this one
    with pytest.raises(ml.CorruptionError, match=r"models:/m-x: .*extra\.rng_by_rank\[1\]\.python\.internal"):
        _MLflowLanceIO(Base()).load_checkpoint("models:/m-x")
    record("r3-1 generator state", "refused")


# --------------------------------------------------------------------------- 2: all or nothing


def wrong_model(parts: Parts) -> dict:
    model = dict(parts.good["model"])
    model["1.weight"] = torch.zeros(5, 5)  # "0.*" fits: torch would copy it, then raise
    return parts.crafted(model=model)


def optimizer_with(parts: Parts, name: str, key: str, value: object) -> dict:
    optimizer = copy.deepcopy(parts.good["optimizer"])
    if value is KeyError:
        del optimizer["state"][name][key]
    else:
        optimizer["state"][name][key] = value
    return parts.crafted(optimizer=optimizer)


def scheduler_with(parts: Parts, **fields) -> dict:
    return parts.crafted(scheduler={**parts.good["scheduler"], **fields})


PART_LIES = {  # each refused after the parts before it in load order would have been restored
    "model: a shape that does not fit": (wrong_model, ml.WeightsError, r"'1\.weight' is \[5, 5\]"),
    "model: a key the model lacks": (
        lambda p: p.crafted(model={**p.good["model"], "2.weight": torch.ones(1)}),
        ml.WeightsError,
        r"unexpected keys \['2\.weight'\]",
    ),
    "optimizer: step 'x'": (
        lambda p: optimizer_with(p, "0.weight", "step", "x"),
        ml.CorruptionError,
        r"optimizer\.state\['0\.weight'\]\['step'\] is a str",
    ),
    "optimizer: no step (Adam's own load fails)": (
        lambda p: optimizer_with(p, "1.bias", "step", KeyError),
        ml.CorruptionError,
        "the optimizer refused the checkpoint's optimizer state",
    ),
    "scheduler: a key that would shadow a method": (
        lambda p: scheduler_with(p, step=5),
        ml.CorruptionError,
        r"keys it does not have \['step'\]",
    ),
    "scheduler: a value of another kind": (
        lambda p: scheduler_with(p, gamma="x"),
        ml.CorruptionError,
        r"values of another kind for \['gamma'\]",
    ),
    "rng: numpy pos 700": (
        lambda p: p.crafted(rng={**p.good["rng"], "numpy": {**p.good["rng"]["numpy"], "pos": 700}}),
        ml.CorruptionError,
        r"rng\.numpy\.pos is 700",
    ),
}


@pytest.mark.parametrize("lie", sorted(PART_LIES))
def test_2_a_refused_checkpoint_leaves_every_part_as_it_was(parts, lie):
    build, error, match = PART_LIES[lie]
    refused_and_untouched(parts, build(parts), error, match)
    record("r3-2 half restored", "refused")


def test_2_a_scheduler_that_refuses_its_state_midway_is_put_back(tmp_path):
    """ReduceLROnPlateau takes the stored attributes, then refuses a mode it does not know:
    the scheduler is put back, and nothing else was restored."""
    p = Parts(tmp_path / "model")
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(p.optimizer, patience=3)
    p.scheduler = plateau
    p.good["scheduler"] = {**plateau.state_dict(), "patience": 9}
    p.load(p.crafted())  # the good one loads
    assert plateau.patience == 9
    refused_and_untouched(
        p,
        p.crafted(scheduler={**p.good["scheduler"], "mode": "sideways"}),
        ml.CorruptionError,
        "ReduceLROnPlateau refused",
    )
    assert plateau.mode == "min" and plateau.patience == 9
    record("r3-2 half restored", "refused")


def test_2_a_good_checkpoint_restores_every_part(parts):
    parts.load(parts.crafted())
    assert all(torch.equal(parts.model.state_dict()[k], v) for k, v in parts.good["model"].items())
    assert parts.scheduler.last_epoch == 7
    assert same(checkpoint._named_optimizer_state(parts.model, parts.optimizer), parts.good["optimizer"])
    record("r3-2 half restored", "correct")


# --------------------------------------------------------------------------- 3: optimizer state


OPTIMIZER_LIES = {
    "step a list of three": ("step", torch.tensor([1.0, 2.0, 3.0]), "is a tensor, not a finite number"),
    "step nan": ("step", float("nan"), "is nan, not a finite number"),
    "step True": ("step", True, "is True, not a finite number"),
    "step complex": ("step", torch.tensor(1 + 2j), "is a tensor, not a finite number"),
    "exp_avg a string": ("exp_avg", "x", "holds a str, not tensors or numbers"),
    "exp_avg a list with a string": ("exp_avg", [torch.ones(1), "x"], "holds a list, not tensors or numbers"),
}


@pytest.mark.parametrize("lie", sorted(OPTIMIZER_LIES))
def test_3_optimizer_state_torch_would_fail_on_is_our_error_naming_the_checkpoint(parts, lie):
    key, value, why = OPTIMIZER_LIES[lie]
    message = refused_and_untouched(
        parts, optimizer_with(parts, "0.bias", key, value), ml.CorruptionError, "optimizer state is malformed"
    )
    assert f"optimizer.state['0.bias']['{key}'] {why}" in message, message
    record("r3-3 optimizer state", "refused")


def test_3_optimizer_groups_that_differ_from_the_live_optimizer_are_refused(parts):
    optimizer = copy.deepcopy(parts.good["optimizer"])
    group = optimizer["param_groups"][0]
    optimizer["param_groups"] = [{**group, "params": group["params"][:2]}, {**group, "params": group["params"][2:]}]
    before = parts.snapshot()
    with pytest.raises(ValueError, match="parameter groups differ from the checkpoint's"):
        parts.load(parts.crafted(optimizer=optimizer))
    assert all(same(before[k], v) for k, v in parts.snapshot().items())
    record("r3-3 optimizer state", "refused")


# --------------------------------------------------------------------------- 4: schemes and time bounds


@pytest.mark.parametrize("uri", ["nfs://container/w.lance", "foo://x/w.lance", "s3://b/w.lance?endpoint=evil"])
@pytest.mark.parametrize("holder", ["data/lance.yaml", "lance-state-dict.yaml"])
def test_4_an_unsupported_scheme_is_refused_before_any_io_naming_the_file(tmp_path, uri, holder):
    path = tmp_path / "model"
    if holder == "data/lance.yaml":
        ml.save_model(torch.nn.Linear(2, 2), str(path))
    else:  # what log_state_dict leaves in a run's artifacts, read from a local copy
        path.mkdir()
    (path / holder).write_text(yaml.safe_dump({"lance_uri": uri, "lance_version": 1}))
    started = time.monotonic()
    with pytest.raises(ml.CorruptionError) as caught:
        if holder == "data/lance.yaml":
            ml.load_state_dict(str(path))
        else:
            modelload.state_dict_pointer(str(path))
    message = str(caught.value)
    assert message.startswith(str(path / holder)) and time.monotonic() - started < 2, message
    if "?" in uri:
        assert "query or fragment" in message and "evil" not in message, message
    else:
        assert "supported: local paths, s3" in message and "mlflow-artifacts" in message, message
    record("r3-4 scheme", "refused")


@pytest.mark.parametrize("uri", ["mlflow-artifacts:/1/w.lance", "https://host/w.lance", "dbfs:/w.lance"])
def test_4_schemes_mlflow_reaches_are_supported(uri):
    fs.check_scheme(uri, "a pointer")  # reached through MLflow's artifact repositories
    record("r3-4 scheme", "correct")


def test_4_a_gs_pointer_fails_within_the_stated_time_naming_the_uri(tmp_path, monkeypatch):
    """The issue's case: a pointer naming gs://bucket/w.lance hung past 60 s. With no GCS
    credentials or network it now fails within the call limit (30 s by default)."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    path = tmp_path / "model"
    ml.save_model(torch.nn.Linear(2, 2), str(path))
    (path / "data" / "lance.yaml").write_text(yaml.safe_dump({"lance_uri": "gs://bucket/w.lance", "lance_version": 1}))
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="gs://bucket/w.lance"):
        ml.load_model(str(path))
    assert time.monotonic() - started < 40
    record("r3-4 hang", "refused")


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    yield server.getsockname()[1]
    server.close()


def test_4_a_silent_gcs_endpoint_is_given_up_after_the_call_limit(silent_port):
    """pyarrow's GCS client waits 120 s for one request to an endpoint that never answers,
    whatever its retry limit; every call through fs's GCS filesystem is given up after
    (1 + client_max_retries) x (connect_timeout + timeout), with a ConnectionError."""
    from pyarrow.fs import GcsFileSystem

    opts = {**fs.REMOTE_DEFAULTS, "connect_timeout": "1s", "timeout": "1s", "client_max_retries": "0"}
    assert fs._call_limit(fs.REMOTE_DEFAULTS) == 30 and fs._call_limit(opts) == 2
    filesystem, path = fs._filesystem("gs://bucket/w.lance/_mlflow_lance/index/1.json", opts)
    assert isinstance(filesystem, fs._Bounded) and path == "bucket/w.lance/_mlflow_lance/index/1.json"
    silent = GcsFileSystem(anonymous=True, endpoint_override=f"127.0.0.1:{silent_port}", scheme="http")
    bounded = fs._Bounded(silent, "gs://bucket/w.lance", fs._call_limit(opts))
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"gs://bucket/w\.lance': timed out after 2s"):
        with bounded.open_input_stream(path) as f:
            f.read(10)
    assert 1.5 < time.monotonic() - started < 6
    record("r3-4 hang", "refused")


def test_4_a_scheme_pyarrow_has_no_filesystem_for_is_a_clear_error():
    with pytest.raises(ValueError, match=r"cannot open nfs://h/w\.lance: pyarrow has no filesystem for 'nfs'"):
        fs._filesystem("nfs://h/w.lance", None)
    record("r3-4 scheme", "refused")


# --------------------------------------------------------------------------- 5: the file that says it


def test_5_a_pointer_out_of_the_model_directory_blames_the_pointer(tmp_path):
    path = tmp_path / "model"
    ml.save_model(torch.nn.Linear(2, 2), str(path))
    (path / "data" / "lance.yaml").write_text(yaml.safe_dump({"lance_uri": "../../other.lance", "lance_version": 1}))
    with pytest.raises(ml.CorruptionError) as caught:
        ml.load_model(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path / 'data' / 'lance.yaml'} names '../../other.lance'") and "MLmodel" not in message
    record("r3-5 error", "refused")


def test_5_an_mlmodel_lance_uri_with_an_unsupported_scheme_names_mlmodel(tracking):
    import mlflow

    with mlflow.start_run():
        info = ml.log_model(torch.nn.Linear(2, 2), name="m")
    (mlmodel,) = Path(tracking["root"], "artifacts").rglob(f"{info.model_id}/artifacts/MLmodel")
    doc = yaml.safe_load(mlmodel.read_text())
    doc["flavors"]["mlflow_lance"]["lance_uri"] = "nfs://container/w.lance"
    mlmodel.write_text(yaml.safe_dump(doc))
    with pytest.raises(ml.CorruptionError, match=f"MLmodel of models:/{info.model_id} .* scheme 'nfs'"):
        ml.load_state_dict(f"models:/{info.model_id}")
    record("r3-5 error", "refused")


# --------------------------------------------------------------------------- 6: bundles


def test_6_a_sparse_file_in_a_bundles_source_stays_sparse(tmp_path):
    src = tmp_path / "model"
    ml.save_model(torch.nn.Linear(2, 2), str(src))
    size = 256 << 20
    with open(src / "input_example.bin", "wb") as f:
        f.seek(1 << 20)
        f.write(b"data" * 1024)
        f.truncate(size)
    if os.stat(src / "input_example.bin").st_blocks * 512 > 1 << 20:
        pytest.skip("this file system does not keep holes")
    dst = Path(ml.bundle_model(str(src), tmp_path / "bundle"))
    copied = dst / "input_example.bin"
    assert os.stat(copied).st_size == size and os.stat(copied).st_blocks * 512 < 1 << 20
    with open(copied, "rb") as f:
        f.seek((1 << 20) - 2)
        assert f.read(4100) == b"\0\0" + b"data" * 1024 + b"\0\0"
    assert torch.equal(ml.load_model(str(dst)).weight, ml.load_model(str(src)).weight)
    record("r3-6 bundle", "correct")


# --------------------------------------------------------------------------- the fuzzer

SEED = int(os.environ.get("MLFLOW_LANCE_STATE_FUZZ_SEED", "20270527"))
CASES = int(os.environ.get("MLFLOW_LANCE_STATE_FUZZ_CASES", "120"))
CAP = 6 << 30  # address space: the interpreter with torch and Lance takes ~2.5 GB of it


@pytest.mark.slow  # about 0.3 s a case
def test_fuzz_crafted_checkpoint_specs_never_crash_or_half_restore(tmp_path):
    """Seeded mutations of a real checkpoint's generator, optimizer, scheduler, step and model
    entries, each saved and loaded with ``load_checkpoint`` in a child under a memory cap: every
    load ends in the restored state (then every generator draws) or in the package's error
    with every part as it was; a SIGSEGV or an abort fails the test naming the case."""
    cmd = ["prlimit", f"--as={CAP}", sys.executable, str(HERE / "state_fuzz_worker.py"), str(SEED), str(CASES)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    report = run_fuzzer(cmd, timeout=600, cwd=tmp_path, env=env)
    assert report["cases"] == CASES and report["bad"] == [], report["bad"][:10]
    assert report["outcomes"].get("refused", 0) > CASES // 2, report  # the mutations do reach the checks
    for outcome, n in report["outcomes"].items():  # "unsaved": save_state_dict refused the mutant
        record("r3 fuzzed checkpoint", "correct" if outcome == "correct" else "refused", n)
