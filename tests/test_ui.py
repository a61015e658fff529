"""The MLflow UI shows each model version's Lance version: a real browser (Debian's headless
Chromium driven by Playwright, no browser download) against a real `mlflow server`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow
import pytest
from model_zoo import SmallCNN, trained

import mlflow_lance as ml

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-headless-shell") or "/usr/bin/chromium"
ARTIFACTS = Path(
    os.environ.get("MLFLOW_LANCE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts")
)


@pytest.fixture
def browser(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no system Chromium (apt-get install chromium); scripts/test.sh installs it")
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            viewport={"width": 1600, "height": 1200},
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield context
        context.close()


def test_registered_model_page_shows_lance_versions(tracking, browser):
    name = "ui-browser-model"
    for seed in (1, 2, 2):  # the third version re-logs identical weights
        with mlflow.start_run():
            ml.log_model(trained(SmallCNN(), seed), name="model", registered_model_name=name)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", "2")
    page = browser.new_page()
    page.goto(f"{tracking['url']}/#/models/{name}", wait_until="domcontentloaded")
    page.get_by_text("Lance version 3").first.wait_for(timeout=30_000)
    text = page.inner_text("body")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "registered-model-page.png"), full_page=True)
    for lance_version in (1, 2, 3):
        assert f"Lance version {lance_version}" in text
    assert "champion" in text
    page.goto(f"{tracking['url']}/#/models/{name}/versions/3", wait_until="domcontentloaded")
    page.get_by_text("lance.version").first.wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "model-version-page.png"), full_page=True)
    assert "0 of 9 tensors changed" in page.inner_text("body")
