"""Every example runs end to end, as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_demo_on_embedded_defaults(tmp_path):
    out = run_example("demo.py", "--dir", str(tmp_path / "demo"), "--runs", "3", tmp_path=tmp_path)
    assert "2 of 23 tensors changed" in out and "bit-exact; verify: OK" in out
    line = next(line for line in out.splitlines() if "versions in one Lance dataset" in line)
    assert float(line.split(" = ")[1].split("x one model")[0]) < 1.2
    assert (tmp_path / "demo" / "mlflow.db").exists()


def test_resnet50_docs_scenario(tmp_path):
    out = run_example("resnet50_versions.py", "--dir", str(tmp_path / "r50"), tmp_path=tmp_path)
    assert "mlflow_lance" in out and "docs example" in out and "faster" in out
    ours = next(line for line in out.splitlines() if line.startswith("mlflow_lance "))
    after_v1, after_v2 = map(float, ours.split()[-2:])
    assert after_v2 - after_v1 < 10  # MB: only the classifier was written again


@pytest.mark.slow
def test_team_setup_on_loopback(tmp_path):
    out = run_example("team_setup.py", "--trainers", "3", tmp_path=tmp_path)
    assert "3 model versions pinned, 3 runs in the sidecar" in out and "@champion loaded" in out
