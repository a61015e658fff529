"""One dataset per registered model: the shim, the sidecar, pins, object storage on a real
S3-compatible server, and several trainers logging into one model at the same moment."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from model_zoo import SmallCNN, trained

import mlflow_lance as ml
from mlflow_lance import artifacts, fs, sidecar, store

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- the shim


def test_dataset_names_are_safe_and_collision_free():
    names = ["churn", "Churn", "churn!", "churn?", "../../etc/passwd", "a/b", "a\\b", "my model", "my-model"]
    safe = [artifacts.safe_name(n) for n in names]
    assert len(set(safe)) == len(names)
    assert all("/" not in s and "\\" not in s and ".." not in s and " " not in s for s in safe)
    assert artifacts.safe_name("churn") == "churn-" + hashlib.sha256(b"churn").hexdigest()[:10]  # the same everywhere
    assert artifacts.safe_name("churn", "3f9a1c0b2e4d") == "churn-3f9a1c0b2e4d"  # a binding names it instead
    with pytest.raises(ValueError, match="non-empty"):
        artifacts.safe_name("  ")


def test_lance_root_follows_the_artifact_location(monkeypatch):
    monkeypatch.delenv("MLFLOW_LANCE_ROOT", raising=False)
    loc = artifacts.dataset_location(
        model_name="churn", registered=True, artifact_location="s3://bucket/mlflow/7", experiment_id="7"
    )
    assert loc.uri == f"s3://bucket/mlflow/lance/models/{artifacts.safe_name('churn')}.lance"
    loc = artifacts.dataset_location(
        model_name="m", registered=False, artifact_location="file:///srv/mlruns/3", experiment_id="3"
    )
    assert loc.uri == f"/srv/mlruns/lance/experiments/3/{artifacts.safe_name('m')}.lance"
    loc = artifacts.dataset_location(  # proxied: behind the tracking server's artifact store (transport)
        model_name="m", registered=True, artifact_location="mlflow-artifacts:/1", experiment_id="1"
    )
    assert loc.uri == f"mlflow-artifacts:/lance/models/{artifacts.safe_name('m')}.lance"
    with pytest.raises(ValueError, match="Set MLFLOW_LANCE_ROOT"):
        artifacts.dataset_location(model_name="m", registered=True, artifact_location="runs:/x/y", experiment_id="1")
    monkeypatch.setenv("MLFLOW_LANCE_ROOT", "s3://other/root/")
    loc = artifacts.dataset_location(
        model_name="m", registered=True, artifact_location="mlflow-artifacts:/1", experiment_id="1"
    )
    assert loc.uri.startswith("s3://other/root/models/")


def test_storage_options_come_from_mlflows_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    opts = artifacts.options("s3://b/x.lance")
    assert opts["aws_endpoint"] == "http://127.0.0.1:9000" and opts["allow_http"] == "true"
    assert opts["aws_access_key_id"] == "id" and opts["aws_secret_access_key"] == "secret"
    assert artifacts.options("/local/x.lance") is None
    assert artifacts.options("s3://b/x.lance", {"aws_region": "eu-west-1"})["aws_secret_access_key"] == "secret"
    assert artifacts.options("s3://b/x.lance", {"aws_access_key_id": "mine"})["aws_access_key_id"] == "mine"
    assert repr(store.Dataset("s3://b/x", opts)).count("secret") == 0


# --------------------------------------------------------------------------- sidecar and pins


def _log(name: str, seed: int) -> tuple[str, dict]:
    with mlflow.start_run() as run:
        info = ml.log_model(trained(SmallCNN(), seed), name="model", registered_model_name=name)
    return run.info.run_id, info.flavors["mlflow_lance"]


def _model_versions(doc: dict, name: str) -> dict[str, int]:
    """model version -> Lance version for registered model ``name`` in a sidecar document."""
    (entry,) = [e for e in doc["registered_models"].values() if e["name"] == name]
    return {mv: e["lance_version"] for mv, e in entry["versions"].items()}


def _run_versions(doc: dict) -> dict[str, int]:
    """run -> its only Lance version (these runs log one model each)."""
    return {r: e["lance_version"] for r, (e,) in doc["runs"].items()}


def test_sidecar_maps_runs_and_model_versions_and_survives_damage(tracking, monkeypatch):
    logged = [_log("sidecar-model", seed) for seed in (1, 2, 3)]
    uri = logged[0][1]["lance_uri"]
    path = Path(sidecar.sidecar_uri(uri))
    doc = yaml.safe_load(path.read_text())
    assert doc["lance_latest_version"] == 3
    assert _run_versions(doc) == {r: c["lance_version"] for r, c in logged}
    assert _model_versions(doc, "sidecar-model") == {"1": 1, "2": 2, "3": 3}
    assert {e["lance_version"] for e in doc["logged_models"].values()} == {1, 2, 3}
    assert path.read_text().startswith("# Written by mlflow-lance")

    # no tracking server needed: the sidecar alone finds a run's version
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    for damage in ("delete", "truncate", "garbage", "stale"):
        if damage == "delete":
            path.unlink()
        elif damage == "truncate":
            path.write_text(path.read_text()[:40])
        elif damage == "garbage":
            path.write_text("runs: [unclosed\n  - {")
        else:
            stale = yaml.safe_load(path.read_text())
            stale["runs"] = {}
            stale["lance_latest_version"] = 1
            path.write_text(yaml.safe_dump(stale))
        damaged = path.read_bytes() if path.exists() else None
        for seed, (run_id, _) in zip((1, 2, 3), logged, strict=True):
            got = ml.load_state_dict(uri, run_id=run_id)
            assert torch.equal(got["head.weight"], trained(SmallCNN(), seed).head.weight), damage
        assert (path.read_bytes() if path.exists() else None) == damaged  # rebuilt in memory: a read writes nothing
        sidecar.refresh(uri)  # a write (log_model, sync, gc) rebuilds it
        rebuilt = yaml.safe_load(path.read_text())
        assert set(rebuilt["runs"]) == {r for r, _ in logged}
        assert _model_versions(rebuilt, "sidecar-model") == {"1": 1, "2": 2, "3": 3}
    with pytest.raises(ml.VersionNotFoundError, match="no stored version"):
        ml.load_state_dict(uri, run_id="0" * 32)


def test_pinned_versions_survive_gc_and_sync_unpins_deleted_model_versions(tracking):
    logged = [_log("pinned-model", seed) for seed in (4, 5, 6)]
    uri = logged[0][1]["lance_uri"]
    ml.save_state_dict(trained(SmallCNN(), 7).state_dict(), uri)  # an unreferenced version
    ml.save_state_dict(trained(SmallCNN(), 8).state_dict(), uri)
    binding = MlflowClient().get_registered_model("pinned-model").tags["mlflow_lance.binding"]
    tags = ml.tags(uri)
    assert sorted(v for t, v in tags.items() if t.startswith("model.")) == [1, 2, 3]
    assert {tags[sidecar.model_version_pin(binding, n)] for n in "123"} == {1, 2, 3}
    assert ml.gc(uri, keep_last=1, grace=timedelta(0))[0].removed_versions == [4]
    MlflowClient().delete_model_version("pinned-model", "2")
    (report,) = ml.sync("pinned-model")
    assert report.unpinned == [sidecar.model_version_pin(binding, 2)] and report.model_versions == {
        "1": 1,
        "3": 3,
    }
    assert sidecar.model_version_pin(binding, 2) not in ml.tags(uri)
    assert sorted(v for t, v in ml.tags(uri).items() if t.startswith("model.")) == [
        1,
        2,
        3,
    ]  # logged models live
    doc = sidecar.read(uri)
    assert _model_versions(doc, "pinned-model") == {"1": 1, "3": 3} and len(doc["runs"]) == 3
    for mv, seed in (("1", 4), ("3", 6)):
        got = ml.load_state_dict(f"models:/pinned-model/{mv}")
        assert torch.equal(got["head.weight"], trained(SmallCNN(), seed).head.weight)


def test_ui_tags_and_descriptions(tracking):
    run_id, conf = _log("ui-model", 9)
    _log("ui-model", 9)  # identical weights: nothing written
    client = MlflowClient()
    run_tags = client.get_run(run_id).data.tags
    assert run_tags["lance.version"] == "1" and run_tags["lance.uri"] == conf["lance_uri"]
    mv2 = client.get_model_version("ui-model", "2")
    assert mv2.tags["lance.version"] == "2" and mv2.tags["lance.tensors_changed"] == "0"
    assert "Lance version 2" in mv2.description and "parent version 1" in mv2.description
    history = client.get_registered_model("ui-model").description
    assert "| 2 | 2 |" in history and "| 1 | 1 |" in history and "| 0 | 0.0% |" in history
    assert (
        client.get_logged_model(conf.get("model_id") or client.get_run(run_id).outputs.model_outputs[0].model_id).tags[
            "lance.version"
        ]
        == "1"
    )


# --------------------------------------------------------------------------- concurrency


def _writers(name: str, seeds: list[int], env: dict, tmp: Path) -> list[dict]:
    """Writers that start logging together: once every one is ready (imports done, run
    started), whatever that took, not at a time guessed in advance."""
    go = tmp / f"go-{name}-{seeds[0]}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "writer.py"), name, str(seed), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env, "PYTHONPATH": str(HERE)},
        )
        for seed in seeds
    ]
    deadline = time.monotonic() + 600  # stands for a hang, not a pace
    while not all(Path(f"{go}.{seed}.ready").exists() for seed in seeds):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            go.touch()
            break  # a writer that died or hung: its communicate() below says how
        time.sleep(0.05)
    go.touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _check_round(name: str, results: list[dict], expected_versions: int, opts: dict | None = None) -> None:
    uri = results[0]["uri"]
    assert {r["uri"] for r in results} == {uri}
    versions = ml.versions(uri, storage_options=opts)
    assert len(versions) == expected_versions
    assert len({r["lance_version"] for r in results}) == len(results)
    assert len({r["model_version"] for r in results}) == len(results)
    doc = sidecar.refresh(uri, opts)
    for r in results:
        assert [e["lance_version"] for e in doc["runs"][r["run_id"]]] == [r["lance_version"]]
        assert _model_versions(doc, name)[r["model_version"]] == r["lance_version"]
        want = trained(SmallCNN(), r["seed"]).state_dict()
        for got in (
            ml.load_state_dict(f"runs:/{r['run_id']}/model"),
            ml.load_state_dict(f"models:/{name}/{r['model_version']}"),
        ):
            assert all(torch.equal(got[k], want[k]) for k in want)
    assert len(MlflowClient().search_model_versions(f"name='{name}'")) == expected_versions


@pytest.mark.slow  # 42 s in the last full run
def test_four_trainers_log_into_one_model_at_once_on_local_disk(any_backend, tmp_path):
    """On SQLite and on PostgreSQL: every round 4 Lance versions, 4 model versions, no loss."""
    name = "concurrent-local"
    env = {"MLFLOW_TRACKING_URI": any_backend["url"], "MLFLOW_LANCE_ROOT": os.environ["MLFLOW_LANCE_ROOT"]}
    for round_ in range(3):
        results = _writers(name, [10 * round_ + i for i in range(4)], env, tmp_path)
        _check_round(name, results, expected_versions=4 * (round_ + 1))


# --------------------------------------------------------------------------- object storage


def test_s3_server_honours_conditional_writes(s3_server):
    """Lance's safe concurrent commits on S3 need put-if-not-exists (If-None-Match: *)."""
    from botocore.exceptions import ClientError

    s3, bucket = s3_server["client"], s3_server["bucket"]
    s3.put_object(Bucket=bucket, Key="cond/x", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket=bucket, Key="cond/x", Body=b"second", IfNoneMatch="*")
    assert err.value.response["Error"]["Code"] in ("PreconditionFailed", "412")
    assert s3.get_object(Bucket=bucket, Key="cond/x")["Body"].read() == b"first"


