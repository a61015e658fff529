"""The `mlflow-lance` command against inputs from someone else: terminal escapes and bad files.

Every string a dataset, a registry or a checkpoint file holds is the writer's, not the user's:
commit messages, the run id property, tensor names, tag files, dataset paths, the messages of
the errors they cause. Printed raw, ESC [2J clears the screen, OSC 52 writes the clipboard,
U+009B is a one-byte CSI and U+202E reverses what follows. The datasets here are built with
Lance directly (writing what `save_state_dict` refuses) and every command is run on them, in
process and as the installed `mlflow-lance`: nothing but printable text and the newlines
between lines may come out. The second half: checkpoint files `import` must refuse with exit
code 2 and a message naming the file, and arguments out of range.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import lance
import mlflow
import pyarrow as pa
import pytest
import torch
from lance.fragment import write_fragments
from safetensors.torch import save_file

import mlflow_lance as ml
from conftest import BIN
from mlflow_lance import cli, store
from mlflow_lance.tensors import hash_bytes, rows_batch

# ESC [2J (clear the screen), OSC 52 (write the clipboard) ended by BEL, a BEL, U+009B (C1
# CSI: "31m" then sets red on terminals that take 8-bit controls), DEL (not valid as an escape
# in JSON: --json must escape it itself) and U+202E (right-to-left override).
EVIL = "\x1b[2J\x1b]52;c;ZXZpbA==\x07\x07\u009b31m\x7f\u202e"
SHOWN = "\\x1b[2J\\x1b]52;c;ZXZpbA==\\x07\\x07\\u009b31m\\x7f\\u202e"  # EVIL as text output shows it
PATH_EVIL = "\u009b31m\u202e"  # what a local path can hold: Lance refuses C0 controls in paths
FAKE_LINE = "nl\n  A fake\ttab"  # a name that would print as a line of its own
BIDI = {"\u061c", "\u200e", "\u200f", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}


def assert_clean(text: str | bytes) -> None:
    """No control character but the newline between lines, no DEL, no C1 control, no bidi
    override or other non-printing character (bytes must be UTF-8)."""
    if isinstance(text, bytes):
        raw = [b for b in text if b < 0x20 and b not in (0x09, 0x0A) or b == 0x7F]
        assert not raw, f"raw control bytes {bytes(raw)!r} in {text[:2000]!r}"
        text = text.decode("utf-8")
    bad = {c for c in text if 0x80 <= ord(c) <= 0x9F or c in BIDI or c != "\n" and not c.isprintable()}
    assert not bad, f"non-printing characters {sorted(bad)!r} reach the terminal in {text[:2000]!r}"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert_clean(out)
    assert_clean(err)
    return code, out, err


# --------------------------------------------------------------------------- crafted inputs


def raw_commit(uri: Path, fragments: list, props: dict[str, str]) -> int:
    """A Lance commit of ``fragments`` with exactly these transaction properties."""
    ds = lance.dataset(str(uri))
    txn = lance.Transaction(
        ds.version, lance.LanceOperation.Overwrite(ds.schema, fragments), transaction_properties=props
    )
    return lance.LanceDataset.commit(str(uri), txn).version


def tensor_row(name: str, t: torch.Tensor) -> tuple[dict, memoryview]:
    payload = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    meta = {
        "name": name,
        "chunk": 0,
        "offset": 0,
        "nbytes": len(payload),
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "hash": hash_bytes(payload),
        "alias": None,
    }
    return meta, memoryview(payload)


def hostile_dataset(uri: Path) -> Path:
    """Three versions: 1 saved normally; 2 its rows under a commit whose message, run id
    property and changed names carry ``EVIL`` (and a newline and a tab); 3 rows written with
    Lance whose tensor names carry them (no mlflow_lance commit properties: "written by
    something else")."""
    ml.save_state_dict({"w": torch.ones(4), "b": torch.zeros(2)}, uri, message="plain")
    ds = lance.dataset(str(uri))
    props = dict(ds.read_transaction(ds.version).transaction_properties)
    message = f"second {EVIL}\nfake line\tx"
    props.update(
        {
            "mlflow_lance.message": message,
            "lance.commit.message": message,
            "mlflow_lance.properties": json.dumps({"mlflow.run_id": "run" + EVIL}),
            "mlflow_lance.changed": json.dumps(["b" + EVIL]),
        }
    )
    raw_commit(uri, [f.metadata for f in ds.get_fragments()], props)
    rows = [
        tensor_row("w", torch.ones(4)),
        tensor_row("x" + EVIL, torch.ones(3)),
        tensor_row(FAKE_LINE, torch.arange(2)),
    ]
    schema = lance.dataset(str(uri)).schema
    reader = pa.RecordBatchReader.from_batches(schema, (rows_batch(schema, m, p) for m, p in rows))
    frags = write_fragments(
        reader, str(uri), schema=schema, mode="append", max_rows_per_file=1, data_storage_version="2.0"
    )
    assert raw_commit(uri, frags, {}) == 3
    return uri


@pytest.fixture
def private_tracking(tmp_path, monkeypatch):
    """MLflow on a SQLite file of this test's own (so --all sees only this test's datasets),
    the Lance root under tmp_path; both reach subprocesses through the environment."""
    url = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_LANCE_ROOT", str(tmp_path / "lance"))
    mlflow.set_tracking_uri(url)
    yield tmp_path / "lance"
    mlflow.set_tracking_uri(None)


@pytest.fixture
def hostile(private_tracking, tmp_path) -> Path:
    """The hostile dataset, in a directory whose name carries C1 and bidi characters."""
    return hostile_dataset(tmp_path / f"w{PATH_EVIL}.lance")


@pytest.fixture
def listed(private_tracking) -> Path:
    """Two plain versions in a dataset under the Lance root (what gc --all and sync --all list)
    whose directory name carries C1 and bidi characters."""
    uri = private_tracking / "models" / f"m{PATH_EVIL}.lance"
    for value in (1.0, 2.0):
        ml.save_state_dict({"w": torch.full((4,), value)}, uri)
    return uri


# --------------------------------------------------------------------------- 21.7 terminal escapes


def test_the_escaper_shows_every_non_printing_character_and_keeps_text():
    assert cli.printable(EVIL) == SHOWN
    assert cli.printable("a\tb\nc\rd\x00\x7f") == "a\\tb\\nc\\rd\\x00\\x7f"
    odd = "\u0085\u00a0\u200b\u2028\U000e0001\ud800"  # NEL, NBSP, ZWSP, line separator, tag, surrogate
    assert cli.printable(odd) == "\\u0085\\u00a0\\u200b\\u2028\\U000e0001\\ud800"
    for kept in ("plain text", "C:\\path\\x1b", "größe 量子 ⚡", ""):
        assert cli.printable(kept) == kept
    assert cli.printable(cli.printable(EVIL)) == cli.printable(EVIL)  # idempotent
    assert all(cli.printable(chr(c)) != chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), *map(ord, BIDI)])


