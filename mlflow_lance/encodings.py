"""Lossless encodings of one tensor's bytes: raw, byte-grouped + zstd, and an XOR delta
against the same tensor's bytes in a parent version.

Pure: bytes or numpy arrays in, bytes out. Nothing here knows about Lance or MLflow.

**Byte grouping.** The bytes of a float hold fields of very different entropy: the exponent
of a trained or freshly initialised weight takes a handful of values, the low mantissa bits
are noise. Each element's byte positions are split into streams (byte 0 of every element,
byte 1 of every element, ...) and each stream is zstd-compressed on its own, so that the
exponent's redundancy is not diluted by the noise around it. For float32 and bfloat16 the
*aligned* variant first rotates each element left by one bit, so that the 8 exponent bits
fill the high byte exactly (``[exponent][mantissa][sign]``) instead of straddling two.

**XOR delta.** A weight after a few optimizer steps keeps its sign, its exponent and its high
mantissa bits; XOR with the parent's bytes turns all of those into zero bits, which the
grouped zstd streams then store in almost nothing. Unchanged regions (an embedding with 1% of
its rows updated) XOR to zero runs, so in-tensor dedup comes for free: it costs a few bytes
per 128 KiB zstd block, without chunk references to keep alive.

**Blocks.** A tensor is encoded in blocks of ``BLOCK_BYTES`` (each block's streams are zstd
frames of their own, or stored raw where zstd does not gain), so that decoding needs one
block of scratch memory beside the destination: peak memory is the tensor plus ~1 MiB, and
each block's bytes are decoded, ungrouped and un-rotated while they are in cache.

**The blob.** ``HEADER`` (magic and format version, encoding, element size, flags, decoded
size, block size, the parent's content hash) followed by one u32 per stream of each block
(bit 31: stored raw; the rest: its stored length), then the streams. ``decode`` checks every
field before it writes a byte: the decoded size must equal the one the caller expects (dtype
x shape), the stream lengths must add up to the blob exactly, and each zstd frame must
declare exactly its stream's length and hold exactly one frame; so a crafted blob can make
it neither allocate nor decode more than the destination it was given, and its work is
linear in that size. A delta chain is resolved by ``chain`` with a fixed bound on its depth
(``MAX_CHAIN``), so a crafted parent reference cannot loop.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zstandard

from .errors import CorruptionError

RAW, GROUPED, XOR = 0, 1, 2
#: The encodings by id, as recorded in a blob's header (and a row's metadata).
NAMES = {RAW: "raw", GROUPED: "grouped", XOR: "xor"}
ROTATED = 1  # flag: each element was rotated left by one bit before grouping (decode rotates back)
FORMAT = 1  # the blob format this module writes and reads
MAGIC = b"MLE"
#: magic, format, encoding, element size, flags, reserved, decoded size, block bytes, parent hash
HEADER = struct.Struct("<3sBBBBBQI16s")
STREAM_RAW = 1 << 31  # bit of a stream's u32 length: the stream is stored as it is
BLOCK_BYTES = 1 << 20  # decoded bytes per block (a multiple of every element size)
MIN_BLOCK_BYTES, MAX_BLOCK_BYTES = 1 << 16, 1 << 26  # bounds on a blob's block size (multiples of 8)
ELEMENT_SIZES = (1, 2, 4, 8)
#: At most this many deltas between a tensor's bytes and the full encoding they start from.
MAX_CHAIN = 4
#: An encoding is kept only if it saves at least this fraction of the raw bytes (else raw).
MIN_GAIN = 0.03
#: A slower-decoding candidate (aligned, then XOR) replaces a faster one only if it saves at
#: least this fraction of the raw bytes more: rotating back costs ~15% of the decode speed.
PREFER = 0.01
LEVEL = 1  # zstd level: on exponent streams level 1 both compresses better and decodes faster than 3
#: Tensors smaller than this stay raw: they are a small share of any model's bytes, and
#: decoding one costs ~50 us of fixed overhead against a plain copy.
MIN_ENCODED_BYTES = 64 << 10
SAMPLE_BLOCKS = 4  # blocks of a tensor ``choose`` encodes with every candidate
NO_PARENT = bytes(16)
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_ROTATABLE = {"bfloat16": 2, "float32": 4}  # dtypes whose exponent fills a byte after a 1-bit rotation


@dataclass(frozen=True)
class Header:
    """What a blob's header declares (checked by ``read_header``)."""

    encoding: int
    element_size: int
    flags: int
    size: int  # decoded bytes
    block: int  # decoded bytes per block
    parent: bytes  # 16-byte content hash of the parent's bytes (XOR), else zeros
    streams: tuple[int, ...]  # the u32 of each stream of each block, in order
    offset: int  # where the first stream starts in the blob

    @property
    def name(self) -> str:
        """The encoding's name (``NAMES``)."""
        return NAMES[self.encoding]


