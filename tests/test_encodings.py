"""encodings.py on its own: every encoding round-trips, the choice, strict headers, delta
chains, memory while decoding, and a seeded fuzzer over mutated blobs.

No Lance, no MLflow, no files.
"""

from __future__ import annotations

import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import run_fuzzer
from mlflow_lance import encodings as E
from mlflow_lance.errors import CorruptionError

HERE = Path(__file__).resolve().parent
BLOCK = E.MIN_BLOCK_BYTES
PARENT_HASH = b"\x01" * 16


def weights(n: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    """``n`` float32 values drawn like a freshly initialised layer's."""
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def bf16(x: np.ndarray) -> np.ndarray:
    """float32 values truncated to bfloat16 bits (uint16)."""
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def round_trip(blob: bytes, data: bytes, parent: bytes | None = None) -> E.Header:
    dest = np.empty(len(data), dtype=np.uint8)
    header = E.decode(blob, dest, parent=parent)
    assert dest.tobytes() == data
    return header


@pytest.mark.parametrize("size", E.ELEMENT_SIZES)
@pytest.mark.parametrize("n", [0, 1, 1000, BLOCK + 24, 3 * BLOCK])  # empty, one element, several blocks
def test_every_encoding_round_trips_every_element_size(size: int, n: int) -> None:
    data = np.random.default_rng(n).integers(0, 256, n * size, dtype=np.uint8).tobytes()
    parent = np.random.default_rng(n + 1).integers(0, 256, n * size, dtype=np.uint8).tobytes()
    for encoding, flags in [(E.RAW, 0), (E.GROUPED, 0), (E.XOR, 0)] + [(E.GROUPED, E.ROTATED)] * (size in (2, 4)):
        kw = {"parent": parent, "parent_hash": PARENT_HASH} if encoding == E.XOR else {}
        blob = E.encode(data, size, encoding=encoding, flags=flags, block=BLOCK, **kw)
        header = round_trip(blob, data, parent if encoding == E.XOR else None)
        assert (header.encoding, header.size) == (encoding, len(data))


def test_grouping_compresses_float_weights_and_aligning_helps_bfloat16() -> None:
    x = weights(1 << 19)
    f32, b16 = x.tobytes(), bf16(x).tobytes()
    grouped32, plain = E.encode(f32, 4), E.encode(f32, 1)  # element size 1: zstd of the raw bytes
    assert len(grouped32) < 0.87 * len(f32) and len(grouped32) < len(plain)
    grouped16, aligned16 = E.encode(b16, 2), E.encode(b16, 2, flags=E.ROTATED)
    assert len(aligned16) < len(grouped16) < 0.70 * len(b16)
    round_trip(aligned16, b16)


def test_a_delta_stores_an_update_in_less_and_decodes_onto_the_parent_in_place() -> None:
    parent = weights(1 << 18)
    child = parent + weights(1 << 18, seed=1, scale=1e-4)
    blob = E.encode(child, 4, encoding=E.XOR, parent=parent, parent_hash=PARENT_HASH)
    assert len(blob) < 0.8 * len(E.encode(child, 4))
    dest = parent.copy().view(np.uint8)  # holds the parent: the delta is applied where it lies
    header = E.decode(blob, dest)
    assert dest.tobytes() == child.tobytes() and header.parent == PARENT_HASH and header.name == "xor"


def test_an_embedding_with_one_percent_of_rows_changed_stores_under_three_percent() -> None:
    rows, width = 4096, 768
    table = weights(rows * width).reshape(rows, width)
    changed = table.copy()
    picked = np.random.default_rng(2).choice(rows, rows // 100, replace=False)
    changed[picked] = weights(len(picked) * width, seed=3).reshape(-1, width)
    choice = E.choose(changed, "float32", 4, parent=table)
    blob = E.encode(changed, 4, encoding=choice.encoding, flags=choice.flags, parent=table, parent_hash=PARENT_HASH)
    assert choice.encoding == E.XOR and len(blob) <= 0.03 * changed.nbytes
    round_trip(blob, changed.tobytes(), table.tobytes())


def test_choose_picks_raw_for_noise_grouped_for_weights_and_xor_for_an_update() -> None:
    noise = np.random.default_rng(4).integers(0, 256, 1 << 20, dtype=np.uint8)
    assert E.choose(noise, "float32", 4) == E.Choice(E.RAW, 0, 1.0)
    x = weights(1 << 20)
    assert E.choose(x, "float32", 4).encoding == E.GROUPED
    assert E.choose(bf16(x), "bfloat16", 2).estimate < 0.70
    assert E.choose(x + weights(1 << 20, seed=5, scale=1e-5), "float32", 4, parent=x).encoding == E.XOR
    assert E.choose(x, "float32", 4, parent=x[:10]).encoding == E.GROUPED  # a parent of another size is ignored
    assert E.choose(b"", "float32", 4).encoding == E.RAW
    assert E.element_size_of(8) == 8 and E.element_size_of(6) == 2 and E.element_size_of(3) == 1
    assert E.rotatable("bfloat16") and not E.rotatable("float16")


def test_decoding_allocates_a_block_of_scratch_not_the_tensor() -> None:
    parent = weights(4 << 20)  # 16 MiB
    child = parent + weights(4 << 20, seed=6, scale=1e-4)
    for blob in (
        E.encode(child, 4, flags=E.ROTATED),
        E.encode(child, 4, encoding=E.XOR, parent=parent, parent_hash=PARENT_HASH),
    ):
        dest = parent.copy().view(np.uint8)
        tracemalloc.start()
        E.decode(blob, dest)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert dest.tobytes() == child.tobytes()
        assert peak < 4 * E.BLOCK_BYTES < 0.3 * child.nbytes, peak


def blob_and_data() -> tuple[bytes, bytes]:
    data = weights(3 * BLOCK // 4 + 5).tobytes()
    return E.encode(data, 4, block=BLOCK), data


def patched(blob: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(blob)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_a_header_is_checked_before_anything_is_written() -> None:
    blob, data = blob_and_data()
    cases = {
        "shorter than its": blob[:10],
        "not an encoded blob": b"XYZ" + blob[3:],
        "format 2": patched(blob, 3, "<B", 2),
        "unknown encoding": patched(blob, 4, "<B", 9),
        "element size 3": patched(blob, 5, "<B", 3),
        "flags 4": patched(blob, 6, "<B", 4),
        "reserved byte": patched(blob, 7, "<B", 1),
        "decodes to 1099511627776 bytes": patched(blob, 8, "<Q", 1 << 40),
        "block size 8 ": patched(blob, 16, "<I", 8),
        "must name its parent": patched(blob, 20, "<16s", PARENT_HASH),
        "the streams take": blob + b"\0",
        "after its table": patched(blob, E.HEADER.size, "<I", 1),
    }
    for why, bad in cases.items():
        dest = np.full(len(data), 7, dtype=np.uint8)
        with pytest.raises(CorruptionError, match=why):
            E.decode(bad, dest)
        assert (dest == 7).all(), why  # nothing written
    with pytest.raises(CorruptionError, match="but its tensor takes 8"):
        E.read_header(blob, 8)  # the size the caller expects (dtype x shape) rules


def test_each_stream_must_be_exactly_one_frame_of_its_length() -> None:
    data = weights(BLOCK // 4).tobytes()  # one block
    blob = E.encode(data, 4, block=BLOCK)
    header = E.read_header(blob, len(data))
    first = header.streams.index(next(w for w in header.streams if not w & E.STREAM_RAW))
    start = header.offset + sum(w & ~E.STREAM_RAW for w in header.streams[:first])
    length = header.streams[first] & ~E.STREAM_RAW
    frame = blob[start : start + length]
    table = E.HEADER.size + 4 * first

    def with_stream(new: bytes) -> bytes:
        out = patched(blob[:start] + new + blob[start + length :], table, "<I", len(new))
        return out

    import zstandard

    other = zstandard.ZstdCompressor(level=1).compress(bytes(len(data) // 4 + 1))
    with pytest.raises(CorruptionError, match="not a zstd frame of"):
        E.decode(with_stream(other), np.empty(len(data), np.uint8))  # declares another size
    with pytest.raises(CorruptionError, match="not exactly one zstd frame"):
        E.decode(with_stream(frame + b"junk"), np.empty(len(data), np.uint8))  # trailing bytes
    with pytest.raises(CorruptionError, match="raw stream"):
        E.decode(patched(blob, table, "<I", E.STREAM_RAW | length), np.empty(len(data), np.uint8))


def test_a_delta_needs_its_parent_and_only_a_delta_takes_one() -> None:
    blob, data = blob_and_data()
    with pytest.raises(CorruptionError, match="has no parent"):
        E.decode(blob, np.empty(len(data), np.uint8), parent=data)
    delta = E.encode(data, 4, encoding=E.XOR, parent=data, parent_hash=PARENT_HASH, block=BLOCK)
    with pytest.raises(CorruptionError, match="the parent holds 4 bytes"):
        E.decode(delta, np.empty(len(data), np.uint8), parent=b"1234")
    with pytest.raises(ValueError, match="XOR delta needs"):
        E.encode(data, 4, encoding=E.XOR)
    with pytest.raises(ValueError, match="takes no parent"):
        E.encode(data, 4, parent=data)
    with pytest.raises(ValueError, match="whole elements"):
        E.encode(b"123", 2)
    with pytest.raises(ValueError, match="read-only"):
        E.decode(blob, np.frombuffer(bytes(len(data)), np.uint8))


def test_a_chain_is_bounded_and_cannot_loop() -> None:
    parents = {b"d": b"c", b"c": b"b", b"b": b"a", b"a": None}
    assert E.chain(b"d", parents.__getitem__) == [b"a", b"b", b"c", b"d"]
    assert E.chain(b"a", parents.__getitem__) == [b"a"]
    with pytest.raises(CorruptionError, match="longer than 2 deltas"):
        E.chain(b"d", parents.__getitem__, max_depth=2)
    with pytest.raises(CorruptionError, match="loops back"):
        E.chain(b"x", {b"x": b"y", b"y": b"x"}.__getitem__)


CASES = 3000


def test_mutated_blobs_decode_to_bytes_or_a_corruption_error_never_an_abort() -> None:
    cmd = ["prlimit", "--as=4000000000", sys.executable, str(HERE / "encodings_fuzz_worker.py"), "20261207", str(CASES)]
    report = run_fuzzer(cmd, timeout=120, env={"PYTHONPATH": str(HERE.parent)})
    assert report["cases"] == CASES and report["bad"] == [], report["bad"][:10]
    assert report["outcomes"]["CorruptionError"] > CASES // 2
    assert report["slowest"] < 1.0  # work is bounded by the destination's size