def test_every_command_escapes_what_a_hostile_dataset_holds(capsys, hostile, listed, tmp_path):
    uri = str(hostile)
    shown_path = uri.replace(PATH_EVIL, "\\u009b31m\\u202e")
    code, out, _ = run(capsys, "versions", uri)
    assert code == 0 and out.startswith(shown_path + "\n")
    lines = out.splitlines()
    assert len(lines) == 1 + 2 + 3  # the path, the header, the rule, one line per version
    assert "second " + SHOWN[:33] in lines[4] and "run\\x1b[2J\\x " in lines[4]  # escaped, then cut
    assert lines[3].split()[0] == "1" and lines[5].split()[0] == "3"

    code, out, _ = run(capsys, "diff", uri, "1", "3")
    assert code == 0 and f"  A x{SHOWN}" in out and "  A nl\\n  A fake\\ttab" in out
    assert out.count("\n  A ") == 2 and "2 added, 1 removed, 0 changed, 1 unchanged" in out

    code, out, _ = run(capsys, "verify", uri)  # names with control characters are problems
    assert code == 1 and f"CORRUPT x{SHOWN} (chunk" in out and "CORRUPT nl\\n  A fake\\ttab (chunk" in out
    ok = f"{shown_path} version 2: 2 tensors, 2 chunks, 24 bytes checked\nOK\n"
    assert run(capsys, "verify", uri, "--version", "2")[:2] == (0, ok)

    code, _, err = run(capsys, "export", uri, str(tmp_path / "out.safetensors"))
    assert code == 2 and "tensor 'x\\x1b[2J" in err and shown_path in err

    assert run(capsys, "tag", uri, "best", "2")[0] == 0
    code, out, _ = run(capsys, "versions", uri)
    assert code == 0 and "best" in out.splitlines()[4]

    shown_listed = str(listed).replace(PATH_EVIL, "\\u009b31m\\u202e")
    code, out, _ = run(capsys, "gc", "--all", "--dry-run", "--keep-last", "1", "--grace-minutes", "0")
    gc_line = "would remove versions [1]; kept 1 version: 1 latest; unpinned 0, pinned 0"
    assert (code, out) == (0, f"{shown_listed}: {gc_line}\n")
    code, out, _ = run(capsys, "sync", "--all")
    assert (code, out) == (0, f"{shown_listed}: 0 runs; pinned nothing new; unpinned nothing\n")

    for command in (
        ["versions", uri],
        ["diff", uri, "1", "3"],
        ["verify", uri],
        ["gc", "--all", "--dry-run", "--keep-last", "1"],
        ["sync", "--all"],
    ):
        code, out, _ = run(capsys, *command, "--json")
        assert code in (0, 1) and out.isascii() and "\\u009b" in out and json.loads(out)
    versions = json.loads(run(capsys, "versions", uri, "--json")[1])
    assert versions[1]["message"].startswith(f"second {EVIL}\n") and versions[1]["changed"] == ["b" + EVIL]
    assert versions[1]["properties"]["mlflow.run_id"] == "run" + EVIL
    assert "x" + EVIL in json.loads(run(capsys, "diff", uri, "1", "3", "--json")[1])["added"]


