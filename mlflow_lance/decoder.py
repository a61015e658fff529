"""Decoding untrusted data files where a crash cannot take the caller down.

Lance decodes a data file's columns in Rust. Bytes flipped or crafted there can make it panic
inside a C stream callback (the process aborts: "non-unwinding panic") or ask for an
allocation sized by a corrupt length ("memory allocation of 68451041296 bytes failed": the
process aborts too). Neither can be caught in Python. So every decode of a data file's rows
that does not come from a checked version index (index.py) runs here: in a child process of
our own, under a memory cap, that answers requests over a pipe. If it dies, the caller gets a
CorruptionError naming the dataset and version, and the next request starts a new child.

A local or remote load whose version index checks out never gets here; a version without an
index (written by plain Lance, an older mlflow-lance, or an index that does not check out),
``verify()`` (which checks the rows themselves) and the Lance docs example's format do.

The child imports Lance and pyarrow, never torch or MLflow, and is started on first use
(about half a second) and kept for later requests. Its address space is capped at
MLFLOW_LANCE_DECODER_MEMORY bytes (default 8 GiB, suffixes K/M/G), raised per request for
the values a request may legitimately need.

Protocol: each message is a 4-byte big-endian length and a JSON header; a reply's header may
announce ``binary`` bytes that follow it. Storage options travel in the request, never in
argv or the environment.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from .errors import CorruptionError

MEMORY_ENV = "MLFLOW_LANCE_DECODER_MEMORY"
TIMEOUT_ENV = "MLFLOW_LANCE_DECODER_TIMEOUT"
_DEFAULT_MEMORY = 8 << 30
_DEFAULT_TIMEOUT = 600.0
_MAX_HEADER = 64 << 20  # rows of a version, as JSON


class DecoderCrashed(CorruptionError):
    """The child decoding a dataset's rows died (a panic, an allocation failure, a signal)."""


# --------------------------------------------------------------------------- parent side


def _memory() -> int:
    text = os.environ.get(MEMORY_ENV, "").strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in ("K", "M", "G") else text
    return int(digits) * scale if digits.isdigit() and int(digits) > 0 else _DEFAULT_MEMORY


def command() -> list[str]:
    """How a decoder child is started: this module, run by this interpreter."""
    return [sys.executable, "-m", "mlflow_lance.decoder", str(_memory())]


