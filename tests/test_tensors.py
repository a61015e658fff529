"""tensors.py on its own: the dtype table, raw bytes, chunks, hashes, ties and Arrow batches.

No Lance, no MLflow, no files: these run in milliseconds.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from mlflow_lance.tensors import (
    DTYPES,
    META_COLUMNS,
    SCHEMA_FIELDS,
    check_key,
    dtype_from_name,
    dtype_name,
    find_ties,
    hash_bytes,
    rows_batch,
    stored_nbytes,
    tensor_bytes,
    tensor_key,
    to_rows,
    unit_batch,
    validate_state_dict,
)

SCHEMA = pa.schema([*SCHEMA_FIELDS, pa.field("data", pa.large_binary(), nullable=False)])


def sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    """A tensor of ``dtype`` with distinct bit patterns (random bytes reinterpreted)."""
    n = int(np.prod(shape)) * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_round_trips_its_exact_bits(name: str) -> None:
    t = sample(DTYPES[name])
    assert dtype_from_name(dtype_name(t.dtype)) is t.dtype
    rows = to_rows("w", t)
    assert rows.meta[0]["dtype"] == name and rows.meta[0]["shape"] == [3, 5]
    assert stored_nbytes(name, [3, 5]) == t.numel() * t.element_size() == rows.nbytes
    back = torch.frombuffer(bytearray(rows.payloads[0]), dtype=torch.uint8).view(t.dtype).reshape(t.shape)
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))  # bits, not values (NaNs)


def test_unknown_dtypes_are_refused_naming_the_tensor() -> None:
    with pytest.raises(TypeError, match="'q'.*quint8.*dequantize"):
        dtype_name(torch.quint8, key="q")
    with pytest.raises(ValueError, match="'w'.*'float128'.*upgrade"):
        dtype_from_name("float128", key="w")


def test_strided_and_zero_size_tensors_give_row_major_bytes() -> None:
    base = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    assert bytes(tensor_bytes(base.t())) == base.t().contiguous().numpy().tobytes()
    assert bytes(tensor_bytes(base[:, 1])) == base[:, 1].contiguous().numpy().tobytes()
    empty = to_rows("e", torch.empty(0, 4))
    assert empty.nbytes == 0 and empty.meta[0]["shape"] == [0, 4] and len(empty.meta) == 1


def test_chunks_cover_the_bytes_once_and_hash_each_piece() -> None:
    t = sample(torch.float32, (10, 10))  # 400 bytes
    rows = to_rows("w", t, chunk_bytes=150)
    assert [m["offset"] for m in rows.meta] == [0, 150, 300]
    assert [len(p) for p in rows.payloads] == [150, 150, 100]
    assert b"".join(bytes(p) for p in rows.payloads) == bytes(tensor_bytes(t))
    assert [m["hash"] for m in rows.meta] == [hash_bytes(p) for p in rows.payloads]
    assert all(m["nbytes"] == 400 and m["chunk"] == i for i, m in enumerate(rows.meta))
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        to_rows("w", t, chunk_bytes=0)


def test_the_key_changes_with_content_dtype_and_shape_only() -> None:
    t = sample(torch.float32)
    key = to_rows("a", t).key
    assert to_rows("b", t.clone()).key == key  # the name is not part of the content
    assert to_rows("a", t.reshape(5, 3)).key != key
    assert to_rows("a", t.view(torch.int32)).key != key
    changed = t.clone()
    changed[0, 0] += 1
    assert to_rows("a", changed).key != key
    assert tensor_key(to_rows("a", t).meta) == key


def test_only_exact_ties_are_aliases() -> None:
    w = torch.randn(4, 4)
    sd = {
        "embed": w,
        "head": w,
        "half": w[:2],
        "copy": w.clone(),
        "t": w.t(),
        "empty": torch.empty(0),
        "e2": torch.empty(0),
    }
    assert find_ties(sd) == {"head": "embed"}
    alias = to_rows("head", w, tie="embed")
    assert alias.nbytes == 0 and alias.meta[0]["alias"] == "embed" and alias.meta[0]["nbytes"] == 64


@pytest.mark.parametrize(
    ("sd", "error", "match"),
    [
        ({"w": [1.0]}, TypeError, "'w' is a list.*never pickles"),
        ({1: torch.zeros(1)}, TypeError, "key 1 is a int"),
        ({" w": torch.zeros(1)}, ValueError, "leading/trailing whitespace"),
        ({"a\nb": torch.zeros(1)}, ValueError, "control characters"),
        ({"w" * 2000: torch.zeros(1)}, ValueError, "longer than 1024"),
        ({"s": torch.zeros(3).to_sparse()}, TypeError, "'s' has layout.*to_dense"),
        ({"m": torch.zeros(3, device="meta")}, ValueError, "'m' is on the meta device"),
        ([("w", torch.zeros(1))], TypeError, "pass model.state_dict"),
    ],
)
def test_bad_state_dicts_are_refused_naming_the_entry(sd: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        validate_state_dict(sd)  # type: ignore[arg-type]


def test_check_key_accepts_ordinary_names() -> None:
    for key in ("w", "layer.0.weight", "模型.权重", "a b"):
        check_key(key)


def read_back(batch: pa.RecordBatch) -> list[tuple[dict, bytes]]:
    table = pa.Table.from_batches([batch]).to_pylist()
    return [({c: row[c] for c in META_COLUMNS}, row["data"]) for row in table]


def test_a_unit_batch_holds_its_rows_in_order_with_exact_payloads() -> None:
    tensors = [
        sample(torch.float16, (7,)),
        sample(torch.int64, (2, 3)),
        torch.empty(0),
        sample(torch.bool, (5,)),
    ]
    rows = []
    for i, t in enumerate(tensors):
        r = to_rows(f"t{i}", t)
        rows += zip(r.meta, r.payloads, strict=True)
    batch = unit_batch(SCHEMA, rows)
    assert batch.num_rows == len(rows) and batch.schema.equals(SCHEMA)
    assert read_back(batch) == [(m, bytes(p)) for m, p in rows]
    single = unit_batch(SCHEMA, rows[:1])
    assert read_back(single) == read_back(rows_batch(SCHEMA, *rows[0]))


def test_a_single_row_batch_shares_the_tensor_memory() -> None:
    t = sample(torch.float32, (64,))
    rows = to_rows("w", t)
    batch = unit_batch(SCHEMA, list(zip(rows.meta, rows.payloads, strict=True)))
    assert batch.column("data").buffers()[2].address == t.data_ptr()  # no copy of a lone payload