def test_gc_and_sync_of_a_dataset_with_a_crafted_run_id(capsys, private_tracking):
    hostile_dataset(private_tracking / "models" / "r.lance")
    assert run(capsys, "gc", "--all", "--dry-run", "--keep-last", "1")[0] == 0
    assert run(capsys, "sync", "--all")[0] == 0


@pytest.mark.slow  # 39 s in the last full run
def test_the_installed_command_writes_no_raw_escape(hostile, listed, tmp_path):
    """The same commands as a real process: the bytes on its stdout and stderr."""
    uri = str(hostile)
    commands = {
        ("versions", uri): 0,
        ("versions", uri, "--json"): 0,
        ("diff", uri, "1", "3"): 0,
        ("verify", uri): 1,
        ("export", uri, str(tmp_path / "o.safetensors")): 2,
        ("tag", uri, "t", "1"): 0,
        ("gc", "--all", "--dry-run", "--keep-last", "1"): 0,
        ("sync", "--all"): 0,
        ("versions", str(tmp_path / f"{EVIL}.lance")): 3,  # not found; the path is quoted
    }
    for argv, expected in commands.items():
        proc = subprocess.run([str(BIN / "mlflow-lance"), *argv], capture_output=True, timeout=300, check=False)
        assert proc.returncode == expected, (argv, proc.stderr[-3000:])
        assert_clean(proc.stdout)
        assert_clean(proc.stderr)
        shown = proc.stdout + proc.stderr
        assert b"\\u009b" in shown or b"\\x9b" in shown or argv[0] == "tag"  # shown, escaped


