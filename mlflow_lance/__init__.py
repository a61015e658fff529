"""mlflow-lance: PyTorch weights versioned in one Lance dataset per model, as an MLflow flavor.

The store (``save_state_dict``, ``load_into``, ``versions``, ...) works on any Lance dataset
URI; the flavor (``log_model``, ``load_model``, ...) ties its versions to MLflow runs and
registered models. ``load_state_dict`` takes either a dataset URI or an MLflow model URI.

Names are imported on first use, so ``import mlflow_lance`` (and the CLI) stays fast and
the store works without importing MLflow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)

_EXPORTS = {
    "store": [
        "CommittedError",
        "CorruptionError",
        "Diff",
        "LoadResult",
        "Problem",
        "VerifyReport",
        "VersionInfo",
        "VersionNotFoundError",
        "WeightsError",
        "diff",
        "load_into",
        "save_state_dict",
        "tag",
        "tags",
        "untag",
        "verify",
        "versions",
    ],
    "flavor": [
        "get_default_conda_env",
        "get_default_pip_requirements",
        "load_model",
        "log_model",
        "log_state_dict",
        "save_model",
    ],
    "loading": ["load_state_dict"],
    "bundle": ["bundle_model"],
    "registry": ["SyncReport", "register_model", "sync"],
    "lifecycle": ["GcResult", "gc"],
    "checkpoint": [
        "Checkpoint",
        "CheckpointHandle",
        "load_checkpoint",
        "log_checkpoint",
        "wait_for_checkpoints",
    ],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)  # the everyday API; the rest of the store's verbs live in mlflow_lance.store


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlflow_lance' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # for type checkers and IDEs (the names __all__ lists, imported on first use above)
    from .bundle import bundle_model
    from .checkpoint import (
        Checkpoint,
        CheckpointHandle,
        load_checkpoint,
        log_checkpoint,
        wait_for_checkpoints,
    )
    from .flavor import (
        get_default_conda_env,
        get_default_pip_requirements,
        load_model,
        log_model,
        log_state_dict,
        save_model,
    )
    from .lifecycle import GcResult, gc
    from .loading import load_state_dict
    from .registry import SyncReport, register_model, sync
    from .store import (
        CommittedError,
        CorruptionError,
        Diff,
        LoadResult,
        Problem,
        VerifyReport,
        VersionInfo,
        VersionNotFoundError,
        WeightsError,
        diff,
        load_into,
        save_state_dict,
        tag,
        tags,
        untag,
        verify,
        versions,
    )
