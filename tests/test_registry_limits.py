"""A registered model with a long history, and a registry that changes underneath mlflow-lance
(issue 17, items 2 and 3): every description and tag stays within MLflow's limits, bookkeeping
for the UI never fails a log, and sync / log_model / register_model treat "already gone" as
done. Against a real `mlflow server` on a throwaway PostgreSQL cluster (whose VARCHAR(5000)
columns SQLite does not enforce), with real concurrent processes."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from model_zoo import SmallCNN, trained

import mlflow_lance as ml
from conftest import _point_at, report
from mlflow_lance import registry, sidecar
from mlflow_lance.bindings import BINDING_TAG, DATASET_TAG

BIN = Path(sys.executable).parent


@pytest.fixture
def pg(postgres_mlflow_server, tmp_path, monkeypatch):
    """This test's client (and its subprocesses) against the PostgreSQL-backed server."""
    _point_at(postgres_mlflow_server, tmp_path, monkeypatch)
    yield postgres_mlflow_server
    mlflow.set_tracking_uri(None)


def _log(name: str | None, seed: int):
    with mlflow.start_run():
        return ml.log_model(trained(SmallCNN(), seed), name="model", registered_model_name=name)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    return trained(SmallCNN(), seed).state_dict()


def _assert_loads(uri: str, seed: int) -> None:
    got, want = ml.load_state_dict(uri), _weights(seed)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want), uri


def _pins_of(name: str) -> tuple[str, dict[str, int]]:
    """(binding, the pins of the dataset registered model ``name`` is bound to)."""
    tags = MlflowClient().get_registered_model(name).tags
    return tags[BINDING_TAG], ml.tags(tags[DATASET_TAG])


# --------------------------------------------------------------------------- limits


def test_limits_are_mlflows_own_with_a_fallback():
    from mlflow.store.model_registry.dbmodels import models as reg
    from mlflow.store.tracking.dbmodels import models as trk
    from mlflow.utils import validation

    got = registry.limits()
    assert got.registered_model_description == reg.SqlRegisteredModel.description.type.length
    assert got.model_version_description == reg.SqlModelVersion.description.type.length
    assert got.registered_model_tag == min(
        reg.SqlRegisteredModelTag.value.type.length, validation.MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH
    )
    assert got.model_version_tag == validation.MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH  # a TEXT column
    assert got.run_tag == got.logged_model_tag == validation.MAX_TAG_VAL_LENGTH == trk.SqlTag.value.type.length
    assert trk.SqlLoggedModelTag.tag_value.type.length is None  # a TEXT column
    # without MLflow's SQLAlchemy models (mlflow-skinny): the shortest column, everywhere
    code = (
        "import sys; sys.modules['mlflow.store.model_registry.dbmodels.models'] = None\n"
        "from mlflow_lance import registry; print(sorted(set(vars(registry.limits()).values())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [registry.FALLBACK_LIMIT]


# --------------------------------------------------------------------------- a long history


UNTAGGED = 5  # versions registered with plain MLflow calls, which the first sync catches up


def _history(name: str, versions: int, person: str) -> tuple[float, list[registry.SyncReport]]:
    """Registered model ``name`` with ``versions`` versions: one logged, the rest registered
    cheaply from its logged model (most carrying the tags and description log_model gives a
    version, ``UNTAGGED`` bare), and a description a person wrote; then its first sync.
    (seconds that sync took, its reports)."""
    info = _log(name, 1)
    client = MlflowClient()
    client.update_registered_model(name, description=person)
    first = client.get_model_version(name, str(info.registered_model_version))
    lance = {k: v for k, v in first.tags.items() if k.startswith("lance.")}
    assert lance["lance.version"] == "1" and first.description.startswith("**Lance version 1**")

    def register(tagged: bool) -> None:
        client.create_model_version(
            name,
            first.source,
            run_id=first.run_id,
            model_id=info.model_id,
            tags=lance if tagged else None,
            description=first.description if tagged else None,
        )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(register, [True] * (versions - 1 - UNTAGGED) + [False] * UNTAGGED))
    start = time.perf_counter()
    reports = ml.sync(name)
    return time.perf_counter() - start, reports


def _exercise(name: str, seed: int) -> dict[str, float]:
    """log_model into ``name``, register_model earlier-logged weights, sync, gc and load the
    newest version, each checked; the seconds each took."""
    client, took = MlflowClient(), {}
    start = time.perf_counter()
    info = _log(name, seed)
    took["log_model"] = time.perf_counter() - start
    mv = client.get_model_version(name, str(info.registered_model_version))
    binding, pins = _pins_of(name)
    assert mv.tags["lance.version"] == str(info.flavors["mlflow_lance"]["lance_version"])
    assert pins[sidecar.model_version_pin(binding, mv.version)] == info.flavors["mlflow_lance"]["lance_version"]

    earlier = _log(None, seed + 1)
    start = time.perf_counter()
    newest = ml.register_model(f"models:/{earlier.model_id}", name)
    took["register_model"] = time.perf_counter() - start
    assert client.get_model_version(name, newest.version).tags["lance.version"] == str(
        earlier.flavors["mlflow_lance"]["lance_version"]
    )

    start = time.perf_counter()
    reports = ml.sync(name)
    took["sync"] = time.perf_counter() - start
    assert reports and not any(r.skipped or r.gone or r.updated or r.pinned for r in reports)  # all right already

    start = time.perf_counter()
    results = ml.gc(name)
    took["gc"] = time.perf_counter() - start
    assert results and not any(r.skipped for r in results)

    start = time.perf_counter()
    model = ml.load_model(f"models:/{name}/{newest.version}")
    took["load_model"] = time.perf_counter() - start
    want = _weights(seed + 1)
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    return took