def test_errors_quoting_a_path_or_a_tag_file_are_escaped(capsys, tmp_path):
    code, _, err = run(capsys, "versions", str(tmp_path / f"w{EVIL}.lance"))  # not found, quoted
    assert code == 3 and repr(f"w{EVIL}.lance")[1:-1] in err
    code, _, err = run(capsys, "verify", str(tmp_path / f"w{EVIL}.lance"), "--version", "t" + EVIL)
    assert code == 3 and repr(EVIL)[1:-1] in err
    uri = tmp_path / "t.lance"
    ml.save_state_dict({"w": torch.ones(2)}, uri)
    ml.tag(uri, "good", 1)
    tags = uri / "_refs" / "tags"
    (tags / "good.json").rename(tags / f"t{EVIL}.json")  # a tag file name Lance cannot list
    for argv in (["versions"], ["verify", "--version", "good"], ["tag", "x", "1"]):
        code, _, err = run(capsys, argv[0], str(uri), *argv[1:])
        assert code == 2 and f"t{SHOWN}.json" in err
    (tags / f"t{EVIL}.json").unlink()
    ml.tag(uri, "good", 1)
    (tags / "good.json").rename(tags / f"t{PATH_EVIL}.json")  # listed, then not found under its name
    code, _, err = run(capsys, "versions", str(uri))
    assert code == 2 and "tags/t%C2%9B31m%E2%80%AE.json" in err


BAD_TAG_FILES = {  # a tag file's content, what Lance (through Rust's Debug escaping) says of it
    "a version that is a hostile string": (
        json.dumps({"version": "v" + EVIL, "manifestSize": 1}),
        "\\u{1b}[2J\\u{1b}]52;c;ZXZpbA==\\u{7}\\u{7}\\u{9b}31m\\u{7f}\\u{202e}",
    ),
    "no version": ("{}", "missing field `version`"),
    "not JSON": ("not json", "expected ident"),
}


@pytest.mark.parametrize("case", sorted(BAD_TAG_FILES))
@pytest.mark.parametrize("argv", [["versions"], ["verify", "--version", "good"], ["diff", "good"]])
def test_a_malformed_tag_file_exits_2_with_an_escaped_message(capsys, tmp_path, argv, case):
    content, detail = BAD_TAG_FILES[case]
    uri = tmp_path / "t.lance"
    ml.save_state_dict({"w": torch.ones(2)}, uri)
    ml.tag(uri, "good", 1)
    (uri / "_refs" / "tags" / "good.json").write_text(content)
    code, _, err = run(capsys, argv[0], str(uri), *argv[1:])
    assert code == 2 and detail in err and "Traceback" not in err, err


def test_tracebacks_panics_and_warnings_are_escaped(capsys, tmp_path, monkeypatch):
    uri = tmp_path / "t.lance"
    ml.save_state_dict({"w": torch.ones(2)}, uri)

    def broken(*args, **kwargs):
        raise RuntimeError(f"a bug quoting {EVIL}\nand a second line")

    monkeypatch.setattr(store, "versions", broken)
    code, _, err = run(capsys, "versions", str(uri))
    assert code == 4 and "Traceback (most recent call last)" in err
    assert f"RuntimeError: a bug quoting {SHOWN}\nand a second line\n" in err
    assert err.rstrip().endswith("please report it with the traceback above")

    class Panic(BaseException):  # what pyo3 raises for a Rust panic
        pass

    def panics(*args, **kwargs):
        raise Panic(f"called `Option::unwrap()` {EVIL}")

    monkeypatch.setattr(store, "versions", panics)
    code, _, err = run(capsys, "versions", str(uri))
    assert code == 4 and f"Panic: called `Option::unwrap()` {SHOWN}" in err

    def warns(*args, **kwargs):
        warnings.warn(f"careful: {EVIL}", UserWarning, stacklevel=1)
        return []

    monkeypatch.setattr(store, "versions", warns)
    code, _, err = run(capsys, "versions", str(uri))
    assert code == 0 and f"UserWarning: careful: {SHOWN}" in err


def test_argument_errors_are_escaped(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["versions", "a", "b" + EVIL])
    _, err = capsys.readouterr()
    assert exc.value.code == 2 and f"error: unrecognized arguments: b{SHOWN}\n" in err
    assert_clean(err)
    with pytest.raises(SystemExit):
        cli.main([EVIL])
    assert_clean(capsys.readouterr().err)


# --------------------------------------------------------------------------- 21.8 bad errors


