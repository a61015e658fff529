"""Hardening: crashes at random moments, unreachable and full storage, racing gc, bad names,
and no pickle or unsafe YAML where weights and mappings are read."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import lance
import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_lance as ml
from conftest import report
from mlflow_lance import sidecar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def record(key: str, value) -> None:
    """Figures for docs/reliability.md (test-artifacts/reliability.json)."""
    report("reliability.json", key, value)


class Worker:
    """A crash_worker.py process; a thread reads the lines it prints (READY, then WRITING k /
    DONE k for each call) as they come, with the moment each arrived."""

    def __init__(self, mode: str, target: str, env: dict | None = None):
        self.mode = mode
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "crash_worker.py"), mode, target],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.events: list[tuple[float, str, int]] = []  # (monotonic time, word, k)
        self._cond = threading.Condition()
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for("READY")

    def _read(self) -> None:
        for line in self.proc.stdout:  # MLflow prints lines of its own ("View run ...") between ours
            if not (m := re.fullmatch(r"(READY|WRITING|DONE) ?(\d*)", line.strip())):
                continue
            with self._cond:
                self.events.append((time.monotonic(), m[1], int(m[2] or 0)))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def seen(self, word: str) -> list[tuple[float, int]]:
        """(time, k) of each ``word`` line so far."""
        with self._cond:
            return [(t, k) for t, w, k in self.events if w == word]

    def wait_for(self, word: str, n: int = 1, timeout: float = 600) -> float:
        """The moment the worker printed ``word`` the ``n``-th time, waiting for it; a worker
        that exits or hangs first fails the test (the timeout stands for a hang, not a pace)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.seen(word)) >= n or self._eof, timeout)
        got = self.seen(word)
        if len(got) < n:
            pytest.fail(f"the {self.mode} worker printed {word} {len(got)} of {n} times (exit {self.proc.poll()})")
        return got[n - 1][0]

    def done(self) -> set[int]:
        """The k of each call that returned before now."""
        return {k for _, k in self.seen("DONE")}

    def kill(self) -> bool:
        """SIGKILL, then read what it printed before; whether it was still running (not
        exited by itself)."""
        self.proc.send_signal(signal.SIGKILL)
        running = self.proc.wait() == -signal.SIGKILL
        with self._cond:
            self._cond.wait_for(lambda: self._eof, 60)
        return running


def kill_at_random(worker: Worker, spans: dict[str, float], rng: random.Random, measure: bool) -> bool:
    """Kill ``worker`` at a random moment of its calls, timed from its own progress, never from
    the process start: with ``measure``, it lets its first call finish (how long that took is
    the mode's span) and is killed within 1.5 spans of its second call's start; otherwise
    within 1.5 spans (the last measured) of its first call's start. So kills land in a first
    call, a later one, or between them, on a slow machine as on a fast one; the spans come
    from workers that always finish a call, so no kill's timing biases them. Whether a call
    had returned before the kill."""
    if measure or worker.mode not in spans:
        spans[worker.mode] = worker.wait_for("DONE") - worker.wait_for("WRITING")
        start = worker.wait_for("WRITING", 2)
    else:
        start = worker.wait_for("WRITING")
    time.sleep(max(0.0, start + rng.uniform(0, 1.5 * spans[worker.mode]) - time.monotonic()))
    assert worker.kill(), f"the {worker.mode} worker exited before its kill"
    return bool(worker.done())


