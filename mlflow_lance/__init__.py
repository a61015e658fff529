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

__version__ = "0.1.0"

_EXPORTS = {
    "store": [
        "CorruptionError", "Diff", "GcReport", "LoadResult", "Problem", "VerifyReport", "VersionInfo",
        "VersionNotFoundError", "WeightsError", "diff", "latest_version", "load_into",
        "resolve_version", "save_state_dict", "tag", "tags", "untag", "verify", "versions",
    ],
    "flavor": ["get_default_conda_env", "get_default_pip_requirements", "load_model", "log_model", "log_state_dict",
               "save_model"],
    "loading": ["load_state_dict"],
    "registry": ["SyncReport", "register_model", "sync"],
    "lifecycle": ["GcResult", "gc"],
    "checkpoint": ["Checkpoint", "CheckpointHandle", "load_checkpoint", "log_checkpoint", "wait_for_checkpoints"],
}  # fmt: skip
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "Checkpoint",
    "CheckpointHandle",
    "CorruptionError",
    "Diff",
    "GcReport",
    "GcResult",
    "LoadResult",
    "Problem",
    "SyncReport",
    "VerifyReport",
    "VersionInfo",
    "VersionNotFoundError",
    "WeightsError",
    "diff",
    "gc",
    "get_default_conda_env",
    "get_default_pip_requirements",
    "latest_version",
    "load_into",
    "load_checkpoint",
    "load_model",
    "load_state_dict",
    "log_checkpoint",
    "log_model",
    "log_state_dict",
    "register_model",
    "resolve_version",
    "save_model",
    "save_state_dict",
    "sync",
    "tag",
    "tags",
    "untag",
    "verify",
    "versions",
    "wait_for_checkpoints",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlflow_lance' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # for type checkers and IDEs
    from .flavor import (
        get_default_conda_env, get_default_pip_requirements, load_model, log_model, log_state_dict, save_model,
    )  # fmt: skip
    from .loading import load_state_dict
    from .checkpoint import Checkpoint, CheckpointHandle, load_checkpoint, log_checkpoint, wait_for_checkpoints
    from .lifecycle import GcResult, gc
    from .registry import SyncReport, register_model, sync
    from .store import (
        CorruptionError, Diff, GcReport, LoadResult, Problem, VerifyReport, VersionInfo, VersionNotFoundError,
        WeightsError, diff, latest_version, load_into, resolve_version, save_state_dict, tag, tags,
        untag, verify, versions,
    )  # fmt: skip