class _Child:
    """One decoder process, owned by the process that started it."""

    def __init__(self) -> None:
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            close_fds=True,
        )
        self.owner = os.getpid()

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None

    def ask(self, header: dict, timeout: float) -> tuple[dict, bytes]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        data = json.dumps(header).encode()
        self.proc.stdin.write(struct.pack(">I", len(data)) + data)
        self.proc.stdin.flush()
        reply = json.loads(self._read(self._length(timeout), timeout))
        return reply, self._read(int(reply.get("binary", 0)), timeout)

    def _length(self, timeout: float) -> int:
        (n,) = struct.unpack(">I", self._read(4, timeout))
        if n > _MAX_HEADER:
            raise EOFError(f"a reply of {n} bytes")
        return n

    def _read(self, n: int, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        fd, chunks, got = self.proc.stdout.fileno(), [], 0
        while got < n:
            if not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError(f"the decoder gave no answer within {timeout:.0f}s")
            chunk = os.read(fd, min(n - got, 16 << 20))
            if not chunk:
                raise EOFError("the decoder exited")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def why(self) -> str:
        """What the dead child said last (the panic or allocation message), one line."""
        code = self.proc.wait(timeout=10) if self.proc.poll() is None else self.proc.returncode
        self.stderr.seek(0)
        lines = [ln for ln in self.stderr.read()[-4096:].decode("utf-8", "replace").splitlines() if ln.strip()]
        said = next((ln for ln in lines if "panicked" in ln or "memory allocation" in ln), lines[-1] if lines else "")
        signal = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"{signal}: {said.strip()[:300]}" if said else signal

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


_lock = threading.Lock()
_child: _Child | None = None


def request(
    kind: str, uri: str, storage_options: Mapping[str, str] | None, *, what: str, memory: int = 0, **args: Any
) -> tuple[Any, bytes]:
    """Ask the decoder to do ``kind`` on dataset ``uri``; (result, binary payload).

    ``what`` names what is decoded, for the error if the child dies; ``memory`` is how many
    bytes the request may legitimately need on top of the cap. Raises DecoderCrashed if the
    child dies or hangs, and the error Lance raised (as OSError / ValueError text) otherwise.
    """
    global _child
    timeout = float(os.environ.get(TIMEOUT_ENV) or _DEFAULT_TIMEOUT)
    header = {
        "kind": kind,
        "uri": uri,
        "storage_options": dict(storage_options or {}),
        "memory": memory,
        **args,
    }
    with _lock:
        if _child is None or not _child.alive():
            _child = _Child()
        child = _child
        try:
            reply, payload = child.ask(header, timeout)
        except (EOFError, OSError, TimeoutError, ValueError, struct.error) as err:
            if isinstance(err, TimeoutError):
                child.proc.kill()
            why = child.why() if not isinstance(err, TimeoutError) else str(err)
            child.close()
            _child = None
            raise DecoderCrashed(
                f"decoding {what} of {uri} crashed the decoder ({why}): its data files are corrupt or crafted. "
                f"Nothing was loaded; restore the dataset or load another version"
            ) from None
    if "error" in reply:
        raise (OSError if reply["error"] == "OSError" else ValueError)(str(reply.get("message", ""))[:2000])
    return reply.get("result"), payload


@atexit.register
def _close() -> None:
    if _child is not None and _child.owner == os.getpid():
        _child.close()


# --------------------------------------------------------------------------- child side


def _scan(args: dict) -> tuple[Any, bytes]:
    """The metadata columns, row addresses and blob descriptors of a version's rows (or of
    some of its fragments): each row as [*META_COLUMNS, position, stored, address]."""
    import lance

    from .tensors import META_COLUMNS

    ds = lance.dataset(args["uri"], version=args["version"], storage_options=args["storage_options"] or None)
    fragments = [ds.get_fragment(i) for i in args["fragments"]] if args.get("fragments") is not None else None
    table = ds.scanner(columns=[*META_COLUMNS, "data"], with_row_address=True, fragments=fragments).to_table()
    out = []
    for row in table.to_pylist():
        desc = row["data"] or {}
        out.append([*(row[c] for c in META_COLUMNS), desc.get("position"), desc.get("size"), row["_rowaddr"]])
    return out, b""


def _docs_example_rows(args: dict) -> tuple[Any, bytes]:
    """The name, shape, row address and number of values of each row of a Lance docs example
    dataset (the values are counted, so that a shape can be checked before anything is
    allocated for it)."""
    import lance
    import pyarrow.compute as pc

    ds = lance.dataset(args["uri"], version=args["version"], storage_options=args["storage_options"] or None)
    table = ds.to_table(columns=["name", "shape", "value"], with_row_address=True)
    counts = pc.list_value_length(table["value"]).to_pylist()
    rows = zip(
        table["name"].to_pylist(), table["shape"].to_pylist(), table["_rowaddr"].to_pylist(), counts, strict=True
    )
    return [[name, shape, address, count] for name, shape, address, count in rows], b""


def _docs_example_values(args: dict) -> tuple[Any, bytes]:
    """The float64 values of one row of a Lance docs example dataset, as raw bytes."""
    import lance

    ds = lance.dataset(args["uri"], version=args["version"], storage_options=args["storage_options"] or None)
    value = ds.take([args["index"]], columns=["value"]).column(0).combine_chunks()
    data = value.flatten().to_numpy(zero_copy_only=False).astype("<f8", copy=False).tobytes()
    return len(data), data


_HANDLERS = {"scan": _scan, "docs_example_rows": _docs_example_rows, "docs_example_values": _docs_example_values}


def _serve(base_memory: int) -> None:
    import resource

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        args = json.loads(stdin.read(struct.unpack(">I", head)[0]))
        limit = base_memory + max(0, int(args.get("memory") or 0)) * 3
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
        try:
            result, payload = _HANDLERS[args["kind"]](args)
            reply = {"result": result, "binary": len(payload)}
        except BaseException as err:  # noqa: BLE001 (a Rust panic is a BaseException; report it as data)
            payload = b""
            kind = "OSError" if isinstance(err, OSError) else "ValueError"
            reply = {"error": kind, "message": f"{type(err).__name__}: {err}"}
        data = json.dumps(reply).encode()
        stdout.write(struct.pack(">I", len(data)) + data + payload)
        stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
