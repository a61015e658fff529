"""Weights behind MLflow's own artifact store: a default `mlflow server` that proxies artifacts
(`mlflow-artifacts:/`), its destination a local folder or S3 (moto_server) whose credentials
only the server holds, and clients with nothing but MLFLOW_TRACKING_URI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from model_zoo import SmallCNN, trained

import mlflow_lance as ml
from conftest import running_mlflow_server
from mlflow_lance import store, transport
from mlflow_lance.cli import main as cli

HERE = Path(__file__).resolve().parent
CLIENT_ENV_DROPPED = (
    "MLFLOW_LANCE_ROOT",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
)


@pytest.fixture(scope="module", params=["local", "s3"])
def proxy_server(request, tmp_path_factory):
    """An unmodified `mlflow server` serving artifacts from a local folder or from S3."""
    root = tmp_path_factory.mktemp(f"proxy-{request.param}")
    if request.param == "local":
        dest = root / "artifacts"
        with running_mlflow_server(root, ["--artifacts-destination", str(dest)]) as url:
            yield {"url": url, "kind": "local", "bytes": lambda: _folder_bytes(dest), "dest": dest}
    else:
        s3 = request.getfixturevalue("s3_server")
        prefix = f"proxied-{os.getpid()}"
        env = {**os.environ, **s3["env"]}
        with running_mlflow_server(root, ["--artifacts-destination", f"s3://{s3['bucket']}/{prefix}"], env=env) as url:
            yield {"url": url, "kind": "s3", "bytes": lambda: _bucket_bytes(s3, prefix), "dest": None}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def _bucket_bytes(s3: dict, prefix: str) -> int:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix + "/")
    return sum(o["Size"] for page in pages for o in page.get("Contents", []))


@pytest.fixture
def client(proxy_server, tmp_path, monkeypatch):
    """This test as a client of the proxy: MLFLOW_TRACKING_URI and nothing else."""
    for name in CLIENT_ENV_DROPPED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy_server["url"])
    monkeypatch.setenv("MLFLOW_LANCE_CACHE_DIR", str(tmp_path / "cache"))
    transport._cache.clear()
    mlflow.set_tracking_uri(proxy_server["url"])
    mlflow.set_experiment(f"proxy-{tmp_path.name}")
    yield proxy_server
    mlflow.set_tracking_uri(None)
    transport._cache.clear()


def _client_env(server: dict, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV_DROPPED}
    return {
        **env,
        "MLFLOW_TRACKING_URI": server["url"],
        "MLFLOW_LANCE_CACHE_DIR": str(tmp_path / "worker-cache"),
        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),
    }


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow  # 37 s in the last full run
def test_log_register_load_checkpoint_and_gc_through_the_proxy(client, tmp_path, capsys):
    model, x = trained(SmallCNN(), 1), torch.randn(2, 3, 8, 8)
    with mlflow.start_run() as run:
        info = ml.log_model(model, name="model", registered_model_name="proxied", input_example=x.numpy())
    flavor = info.flavors["mlflow_lance"]
    assert flavor["lance_uri"].startswith("mlflow-artifacts:/lance/models/proxied-")
    MlflowClient().set_registered_model_alias("proxied", "champion", 1)
    for uri in (f"runs:/{run.info.run_id}/model", "models:/proxied/1", "models:/proxied@champion", info.model_uri):
        assert _same(ml.load_model(uri), model), uri
    pyfunc = mlflow.pyfunc.load_model("models:/proxied@champion")
    torch.testing.assert_close(torch.from_numpy(pyfunc.predict(x.numpy())), model(x).detach(), equal_nan=True)
    if client["dest"] is not None:  # the weights are in the server's destination, nowhere else
        assert list((client["dest"] / "lance" / "models").glob("proxied-*.lance/_versions/*.manifest"))

    # checkpoints, blocking and async, with retention that deletes through the proxy
    net, data = torch.nn.Linear(16, 4), torch.randn(8, 16)
    opt = torch.optim.AdamW(net.parameters())
    with mlflow.start_run() as ckpt_run:
        for step in (1, 2, 3):
            net(data).square().sum().backward()
            opt.step()
            last = ml.log_checkpoint(net, opt, step=step, keep_last=1, blocking=step != 2)
        ml.wait_for_checkpoints()
    fresh = torch.nn.Linear(16, 4)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    state = ml.load_checkpoint(f"runs:/{ckpt_run.info.run_id}/checkpoint", fresh, fresh_opt)
    assert state["step"] == 3 and _same(fresh, net)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    before = client["bytes"]()
    (result,) = ml.gc(last.lance_uri, grace=timedelta(0))  # retention unreferenced 1 and 2: gc frees them
    assert set(result.removed_versions) == {1, 2} and result.bytes_removed > 0
    assert [v.version for v in ml.versions(last.lance_uri)] == [3]
    assert client["bytes"]() < before  # space given back behind the proxy

    # the CLI, given the registered model's name
    capsys.readouterr()
    assert cli(["versions", "proxied", "--json"]) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == [1]
    assert cli(["verify", "proxied"]) == 0
    assert cli(["sync", "proxied"]) == 0
    assert cli(["diff", "proxied", "1", "1"]) == 0
    assert cli(["gc", "proxied", "--dry-run"]) == 0
    assert cli(["export", "proxied", str(tmp_path / "w.safetensors")]) == 0
    assert (tmp_path / "w.safetensors").stat().st_size > 0
    assert cli(["bundle", "models:/proxied/1", str(tmp_path / "bundle")]) == 0
    assert _same(ml.load_model(str(tmp_path / "bundle")), model)
    capsys.readouterr()


def test_a_one_tensor_change_uploads_that_tensor_and_little_else(client):
    big = {f"layer{i}.weight": torch.randn(512, 512) for i in range(6)}  # 1 MiB each
    uri = "mlflow-artifacts:/lance/experiments/dedup/w.lance"
    store.save_state_dict(big, uri)
    before, sent, got = client["bytes"](), transport.counters["uploaded"], transport.counters["fetched"]
    big["layer3.weight"] = big["layer3.weight"] + 1
    info = store.save_state_dict(big, uri)
    grown, uploaded = client["bytes"]() - before, transport.counters["uploaded"] - sent
    assert info.changed == ("layer3.weight",)
    assert 1 << 20 <= grown <= (1 << 20) + (1 << 20), grown  # the tensor plus at most 1 MiB
    assert uploaded <= (1 << 20) + (1 << 20), uploaded
    # the new data file's footer, which the save reads right back (its index scans the blob
    # descriptors), comes from the cache the upload filled: only manifests and the index travel
    assert transport.counters["fetched"] - got < 64 << 10, transport.counters["fetched"] - got


def test_reads_fetch_only_the_bytes_they_need(client):
    if client["kind"] != "local":
        pytest.skip("the gateway and the claims are the same whatever the destination: run once")
    uri = "mlflow-artifacts:/lance/experiments/reads/w.lance"
    sd = {f"t{i}": torch.full((1 << 18,), float(i)) for i in range(8)}  # 1 MiB each
    store.save_state_dict(sd, uri)
    sd2 = {**sd, "t5": sd["t5"] + 1}
    store.save_state_dict(sd2, uri)
    transport._cache.clear()
    got = transport.counters["fetched"]
    one = ml.load_state_dict(uri, 1, names="t3")
    assert list(one) == ["t3"] and torch.equal(one["t3"], sd["t3"])
    assert transport.counters["fetched"] - got <= (1 << 20) + (256 << 10)  # the tensor + metadata
    got = transport.counters["fetched"]
    assert all(torch.equal(v, sd[k]) for k, v in ml.load_state_dict(uri, 1).items())
    assert transport.counters["fetched"] - got <= 7 * (1 << 20) + (256 << 10)  # t3 came from the cache
    got = transport.counters["fetched"]
    assert all(torch.equal(v, sd2[k]) for k, v in ml.load_state_dict(uri, 2).items())
    assert transport.counters["fetched"] - got <= (1 << 20) + (256 << 10)  # only what version 1 lacked


@pytest.mark.slow
def test_four_writers_three_rounds_lose_nothing(client, tmp_path):
    if client["kind"] != "local":
        pytest.skip("the race is decided in the tracking store, the same whatever the destination: run once")
    start = time.time() + 12
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "proxy_worker.py"), "log", "racers", str(seed), "3", str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_client_env(client, tmp_path),
        )
        for seed in (1, 2, 3, 4)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) == 12
    assert sorted(r["lance_version"] for r in results) == list(range(1, 13))  # every commit its own version
    assert sorted(int(r["model_version"]) for r in results) == list(range(1, 13))
    for r in results:
        want = trained(SmallCNN(), r["seed"]).state_dict()
        for uri in (f"runs:/{r['run_id']}/model", f"models:/racers/{r['model_version']}"):
            got = ml.load_state_dict(uri)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), uri


def test_a_writer_killed_mid_upload_or_after_its_claim_blocks_nothing(client, tmp_path):
    if client["kind"] != "local":
        pytest.skip("the gateway and the claims are the same whatever the destination: run once")
    uri = "mlflow-artifacts:/lance/experiments/killed/w.lance"
    base = {"a": torch.arange(1000.0)}
    store.save_state_dict(base, uri)
    env = _client_env(client, tmp_path)

    # killed while its data files upload
    worker = subprocess.Popen(
        [sys.executable, str(HERE / "proxy_worker.py"), "save", uri, "24"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert worker.stdout.readline().strip() == "writing"
    time.sleep(1.0)
    worker.kill()
    worker.wait()

    # killed right after its claim (the commit point), before its manifest was written
    claimed = subprocess.run(
        [sys.executable, str(HERE / "proxy_worker.py"), "save", uri, "1"],
        capture_output=True,
        text=True,
        env={**env, transport.FAULT_ENV: "claimed"},
        timeout=300,
    )
    assert claimed.returncode == -signal.SIGKILL, claimed.stderr[-2000:]
    listed = [v.version for v in ml.versions(uri)]

    # the next writer rolls the claimed commit forward and commits after it
    after = store.save_state_dict({"a": torch.arange(1000.0) + 1}, uri)
    versions = [v.version for v in ml.versions(uri)]
    assert after.version == versions[-1] and len(versions) >= len(listed) + 1
    assert versions[-2] == listed[-1] + 1  # the killed writer's claimed version, finished by the next
    for v in versions:
        assert ml.load_state_dict(uri, v)  # every version loads
    assert torch.equal(ml.load_state_dict(uri)["a"], torch.arange(1000.0) + 1)

    # gc reclaims what the killed writers left: staged copies, unnamed data files
    before = client["bytes"]()
    report = store.prune(uri, keep_last=1, grace=timedelta(0))
    assert report.orphan_files >= 1 or report.removed_versions
    assert client["bytes"]() < before
    leftovers = transport.locate(uri)
    assert not [e for e in leftovers.upstream.listdir(f"{leftovers.key}/{transport.STAGED_DIR}") if not e.is_dir]
    assert torch.equal(ml.load_state_dict(uri)["a"], torch.arange(1000.0) + 1)


def test_a_server_that_does_not_answer_fails_with_a_connection_error_naming_it(monkeypatch, tmp_path):
    for name in CLIENT_ENV_DROPPED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_LANCE_HTTP_TIMEOUT", "1")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts, never answers
    stop = threading.Event()
    try:
        for sock in (closed, silent):
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
            mlflow.set_tracking_uri(url)
            started = time.monotonic()
            with pytest.raises(ConnectionError, match="127.0.0.1") as err:
                ml.load_state_dict("mlflow-artifacts:/lance/models/x.lance")
            assert "MLflow" in str(err.value)
            assert time.monotonic() - started < 30
    finally:
        stop.set()
        closed.close()
        silent.close()
        mlflow.set_tracking_uri(None)


def test_the_gateway_refuses_other_processes_and_keys_outside_the_datasets_it_opened(client):
    if client["kind"] != "local":
        pytest.skip("the gateway and the claims are the same whatever the destination: run once")
    import urllib.error
    import urllib.request

    uri = "mlflow-artifacts:/lance/experiments/guard/w.lance"
    store.save_state_dict({"a": torch.ones(3)}, uri)
    target, opts = transport.lance_target(uri)
    bucket = target.split("/")[2]
    for path, auth in (
        (f"/{bucket}/lance/experiments/guard/w.lance/_versions/", "AWS4-HMAC-SHA256 Credential=someone-else/x"),
        (f"/{bucket}/lance/experiments/other.lance/data/x.lance", f"Credential={opts['aws_access_key_id']}/x"),
        (f"/{bucket}/lance/experiments/guard/w.lance/../../other", f"Credential={opts['aws_access_key_id']}/x"),
    ):
        request = urllib.request.Request(opts["aws_endpoint"] + path, headers={"Authorization": auth})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code in (400, 403), path


def test_any_artifact_repository_mlflow_knows_carries_a_dataset(tracking, tmp_path, monkeypatch):
    """A scheme only MLflow can open (as dbfs:/ or azureml:// are), through its ArtifactRepository
    API: here a plugin scheme over a local folder, registered the way plugins are."""
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    folder = tmp_path / "plugin-store"
    folder.mkdir()

    def factory(uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> LocalArtifactRepository:
        return LocalArtifactRepository(str(folder), tracking_uri=tracking_uri)

    monkeypatch.setitem(_artifact_repository_registry._registry, "plugin-store", factory)
    uri = "plugin-store://team/lance/w.lance"
    first = {"a": torch.arange(6.0), "b": torch.ones(2, 2)}
    store.save_state_dict(first, uri)
    second = {**first, "b": torch.zeros(2, 2)}
    assert store.save_state_dict(second, uri).changed == ("b",)
    assert [v.version for v in ml.versions(uri)] == [1, 2]
    for version, want in ((1, first), (2, second)):
        got = ml.load_state_dict(uri, version)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert list(folder.glob("lance/w.lance/_versions/*.manifest"))  # the weights are in that store


def test_an_artifact_uri_naming_another_host_gets_no_credentials(client):
    """A planted MLmodel or pointer naming https://elsewhere/... is refused before any request:
    MLflow's token or password goes to the tracking server only."""
    for planted in (
        "http://203.0.113.9:80/api/2.0/mlflow-artifacts/artifacts/lance/x.lance",
        "mlflow-artifacts://203.0.113.9:80/lance/x.lance",
    ):
        with pytest.raises(ValueError, match="another host than the tracking server"):
            transport.locate(planted)
    same = client["url"].split("://", 1)[1]
    assert transport.locate(f"mlflow-artifacts://{same}/lance/x.lance").key == "lance/x.lance"
