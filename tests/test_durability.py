"""Durable before referenced (issue 17, item 5): every file of a new version, its version
index, its pin and the directories that name them reach the disk (fsync) before the first
MLflow call after the commit, which is the first that can name the version.

Traced for real: a child process runs ``log_model`` against a real `mlflow server` under
``strace -f`` (Debian's package), and the trace is read in order: the files the save
created (renamed or linked into place), each fsync, and each send on a socket.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = """
import json, os, mlflow, torch, mlflow_lance as ml
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
with mlflow.start_run():
    first = ml.log_model(model, name="model", registered_model_name="durable")
    with torch.no_grad():
        model[2].bias.add_(1)
    open(os.environ["SECOND_SAVE_MARKER"], "w").close()  # an openat in the trace: the second save starts
    info = ml.log_model(model, name="model", registered_model_name="durable")
conf = info.flavors["mlflow_lance"]
print(json.dumps([conf["lance_uri"], conf["lance_version"], info.model_id]))
"""
CALLS = "openat,fsync,fdatasync,rename,renameat,renameat2,linkat,sendto,sendmsg,write"


def traced(tmp_path: Path, env: dict) -> tuple[list[str], list]:
    out = tmp_path / "trace.txt"
    env = {**env, "SECOND_SAVE_MARKER": str(tmp_path / "second-save-starts")}
    done = subprocess.run(
        [
            "strace",
            "-f",
            "-yy",
            "-s",
            "0",
            "-e",
            f"trace={CALLS}",
            "-o",
            str(out),
            sys.executable,
            "-c",
            textwrap.dedent(SCRIPT),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    return out.read_text().splitlines(), json.loads(done.stdout.strip().splitlines()[-1])


def joined(lines: list[str]) -> list[str]:
    """The trace with each call that another thread interrupted (``<unfinished ...>`` ...
    ``<... name resumed>``) put back together on the line where it finished (one line per
    input line, so that line numbers still order the calls)."""
    pending: dict[str, str] = {}
    out = []
    for line in lines:
        pid, _, rest = line.partition(" ")
        rest = rest.lstrip()  # strace pads pids to a width
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            out.append("")
        elif rest.startswith("<... ") and pid in pending:
            out.append(f"{pid} {pending.pop(pid)}{rest.split('resumed>', 1)[1]}")
        else:
            out.append(line)
    return out


def paths(line: str) -> tuple[str, str]:
    """(source, destination) of a rename or link, names relative to a directory descriptor
    (``renameat(5</dir>, "a", 5</dir>, "b")``) made absolute."""
    pairs = re.findall(r'(?:\d+|AT_FDCWD)<([^>]*)>, "([^"]+)"', line)
    if len(pairs) >= 2:
        full = [name if name.startswith("/") else f"{folder}/{name}" for folder, name in pairs]
        return full[0], full[-1]
    names = re.findall(r'"([^"]+)"', line)
    return names[0], names[-1]


def events(lines: list[str], dataset: str) -> tuple[dict[str, int], dict[str, int], list[int]]:
    """(final path of each file created in the dataset -> its line, path -> the line of its
    first fsync, lines of the sends on TCP sockets). A file fsync'ed under a temporary name
    and then renamed into place counts as fsync'ed under its final name."""
    created, synced, sends = {}, {}, []
    for i, line in enumerate(joined(lines)):
        if re.search(r"^\d+\s+(?:rename|renameat2?|linkat)\(", line) and line.endswith(" = 0"):
            src, dst = paths(line)
            if dst.startswith(dataset) and ".tmp" not in os.path.basename(dst):
                created.setdefault(dst, i)
            if src in synced:
                synced.setdefault(dst, synced[src])
        elif m := re.search(r"(?:fsync|fdatasync)\(\d+<([^>]+)>\)\s+= 0", line):
            synced.setdefault(m.group(1), i)
        elif re.search(r"(?:sendto|sendmsg|write)\(\d+<TCP(?:v6)?:\[", line):
            sends.append(i)
    return created, synced, sends


@pytest.mark.slow  # 23 s in the last full run
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is installed by scripts/test.sh")
def test_every_file_of_a_version_is_fsynced_before_mlflow_can_name_it(tracking, tmp_path):
    lines, (uri, version, model_id) = traced(tmp_path, {**os.environ})
    start = next(i for i, ln in enumerate(lines) if "second-save-starts" in ln)
    lines = lines[start:]  # the second save: a version on top of an existing dataset
    created, synced, sends = events(lines, uri)
    manifest = next(p for p in created if "/_versions/" in p and p.endswith(".manifest"))
    first_send = next(i for i in sends if i > created[manifest])  # the first MLflow call after the commit
    index = f"{uri}/_mlflow_lance/index/{version}.json"
    pin = f"{uri}/_refs/tags/model.{model_id}.json"
    files = [p for p in created if "/data/" in p or "/_transactions/" in p] + [manifest, index, pin]
    assert any("/data/" in p for p in files) and any("/_transactions/" in p for p in files)
    dirs = {os.path.dirname(p) for p in files}
    for path in [*files, *dirs]:
        assert path in synced, f"{path} was never fsync'ed"
        assert synced[path] < first_send, f"{path} was fsync'ed after MLflow was told about the version"
        if path in created:
            assert synced[path] > created[path] or path.endswith(".json"), f"{path} fsync'ed before it existed"


@pytest.mark.slow  # 21 s in the last full run
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is installed by scripts/test.sh")
def test_the_opt_out_syncs_nothing(tracking, tmp_path):
    lines, (uri, *_rest) = traced(tmp_path, {**os.environ, "MLFLOW_LANCE_FSYNC": "0"})
    assert not [ln for ln in lines if re.search(r"(?:fsync|fdatasync)\(\d+<" + re.escape(uri), ln)]
