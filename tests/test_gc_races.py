"""gc against a registry that changes while it runs (issue 17, items 1 and 3): a reference
made before gc's delete step always keeps its weights, two gc at once both finish, and
checkpoint retention racing a registration loses nothing. On a real `mlflow server` (SQLite
and PostgreSQL), with the registry operations made at each of gc's steps in turn (hooked,
so the interleaving is exact) and by real concurrent processes (so it is real)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_lance as ml
from mlflow_lance import cleanup, lifecycle, store

BIN = Path(sys.executable).parent
NOW = timedelta(0)

# Where gc reads MLflow or changes pins, in its order: a registry operation is made right
# before the n-th such call (see lifecycle.survey for why the order keeps every reference).
STEPS = [
    (lifecycle, "survey"),
    (store, "versions"),
    (MlflowClient, "get_logged_model"),
    (MlflowClient, "search_model_versions"),
    (lifecycle, "apply_pins"),
    (store, "prune"),
    (cleanup, "_tracked"),
]


def net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def loads(uri: str, want: dict[str, torch.Tensor]) -> bool:
    try:
        got = ml.load_state_dict(uri)
    except ml.WeightsError:
        return False
    return list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def logged_then_superseded(seed: int) -> tuple[str, dict[str, torch.Tensor]]:
    """A logged model A in a run, and a later version on top of it (A is not the latest)."""
    with mlflow.start_run():
        a = net(seed)
        info = ml.log_model(a, name="model")
        ml.log_model(net(seed + 1000), name="model")
    return info.model_id, weights(a)


@pytest.mark.parametrize("step", range(len(STEPS)), ids=[name for _, name in STEPS])
def test_registering_then_deleting_a_logged_model_inside_gc_keeps_its_weights(any_backend, monkeypatch, step):
    """The reported loss: ``mlflow.register_model(models:/A)`` then ``delete_logged_model(A)``
    while ``gc --all`` runs. Made right before each of gc's steps in turn."""
    model_id, want = logged_then_superseded(10 + step)
    owner, name = STEPS[step]
    original = getattr(owner, name)
    fired = []

    def race(*args, **kwargs):
        if not fired:
            fired.append(True)
            mv = mlflow.register_model(f"models:/{model_id}", f"x{step}")
            MlflowClient().delete_logged_model(model_id)
            fired.append(mv.version)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, race)
    ml.gc(all=True, grace=NOW)
    monkeypatch.undo()
    assert len(fired) == 2, f"gc never reached {name}"
    assert loads(f"models:/x{step}/{fired[1]}", want)  # the model version MLflow lists loads
    ml.gc(all=True, grace=NOW)  # and stays: its pin is set now
    assert loads(f"models:/x{step}/{fired[1]}", want)


def test_checkpoint_retention_racing_a_registration_keeps_the_registered_weights(tracking, monkeypatch):
    """Retention decides a checkpoint is unregistered, someone registers it, retention deletes
    the logged model: the model version keeps its weights through gc."""
    from mlflow_lance import checkpoint

    model = net(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run():
        first = ml.log_checkpoint(model, opt, step=1)
        want = weights(model)
        original = MlflowClient.delete_logged_model
        registered = []

        def register_first(self, model_id):
            if model_id == first.model_id and not registered:
                registered.append(mlflow.register_model(f"models:/{model_id}", "ckpt").version)
            return original(self, model_id)

        monkeypatch.setattr(MlflowClient, "delete_logged_model", register_first)
        with torch.no_grad():
            model[0].weight.add_(1)
        second = ml.log_checkpoint(model, opt, step=2, keep_last=1)
        monkeypatch.undo()
    assert second.deleted == (first.model_id,) and registered
    ml.gc(all=True, grace=NOW)
    got = ml.load_state_dict(first.lance_uri, first.lance_version)
    assert all(torch.equal(got["model"][k], want[k]) for k in want)
    assert checkpoint.read_checkpoint(f"models:/ckpt/{registered[0]}")["step"] == 1


# --------------------------------------------------------------------------- real processes


RACER = """
import sys, mlflow
from mlflow import MlflowClient
client = MlflowClient()
for model_id in sys.argv[2:]:
    mv = mlflow.register_model(f"models:/{model_id}", sys.argv[1])
    client.delete_logged_model(model_id)
    print(mv.version, model_id, flush=True)
"""


def test_gc_processes_racing_a_registrar_process_lose_nothing(postgres_mlflow_server, tmp_path, monkeypatch):
    """Ten logged models registered and then deleted by one process while two `mlflow-lance gc
    --all` processes run at once (PostgreSQL): every registered version loads, and both gc
    exit 0."""
    from conftest import _point_at

    _point_at(postgres_mlflow_server, tmp_path, monkeypatch)
    made = [logged_then_superseded(100 + i) for i in range(10)]
    env = {**os.environ}
    gcs = [
        subprocess.Popen(
            [str(BIN / "mlflow-lance"), "gc", "--all", "--grace-minutes", "0"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    racer = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RACER), "raced", *[m for m, _ in made]],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert racer.returncode == 0, racer.stderr[-2000:]
    for p in gcs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    ml.gc(all=True, grace=NOW)  # and once more, after the race
    versions = dict(line.split() for line in racer.stdout.split("\n") if line.strip())
    lost = [v for v, model_id in versions.items() if not loads(f"models:/raced/{v}", dict(made)[model_id])]
    assert len(versions) == 10 and lost == []
    mlflow.set_tracking_uri(None)


def test_two_gc_at_once_both_finish(tracking):
    """Both remove pins and versions the other may have removed first: "already gone" is done."""
    uris = set()
    for i in range(4):
        model_id, _ = logged_then_superseded(200 + i)
        uris.add(
            ml.register_model(f"models:/{model_id}", "twice").tags.get("lance.uri")
            or MlflowClient().get_logged_model(model_id).tags["lance.uri"]
        )
    client = MlflowClient()
    for mv in client.search_model_versions("name = 'twice'"):
        client.delete_model_version("twice", mv.version)
    runs = [
        subprocess.Popen(
            [str(BIN / "mlflow-lance"), "gc", "--all", "--grace-minutes", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for p in runs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert uris and not any(t.startswith("mv.") for uri in uris for t in ml.tags(uri))


def test_a_version_gc_removes_under_a_listing_is_gone_not_damaged(tmp_path, monkeypatch):
    """A gc beside a read removes versions between the read's listing and its reading of each
    commit (what `sync --all` met beside a gc): the listing leaves them out, and nothing says
    "damaged or crafted". A version still listed whose commit cannot be read still is."""
    uri = tmp_path / "w.lance"
    for i in range(3):
        ml.save_state_dict({"w": torch.full((4,), float(i))}, uri)
    real = store.version_list

    def listing_then_gc(ds):
        listed = real(ds)
        monkeypatch.setattr(store, "version_list", real)
        assert store.prune(uri, keep_last=1, grace=NOW).removed_versions == [1, 2]  # the gc beside
        return listed

    monkeypatch.setattr(store, "version_list", listing_then_gc)
    assert [v.version for v in store.versions(uri)] == [3]
    monkeypatch.undo()
    ml.save_state_dict({"w": torch.ones(4)}, uri)
    (uri / "_versions" / "3.manifest").write_bytes(b"garbage")  # still there, unreadable: damage, said so
    with pytest.raises(ml.WeightsError):
        store.versions(uri)
