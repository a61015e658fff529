"""Real services for the tests: `mlflow server` processes (SQLite or PostgreSQL backend), a
throwaway PostgreSQL cluster and an S3-compatible server, all on 127.0.0.1."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import corpus
import pytest

BIN = Path(sys.executable).parent
_OUTCOMES: dict[str, int] = {}
_SECONDS: dict[str, float] = {}  # test id -> seconds (setup, call and teardown together)
_SLOW: set[str] = set()  # the ids marked slow
_STARTED = time.time()
ARTIFACTS = Path(
    os.environ.get("MLFLOW_LANCE_TEST_ARTIFACTS") or Path(__file__).resolve().parent.parent / "test-artifacts"
)
_CORPUS_FAILED: list[str] = []


def raw(t) -> bytes:
    """The exact bytes of a tensor, for bit-exact comparisons (NaN payloads included)."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b""


def run_fuzzer(cmd: list[str], timeout: float, **kwargs) -> dict:
    """Run a fuzzer worker (under its prlimit) and return the JSON report it prints last; a hang
    or a death fails the test naming the last case the worker started."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as err:
        last = (err.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
        pytest.fail(f"the fuzzer hung; last case started: {last}")
    last_case = [ln for ln in done.stderr.splitlines() if ln.startswith("case ")][-1:]
    assert done.returncode == 0, f"the fuzzer died ({done.returncode}) in {last_case}: {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def in_subprocess(code: str, timeout: float = 90, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (a hang, an abort or a signal cannot take the test
    run with it); the JSON it prints last. A hang fails the test naming the timeout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)]), **(env or {})},
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout:.0f}s")
    died = f" ({signal.Signals(-out.returncode).name})" if out.returncode < 0 else ""
    assert out.returncode == 0, f"exit {out.returncode}{died}: {out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _global_random_state():
    """Every test leaves the global random generators (torch, numpy, random) as it found
    them, however it seeds them."""
    import random

    import numpy as np
    import torch

    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(saved[0])
    np.random.set_state(saved[1])
    random.setstate(saved[2])


def pytest_runtest_logreport(report) -> None:
    """Count how tests ended (run.json), and the corpus tests that failed (a case that ended
    unsafe or wrong)."""
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _OUTCOMES[report.outcome] = _OUTCOMES.get(report.outcome, 0) + 1
    _SECONDS[report.nodeid] = _SECONDS.get(report.nodeid, 0.0) + report.duration
    if "slow" in report.keywords:
        _SLOW.add(report.nodeid)
    if report.failed and report.nodeid.split("::")[0].endswith(corpus.CORPUS_FILES):
        _CORPUS_FAILED.append(report.nodeid)


def report(name: str, key: str, value: object) -> None:
    """Merge ``key: value`` into the report ``test-artifacts/<name>`` (figures that
    scripts/docs.py renders into docs/reliability.md), counted from what the test ran."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc[key] = value
    _write_json(path, doc, sort_keys=True)


