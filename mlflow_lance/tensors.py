"""Tensors <-> Arrow rows: the dtype table, raw bytes, shapes, chunks and content hashes.

A tensor becomes one or more rows (one per chunk of at most ``chunk_bytes``), each holding
the tensor's name, dtype name, shape, the chunk's byte offset, the tensor's total byte
count, an xxh3-128 hash of the chunk, and the chunk's raw bytes. Bytes are taken from the
tensor's memory without a copy wherever the tensor already is a contiguous CPU tensor.

Nothing here knows about Lance or MLflow.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
import xxhash

# Every dense torch dtype whose bytes round-trip exactly. Names are torch's own
# (``str(dtype)`` without the ``torch.`` prefix), so a dataset is readable by a person.
_DTYPE_NAMES = (
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "complex128",
    "complex64",
    "complex32",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
)
DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
_NAMES_BY_DTYPE: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items()}

#: Default upper bound of one row's payload. A tensor that fits in one row is loaded as a lazy
#: memory map; a chunked one must be assembled in fresh memory (2.5 GiB: ~2 s here whatever the
#: chunk size, 16 MiB to 1 GiB). So only tensors above 1 GiB are split, which also keeps every
#: Arrow value well below 2 GiB.
DEFAULT_CHUNK_BYTES = 1 << 30
MAX_NAME_LENGTH = 1024

#: Column order of a weights dataset. ``data`` is a Lance blob column (see format.py).
SCHEMA_FIELDS = (
    pa.field("name", pa.string(), nullable=False),
    pa.field("chunk", pa.int32(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("nbytes", pa.int64(), nullable=False),
    pa.field("dtype", pa.string(), nullable=False),
    pa.field("shape", pa.list_(pa.int64()), nullable=False),
    pa.field("hash", pa.string(), nullable=False),
    pa.field("alias", pa.string(), nullable=True),
)
META_COLUMNS = tuple(f.name for f in SCHEMA_FIELDS)


def dtype_name(dtype: torch.dtype, *, key: str = "?") -> str:
    """Name under which ``dtype`` is stored; raises TypeError for dtypes that have no raw form."""
    try:
        return _NAMES_BY_DTYPE[dtype]
    except KeyError:
        raise TypeError(
            f"tensor {key!r} has dtype {dtype}, which mlflow-lance cannot store as raw bytes; "
            f"supported: {', '.join(DTYPES)}. Convert it first (e.g. dequantize())."
        ) from None


def dtype_from_name(name: str, *, key: str = "?") -> torch.dtype:
    """The torch dtype stored under ``name`` (raises ValueError naming the key if unknown)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(
            f"tensor {key!r} is stored with dtype {name!r}, which this torch {torch.__version__} "
            f"does not know; upgrade torch or mlflow-lance."
        ) from None


def hash_bytes(data: memoryview | bytes) -> str:
    """Content hash of a byte range: xxh3-128 (~8 GB/s here; sha256 runs at ~1 GB/s)."""
    return xxhash.xxh3_128_hexdigest(data)


def validate_state_dict(state_dict: Mapping[str, object]) -> None:
    """Raise a TypeError/ValueError naming the first bad entry; never writes anything."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(  # begins as mlflow.pytorch's message does
            f"Invalid object type for `state_dict`: {type(state_dict)}. Must be an instance of `dict`: "
            f"a state dict (str to torch.Tensor) or a checkpoint dict; pass model.state_dict()."
        )
    for key, value in state_dict.items():
        check_key(key)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a torch.Tensor; "
                f"mlflow-lance stores tensors only and never pickles. Store it as a tensor, "
                f"or pass it in `properties=` (strings) instead."
            )
        if value.layout != torch.strided:
            raise TypeError(
                f"tensor {key!r} has layout {value.layout}; only dense tensors are stored. Call .to_dense() first."
            )
        if value.is_quantized:
            raise TypeError(
                f"tensor {key!r} is quantized ({value.dtype}); call .dequantize() first or store "
                f"int_repr(), scale and zero point as separate tensors."
            )
        if value.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device and has no data to store")
        dtype_name(value.dtype, key=key)


def check_key(key: object) -> None:
    """Raise a TypeError/ValueError unless ``key`` is a storable tensor name."""
    if not isinstance(key, str):
        raise TypeError(f"state dict key {key!r} is a {type(key).__name__}; keys must be str")
    if not key or key.strip() != key:
        raise ValueError(f"state dict key {key!r} is empty or has leading/trailing whitespace; rename it")
    if len(key) > MAX_NAME_LENGTH or min(key) < " ":  # a control character
        raise ValueError(
            f"state dict key {key[:80]!r}... is longer than {MAX_NAME_LENGTH} characters or "
            f"holds control characters; rename it"
        )


def stored_nbytes(dtype: str, shape: list[int]) -> int:
    """Bytes a tensor of dtype name ``dtype`` and ``shape`` takes (Python ints: no overflow)."""
    n = DTYPES[dtype].itemsize
    for s in shape:
        n *= s
    return n


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, as a flat uint8 memoryview.

    No copy for a contiguous CPU tensor; one copy for a strided view or a device tensor.
    """
    t = tensor.detach()
    if not t.is_cpu:
        t = t.cpu()
    if t.dim() != 1 or not t.is_contiguous():  # (a few microseconds per tensor: thousands of small ones add up)
        t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    # numpy has no bfloat16/float8; viewing as uint8 keeps every dtype's exact bits (a flat "B" view).
    return memoryview(t.view(torch.uint8).numpy())