def wait_until(done, what: str, timeout: float = 600, step: float = 0.1) -> None:
    """Wait for ``done()``; the timeout stands for a hang and fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(step)


def check_versions(uri: str, seen: set[int], bad: list[str]) -> int:
    """Every version not checked before verifies and holds the tensors its properties name;
    each one that does not is added to ``bad``."""
    from crash_worker import state

    checked = 0
    for info in ml.versions(uri):
        if info.version in seen:
            continue
        report = ml.verify(uri, info.version)
        got = ml.load_state_dict(uri, info.version) if report.ok else {}
        want = state(int(info.properties["k"]))
        if not report.ok or not all(n in got and torch.equal(got[n], want[n]) for n in want):
            bad.append(f"version {info.version}: {report.problems[:2]}")
        seen.add(info.version)
        checked += 1
    return checked


@pytest.mark.slow
def test_save_killed_at_random_moments_leaves_every_version_intact_and_gc_reclaims_the_rest(tmp_path):
    """50 saves killed at random moments: every committed version is whole, the next save
    works, and gc reclaims what the killed saves left (partial .tmp files, complete data
    files no version names) once they are older than the grace period."""
    rng = random.Random(1)
    uri = str(tmp_path / "crash.lance")
    seen: set[int] = set()
    bad: list[str] = []
    trials, spans, after_a_save, reported = 50, {}, 0, set()
    for i in range(trials):
        worker = Worker("save", uri)
        after_a_save += kill_at_random(worker, spans, rng, measure=i % 2 == 0)
        reported |= worker.done()
        if Path(uri).exists():
            check_versions(uri, seen, bad)
    worker = Worker("save", uri)  # and the dataset still takes new versions
    worker.wait_for("DONE")
    assert worker.kill()
    reported |= worker.done()
    check_versions(uri, seen, bad)
    committed = {int(v.properties["k"]) for v in ml.versions(uri)}
    assert reported <= committed, sorted(reported - committed)  # every save that returned is there
    data = Path(uri) / "data"
    before = {p.name: p.stat().st_size for p in data.iterdir()}
    old = time.time() - 3600
    for path in Path(uri).rglob("*"):
        os.utime(path, (old, old))
    report = ml.gc(uri, keep_last=1, grace=timedelta(minutes=30))
    ds = lance.dataset(uri)  # versions superseded within the grace period stay, with their files
    used = {
        f.path
        for v in ds.versions()
        for frag in ds.checkout_version(v["version"]).get_fragments()
        for f in frag.metadata.files
    }
    record(
        "save_state_dict_kills",
        {
            "trials": trials,
            "killed_after_a_save_returned": after_a_save,
            "versions_checked": len(seen),
            "lost_or_corrupt": len(bad),
            "files_left_by_kills": len(set(before) - used),
            "orphans_reclaimed": report[0].orphan_files,
            "orphan_bytes_reclaimed": report[0].orphan_bytes,
        },
    )
    assert not bad, bad
    assert trials // 2 <= after_a_save < trials, after_a_save  # kills landed in a process's first save, and later
    assert len(seen) >= trials // 2  # each measuring worker committed one at least
    assert report[0].orphan_files > 0 and report[0].orphan_bytes > 0  # the kills left some, now gone
    assert {p.name for p in data.iterdir()} == used  # nothing left that no version uses
    check_versions(uri, set(), bad)
    assert not bad, bad


@pytest.mark.slow
def test_log_model_and_sync_killed_at_random_moments(tracking):
    rng = random.Random(2)
    name = "crash-model"
    env = {
        "MLFLOW_TRACKING_URI": tracking["url"],
        "MLFLOW_LANCE_ROOT": os.environ["MLFLOW_LANCE_ROOT"],
        "MLFLOW_EXPERIMENT_NAME": mlflow.get_experiment(mlflow.tracking.fluent._get_experiment_id()).name,
    }
    trials = {"log": 0, "sync": 0}
    spans: dict[str, float] = {}
    logged = 0
    for i in range(16):
        mode = "sync" if i % 4 == 3 else "log"
        if mode == "sync" and not MlflowClient().search_model_versions(f"name='{name}'"):
            mode = "log"
        worker = Worker(mode, name, env)
        kill_at_random(worker, spans, rng, measure=i % 2 == 0)
        logged += len(worker.done()) if mode == "log" else 0
        trials[mode] += 1
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) >= logged > 0, (len(versions), logged)  # each log_model that returned is there
    uri = None
    for mv in versions:  # no registry entry points at a missing, unpinned or broken Lance version
        model = ml.load_model(f"models:/{name}/{mv.version}")
        run_k = float(client.get_run(mv.run_id).data.tags["k"])
        assert torch.equal(model.weight, torch.full((256, 256), run_k))
        conf = flavor_conf(name, mv.version)
        uri = conf["lance_uri"]
        # pinned by its logged model from the moment it was committed (a kill between
        # registration and the model-version pin leaves only that one; sync adds the other)
        assert ml.tags(uri)[sidecar.model_pin(mv.source.split("/")[-1])] == conf["lance_version"]
        assert ml.verify(uri, conf["lance_version"]).ok
    (report,) = ml.sync(name)  # the sidecar is rebuilt and agrees with the registry
    doc = sidecar.read(uri)
    (entry,) = doc["registered_models"].values()
    assert set(entry["versions"]) == {mv.version for mv in versions} == set(report.model_versions)
    tags, binding = ml.tags(uri), client.get_registered_model(name).tags["mlflow_lance.binding"]
    assert all(
        tags[sidecar.model_version_pin(binding, mv.version)] == flavor_conf(name, mv.version)["lance_version"]
        for mv in versions
    )
    record("log_model_and_sync_kills", {**trials, "model_versions_checked": len(versions)})  # every check asserts


def flavor_conf(name: str, version: str) -> dict:
    from mlflow_lance.lifecycle import flavor_conf as conf_of

    return conf_of(f"models:/{name}/{version}")


@pytest.mark.slow
def test_writers_racing_gc_and_sync_lose_nothing(tracking):
    """Two trainers log while gc (with a short grace period) and sync run in a loop."""
    name = "race-model"
    with mlflow.start_run():
        info = ml.log_model(torch.nn.Linear(64, 64), name="model", registered_model_name=name)
    uri = info.flavors["mlflow_lance"]["lance_uri"]
    stop = threading.Event()
    rounds: list[int] = []
    errors: list[BaseException] = []

    def janitor() -> None:
        try:
            while not stop.is_set():
                ml.gc(uri, keep_last=1, grace=timedelta(seconds=3))
                ml.sync(name)
                rounds.append(1)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    thread = threading.Thread(target=janitor)
    thread.start()
    env = {"MLFLOW_TRACKING_URI": tracking["url"], "MLFLOW_LANCE_ROOT": os.environ["MLFLOW_LANCE_ROOT"]}
    try:
        writers = [Worker("log", name, env) for _ in range(2)]
        for w in writers:  # both write while the janitor runs; then rounds and versions are counted
            w.wait_for("DONE")
        first = len(rounds)
        wait_until(
            lambda: errors or (sum(len(w.done()) for w in writers) >= 6 and len(rounds) >= first + 3),
            "6 log_model calls and 3 more gc + sync rounds",
        )
        for w in writers:
            assert w.kill()
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    logged = sum(len(w.done()) for w in writers)
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) >= 1 + logged, (len(versions), logged)  # each log_model that returned is there
    for mv in versions:
        model = ml.load_model(f"models:/{name}/{mv.version}", verify=True)
        if mv.version != "1":
            assert torch.equal(model.weight, torch.full((256, 256), float(client.get_run(mv.run_id).data.tags["k"])))
    record(
        "writers_racing_gc_and_sync", {"model_versions_checked": len(versions), "gc_and_sync_rounds": len(rounds)}
    )  # every check asserts


# --------------------------------------------------------------------------- storage faults


def test_unreachable_storage_fails_fast_with_a_clear_message():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = {
        "aws_endpoint": f"http://127.0.0.1:{port}",
        "allow_http": "true",
        "aws_access_key_id": "a",
        "aws_secret_access_key": "b",
        "aws_region": "us-east-1",
    }
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=r"cannot reach the storage of 's3://b/w.lance'.*aws_endpoint"):
        ml.load_state_dict("s3://b/w.lance", storage_options=opts)
    with pytest.raises(ConnectionError, match="nothing was written"):
        ml.save_state_dict({"w": torch.ones(2)}, "s3://b/w.lance", storage_options=opts)
    assert time.monotonic() - t0 < 60


def test_a_silent_endpoint_times_out_instead_of_hanging():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)  # accepts connections, never answers
    port = server.getsockname()[1]
    opts = {
        "aws_endpoint": f"http://127.0.0.1:{port}",
        "allow_http": "true",
        "aws_access_key_id": "a",
        "aws_secret_access_key": "b",
        "aws_region": "us-east-1",
        "timeout": "2s",
        "client_retry_timeout": "6",
    }
    t0 = time.monotonic()
    try:
        with pytest.raises(ConnectionError, match="timed out"):
            ml.load_state_dict("s3://b/w.lance", storage_options=opts)
    finally:
        server.close()
    assert time.monotonic() - t0 < 90


def test_a_full_disk_leaves_earlier_versions_intact(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        uri = mount / "w.lance"
        first = {"a": torch.ones(100_000), "b": torch.zeros(10)}  # 400 KB
        ml.save_state_dict(first, uri)
        with pytest.raises(OSError, match="no space left on the device. Nothing was committed"):
            ml.save_state_dict({"a": torch.randn(1_000_000), "b": torch.zeros(10)}, uri)  # 4 MB
        assert [v.version for v in ml.versions(uri)] == [1]
        assert ml.verify(uri).ok and torch.equal(ml.load_state_dict(uri)["a"], first["a"])
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# --------------------------------------------------------------------------- names and safety


@pytest.mark.parametrize("name", ["a\\b", "my model", "UPPER..lower", "ünïcode ✓"])
def test_odd_registered_model_names_get_safe_datasets(tracking, name):
    with mlflow.start_run():
        info = ml.log_model(torch.nn.Linear(2, 2), name="model", registered_model_name=name)
    uri = Path(info.flavors["mlflow_lance"]["lance_uri"])
    root = Path(os.environ["MLFLOW_LANCE_ROOT"]).resolve()
    assert uri.resolve().parent == root / "models" and " " not in uri.name and "\\" not in uri.name
    assert torch.equal(ml.load_model(f"models:/{name}/1").weight, ml.load_state_dict(uri)["weight"])


@pytest.mark.parametrize("name", ["team/model", "../../escape", "a:b", " "])
def test_names_the_registry_refuses_are_refused_before_anything_is_written(tracking, name):
    with mlflow.start_run() as run, pytest.raises(mlflow.exceptions.MlflowException, match="name"):
        ml.log_model(torch.nn.Linear(2, 2), name="model", registered_model_name=name)
    assert not list(Path(os.environ["MLFLOW_LANCE_ROOT"]).rglob("*.lance"))
    assert MlflowClient().list_artifacts(run.info.run_id) == []


def test_no_unsafe_deserialization_in_the_package():
    source = "\n".join(p.read_text() for p in (ROOT / "mlflow_lance").rglob("*.py"))
    assert not re.search(r"yaml\.load\(", source) and not re.search(r"yaml\.unsafe_load", source)
    assert all("weights_only=True" in call for call in re.findall(r"torch\.load\([^)]*\)", source))
    # the only unpickling is the skeleton, behind the opt-out
    assert re.findall(r"(?:pickle|cloudpickle)\.loads?\(", source) == ["cloudpickle.loads("]


@pytest.mark.slow
def test_plain_writers_racing_gc_keep_every_surviving_version_whole(tmp_path):
    """Unpinned versions do get collected, and none that survives points at a deleted file."""
    uri = str(tmp_path / "race.lance")
    ml.save_state_dict({"seed": torch.ones(1)}, uri, properties={"k": "0"})
    writers = [Worker("save", uri) for _ in range(2)]
    removed: list[int] = []
    rounds = 0

    def enough() -> bool:  # rounds bounded by what happened, not by the clock
        nonlocal rounds
        removed.extend(ml.gc(uri, keep_last=1, grace=timedelta(seconds=2))[0].removed_versions)
        rounds += 1
        return bool(removed) and sum(len(w.done()) for w in writers) >= 6 and rounds >= 5

    wait_until(enough, "6 saves and a version collected", step=0.05)
    for w in writers:
        assert w.kill()
    surviving = [v for v in ml.versions(uri) if v.version != 1]
    assert surviving
    bad: list[str] = []
    checked = check_versions(uri, {1}, bad)
    record(
        "plain_writers_racing_gc",
        {"versions_collected": len(removed), "surviving_checked": checked, "lost_or_corrupt": len(bad)},
    )
    assert checked == len(surviving) and not bad, bad