def _write_json(path: Path, doc: object, **kwargs) -> None:
    """Write ``path`` whole or not at all (a temp file renamed over it), so that another test
    run beside this one, writing to the same test-artifacts/, never reads half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, **kwargs))
    os.replace(tmp, path)


def pytest_sessionfinish(session) -> None:
    """Write the corpus tally (test-artifacts/untrusted.json) when corpus cases ran, what this
    run was (run.json: when, on what, with what, and how many tests ended how) and how long
    each test took (durations.json: every test id with its seconds, setup and teardown
    included, slowest first; which are marked slow)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if corpus.OUTCOMES:
        _write_json(ARTIFACTS / "untrusted.json", corpus.report(_CORPUS_FAILED))
    import importlib.metadata
    import platform

    versions = {}
    for dist in ("torch", "pylance", "mlflow", "mlflow-lance"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    run = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - _STARTED),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": versions,
        "tests": dict(sorted(_OUTCOMES.items())),
        "selection": " ".join(session.config.invocation_params.args),
    }
    _write_json(ARTIFACTS / "run.json", run)
    durations = {
        "date": run["date"],
        "selection": run["selection"],
        "seconds": {k: round(v, 2) for k, v in sorted(_SECONDS.items(), key=lambda kv: (-kv[1], kv[0]))},
        "slow": sorted(_SLOW),
        "not_slow_total_seconds": round(sum(v for k, v in _SECONDS.items() if k not in _SLOW)),
        "slow_total_seconds": round(sum(v for k, v in _SECONDS.items() if k in _SLOW)),
    }
    _write_json(ARTIFACTS / "durations.json", durations)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90.0, expect: bytes | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and (expect is None or expect in r.read()):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    """Stop exactly this process and the workers it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def running_mlflow_server(root: Path, artifact_args: list[str], env: dict | None = None, backend: str | None = None):
    """`mlflow server` on ``backend`` (default: SQLite under ``root``); yields its URL, then stops it.

    Its job runner (MLflow 3's GenAI jobs: nine huey worker processes per server, none of them
    in the artifact or registry path) is off, unless ``env`` turns it on."""
    port = free_port()
    env = {**(os.environ if env is None else env)}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    backend = backend or f"sqlite:///{root}/mlflow.db"
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                backend,
                *artifact_args,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/health", proc, expect=b"OK")
            yield url
        finally:
            stop(proc)


def _pg_bin(tool: str) -> str:
    found = shutil.which(tool) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's {tool} is not installed (apt-get install postgresql); scripts/test.sh does it"
        )
    return found


@contextlib.contextmanager
def running_postgres():
    """A throwaway PostgreSQL cluster made with initdb and started with pg_ctl on a loopback
    port, in a temp dir; yields a SQLAlchemy URI of an empty database, then removes it all.
    PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user."""
    as_root = os.geteuid() == 0
    user = "postgres" if as_root else pwd.getpwuid(os.geteuid()).pw_name
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    base = Path(tempfile.mkdtemp(prefix="mlflow-lance-pg-"))
    data, port = base / "data", free_port()
    if as_root:
        shutil.chown(base, "postgres")
    try:
        subprocess.run(
            [*run_as, _pg_bin("initdb"), "-D", str(data), "-U", user, "-A", "trust", "--no-sync"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *run_as,
                _pg_bin("pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(base / "pg.log"),
                "-w",
                "-o",
                f"-h 127.0.0.1 -p {port} -k {base} -F",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        try:
            subprocess.run(
                [*run_as, _pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, "mlflow"],
                check=True,
                capture_output=True,
            )
            yield f"postgresql+psycopg2://{user}@127.0.0.1:{port}/mlflow"
        finally:
            subprocess.run(
                [*run_as, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite backend and proxied artifacts; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with running_mlflow_server(root, ["--artifacts-destination", str(root / "artifacts")]) as url:
        yield {"url": url, "root": root, "backend": f"sqlite:///{root}/mlflow.db"}


@pytest.fixture(scope="session")
def postgres_mlflow_server(tmp_path_factory):
    """`mlflow server` on a real PostgreSQL backend (a throwaway cluster), proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow_pg_server")
    with running_postgres() as backend:
        with running_mlflow_server(root, ["--artifacts-destination", str(root / "artifacts")], backend=backend) as url:
            yield {"url": url, "root": root, "backend": backend}


def _point_at(server: dict, tmp_path: Path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["url"])
    monkeypatch.setenv("MLFLOW_LANCE_ROOT", str(tmp_path / "lance"))
    mlflow.set_tracking_uri(server["url"])
    mlflow.set_experiment(f"test-{tmp_path.name}")


@pytest.fixture
def tracking(mlflow_server, tmp_path, monkeypatch):
    """Point this test's MLflow client (and its subprocesses) at the server; Lance root in tmp."""
    import mlflow

    _point_at(mlflow_server, tmp_path, monkeypatch)
    yield mlflow_server
    mlflow.set_tracking_uri(None)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_backend(request, tmp_path, monkeypatch):
    """`tracking`, once against each SQL backend the README's team setup names."""
    import mlflow

    server = request.getfixturevalue("mlflow_server" if request.param == "sqlite" else "postgres_mlflow_server")
    _point_at(server, tmp_path, monkeypatch)
    yield server
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto_server) on 127.0.0.1 with a fresh bucket."""
    import boto3

    root = tmp_path_factory.mktemp("s3")
    port = free_port()
    log = open(root / "moto.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/", proc, timeout=60)
        env = {
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test-key-id-for-moto",
            "AWS_SECRET_ACCESS_KEY": "test-secret-for-moto-0123456789",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket="mlflow-team")
        yield {"endpoint": endpoint, "env": env, "client": s3, "bucket": "mlflow-team"}
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="session")
def team_server(s3_server, tmp_path_factory):
    """The team setup on loopback: `mlflow server` (SQL backend) whose artifact root is on S3;
    clients write artifacts straight to S3, and the Lance root follows the artifact root."""
    root = tmp_path_factory.mktemp("team")
    artifacts = ["--default-artifact-root", f"s3://{s3_server['bucket']}/mlflow", "--no-serve-artifacts"]
    with running_mlflow_server(root, artifacts, env={**os.environ, **s3_server["env"]}) as url:
        yield {"url": url, "root": root, **s3_server}
