"""The documentation: the generated pages match the reports they were rendered from, every
relative link points at a file that exists, and the README stays a quickstart."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_pages_match_their_reports():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "docs.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_every_relative_link_points_at_a_file():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert not broken, broken


def test_the_readme_is_a_quickstart():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "bash scripts/test.sh" in text and "examples/demo.py" in text  # the two set-up commands


def test_a_run_keeps_every_tests_seconds_and_docs_copies_them(tmp_path):
    """conftest.py writes durations.json (every test id with its seconds, the slow ones named)
    at the end of a run; scripts/docs.py copies it into docs/reports/ with the run's reports."""
    ids = [
        "tests/test_docs.py::test_the_readme_is_a_quickstart",
        "tests/test_docs.py::test_every_relative_link_points_at_a_file",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_LANCE_TEST_ARTIFACTS": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout[-2000:]
    doc = json.loads((tmp_path / "durations.json").read_text())
    assert sorted(doc["seconds"]) == sorted(ids) and all(isinstance(s, float) for s in doc["seconds"].values())
    assert doc["slow"] == [] and doc["slow_total_seconds"] == 0
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import docs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert "durations.json" in docs.TEST_REPORTS  # copied with run.json by a full run's `python scripts/docs.py`
