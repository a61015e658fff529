"""Flipped bytes never abort the process (issue 21, family 3): a seeded byte-flip fuzzer over
manifests, data files, version indexes, transaction files and tags of real datasets (raw, zstd
and auto), every read run on each copy, in a child process under a memory cap (``prlimit --as``),
so that an abort, a hang or an allocation the files do not hold fails the test instead of
taking the machine down. Counts come from what was run (tests/byteflip_worker.py)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from corpus import record

import mlflow_lance as ml
from conftest import run_fuzzer

HERE = Path(__file__).resolve().parent
SEED = int(os.environ.get("MLFLOW_LANCE_BYTEFLIP_SEED", "20261204"))
CASES = int(os.environ.get("MLFLOW_LANCE_BYTEFLIP_CASES", "400"))
CAP = 6 << 30  # address space: the interpreter with torch and Lance takes ~2.5 GB of it


@pytest.mark.slow  # 37 s in the last full run
def test_flipped_bytes_end_in_data_or_a_clear_error_never_an_abort(tmp_path):
    cmd = [
        "prlimit",
        f"--as={CAP}",
        sys.executable,
        str(HERE / "byteflip_worker.py"),
        str(SEED),
        str(CASES),
        str(tmp_path),
    ]
    report = run_fuzzer(cmd, timeout=900)
    assert report["cases"] == CASES and report["reads"] == CASES * 9
    assert report["bad"] == [], report["bad"][:20]  # every read ended in data or the package's error
    assert report["wrong"] == [], report["wrong"][:20]  # and a verified read in the saved bytes
    for outcome, n in report["outcomes"].items():
        record("r2-3 flipped bytes", "correct" if outcome == "returned" else "refused", n)


@pytest.mark.parametrize("how", ["killed", "silent"])
def test_a_decoder_that_dies_or_hangs_is_a_corruption_error_and_the_next_read_works(tmp_path, monkeypatch, how):
    """The child that decodes untrusted rows dies (SIGKILL, as an abort would end it) or gives
    no answer in time: the caller gets a CorruptionError naming the dataset, ``verify``
    reports it as a problem, and the next read starts a new child."""
    from mlflow_lance import decoder

    uri = tmp_path / "w.lance"
    sd = {"w": torch.randn(16)}
    ml.save_state_dict(sd, uri)
    shutil.rmtree(uri / "_mlflow_lance")  # without its index, a load decodes the rows
    assert torch.equal(ml.load_state_dict(uri)["w"], sd["w"])  # the child runs
    if how == "killed":  # a child that reads the request and aborts, as a Rust panic in Lance does
        decoder._close()
        monkeypatch.setattr(decoder, "_child", None)
        script = "import os, sys; sys.stdin.buffer.read(4); sys.stderr.write('thread panicked at x\\n'); os.abort()"
        monkeypatch.setattr(decoder, "command", lambda: [sys.executable, "-c", script])
        why = f"{uri} crashed the decoder \\(signal 6: thread panicked at x\\)"
    else:  # a child that reads the request and never answers
        decoder._close()
        monkeypatch.setattr(decoder, "_child", None)
        script = "import sys, time; sys.stdin.buffer.read(4); time.sleep(120)"
        monkeypatch.setattr(decoder, "command", lambda: [sys.executable, "-c", script])
        monkeypatch.setenv("MLFLOW_LANCE_DECODER_TIMEOUT", "2")
        why = f"{uri} crashed the decoder \\(the decoder gave no answer within 2s"
    with pytest.raises(ml.CorruptionError, match=why):
        ml.load_state_dict(uri)
    monkeypatch.undo()
    assert torch.equal(ml.load_state_dict(uri)["w"], sd["w"]) and ml.verify(uri).ok
    record("r2-3 flipped bytes", "refused")