@dataclass(frozen=True)
class Choice:
    """How ``choose`` decided to encode a tensor."""

    encoding: int
    flags: int
    estimate: float  # estimated stored / raw bytes, from the sampled blocks


def rotatable(dtype: str) -> bool:
    """Whether a dtype has the aligned variant (bfloat16 and float32 do).

    Args:
        dtype: a tensors.DTYPES name.

    Returns:
        True where a one-bit rotation makes the exponent fill the high byte.
    """
    return dtype in _ROTATABLE


def element_size_of(dtype_size: int) -> int:
    """The element size grouping uses for a dtype.

    Args:
        dtype_size: the dtype's size in bytes.

    Returns:
        The largest of ``ELEMENT_SIZES`` that divides it (complex128's 16 bytes group as 8:
        every size round-trips, grouping only decides how well it compresses).
    """
    for size in reversed(ELEMENT_SIZES):
        if dtype_size % size == 0:
            return size
    return 1


def _rotate(block: np.ndarray, size: int, left: bool) -> None:
    """Rotate each ``size``-byte element of the uint8 ``block`` by one bit, in place."""
    w = block.view(_UINT[size])
    bits = 8 * size
    if left:
        top = w >> (bits - 1)
        w <<= 1
    else:
        top = w << (bits - 1)
        w >>= 1
    w |= top


def _as_u8(data: memoryview | bytes | np.ndarray) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).ravel()


def _encode_block(
    block: np.ndarray, size: int, flags: int, cctx: zstandard.ZstdCompressor, out: list[bytes]
) -> list[int]:
    """Group, compress and append one block's streams to ``out``; their header words."""
    if flags & ROTATED:
        block = block.copy()
        _rotate(block, size, left=True)
    grouped = block.reshape(-1, size)
    words = []
    for j in range(size):
        stream = np.ascontiguousarray(grouped[:, j]) if size > 1 else block
        frame = cctx.compress(stream)
        if len(frame) < len(stream):
            out.append(frame)
            words.append(len(frame))
        else:
            out.append(stream.tobytes())
            words.append(STREAM_RAW | len(stream))
    return words


