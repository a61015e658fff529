"""The lifecycle: every reference MLflow can still resolve keeps its weights, and what MLflow
deleted gives its space back. The five cases of issue 9, each against a real `mlflow server`."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_lance as ml
from mlflow_lance import bindings, lifecycle, sidecar
from mlflow_lance.cli import main as cli

BIN = Path(sys.executable).parent
NOW = timedelta(0)


def net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


def expect(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_loads(uri: str, weights: dict[str, torch.Tensor]) -> None:
    got = ml.load_state_dict(uri)
    assert list(got) == list(weights) and all(torch.equal(got[k], weights[k]) for k in weights), uri


def mlflow_gc(server: dict) -> None:
    """MLflow's own gc: purges deleted runs and deleted logged models (and their artifacts)."""
    subprocess.run(
        [
            str(BIN / "mlflow"),
            "gc",
            "--backend-store-uri",
            server["backend"],
            "--artifacts-destination",
            str(server["root"] / "artifacts"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_checkpoints_of_one_run_registered_later_all_survive_gc(tracking):
    """Case 1: three checkpoints of one run, the first registered later by model ID."""
    models = [net(seed) for seed in (1, 2, 3)]
    with mlflow.start_run():
        infos = [ml.log_model(m, name="model", step=epoch) for epoch, m in enumerate(models, 1)]
    uri = infos[0].flavors["mlflow_lance"]["lance_uri"]
    mlflow.register_model(f"models:/{infos[0].model_id}", "best")  # plain MLflow: no pin yet
    assert cli(["gc", uri, "--keep-last", "1", "--grace-minutes", "0"]) == 0
    assert_loads("models:/best/1", expect(models[0]))
    for info, m in zip(infos, models, strict=True):
        assert_loads(f"models:/{info.model_id}", expect(m))
    assert (
        ml.tags(uri)[
            sidecar.model_version_pin(
                bindings.binding_id("best", MlflowClient().get_registered_model("best").creation_timestamp),
                1,
            )
        ]
        == 1
    )

    MlflowClient().delete_logged_model(infos[1].model_id)  # epoch 2 goes; epoch 1 stays registered
    (result,) = ml.gc(uri, grace=NOW)
    assert result.removed_versions == [2] and result.bytes_removed > 0
    MlflowClient().delete_logged_model(infos[0].model_id)
    assert ml.gc(uri, grace=NOW)[0].removed_versions == []  # best/1 still references version 1
    assert_loads("models:/best/1", expect(models[0]))
    ml.tag(uri, "person", 3)
    (result,) = ml.gc(uri, grace=NOW, dry_run=True)
    why = {v: set(r) for v, r in result.kept.items()}
    assert why == {1: {"mlflow_reference"}, 3: {"latest", "tag:person", "mlflow_reference"}}  # pins are not tags
    assert result.kept_referenced == [1, 3]
    MlflowClient().delete_model_version("best", "1")
    assert ml.gc(uri, grace=NOW)[0].removed_versions == [1]
    assert_loads(f"models:/{infos[2].model_id}", expect(models[2]))


def test_copied_versions_keep_their_source_and_sync_touches_only_its_own_pins(tracking):
    """Case 2: a/1, a/2; copy a/2 to b; syncing b never unpins a; gc keeps both of a's."""
    m1, m2 = net(1), net(2)
    for m in (m1, m2):
        with mlflow.start_run():
            info = ml.log_model(m, name="model", registered_model_name="copy-a")
    uri = info.flavors["mlflow_lance"]["lance_uri"]
    MlflowClient().copy_model_version("models:/copy-a/2", "copy-b")
    a_pins = {t: v for t, v in ml.tags(uri).items() if t.startswith("mv.")}
    (report,) = ml.sync("copy-b")
    assert report.unpinned == [] and report.model_versions == {"1": 2}
    assert {t: v for t, v in ml.tags(uri).items() if t.startswith("mv.")}.items() >= a_pins.items()
    assert ml.gc(uri, keep_last=1, grace=NOW)[0].removed_versions == []
    assert_loads("models:/copy-a/1", expect(m1))
    assert_loads("models:/copy-b/1", expect(m2))
    b_tags = MlflowClient().get_model_version("copy-b", "1").tags
    assert b_tags["lance.version"] == "2" and b_tags["lance.uri"] == uri

    MlflowClient().delete_model_version("copy-a", "2")  # b's copy still holds version 2
    assert ml.gc(uri, grace=NOW)[0].removed_versions == []
    assert_loads("models:/copy-b/1", expect(m2))
    doc = sidecar.read(uri)
    names = {e["name"] for e in doc["registered_models"].values()}
    assert names == {"copy-a", "copy-b"}


def test_rename_keeps_the_dataset_and_a_reused_name_gets_a_new_one(tracking):
    """Case 3: rename d -> d2, log into d2: same dataset, deduplicated; a new d starts afresh."""
    base = net(1)
    with mlflow.start_run():
        first = ml.log_model(base, name="model", registered_model_name="ren-d")
    uri = first.flavors["mlflow_lance"]["lance_uri"]
    MlflowClient().rename_registered_model("ren-d", "ren-d2")
    with torch.no_grad():
        base[2].bias += 1  # only the head's bias changes
    with mlflow.start_run():
        second = ml.log_model(base, name="model", registered_model_name="ren-d2")
    conf = second.flavors["mlflow_lance"]
    assert conf["lance_uri"] == uri and conf["tensors_changed"] == 1
    reports = ml.sync("ren-d2")
    assert [r.dataset for r in reports] == [uri] and reports[0].model_versions == {"1": 1, "2": 2}
    assert cli(["sync", "ren-d2"]) == 0

    fresh = net(7)
    with mlflow.start_run():
        third = ml.log_model(fresh, name="model", registered_model_name="ren-d")
    new_uri = third.flavors["mlflow_lance"]["lance_uri"]
    assert not bindings.same_dataset(new_uri, uri)
    assert not any(t.startswith("mv.") for t in ml.tags(new_uri)) or all(
        v == 1 for t, v in ml.tags(new_uri).items() if t.startswith("mv.")
    )
    assert len([t for t in ml.tags(uri) if t.startswith("mv.")]) == 2  # d2's pins untouched
    assert_loads("models:/ren-d2/1", expect(net(1)))
    assert_loads("models:/ren-d/1", expect(fresh))


def test_registering_earlier_weights_binds_them_and_later_logs_deduplicate(tracking):
    """Case 4: register an unregistered model's run later, then log into that model."""
    model = net(3)
    with mlflow.start_run() as run:
        first = ml.log_model(model, name="model")
    uri = first.flavors["mlflow_lance"]["lance_uri"]
    mlflow.register_model(f"runs:/{run.info.run_id}/model", "later-c")
    with mlflow.start_run():
        second = ml.log_model(model, name="model", registered_model_name="later-c")
    conf = second.flavors["mlflow_lance"]
    assert conf["lance_uri"] == uri and conf["tensors_changed"] == 0 and conf["bytes_written"] < 4096
    client = MlflowClient()
    for version in ("1", "2"):  # caught up by the log, no manual sync
        mv = client.get_model_version("later-c", version)
        assert mv.tags["lance.uri"] == uri and "Lance version" in mv.description
    binding = client.get_registered_model("later-c").tags[bindings.BINDING_TAG]
    assert {sidecar.model_version_pin(binding, 1), sidecar.model_version_pin(binding, 2)} <= set(ml.tags(uri))
    assert [r.dataset for r in ml.sync("later-c")] == [uri]
    # mlflow_lance.register_model does the bookkeeping at once
    with mlflow.start_run():
        third = ml.log_model(net(4), name="other")
    mv = ml.register_model(f"models:/{third.model_id}", "later-e")
    assert client.get_model_version("later-e", mv.version).tags["lance.version"] == "1"


def test_deleted_references_give_their_space_back(tracking):
    """Case 5: delete the model version, the logged model and the run, run `mlflow gc`: our gc
    removes the version and frees its bytes."""
    keep, drop = net(5), net(6)
    with mlflow.start_run():
        ml.log_model(keep, name="model", registered_model_name="space")
    with mlflow.start_run() as run:
        info = ml.log_model(drop, name="model", registered_model_name="space")
    with mlflow.start_run():
        ml.log_model(keep, name="model", registered_model_name="space")  # the latest stays anyway
    uri = info.flavors["mlflow_lance"]["lance_uri"]
    client = MlflowClient()
    (dry,) = ml.gc(uri, grace=NOW, dry_run=True)
    assert dry.removed_versions == []
    client.delete_model_version("space", "2")
    client.delete_run(run.info.run_id)
    assert ml.gc(uri, grace=NOW)[0].removed_versions == []  # the run can be restored: kept
    client.restore_run(run.info.run_id)
    assert_loads(f"models:/{info.model_id}", expect(drop))
    client.delete_run(run.info.run_id)
    client.delete_logged_model(info.model_id)
    mlflow_gc(tracking)
    (dry,) = ml.gc(uri, grace=NOW, dry_run=True)
    assert dry.removed_versions == [2]
    (result,) = ml.gc(uri, grace=NOW)
    assert (
        result.removed_versions == [2]
        and result.bytes_removed >= sum(t.numel() * t.element_size() for t in drop.state_dict().values()) - 64
    )
    assert_loads("models:/space/1", expect(keep))
    assert_loads("models:/space/3", expect(keep))
    assert "model." + info.model_id not in ml.tags(uri)
    assert cli(["gc", "--all", "--grace-minutes", "0", "--json"]) == 0


def test_run_with_several_versions_needs_a_step_or_model_id(tracking):
    with mlflow.start_run() as run:
        infos = [ml.log_model(net(s), name="model", step=s) for s in (1, 2)]
    uri = infos[0].flavors["mlflow_lance"]["lance_uri"]
    with pytest.raises(ml.VersionNotFoundError, match="step= or model_id="):
        ml.load_state_dict(uri, run_id=run.info.run_id)
    assert_loads_sd = ml.load_state_dict(uri, run_id=run.info.run_id, step=1)
    assert torch.equal(assert_loads_sd["0.weight"], net(1)[0].weight)
    sd = ml.load_state_dict(uri, run_id=run.info.run_id, model_id=infos[1].model_id)
    assert torch.equal(sd["0.weight"], net(2)[0].weight)
    doc = sidecar.read(uri)
    assert [e["step"] for e in doc["runs"][run.info.run_id]] == [1, 2]


def test_store_gc_of_a_plain_dataset_needs_a_policy(tmp_path):
    uri = str(tmp_path / "plain.lance")
    for seed in (1, 2, 3):
        ml.save_state_dict(net(seed).state_dict(), uri)
    with pytest.raises(ValueError, match="keep_last"):
        ml.gc(uri)
    assert ml.gc(uri, keep_last=1, grace=NOW)[0].removed_versions == [1, 2]


def test_gc_through_another_tracking_server_removes_nothing(tracking, tmp_path, monkeypatch):
    """Pointed at a tracking server that never saw the dataset, "not found" means "wrong
    server": gc refuses instead of deleting everything."""
    with mlflow.start_run():
        infos = [ml.log_model(net(s), name="model", step=s) for s in (1, 2)]
    uri = infos[0].flavors["mlflow_lance"]["lance_uri"]
    other = f"sqlite:///{tmp_path}/other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    mlflow.set_tracking_uri(other)
    with pytest.raises(lifecycle.ForeignDataset, match="knows none"):
        ml.gc(uri, grace=NOW)
    assert [v.version for v in ml.versions(uri)] == [1, 2]
    assert cli(["gc", uri, "--grace-minutes", "0"]) == 3
    mlflow.set_tracking_uri(tracking["url"])


def test_attacks_found_in_review_lose_nothing(tracking, tmp_path):
    """Sequences a reviewer found: a copy whose source name is reused; a model directory saved
    with lance_uri= and registered by plain MLflow; a relative lance_uri."""
    client = MlflowClient()
    m1 = net(11)
    with mlflow.start_run():
        first = ml.log_model(m1, name="model", registered_model_name="reuse-r")
        ml.log_model(net(12), name="model", registered_model_name="reuse-r")
    client.copy_model_version("models:/reuse-r/1", "reuse-s")
    client.delete_registered_model("reuse-r")
    client.delete_logged_model(first.model_id)
    ml.gc(all=True, grace=NOW)
    with mlflow.start_run():
        ml.log_model(net(13), name="model", registered_model_name="reuse-r")  # a new reuse-r/1
    ml.gc(all=True, grace=NOW)
    assert_loads("models:/reuse-s/1", expect(m1))

    ds = str(tmp_path / "shared.lance")
    with mlflow.start_run() as run:
        for i, seed in enumerate((21, 22)):
            ml.save_model(net(seed), str(tmp_path / f"p{i}"), lance_uri=ds)
            mlflow.log_artifacts(str(tmp_path / f"p{i}"), f"m{i}")
    client.create_registered_model("saved-r")
    client.create_model_version("saved-r", source=f"{run.info.artifact_uri}/m0", run_id=run.info.run_id)
    assert ml.gc(ds, keep_last=1, grace=NOW)[0].removed_versions == []
    assert_loads("models:/saved-r/1", expect(net(21)))

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with mlflow.start_run():
            info = ml.log_model(net(31), name="model", registered_model_name="relative", lance_uri="rel/w.lance")
    finally:
        os.chdir(cwd)
    assert os.path.isabs(info.flavors["mlflow_lance"]["lance_uri"])
    assert_loads("models:/relative/1", expect(net(31)))


def test_pins_of_the_old_scheme_protect_until_gc_replaces_them(tracking):
    """A dataset pinned the old way (run.<id>, model-version.<n>): gc keeps what MLflow still
    references, replaces the old pins, and reclaims a version once MLflow lets go of it, even
    though its run still exists."""
    old, new = net(41), net(42)
    with mlflow.start_run() as run:
        first = ml.log_model(old, name="model", registered_model_name="legacy-pins")
    with mlflow.start_run():
        ml.log_model(new, name="model", registered_model_name="legacy-pins")
    uri = first.flavors["mlflow_lance"]["lance_uri"]
    for pin in [t for t in ml.tags(uri) if t.startswith(("model.", "mv."))]:
        ml.untag(uri, pin)
    ml.tag(uri, f"run.{run.info.run_id}", 1)
    ml.tag(uri, "model-version.1", 1)
    (result,) = ml.gc(uri, grace=NOW)
    assert result.removed_versions == [] and set(result.unpinned) == {
        f"run.{run.info.run_id}",
        "model-version.1",
    }
    assert not any(t.startswith(("run.", "model-version.")) for t in ml.tags(uri))
    assert_loads("models:/legacy-pins/1", expect(old))
    MlflowClient().delete_model_version("legacy-pins", "1")
    MlflowClient().delete_logged_model(first.model_id)
    assert ml.gc(uri, grace=NOW)[0].removed_versions == [1]  # its run still exists: no matter
    assert_loads("models:/legacy-pins/2", expect(new))
