"""Mutate encoded blobs and decode each mutant (the fuzzer of tests/test_encodings.py, run as
a child under a memory cap so that an abort or a runaway allocation is seen).

Usage: encodings_fuzz_worker.py SEED CASES. Seeded: case i of seed s makes the same mutant
every run. Before each case it prints ``case <i>`` to stderr. At the end it prints one JSON
line: the number of cases, how each decode ended, the decodes that ended other than in the
original bytes or a CorruptionError ("bad"), and the slowest decode in seconds.
"""

from __future__ import annotations

import json
import random
import struct
import sys
import time

import numpy as np

from mlflow_lance import encodings as E
from mlflow_lance.errors import CorruptionError


def originals() -> list[tuple[str, bytes, bytes, bytes | None]]:
    """(label, data, blob, parent) for every encoding, over a few blocks each."""
    rng = np.random.default_rng(7)
    weights = (rng.standard_normal(100_000) * 0.02).astype(np.float32)
    parent = weights.tobytes()
    child = (weights + rng.standard_normal(weights.size).astype(np.float32) * 1e-4).tobytes()
    half = np.frombuffer(parent, dtype=np.uint16)[1::2].tobytes()  # bfloat16: the high halves
    block = E.MIN_BLOCK_BYTES
    return [
        ("raw", parent, E.encode(parent, 1, encoding=E.RAW, block=block), None),
        ("grouped", parent, E.encode(parent, 4, block=block), None),
        ("aligned", half, E.encode(half, 2, flags=E.ROTATED, block=block), None),
        ("xor", child, E.encode(child, 4, encoding=E.XOR, parent=parent, parent_hash=b"p" * 16, block=block), parent),
    ]


def mutate(rng: random.Random, blob: bytes, table_end: int) -> bytes:
    """One mutant: flipped bytes (mostly in the header and stream table), a rewritten field,
    a cut or a splice."""
    b = bytearray(blob)
    how = rng.randrange(5)
    if how == 0:  # flip bytes in the header or table
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(min(table_end + 8, len(b)))] ^= 1 << rng.randrange(8)
    elif how == 1:  # flip bytes anywhere (streams included)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif how == 2:  # a header field set to an extreme
        field, fmt = rng.choice([(8, "<Q"), (16, "<I"), (5, "<B"), (6, "<B"), (4, "<B")])
        value = rng.choice([0, 1, 2, 3, 8, 255, (1 << 31), (1 << 32) - 1, (1 << 62)])
        struct.pack_into(fmt, b, field, value % (1 << (8 * struct.calcsize(fmt))))
    elif how == 3:  # a stream length rewritten (moving bytes between streams, or raw bit toggled)
        i = rng.randrange((table_end - E.HEADER.size) // 4)
        word = struct.unpack_from("<I", b, E.HEADER.size + 4 * i)[0]
        struct.pack_into("<I", b, E.HEADER.size + 4 * i, rng.choice([word ^ E.STREAM_RAW, word + 1, 0, word // 2]))
    else:  # cut, or append junk
        b = b[: rng.randrange(len(b))] if rng.random() < 0.5 else b + bytes(rng.randrange(1, 64))
    return bytes(b)


def main() -> None:
    seed, cases = int(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    sources = originals()
    outcomes: dict[str, int] = {}
    bad: list[str] = []
    slowest = 0.0
    for i in range(cases):
        label, data, blob, parent = sources[i % len(sources)]
        print(f"case {i} {label}", file=sys.stderr, flush=True)
        mutant = mutate(rng, blob, E.read_header(blob, len(data)).offset)
        dest = np.empty(len(data), dtype=np.uint8)
        start = time.perf_counter()
        try:
            E.decode(mutant, dest, parent=parent)
            outcome = "same bytes" if dest.tobytes() == data else "other bytes"
        except CorruptionError:
            outcome = "CorruptionError"
        except Exception as err:  # noqa: BLE001 (the fuzzer reports anything else)
            outcome = type(err).__name__
            bad.append(f"case {i} ({label}): {type(err).__name__}: {str(err)[:200]}")
        slowest = max(slowest, time.perf_counter() - start)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(json.dumps({"cases": cases, "outcomes": outcomes, "bad": bad, "slowest": slowest}))


if __name__ == "__main__":
    main()
