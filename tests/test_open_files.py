"""Open descriptors and mappings of a load: bounded whatever the number of tensors or data
files, and tensors that stay zero-copy views, copy-on-write and independent of each other."""

from __future__ import annotations

import gc
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import mlflow_lance as ml
from conftest import in_subprocess
from conftest import raw as bits


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings_of(folder: Path) -> int:
    """Memory mappings of files under ``folder`` in this process."""
    with open("/proc/self/maps") as f:
        return sum(str(folder) in line for line in f)


def test_a_load_of_3000_tensors_holds_no_descriptor_and_one_mapping_per_data_file(tmp_path: Path):
    uri = tmp_path / "w.lance"
    sd = OrderedDict((f"t{i}", torch.randn(64)) for i in range(3000))
    ml.save_state_dict(sd, uri)
    files = len(os.listdir(uri / "data"))
    before = open_fds()
    got = ml.load_state_dict(uri)
    assert open_fds() == before  # was one per tensor: 3,000 (mmap.mmap dups each one it maps)
    assert 1 <= mappings_of(uri) <= files  # one mapping per data file, not per tensor
    assert all(bits(got[k]) == bits(v) for k, v in sd.items())
    # views of one mapping, yet each tensor has storage of its own bytes (safetensors and
    # torch.save treat them as separate tensors) and is copy-on-write
    assert got["t0"].untyped_storage().nbytes() == 64 * 4
    assert got["t0"].untyped_storage().data_ptr() != got["t1"].untyped_storage().data_ptr()
    got["t1"].mul_(2)
    assert bits(got["t0"]) == bits(sd["t0"]) and bits(got["t2"]) == bits(sd["t2"])
    assert bits(ml.load_state_dict(uri, names=["t1"])["t1"]) == bits(sd["t1"])
    keep = got["t5"]
    del got
    gc.collect()
    assert mappings_of(uri) >= 1  # a tensor still alive keeps its data file mapped
    assert bits(keep) == bits(sd["t5"])
    del keep
    gc.collect()
    assert mappings_of(uri) == 0  # unmapped once no tensor refers to it


def test_more_data_files_than_the_descriptor_limit_save_and_load(tmp_path: Path):
    """40 data files (one tensor each) under ``ulimit -n 32``: saved, mapped, read with
    preadv in several threads, verified and read into a module."""
    got = in_subprocess(
        f"""
        import json, os, resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
        import torch
        import mlflow_lance as ml
        from mlflow_lance import plan
        uri = {str(tmp_path / "w.lance")!r}
        n = plan.PACK_TENSOR_BYTES // 4  # float32 values: a data file each
        sd = {{f"t{{i}}": torch.full((n,), float(i)) for i in range(40)}}
        ml.save_state_dict(sd, uri)
        same = lambda got: all(torch.equal(got[k], v) for k, v in sd.items())
        maps = ml.load_state_dict(uri)
        os.environ["MLFLOW_LANCE_MMAP"] = "0"
        reads = ml.load_state_dict(uri)
        module = torch.nn.Module()
        for k, v in sd.items():
            module.register_buffer(k, torch.zeros_like(v))
        ml.load_into(module, uri, verify=True)
        print(json.dumps({{"files": len(os.listdir(os.path.join(uri, "data"))), "maps": same(maps),
                          "reads": same(reads), "verified": same(ml.load_state_dict(uri, verify=True)),
                          "into": same(module.state_dict()), "fds": len(os.listdir("/proc/self/fd"))}}))
        """
    )
    assert got["files"] == 40
    assert got["maps"] and got["reads"] and got["verified"] and got["into"]
    assert got["fds"] < 24


@pytest.mark.slow
def test_a_model_of_100000_tensors_saves_loads_logs_and_checkpoints_under_ulimit_256(tracking, tmp_path: Path):
    """Every way in and out of the store, under ``ulimit -n 256``: save_state_dict,
    load_state_dict, load_into, log_model, load_model, pyfunc (load and predict),
    log_checkpoint and load_checkpoint."""
    got = in_subprocess(
        f"""
        import json, os, resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        import mlflow, numpy as np, torch
        import mlflow_lance as ml

        class Many(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.ParameterList(torch.full((64,), float(i)) for i in range(100_000))

            def forward(self, x):
                return x + self.w[-1]

        model = Many()
        keys, want = list(model.state_dict()), torch.arange(100_000.0).repeat_interleave(64)
        same = lambda sd: list(sd) == keys and torch.equal(torch.cat([v.detach() for v in sd.values()]), want)

        def scrambled():
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            return model

        uri = {str(tmp_path / "w.lance")!r}
        ml.save_state_dict(model.state_dict(), uri)
        out = {{"load_state_dict": same(ml.load_state_dict(uri))}}
        ml.load_into(scrambled(), uri)
        out["load_into"] = same(model.state_dict())
        with mlflow.start_run():
            info = ml.log_model(model, name="model")
            out["load_model"] = same(ml.load_model(info.model_uri).state_dict())
            pyfunc = mlflow.pyfunc.load_model(info.model_uri)
            out["pyfunc"] = bool((pyfunc.predict(np.zeros((1, 64), "float32")) == 99_999).all())
            ckpt = ml.log_checkpoint(model, step=1)
            ml.load_checkpoint(ckpt.model_uri, scrambled())
            out["checkpoint"] = same(model.state_dict())
        out["fds"] = len(os.listdir("/proc/self/fd"))
        print(json.dumps(out))
        """,
        timeout=300,
    )
    assert got.pop("fds") < 64
    assert got == dict.fromkeys(["load_state_dict", "load_into", "load_model", "pyfunc", "checkpoint"], True)
