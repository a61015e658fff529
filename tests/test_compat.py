"""The private MLflow and torch names mlflow-lance uses (compat.py) exist in what is installed."""

from __future__ import annotations

import pytest

from mlflow_lance import compat


@pytest.mark.parametrize("name", sorted(compat.PRIVATE))
def test_every_private_name_resolves_in_the_installed_versions(name):
    assert getattr(compat, name) is not None


def test_a_name_that_moved_fails_naming_it_and_the_fix(monkeypatch):
    monkeypatch.setitem(compat.PRIVATE, "_gone", "mlflow.utils.environment")
    with pytest.raises(ImportError, match=r"mlflow\.utils\.environment\._gone.*install the versions"):
        compat.resolve("_gone")


def test_names_not_listed_are_not_served():
    with pytest.raises(AttributeError):
        compat._not_a_private_name  # noqa: B018 (the attribute access is the test)