def encode(
    data: memoryview | bytes | np.ndarray,
    element_size: int,
    *,
    encoding: int = GROUPED,
    flags: int = 0,
    parent: memoryview | bytes | np.ndarray | None = None,
    parent_hash: bytes = NO_PARENT,
    block: int = BLOCK_BYTES,
    level: int = LEVEL,
) -> bytes:
    """Encode a tensor's bytes as one blob.

    Args:
        data: the tensor's bytes, row-major.
        element_size: bytes per element to group by (``element_size_of`` of the dtype's size).
        encoding: ``RAW``, ``GROUPED`` or ``XOR``.
        flags: ``ROTATED`` for the aligned variant (only with element size 2 or 4).
        parent: the parent version's bytes of the same tensor (``XOR`` only), as many as ``data``.
        parent_hash: the parent's 16-byte content hash, recorded for ``chain`` (``XOR`` only).
        block: decoded bytes per block (a positive multiple of the element size).
        level: the zstd level.

    Returns:
        The blob: header, stream table, streams.

    Raises:
        ValueError: an argument that cannot describe a valid blob.
    """
    src = _as_u8(data)
    n = len(src)
    if element_size not in ELEMENT_SIZES or n % element_size:
        raise ValueError(f"{n} bytes are not whole elements of {element_size} bytes ({ELEMENT_SIZES})")
    if encoding not in NAMES:
        raise ValueError(f"unknown encoding {encoding!r}; known: {NAMES}")
    if flags & ~ROTATED or (flags & ROTATED and element_size not in (2, 4)):
        raise ValueError(f"flags {flags} do not apply to elements of {element_size} bytes")
    if not MIN_BLOCK_BYTES <= block <= MAX_BLOCK_BYTES or block % 8:
        raise ValueError(f"block must be a multiple of 8 in [{MIN_BLOCK_BYTES}, {MAX_BLOCK_BYTES}], got {block}")
    base = None
    if encoding == XOR:
        base = _as_u8(parent) if parent is not None else None
        if base is None or len(base) != n or len(parent_hash) != 16 or parent_hash == NO_PARENT:
            raise ValueError("an XOR delta needs the parent's bytes (as many as the tensor's) and its 16-byte hash")
    elif parent is not None or parent_hash != NO_PARENT:
        raise ValueError(f"encoding {NAMES[encoding]!r} takes no parent")
    if encoding == RAW:
        flags, element_size = 0, 1
    words: list[int] = []
    streams: list[bytes] = []
    if encoding == RAW:  # one raw stream per block
        for start in range(0, n, block):
            piece = src[start : start + block]
            words.append(STREAM_RAW | len(piece))
            streams.append(piece.tobytes())
    else:
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
        for start in range(0, n, block):
            piece = src[start : start + block]
            if base is not None:
                piece = np.bitwise_xor(piece, base[start : start + block])
            words += _encode_block(piece, element_size, flags, cctx, streams)
    head = HEADER.pack(MAGIC, FORMAT, encoding, element_size, flags, 0, n, block, parent_hash)
    return b"".join([head, struct.pack(f"<{len(words)}I", *words), *streams])


