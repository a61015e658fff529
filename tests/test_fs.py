"""The filesystem layer on its own: local paths, Lance's options, small files. No server needed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from mlflow_lance import fs


def python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout's mlflow_lance."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_local_path_of_plain_paths_and_file_uris(tmp_path):
    assert fs.local_path(str(tmp_path / "w.lance")) == str(tmp_path / "w.lance")
    assert fs.local_path("relative/w.lance") == "relative/w.lance"
    assert fs.local_path("file:///data/my%20models/w.lance") == "/data/my models/w.lance"
    for remote in ("s3://bucket/w.lance", "gs://bucket/w.lance", "az://container/w.lance", "memory:///w"):
        assert fs.local_path(remote) is None


def test_lance_options_add_time_limits_only_for_object_storage(tmp_path):
    assert fs.lance_options(str(tmp_path), None) is None
    assert fs.lance_options(f"file://{tmp_path}", {"k": "v"}) == {"k": "v"}
    remote = fs.lance_options("s3://bucket/w.lance", {"aws_region": "eu-west-1", "timeout": "60s"})
    assert remote == {**fs.REMOTE_DEFAULTS, "aws_region": "eu-west-1", "timeout": "60s"}  # the caller's win
    assert fs.lance_options("gs://bucket/w.lance", None) == fs.REMOTE_DEFAULTS


def test_write_text_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "deeper" / "side.yaml"
    fs.write_text(str(path), "one\n")
    assert path.read_text() == "one\n"
    seen: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(fs.read_text(str(path), limit=1 << 20))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(200):
        fs.write_text(str(path), ("a" if i % 2 else "b") * 50_000, sync=i % 50 == 0)
    stop.set()
    t.join()
    assert seen <= {"one\n", "a" * 50_000, "b" * 50_000}  # never a mix or a partial file
    assert os.listdir(path.parent) == ["side.yaml"]


def test_write_text_failure_leaves_the_old_file(tmp_path):
    path = tmp_path / "side.yaml"
    fs.write_text(str(path), "old")
    os.mkdir(tmp_path / "blocker")
    with pytest.raises(OSError):
        fs.write_text(str(tmp_path / "blocker"), "new")  # a directory cannot be replaced by a file
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["blocker", "side.yaml"]


def test_read_text_limits_and_what_reads_as_missing(tmp_path):
    path = tmp_path / "f.txt"
    assert fs.read_text(str(path), limit=10) is None  # missing
    path.write_text("0123456789")
    assert fs.read_text(str(path), limit=10) == "0123456789"
    assert fs.read_text(f"file://{path}", limit=10) == "0123456789"
    assert fs.read_text(str(path), limit=9) is None  # over the limit
    path.write_bytes(b"\xff\xfe not utf-8")
    assert fs.read_text(str(path), limit=100) is None
    assert fs.read_bytes(str(path), limit=100) == b"\xff\xfe not utf-8"
    assert fs.read_text(str(tmp_path), limit=100) is None  # a directory


def test_read_refuses_fifos_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = python(
        f"from mlflow_lance import fs; print(fs.read_text({str(fifo)!r}, limit=9), "
        f"fs.read_bytes({str(fifo)!r}, limit=9))"
    )  # a child: a read that blocks times out
    assert out.stdout.strip() == "None None", out.stderr


def test_read_bytes_follows_links_only_when_asked(tmp_path):
    target = tmp_path / "target.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert fs.read_bytes(str(link), limit=10) == b"{}"
    assert fs.read_bytes(str(link), limit=10, follow_links=False) is None
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert fs.read_bytes(str(loop), limit=10) is None


def test_list_dirs_lists_only_directories(tmp_path):
    (tmp_path / "b.lance").mkdir()
    (tmp_path / "a.lance").mkdir()
    (tmp_path / "a.lance.yaml").write_text("")
    assert fs.list_dirs(str(tmp_path)) == [str(tmp_path / "a.lance"), str(tmp_path / "b.lance")]
    assert fs.list_dirs(str(tmp_path / "missing")) == []


def test_importing_fs_imports_neither_lance_nor_mlflow_nor_pyarrow():
    out = python("import sys, mlflow_lance.fs; print([m for m in ('lance', 'mlflow', 'pyarrow') if m in sys.modules])")
    assert out.stdout.strip() == "[]", out.stderr
