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


def start_worker(mode: str, target: str, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "crash_worker.py"), mode, target],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout.readline().strip() == "READY"
    return proc


def kill_at_random(proc: subprocess.Popen, low: float, high: float) -> None:
    time.sleep(random.uniform(low, high))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


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
    random.seed(1)
    uri = str(tmp_path / "crash.lance")
    seen: set[int] = set()
    bad: list[str] = []
    trials = 50
    for _ in range(trials):
        kill_at_random(start_worker("save", uri), 0.05, 1.5)
        if Path(uri).exists():
            check_versions(uri, seen, bad)
    proc = start_worker("save", uri)  # and the dataset still takes new versions
    kill_at_random(proc, 1.0, 1.0)
    check_versions(uri, seen, bad)
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
            "versions_checked": len(seen),
            "lost_or_corrupt": len(bad),
            "files_left_by_kills": len(set(before) - used),
            "orphans_reclaimed": report[0].orphan_files,
            "orphan_bytes_reclaimed": report[0].orphan_bytes,
        },
    )
    assert not bad, bad
    assert len(seen) >= trials // 2
    assert report[0].orphan_files > 0 and report[0].orphan_bytes > 0  # the kills left some, now gone
    assert {p.name for p in data.iterdir()} == used  # nothing left that no version uses
    check_versions(uri, set(), bad)
    assert not bad, bad


@pytest.mark.slow
def test_log_model_and_sync_killed_at_random_moments(tracking):
    random.seed(2)
    name = "crash-model"
    env = {
        "MLFLOW_TRACKING_URI": tracking["url"],
        "MLFLOW_LANCE_ROOT": os.environ["MLFLOW_LANCE_ROOT"],
        "MLFLOW_EXPERIMENT_NAME": mlflow.get_experiment(mlflow.tracking.fluent._get_experiment_id()).name,
    }
    trials = {"log": 0, "sync": 0}
    for i in range(16):
        mode = "sync" if i % 4 == 3 else "log"
        if mode == "sync" and not MlflowClient().search_model_versions(f"name='{name}'"):
            mode = "log"
        kill_at_random(start_worker(mode, name, env), 0.5, 4.0)
        trials[mode] += 1
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{name}'")
    assert versions, "no log_model finished in any trial"
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


def test_writers_racing_gc_and_sync_lose_nothing(tracking):
    """Two trainers log while gc (with a short grace period) and sync run in a loop."""
    name = "race-model"
    with mlflow.start_run():
        info = ml.log_model(torch.nn.Linear(64, 64), name="model", registered_model_name=name)
    uri = info.flavors["mlflow_lance"]["lance_uri"]
    stop = time.time() + 25
    errors: list[BaseException] = []

    def janitor() -> None:
        try:
            while time.time() < stop:
                ml.gc(uri, keep_last=1, grace=timedelta(seconds=3))
                ml.sync(name)
                time.sleep(0.2)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=janitor)
    thread.start()
    env = {"MLFLOW_TRACKING_URI": tracking["url"], "MLFLOW_LANCE_ROOT": os.environ["MLFLOW_LANCE_ROOT"]}
    writers = [start_worker("log", name, env) for _ in range(2)]
    time.sleep(max(0.0, stop - time.time()))
    for w in writers:
        w.send_signal(signal.SIGKILL)
        w.wait()
    thread.join()
    assert not errors, errors
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) >= 3
    for mv in versions:
        model = ml.load_model(f"models:/{name}/{mv.version}", verify=True)
        if mv.version != "1":
            assert torch.equal(model.weight, torch.full((256, 256), float(client.get_run(mv.run_id).data.tags["k"])))
    record("writers_racing_gc_and_sync", {"model_versions_checked": len(versions)})  # every check asserts


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


def test_plain_writers_racing_gc_keep_every_surviving_version_whole(tmp_path):
    """Unpinned versions do get collected, and none that survives points at a deleted file."""
    uri = str(tmp_path / "race.lance")
    ml.save_state_dict({"seed": torch.ones(1)}, uri, properties={"k": "0"})
    writers = [start_worker("save", uri) for _ in range(2)]
    removed: list[int] = []
    stop = time.time() + 15
    while time.time() < stop:
        removed += ml.gc(uri, keep_last=1, grace=timedelta(seconds=2))[0].removed_versions
        time.sleep(0.3)
    for w in writers:
        w.send_signal(signal.SIGKILL)
        w.wait()
    surviving = [v for v in ml.versions(uri) if v.version != 1]
    assert removed and surviving
    bad: list[str] = []
    checked = check_versions(uri, {1}, bad)
    record(
        "plain_writers_racing_gc",
        {"versions_collected": len(removed), "surviving_checked": checked, "lost_or_corrupt": len(bad)},
    )
    assert checked == len(surviving) and not bad, bad