def read_header(blob: memoryview | bytes, expected_size: int, *, total: int | None = None) -> Header:
    """The header of ``blob``, checked against everything it must agree with.

    Args:
        blob: an encoded blob, or (with ``total``) a prefix of one of at least ``HEADER.size``
            bytes: then only the fixed fields are checked, and ``streams`` is empty.
        expected_size: the decoded size the tensor's dtype and shape give.
        total: the whole blob's length, when ``blob`` is a prefix of it.

    Returns:
        The checked header.

    Raises:
        CorruptionError: the header is malformed, of another format, declares another size than
            ``expected_size``, or its stream table does not describe the blob exactly.
    """
    view = memoryview(blob).cast("B")
    if len(view) < HEADER.size:
        raise CorruptionError(f"encoded blob of {len(view)} bytes is shorter than its {HEADER.size}-byte header")
    magic, fmt, encoding, size, flags, reserved, n, block, parent = HEADER.unpack_from(view)
    if magic != MAGIC or fmt != FORMAT:
        raise CorruptionError(f"not an encoded blob of format {FORMAT} (magic {bytes(magic)!r}, format {fmt})")
    if encoding not in NAMES or size not in ELEMENT_SIZES or reserved:
        raise CorruptionError(f"unknown encoding {encoding}, element size {size} or reserved byte {reserved}")
    if flags & ~ROTATED or (flags & ROTATED and size not in (2, 4)) or (encoding == RAW and (flags or size != 1)):
        raise CorruptionError(f"flags {flags} do not apply to encoding {encoding} of elements of {size} bytes")
    if n != expected_size or n % size:
        raise CorruptionError(f"blob decodes to {n} bytes, but its tensor takes {expected_size}")
    if not MIN_BLOCK_BYTES <= block <= MAX_BLOCK_BYTES or block % 8:
        raise CorruptionError(f"block size {block} is not a multiple of 8 in [{MIN_BLOCK_BYTES}, {MAX_BLOCK_BYTES}]")
    if (encoding == XOR) != (parent != NO_PARENT):
        raise CorruptionError("a delta must name its parent, and only a delta may")
    count = -(-n // block) * (1 if encoding == RAW else size)
    offset = HEADER.size + 4 * count
    length = len(view) if total is None else total
    if length < offset:
        raise CorruptionError(f"blob of {length} bytes is shorter than its stream table ({count} streams)")
    if total is not None:
        return Header(encoding, size, flags, n, block, bytes(parent), (), offset)
    words = struct.unpack_from(f"<{count}I", view, HEADER.size)
    stored = sum(w & ~STREAM_RAW for w in words)
    if offset + stored != len(view):
        raise CorruptionError(
            f"the streams take {stored} bytes, but the blob holds {len(view) - offset} after its table"
        )
    return Header(encoding, size, flags, n, block, bytes(parent), words, offset)


def decode(
    blob: memoryview | bytes,
    dest: memoryview | np.ndarray,
    *,
    parent: memoryview | bytes | np.ndarray | None = None,
) -> Header:
    """Decode ``blob`` into ``dest`` (the tensor's memory, written in place; nothing of its size
    is allocated).

    For an XOR delta, ``dest`` may already hold the parent's bytes (``parent`` None): each
    block is XORed into it. Otherwise ``parent`` gives them.

    Args:
        blob: an encoded blob.
        dest: writable destination of exactly the tensor's byte size.
        parent: the parent's decoded bytes, for an XOR delta whose ``dest`` does not hold them.

    Returns:
        The blob's checked header.

    Raises:
        CorruptionError: the blob is malformed or crafted (see ``read_header``), a stream does
            not decode to exactly its length, or ``parent`` is given for a blob that is not a
            delta or is of another size.
        ValueError: ``dest`` is read-only.
    """
    out = dest if isinstance(dest, np.ndarray) else np.frombuffer(dest, dtype=np.uint8)
    out = out.view(np.uint8).reshape(-1)
    if not out.flags.writeable:
        raise ValueError("the destination buffer is read-only")
    view = memoryview(blob).cast("B")
    h = read_header(view, len(out))
    base = _as_u8(parent) if parent is not None else None
    if h.encoding != XOR and base is not None:
        raise CorruptionError(f"a {h.name} blob has no parent, but one was given")
    if base is not None and len(base) != h.size:
        raise CorruptionError(f"the parent holds {len(base)} bytes, the delta {h.size}")
    dctx = _decompressor()
    pos, k = h.offset, (1 if h.encoding == RAW else h.element_size)
    scratch = np.empty(min(h.block, h.size) if h.encoding == XOR else 0, dtype=np.uint8)
    for b, start in enumerate(range(0, h.size, h.block)):
        length = min(h.block, h.size - start)
        if length % k:
            raise CorruptionError(f"block {b} of {length} bytes is not whole elements of {k}")
        target = out[start : start + length] if h.encoding != XOR else scratch[:length]
        grouped = target.reshape(-1, k)
        for j in range(k):
            word = h.streams[b * k + j]
            stored = word & ~STREAM_RAW
            piece = view[pos : pos + stored]
            pos += stored
            want = length // k
            if word & STREAM_RAW:
                if stored != want:
                    raise CorruptionError(f"raw stream {j} of block {b} holds {stored} bytes, not {want}")
                data = np.frombuffer(piece, dtype=np.uint8)
            else:
                data = np.frombuffer(_unzstd(dctx, piece, want, b, j), dtype=np.uint8)
            if k == 1:
                target[:] = data
            else:
                grouped[:, j] = data
        if h.flags & ROTATED:
            _rotate(target, k, left=False)
        if h.encoding == XOR:
            dst = out[start : start + length]
            np.bitwise_xor(target, base[start : start + length] if base is not None else dst, out=dst)
    return h


_LOCAL = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (one may not be used by two threads at once)."""
    if getattr(_LOCAL, "dctx", None) is None:
        _LOCAL.dctx = zstandard.ZstdDecompressor()
    return _LOCAL.dctx


def _unzstd(dctx: zstandard.ZstdDecompressor, piece: memoryview, want: int, block: int, stream: int) -> bytes:
    """One zstd frame that declares exactly ``want`` bytes, decoded (nothing before, after or
    beyond it)."""
    try:
        declared = zstandard.frame_content_size(piece)
    except zstandard.ZstdError:
        declared = None
    if declared != want:
        raise CorruptionError(f"stream {stream} of block {block} is not a zstd frame of {want} bytes ({declared})")
    obj = dctx.decompressobj(write_size=max(want, 1))
    try:
        data = obj.decompress(piece)
    except zstandard.ZstdError as err:
        raise CorruptionError(f"stream {stream} of block {block} does not decode: {err}") from None
    if len(data) != want or not obj.eof or obj.unused_data:
        raise CorruptionError(f"stream {stream} of block {block} is not exactly one zstd frame of {want} bytes")
    return data


def chain(start: bytes, parent_of: Callable[[bytes], bytes | None], max_depth: int = MAX_CHAIN) -> list[bytes]:
    """The content hashes from a tensor's full encoding up to ``start``, following parents.

    Args:
        start: the content hash of the tensor to decode.
        parent_of: the parent hash recorded by the blob stored under a hash (None: a full
            encoding); it raises for a hash that is not stored.
        max_depth: most deltas allowed between ``start`` and its full encoding.

    Returns:
        The hashes to decode in order: the full encoding first, ``start`` last.

    Raises:
        CorruptionError: the chain loops or is longer than ``max_depth`` deltas.
    """
    hashes = [start]
    while (parent := parent_of(hashes[-1])) is not None:
        if parent in hashes:
            raise CorruptionError(f"the delta chain of {start.hex()} loops back to {parent.hex()}")
        if len(hashes) > max_depth:
            raise CorruptionError(f"the delta chain of {start.hex()} is longer than {max_depth} deltas")
        hashes.append(parent)
    return hashes[::-1]


def _sample(src: np.ndarray, block: int, count: int) -> list[tuple[int, int]]:
    """Up to ``count`` block-aligned spans spread evenly over ``src``."""
    blocks = -(-len(src) // block)
    picks = sorted({round(i * (blocks - 1) / max(count - 1, 1)) for i in range(min(count, blocks))})
    return [(p * block, min(block, len(src) - p * block)) for p in picks]


def choose(
    data: memoryview | bytes | np.ndarray,
    dtype: str,
    element_size: int,
    *,
    parent: memoryview | bytes | np.ndarray | None = None,
    level: int = LEVEL,
) -> Choice:
    """Pick the smallest encoding for a tensor from a sample of its blocks.

    Encodes up to ``SAMPLE_BLOCKS`` evenly spread blocks with each candidate (grouped, grouped
    aligned where the dtype has it, and the same two as an XOR delta when ``parent`` is given)
    and keeps the smallest, preferring the faster to decode (in that order) unless a later one
    saves ``PREFER`` of the bytes more; raw when none saves ``MIN_GAIN`` of the bytes, and for
    tensors under ``MIN_ENCODED_BYTES``.

    Args:
        data: the tensor's bytes.
        dtype: its dtype name (tensors.DTYPES), to know whether it has the aligned variant.
        element_size: ``element_size_of`` its dtype's size.
        parent: the parent version's bytes of the same tensor, if it has one of equal size.
        level: the zstd level.

    Returns:
        The choice and its estimated ratio.
    """
    src = _as_u8(data)
    if len(src) < MIN_ENCODED_BYTES:
        return Choice(RAW, 0, 1.0)
    base = _as_u8(parent) if parent is not None and len(_as_u8(parent)) == len(src) else None
    spans = _sample(src, BLOCK_BYTES, SAMPLE_BLOCKS)
    total = sum(n for _, n in spans)
    flag_options = (0, ROTATED) if rotatable(dtype) and _ROTATABLE[dtype] == element_size else (0,)
    candidates = [(GROUPED, f) for f in flag_options] + ([(XOR, f) for f in flag_options] if base is not None else [])
    best = Choice(RAW, 0, 1.0)
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
    for encoding, flags in candidates:
        stored = 0
        for start, n in spans:
            piece = src[start : start + n]
            if encoding == XOR:
                piece = np.bitwise_xor(piece, base[start : start + n])
            sink: list[bytes] = []
            _encode_block(piece, element_size, flags, cctx, sink)
            stored += sum(map(len, sink)) + 4 * element_size
        ratio = stored / total
        if ratio < best.estimate - (PREFER if best.encoding != RAW else 0):
            best = Choice(encoding, flags, ratio)
    return best if best.estimate <= 1 - MIN_GAIN else Choice(RAW, 0, 1.0)