def find_ties(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor is the very same view of a storage as an earlier name's (tied weights).

    Returns {later name: first name}. Only exact ties (same storage, offset, shape, strides and
    dtype) count; partial overlaps are stored as independent tensors.
    """
    first: dict[tuple, str] = {}
    ties: dict[str, str] = {}
    for key, t in state_dict.items():
        if t.numel() == 0:
            continue
        ident = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if ident in first:
            ties[key] = first[ident]
        else:
            first[ident] = key
    return ties


@dataclass(frozen=True)
class TensorRows:
    """A tensor split into rows: one metadata dict and one payload per chunk."""

    name: str
    meta: list[dict]
    payloads: list[memoryview]
    nbytes: int = field(init=False)  # of the payloads

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", sum(map(len, self.payloads)))

    @property
    def key(self) -> tuple:
        return tensor_key(self.meta)


def tensor_key(meta: list[Mapping]) -> tuple:
    """Identity of a tensor's stored rows: equal keys mean identical content (dedup)."""
    return tuple(
        (m["chunk"], m["offset"], m["nbytes"], m["dtype"], tuple(m["shape"]), m["hash"], m["alias"]) for m in meta
    )


def to_rows(
    name: str, tensor: torch.Tensor, *, tie: str | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> TensorRows:
    """Split one tensor into rows and hash each chunk. A tensor tied to another (``tie``: the
    name it shares its storage with) has one empty row, whose ``alias`` column names it."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    dname = dtype_name(tensor.dtype, key=name)
    shape = list(tensor.shape)
    total = tensor.nbytes
    data = memoryview(b"") if tie is not None else tensor_bytes(tensor)
    spans = (
        [(0, len(data))]
        if len(data) <= chunk_bytes
        else [(o, min(chunk_bytes, total - o)) for o in range(0, total, chunk_bytes)]
    )
    meta, payloads = [], []
    for i, (off, n) in enumerate(spans):
        payload = data[off : off + n] if len(spans) > 1 else data
        meta.append(
            {
                "name": name,
                "chunk": i,
                "offset": off,
                "nbytes": total,
                "dtype": dname,
                "shape": shape,
                "hash": hash_bytes(payload),
                "alias": tie,
            }
        )
        payloads.append(payload)
    return TensorRows(name, meta, payloads)


def rows_batch(schema: pa.Schema, meta: dict, payload: memoryview) -> pa.RecordBatch:
    """One Arrow record batch holding one row; the payload buffer is not copied."""
    columns = [pa.array([meta[f.name]], f.type) for f in SCHEMA_FIELDS]
    offsets = pa.py_buffer(np.array([0, len(payload)], dtype=np.int64))
    data = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(payload)])
    return pa.RecordBatch.from_arrays([*columns, data], schema=schema)


def unit_batch(schema: pa.Schema, rows: list[tuple[dict, memoryview]]) -> pa.RecordBatch:
    """One Arrow record batch holding the rows of one data file.

    A single row's payload is not copied; several rows (a packed run of small tensors, at most
    a few MiB) are copied into one buffer, because Lance writes one batch of many rows about
    twice as fast as as many one-row batches.
    """
    if len(rows) == 1:
        return rows_batch(schema, *rows[0])
    columns = [pa.array([meta[f.name] for meta, _ in rows], f.type) for f in SCHEMA_FIELDS]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(payload) for _, payload in rows], out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.uint8)
    for (_, payload), start in zip(rows, offsets[:-1], strict=True):
        values[start : start + len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    data = pa.Array.from_buffers(pa.large_binary(), len(rows), [None, pa.py_buffer(offsets), pa.py_buffer(values)])
    return pa.RecordBatch.from_arrays([*columns, data], schema=schema)


def readonly_bytes(buf) -> torch.Tensor:
    """A flat uint8 tensor over a read-only buffer (no copy); only ever read from it."""
    if buf is None or len(memoryview(buf)) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buf, dtype=torch.uint8)


def uint8_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's memory (for writing chunks into it)."""
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


_paused = [0, False]  # saves and loads in progress, and whether the cyclic GC was enabled before them
_pause_lock = threading.Lock()


@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a save or load runs (nested and in
    several threads alike; restored as it was when the last one ends). A version of many
    small tensors creates a few objects per tensor, and each full collection walks every
    object alive: with 20,000 tensors, half of a save went to collections that found
    nothing. Memory freed by reference counting is freed as before."""
    with _pause_lock:
        if not _paused[0]:
            _paused[1] = gc.isenabled()
            gc.disable()
        _paused[0] += 1
    try:
        yield
    finally:
        with _pause_lock:
            _paused[0] -= 1
            if not _paused[0] and _paused[1]:
                gc.enable()