@pytest.mark.slow  # 45 s in the last full run
def test_team_setup_on_s3(team_server, monkeypatch, tmp_path):
    """Tracking server with a SQL backend, artifacts and Lance datasets on S3-compatible storage."""
    for k, v in team_server["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_LANCE_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server["url"])
    mlflow.set_tracking_uri(team_server["url"])
    mlflow.set_experiment("team-s3")
    try:
        name = "team-model"
        run_id, conf = _log(name, 20)
        assert conf["lance_uri"].startswith(f"s3://{team_server['bucket']}/mlflow/lance/models/")
        MlflowClient().set_registered_model_alias(name, "champion", "1")
        want = trained(SmallCNN(), 20)
        for uri in (f"runs:/{run_id}/model", f"models:/{name}@champion"):
            loaded = ml.load_model(uri)
            assert all(
                torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), want.state_dict().values(), strict=True)
            )
        opts = artifacts.options(conf["lance_uri"])
        assert (
            ml.load_state_dict(conf["lance_uri"], run_id=run_id, storage_options=opts).keys()
            == want.state_dict().keys()
        )
        keys = [
            o["Key"]
            for o in team_server["client"].list_objects_v2(Bucket=team_server["bucket"], Prefix="mlflow/")["Contents"]
        ]
        assert any(k.endswith(".lance.yaml") for k in keys) and any("/_versions/" in k for k in keys)
        assert not any(k.endswith(".pt") or k.endswith(".pth") for k in keys)
        for round_ in range(2):
            results = _writers(
                name,
                [30 + 10 * round_ + i for i in range(4)],
                {"MLFLOW_TRACKING_URI": team_server["url"], **team_server["env"]},
                tmp_path,
            )
            _check_round(name, results, expected_versions=1 + 4 * (round_ + 1), opts=opts)
        _assert_no_credentials_written(team_server, name, conf["lance_uri"], run_id, opts)
    finally:
        mlflow.set_tracking_uri(None)


def _assert_no_credentials_written(team_server: dict, name: str, uri: str, run_id: str, opts: dict) -> None:
    """The keys used above appear in no MLmodel, artifact, sidecar, tag, description, commit or log."""
    client = MlflowClient()
    texts = [
        client.get_registered_model(name).description or "",
        json.dumps(client.get_run(run_id).data.tags),
    ]
    for mv in client.search_model_versions(f"name='{name}'"):
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}")
        texts += [p.read_bytes().decode("latin-1") for p in Path(local).rglob("*") if p.is_file()]
        texts.append(json.dumps(mv.tags) + (mv.description or ""))
    texts.append(fs.read_text(sidecar.sidecar_uri(uri), opts, limit=sidecar.MAX_SIDECAR_BYTES))
    texts += [json.dumps(v.properties) + (v.message or "") for v in ml.versions(uri, storage_options=opts)]
    texts.append((team_server["root"] / "server.log").read_text(errors="ignore"))
    for secret in (team_server["env"]["AWS_SECRET_ACCESS_KEY"], team_server["env"]["AWS_ACCESS_KEY_ID"]):
        assert not any(secret in t for t in texts)