def header(doc: dict) -> bytes:
    """A safetensors header: its length, then its JSON."""
    text = json.dumps(doc).encode()
    return struct.pack("<Q", len(text)) + text


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
LYING_SAFETENSORS = {  # the file's bytes, what the error says
    "header length past the end": (struct.pack("<Q", 1 << 20) + b"{}", "invalid header length"),
    "header length 2**63": (struct.pack("<Q", 1 << 63) + b"{}", "header too large"),
    "header not JSON": (struct.pack("<Q", 16) + b"{not json}      ", "invalid JSON"),
    "offsets out of range": (header({"w": {**F32, "data_offsets": [0, 4000]}}) + b"\0" * 8, "offset"),
    "offsets and shape disagree": (header({"w": {**F32, "shape": [3]}}) + b"\0" * 8, "offset"),
    "a dtype that does not exist": (header({"w": {**F32, "dtype": "F99"}}) + b"\0" * 8, "F99"),
    "shorter than its length field": (b"\1\2", "header too small"),
    "empty": (b"", "header too small"),
}


@pytest.mark.parametrize("case", sorted(LYING_SAFETENSORS))
def test_import_of_a_lying_safetensors_file_is_refused(capsys, tmp_path, case):
    content, detail = LYING_SAFETENSORS[case]
    src = tmp_path / "model.safetensors"
    src.write_bytes(content)
    code, _, err = run(capsys, "import", str(tmp_path / "w.lance"), str(src))
    assert code == 2 and f"{src} is not a valid safetensors file" in err and detail in err, err
    assert not (tmp_path / "w.lance").exists()


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def torch_file(obj: object, cut: int | None = None) -> bytes:
    """What torch.save writes for ``obj`` (its first ``cut`` bytes)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()[:cut]


TORCH_FILES = {  # the file's bytes (built at test time), what the error says
    "code": (lambda: torch_file({"w": Evil()}), "refused it (Trying to load unsupported GLOBAL posix.system"),
    "garbage": (lambda: b"garbage data, not a pickle", "weights_only=True) refused it (Unsupported operand"),
    "empty": (lambda: b"", "is not a readable torch checkpoint: EOFError"),
    "truncated zip": (
        lambda: torch_file({"w": torch.ones(8)}, 100),
        "is not a readable torch checkpoint: RuntimeError: PytorchStreamReader",
    ),
    "not a dict": (lambda: torch_file([torch.ones(1)]), "holds a list, not a state dict"),
    "a key save refuses": (lambda: torch_file({"w" + EVIL: torch.ones(1)}), "holds control characters"),
}


@pytest.mark.parametrize("case", sorted(TORCH_FILES))
def test_import_of_a_torch_file_torch_refuses_is_refused(capsys, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # where the pickled os.system would touch its marker
    build, expect = TORCH_FILES[case]
    src = tmp_path / "ckpt.pt"
    src.write_bytes(build())
    code, _, err = run(capsys, "import", str(tmp_path / "w.lance"), str(src))
    assert code == 2 and "Traceback" not in err and not (tmp_path / "pwned").exists(), err
    assert expect in err and (str(src) in err or case == "a key save refuses"), err
    assert "weights_only set to `False`" not in err  # torch's advice to run the file's code is not repeated


UNBLOCK = """
import os, sys, time
while True:
    time.sleep(float(sys.argv[1]))
    for fifo in sys.argv[2:]:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody is reading it
            pass