def _check_history(name: str, person: str, newest: int, total: int) -> int:
    """The registered model's description: the person's text whole, then the newest versions
    and how many older ones are not shown, within MLflow's limit. The versions shown."""
    description = MlflowClient().get_registered_model(name).description
    assert len(description) <= registry.limits().registered_model_description
    assert description.startswith(f"{person}\n\n{registry.HISTORY_MARKER}\n")
    shown = [int(n) for n in re.findall(r"^\| (\d+) \|", description, re.MULTILINE)]
    assert shown == list(range(newest, newest - len(shown), -1))  # the newest first, none skipped
    omitted = re.search(r"^\*([\d,]+) older model versions? not shown\.\*$", description, re.MULTILINE)
    assert len(shown) + (int(omitted.group(1).replace(",", "")) if omitted else 0) == total
    return len(shown)


@pytest.mark.slow  # 131 s in the last full run
def test_a_thousand_versions_on_postgresql(pg):
    """log_model, register_model, sync, gc and load with 10 and with 1,000 versions; the
    history stays within PostgreSQL's 5,000 characters and names what it leaves out."""
    person = "Owned by the ranking team; ask in #ranking before promoting a version."
    assert registry.limits().registered_model_description == 5000  # PostgreSQL enforces it here
    rows, figures = {}, {}
    for name, versions, seed in (("history-10", 10, 10), ("history-1000", 1000, 20)):
        first_sync, reports = _history(name, versions, person)
        (found,) = reports
        assert not found.skipped and not found.gone
        assert len(found.updated) == UNTAGGED  # only the bare versions needed their tags and description
        assert len(found.pinned) == versions - 1  # every version pinned, the logged one by log_model already...
        start = time.perf_counter()
        (again,) = ml.sync(name)
        steady = time.perf_counter() - start
        assert again.updated == [] and again.pinned == [] and again.unpinned == []  # ...so nothing changes now
        figures[versions] = {"first sync": first_sync, "sync, all right": steady, **_exercise(name, seed)}
        rows[versions] = _check_history(name, person, newest=versions + 2, total=versions + 2)
    assert rows[10] == 12  # all of them fit
    assert 50 < rows[1000] < 100  # the newest that fit, then the count of the rest
    report("reliability.json", "registry_scale_seconds_postgresql", {str(n): f for n, f in figures.items()})
    print("\nseconds on PostgreSQL   " + "".join(f"{n:>14,} versions" for n in figures))
    for op in figures[10]:
        print(f"{op:<24}" + "".join(f"{figures[n][op]:>23.2f}" for n in figures))


def test_text_a_person_wrote_is_never_cut(pg):
    name = "described"
    _log(name, 1)
    client = MlflowClient()
    long = "Model card: " + "x" * 4_900 + "."  # fits MLflow's 5,000 characters, leaves no room for a table
    client.update_registered_model(name, description=long)
    _log(name, 2)  # on PostgreSQL the table would overflow the column: no table, and no error
    assert client.get_registered_model(name).description == long
    client.update_registered_model(name, description="Short notes.")
    ml.sync(name)
    described = client.get_registered_model(name).description
    assert described.startswith(f"Short notes.\n\n{registry.HISTORY_MARKER}\n")
    assert "\n| 2 | 2 |" in described and "\n| 1 | 1 |" in described and "not shown" not in described


# --------------------------------------------------------------------------- gone while it runs


CHURN = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

stop, ready, renamed, added = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
client = MlflowClient()
source = client.get_model_version(added, "1")
model_id = source.source.rsplit("/", 1)[-1]
counts = {"renames": 0, "deleted": 0}
ready.touch()
try:
    while not stop.exists():
        client.rename_registered_model(renamed, renamed + "-moved")
        made = [client.create_model_version(added, source.source, run_id=source.run_id, model_id=model_id).version
                for _ in range(3)]
        time.sleep(0.3)
        client.rename_registered_model(renamed + "-moved", renamed)
        counts["renames"] += 2
        time.sleep(0.2)
        for version in made:
            client.delete_model_version(added, version)
            counts["deleted"] += 1
finally:
    try:
        client.rename_registered_model(renamed + "-moved", renamed)
    except MlflowException:
        pass
