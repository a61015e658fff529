"""compression="auto" through the store: each payload an encodings.py blob (byte-grouped
zstd) or a zstd frame; round trips, sizes, later versions, verify, and crafted blobs."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

import mlflow_lance as ml
from conftest import raw as bits
from mlflow_lance import encodings
from mlflow_lance.tensors import DTYPES


def weights(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def state() -> dict[str, torch.Tensor]:
    emb = weights((512, 1024), torch.bfloat16)
    return {
        "emb": emb,
        "head": emb,  # tied: stored once
        "fc": weights((256, 512), seed=1),
        "half": weights((300, 300), torch.float16, seed=2),
        "zeros": torch.zeros(250_000),  # would be > max_zstd_ratio() smaller encoded: a zstd frame
        "noise": torch.randint(0, 256, (300_000,), dtype=torch.uint8),  # raw choice: a zstd frame
        "bias": torch.randn(7),
        "steps": torch.arange(5),
        "empty": torch.empty(0, 3),
        "c64": weights((64, 1024), seed=3).to(torch.complex64),
    }


def data_bytes(uri: Path) -> int:
    return sum(f.stat().st_size for f in (uri / "data").iterdir())


def test_auto_round_trips_smaller_than_zstd_and_keeps_its_choice(tmp_path: Path) -> None:
    sd = state()
    auto, zstd = tmp_path / "auto.lance", tmp_path / "zstd.lance"
    ml.save_state_dict(sd, auto, compression="auto")
    only_weights = {k: sd[k] for k in ("emb", "fc", "half")}
    ml.save_state_dict(only_weights, tmp_path / "auto2.lance", compression="auto")
    ml.save_state_dict(only_weights, zstd, compression="zstd")
    assert data_bytes(tmp_path / "auto2.lance") < 0.9 * data_bytes(zstd)
    for verify in (False, True):
        out = ml.load_state_dict(auto, verify=verify)
        assert list(out) == list(sd)
        for k, t in sd.items():
            assert out[k].dtype == t.dtype and out[k].shape == t.shape and bits(out[k]) == bits(t), k
    assert out["emb"].data_ptr() == out["head"].data_ptr()
    sd["fc"] = sd["fc"] + 1e-3
    info = ml.save_state_dict(sd, auto)  # the dataset keeps compression="auto"
    assert info.changed == ("fc",)
    assert bits(ml.load_state_dict(auto, names=["fc"])["fc"]) == bits(sd["fc"])
    assert ml.verify(auto).ok
    with pytest.raises(ValueError, match="compression"):
        ml.save_state_dict(sd, auto, compression="zstd")


@pytest.mark.parametrize("name", ["bfloat16", "float32", "float64", "int8", "float8_e4m3fn"])
def test_every_element_size_round_trips_and_a_split_tensor_too(tmp_path: Path, name: str) -> None:
    t = weights((200, 1000)).to(DTYPES[name]) if name != "int8" else torch.randint(-3, 3, (200, 1000), dtype=torch.int8)
    uri = tmp_path / "w.lance"
    ml.save_state_dict({"t": t}, uri, compression="auto", chunk_bytes=300_001)  # chunks not whole elements
    assert bits(ml.load_state_dict(uri, verify=True)["t"]) == bits(t)


def encoded_blob(uri: Path) -> tuple[Path, int]:
    """The data file holding an encoded blob, and where the blob starts."""
    for f in sorted((uri / "data").iterdir()):
        at = f.read_bytes().find(encodings.MAGIC + bytes([encodings.FORMAT]))
        if at >= 0:
            return f, at
    raise AssertionError("no encoded blob")


@pytest.mark.parametrize(
    "field, fmt, value, why",
    [
        (8, "<Q", 1 << 40, "decodes to 1099511627776 bytes"),  # a size other than dtype x shape
        (4, "<B", encodings.XOR, "must name its parent"),
        (16, "<I", 8, "block size 8"),
    ],
)
def test_a_crafted_header_is_a_corruption_error_before_anything_is_decoded(
    tmp_path: Path, field: int, fmt: str, value: int, why: str
) -> None:
    uri = tmp_path / "w.lance"
    ml.save_state_dict({"w": weights((512, 512))}, uri, compression="auto")
    path, at = encoded_blob(uri)
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at + field, value)
    path.write_bytes(bytes(data))
    with pytest.raises(ml.CorruptionError, match=why):
        ml.load_state_dict(uri)
    assert not ml.verify(uri).ok


def test_a_delta_blob_is_refused_by_this_release(tmp_path: Path) -> None:
    uri = tmp_path / "w.lance"
    w = weights((512, 512))
    ml.save_state_dict({"w": w}, uri, compression="auto")
    path, at = encoded_blob(uri)
    blob = encodings.encode(w.numpy().view("uint8"), 4)
    delta = encodings.encode(w.numpy().view("uint8"), 4, encoding=encodings.XOR, parent=w.numpy().view("uint8"),
                             parent_hash=b"\x01" * 16)  # fmt: skip
    data = path.read_bytes()
    assert data[at : at + len(blob)] == blob
    if len(delta) > len(blob):
        pytest.skip("the delta does not fit where the blob was")
    path.write_bytes(data[:at] + delta.ljust(len(blob), b"\0") + data[at + len(blob) :])
    with pytest.raises(ml.CorruptionError, match="delta against an earlier version"):
        ml.load_state_dict(uri)