"""


@contextlib.contextmanager
def writers_for(fifos: list[Path], every: float = 5.0):
    """If anything opens one of ``fifos`` for reading and blocks there, open and close its
    writing end (every ``every`` seconds, from another process: the blocked open may hold the
    GIL, and Rust retries an open a signal interrupts): the reader sees an empty file, and the
    test fails instead of hanging."""
    helper = subprocess.Popen([sys.executable, "-c", UNBLOCK, str(every), *map(str, fifos)])
    try:
        yield
    finally:
        helper.kill()
        helper.wait()


def test_import_of_a_file_that_is_missing_a_fifo_or_a_directory(capsys, tmp_path):
    target = str(tmp_path / "w.lance")
    code, _, err = run(capsys, "import", target, str(tmp_path / f"missing{EVIL}.pt"))
    assert code == 3 and f"missing{SHOWN}.pt: no such file" in err
    fifos = [tmp_path / "ckpt.safetensors", tmp_path / "ckpt.pt"]
    for fifo in fifos:
        os.mkfifo(fifo)  # opening it would block until a writer came: it is never opened
    for path in (*fifos, tmp_path):
        with writers_for(fifos):
            code, _, err = run(capsys, "import", target, str(path))
        assert code == 2 and f"{path} is not a regular file" in err
    save_file({"w": torch.ones(2)}, tmp_path / "ok.safetensors")
    unreadable = tmp_path / "locked.pt"
    torch.save({"w": torch.ones(2)}, unreadable)
    unreadable.chmod(0)
    code, _, err = run(capsys, "import", target, str(unreadable))
    assert code == (0 if os.geteuid() == 0 else 2)  # root reads it anyway
    assert run(capsys, "import", target, str(tmp_path / "ok.safetensors"))[0] == 0


def test_a_pickle_error_names_the_file_even_when_torch_says_little(capsys, tmp_path, monkeypatch):
    src = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(1)}, src)

    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError("Weights only load failed. Re-running with weights_only=False ...")

    monkeypatch.setattr(torch, "load", refuse)
    code, _, err = run(capsys, "import", str(tmp_path / "w.lance"), str(src))
    refused = f"{src}: torch.load(weights_only=True) refused it (not a weights-only checkpoint);"
    assert code == 2 and refused in err


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["verify", "{uri}", "--version", "99999999999999999999999"], 2, "not a version number from 0 to"),
        (["diff", "{uri}", "18446744073709551616"], 2, "not a version number from 0 to"),
        (["export", "{uri}", "o.safetensors", "--version", "9" * 5000], 2, "not a version number from 0 to"),
        (["tag", "{uri}", "t", "99999999999999999999999"], 2, "not a version number from 0 to"),
        (["tag", "{uri}", "t", "abc"], 2, "not a version number from 0 to"),
        (["verify", "{uri}", "--version", str(2**64 - 1)], 3, f"version {2**64 - 1} does not exist"),
        (["diff", "{uri}", "1", "7"], 3, "version 7 does not exist"),
        (["verify", "{uri}", "--version", "nope"], 3, "tag 'nope' does not exist"),
        (["tag", "{uri}", "t"], 2, "give a VERSION to tag"),
        (["tag", "{uri}", "7", "1"], 2, "tag name"),
        (["tag", "{uri}", "nope", "--delete"], 3, "tag 'nope' does not exist"),
        (["gc", "{uri}", "--older-than-days", "inf"], 2, "days must be a finite number >= 0"),
        (["gc", "{uri}", "--older-than-days", "nan"], 2, "days must be a finite number >= 0"),
        (["gc", "{uri}", "--older-than-days", "-1"], 2, "days must be a finite number >= 0"),
        (["gc", "{uri}", "--older-than-days", "1e9"], 2, "it reaches back before the year 1"),
        (["gc", "{uri}", "--grace-minutes", "1e300"], 2, "reaches back before the year 1"),
        (["gc", "{uri}", "--grace-minutes", "soon"], 2, "not a number of minutes: 'soon'"),
        (["gc", "{uri}", "--keep-last", "0"], 2, "keep_last must be >= 1"),
    ],
)
def test_arguments_out_of_range_are_refused_with_a_message(capsys, private_tracking, tmp_path, argv, code, message):
    uri = tmp_path / "w.lance"
    ml.save_state_dict({"w": torch.ones(2)}, uri)
    argv = [a.format(uri=uri) for a in argv]
    try:
        got, _, err = run(capsys, *argv)
    except SystemExit as exit_:  # argparse refused the argument
        got, err = exit_.code, capsys.readouterr().err
        assert_clean(err)
    assert (got, message in err) == (code, True), err
    assert "Traceback" not in err
    assert [v.version for v in ml.versions(uri)] == [1] and ml.tags(uri) == {}