print(json.dumps(counts))
"""

DELETER = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

stop, ready, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
client = MlflowClient()
deleted = 0
ready.touch()
while not stop.exists():
    for mv in client.search_model_versions(f"name = '{name}'"):
        try:
            client.delete_model_version(name, mv.version)
            deleted += 1
        except MlflowException:
            pass
    time.sleep(0.005)
print(json.dumps({"deleted": deleted}))
"""


def _start(script: str, tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """A process running ``script`` against this test's server, once it is ready; and its stop file."""
    stop, ready = tmp_path / f"stop-{time.monotonic_ns()}", tmp_path / f"ready-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(stop), str(ready), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "not ready"
        time.sleep(0.05)
    return proc, stop


def _finish(proc: subprocess.Popen, stop: Path) -> dict:
    stop.touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _sync_all() -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mlflow-lance"), "sync", "--all", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )


def _assert_every_version_pinned_and_loading(
    names: list[str], seed_of: dict[str, int], only: set[tuple[str, str]] | None = None
) -> int:
    """Every model version of ``names`` that exists (of ``only``, if given) is pinned and loads
    the weights of the logged model it was registered from; how many there are."""
    client, checked = MlflowClient(), 0
    for name in names:
        binding, pins = _pins_of(name)
        for mv in client.search_model_versions(f"name = '{name}'"):
            if only is not None and (name, mv.version) not in only:
                continue
            assert sidecar.model_version_pin(binding, mv.version) in pins, (name, mv.version)
            _assert_loads(f"models:/{name}/{mv.version}", seed_of[mv.source.rsplit("/", 1)[-1]])
            checked += 1
    return checked


@pytest.mark.slow  # 123 s in the last full run
def test_sync_all_finishes_while_models_are_renamed_and_versions_deleted(pg, tmp_path):
    """Another process renames a model back and forth and registers and deletes versions of
    another while `mlflow-lance sync --all` runs: every sync exits 0 and reports what changed
    underneath it, and every version that exists keeps its pin and loads."""
    names, seed_of, logged = ["churn-renamed", "churn-added", "churn-still"], {}, set()
    for i, name in enumerate(names):
        for seed in (30 + 2 * i, 31 + 2 * i):
            info = _log(name, seed)
            seed_of[info.model_id] = seed
            logged.add((name, str(info.registered_model_version)))
    churner, stop = _start(CHURN, tmp_path, "churn-renamed", "churn-added")
    try:
        runs = [_sync_all() for _ in range(3)]
    finally:
        counts = _finish(churner, stop)
    assert counts["renames"] and counts["deleted"]
    for run in runs:
        assert run.returncode == 0, run.stderr[-4000:]
    reports = [r for run in runs for r in json.loads(run.stdout)]
    changed = [r for r in reports if r["gone"] or (r["skipped"] and "deleted or renamed" in r["skipped"])]
    assert changed, "the registry never changed underneath a sync: the test did not test anything"
    print(
        f"\n{counts['renames']} renames, {counts['deleted']} versions deleted during 3 syncs: "
        f"{sum(bool(r['skipped']) for r in changed)} reports skipped, {sum(len(r['gone']) for r in changed)} gone"
    )
    assert len(logged) == _assert_every_version_pinned_and_loading(names, seed_of, only=logged)
    assert _sync_all().returncode == 0  # and a quiet sync pins what plain MLflow registered meanwhile
    assert _assert_every_version_pinned_and_loading(names, seed_of) >= len(logged)


def test_log_and_register_survive_their_new_version_being_deleted_at_once(pg, tmp_path, caplog):
    """Another process deletes every version of the model the moment it appears: log_model and
    register_model neither raise nor lose weights; each warns that it skipped the version's
    bookkeeping, and the version's pin (safety) was set before it."""
    name = "vanishing"
    caplog.set_level(logging.WARNING, logger="mlflow_lance.registry")
    _log(name, 40)
    deleter, stop = _start(DELETER, tmp_path, name)
    logged, hits = [], 0
    try:
        for seed in range(41, 49):
            caplog.clear()
            info = _log(name, seed)  # must not raise
            logged.append((info, seed))
            ml.register_model(f"models:/{info.model_id}", name)  # must not raise either
            hits += any("deleted or renamed" in r.getMessage() for r in caplog.records)
            if hits >= 3:
                break
    finally:
        counts = _finish(deleter, stop)
    assert counts["deleted"] >= len(logged) and hits, "no version vanished under a log: nothing was tested"
    binding, pins = _pins_of(name)
    for info, seed in logged:  # the weights are safe: pinned by their logged model, and loadable
        conf = info.flavors["mlflow_lance"]
        assert pins[sidecar.model_pin(info.model_id)] == conf["lance_version"]
        assert pins[sidecar.model_version_pin(binding, info.registered_model_version)] == conf["lance_version"]
        _assert_loads(f"models:/{info.model_id}", seed)
    info = _log(name, 49)  # nobody deletes now: the version stays, pinned, described and loadable
    mv = MlflowClient().get_model_version(name, str(info.registered_model_version))
    assert mv.tags["lance.version"] == str(info.flavors["mlflow_lance"]["lance_version"])
    assert _assert_every_version_pinned_and_loading([name], {info.model_id: 49}) == 1
