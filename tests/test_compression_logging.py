"""compression= where users save: log_model / save_model / log_state_dict / log_checkpoint (and
the callbacks and the CLI that forward it). Round trips, encoded rows on disk, encoding off
the training thread for async checkpoints, and the error for a dataset created otherwise."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
import zstandard
from mlflow import MlflowClient

import mlflow_lance as ml
from conftest import raw as bits
from mlflow_lance import encodings
from mlflow_lance.cli import main as cli_main


def bf16_model(seed: int = 0) -> torch.nn.Module:
    """Random init, bf16, ~0.5 MiB of weights: every weight large enough to be encoded."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).to(torch.bfloat16)


def data_bytes(uri: str) -> int:
    return sum(f.stat().st_size for f in (Path(uri) / "data").iterdir())


def holds_encoded_blob(uri: str) -> bool:
    magic = encodings.MAGIC + bytes([encodings.FORMAT])
    return any(magic in f.read_bytes() for f in (Path(uri) / "data").iterdir())


def lance_uri(info) -> str:
    return info.flavors["mlflow_lance"]["lance_uri"]


def versions_of(name: str) -> int:
    return len(MlflowClient().search_model_versions(f"name='{name}'"))


def test_log_model_auto_loads_equal_and_stores_fewer_bytes_than_raw(tracking):
    model = bf16_model()
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with mlflow.start_run():
        auto = ml.log_model(model, name="m", registered_model_name="cmp-auto", compression="auto")
        plain = ml.log_model(model, name="m", registered_model_name="cmp-raw")
    assert holds_encoded_blob(lance_uri(auto)) and not holds_encoded_blob(lance_uri(plain))
    assert data_bytes(lance_uri(auto)) < 0.8 * data_bytes(lance_uri(plain))
    loaded = ml.load_model("models:/cmp-auto/1")
    assert bits(loaded(x)) == bits(model(x))
    for k, t in model.state_dict().items():
        assert bits(loaded.state_dict()[k]) == bits(t), k

    # a later version keeps the dataset's compression (None) or names it; anything else is refused
    with mlflow.start_run():
        model[0].weight.data += 1
        again = ml.log_model(model, name="m", registered_model_name="cmp-auto")
        assert lance_uri(again) == lance_uri(auto)
        ml.log_model(model, name="m", registered_model_name="cmp-auto", compression="auto")
        with pytest.raises(ValueError, match=r"created with compression='auto'.*Pass compression=None"):
            ml.log_model(model, name="m", registered_model_name="cmp-auto", compression="none")
        # a registered model whose dataset was created raw: the user's likely mistake
        with pytest.raises(ValueError, match=r"created with compression='none'.*registered model name"):
            ml.log_model(model, name="m", registered_model_name="cmp-raw", compression="auto")
    assert versions_of("cmp-auto") == 3 and versions_of("cmp-raw") == 1  # the refused logs registered nothing
    assert bits(ml.load_model("models:/cmp-auto/3")(x)) == bits(model(x))
    with pytest.raises(ValueError, match="compression must be"):
        ml.log_model(model, name="m", compression="lz4")


def test_save_model_and_log_state_dict_take_compression(tracking, tmp_path):
    model = bf16_model(1)
    ml.save_model(model, str(tmp_path / "dir"), compression="auto")
    assert holds_encoded_blob(str(tmp_path / "dir" / "data" / "weights.lance"))
    assert bits(ml.load_model(str(tmp_path / "dir"))[0].weight) == bits(model[0].weight)
    with mlflow.start_run() as run:
        ml.log_state_dict({"model": model.state_dict(), "epoch": 3}, "sd", compression="auto")
    sd = ml.load_state_dict(f"runs:/{run.info.run_id}/sd")
    assert sd["epoch"] == 3 and bits(sd["model"]["2.weight"]) == bits(model[2].weight)
    with pytest.raises(ValueError, match="compression must be"):
        ml.save_model(model, str(tmp_path / "other"), compression="gzip")
    assert not (tmp_path / "other").exists()


class _CompressCalls:
    """Every zstd compression, when and on which thread: ``zstandard.ZstdCompressor`` (where
    the package looks it up) made to build zstandard's own compressor behind a wrapper that
    records each ``compress`` (a subclass of the C type is not safe from several threads)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[float, int]] = []
        calls, real = self.calls, zstandard.ZstdCompressor

        class Recording:
            def __init__(self, *args, **kwargs) -> None:
                self._inner = real(*args, **kwargs)

            def compress(self, data):
                calls.append((time.monotonic(), threading.get_ident()))
                return self._inner.compress(data)

            def __getattr__(self, name: str):
                return getattr(self._inner, name)

        monkeypatch.setattr(zstandard, "ZstdCompressor", Recording)

    def before(self, t: float) -> list[tuple[float, int]]:
        return [c for c in self.calls if c[0] <= t]


def test_async_checkpoint_encodes_in_the_background_thread(tracking, monkeypatch):
    model = bf16_model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    zstd = _CompressCalls(monkeypatch)
    training = threading.get_ident()
    with mlflow.start_run():
        handle = ml.log_checkpoint(model, opt, step=1, blocking=False, compression="auto")
        returned = time.monotonic()
        done = handle.result()
        # nothing was encoded while log_checkpoint held the training thread, and nothing on it
        assert zstd.calls and not zstd.before(returned)
        assert training not in {t for _, t in zstd.calls}
        assert holds_encoded_blob(done.lance_uri)
        # the same recorder sees the encoding inside the call when the checkpoint blocks
        model[0].weight.data += 1
        seen = len(zstd.calls)
        blocking = ml.log_checkpoint(model, opt, step=2, compression="auto")
        assert len(zstd.calls) > seen
        restored = bf16_model(3)
        ml.load_checkpoint(f"models:/{blocking.model_id}", restored)
        assert bits(restored[0].weight) == bits(model[0].weight)
        # the run's dataset was created with "auto": "none" is refused (from the background too)
        late = ml.log_checkpoint(model, opt, step=3, blocking=False, compression="none")
        with pytest.raises(ValueError, match=r"created with compression='auto'.*a new run"):
            late.result()
        ml.log_checkpoint(model, opt, step=4)  # None keeps the run's compression
    with pytest.raises(ValueError, match="compression must be"):
        ml.log_checkpoint(model, opt, step=5, compression="best")


def test_callbacks_check_and_keep_compression():
    from mlflow_lance.integrations.transformers import MLflowLanceTrainerCallback

    assert MLflowLanceTrainerCallback(compression="auto").compression == "auto"
    with pytest.raises(ValueError, match="compression must be"):
        MLflowLanceTrainerCallback(compression="zstd9")
    lightning = pytest.importorskip("mlflow_lance.integrations.lightning")
    assert lightning.MLflowLanceCheckpoint(compression="auto").compression == "auto"
    with pytest.raises(ValueError, match="compression must be"):
        lightning.MLflowLanceCheckpoint(compression="fast")


def test_cli_import_takes_compression(tmp_path, capsys):
    from safetensors.torch import save_file

    sd = bf16_model(4).state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    uri = str(tmp_path / "w.lance")
    assert cli_main(["import", uri, str(tmp_path / "w.safetensors"), "--compression", "auto"]) == 0
    assert holds_encoded_blob(uri)
    assert all(bits(ml.load_state_dict(uri)[k]) == bits(t) for k, t in sd.items())
    assert cli_main(["import", uri, str(tmp_path / "w.safetensors"), "--compression", "none"]) == 2
    assert "compression=None" in capsys.readouterr().err
