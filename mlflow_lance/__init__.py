"""mlflow-lance: PyTorch weights versioned in one Lance dataset per model, as an MLflow flavor.

The store (``save_state_dict``, ``load_into``, ``versions``, ...) works on any Lance dataset
URI; the flavor (``log_model``, ``load_model``, ...) ties its versions to MLflow runs and
registered models. ``load_state_dict`` takes either a dataset URI or an MLflow model URI.
"""

from .flavor import get_default_pip_requirements, load_model, load_state_dict, log_model, save_model
from .registry import SyncReport, sync
from .store import (
    CorruptionError,
    Diff,
    GcReport,
    LoadResult,
    Problem,
    VerifyReport,
    VersionInfo,
    VersionNotFoundError,
    WeightsError,
    diff,
    gc,
    latest_version,
    load_into,
    save_state_dict,
    tag,
    tags,
    untag,
    verify,
    versions,
)

__version__ = "0.1.0"

__all__ = [
    "CorruptionError",
    "Diff",
    "GcReport",
    "LoadResult",
    "Problem",
    "VerifyReport",
    "VersionInfo",
    "VersionNotFoundError",
    "WeightsError",
    "diff",
    "SyncReport",
    "gc",
    "get_default_pip_requirements",
    "latest_version",
    "load_into",
    "load_model",
    "load_state_dict",
    "log_model",
    "save_model",
    "save_state_dict",
    "sync",
    "tag",
    "tags",
    "untag",
    "verify",
    "versions",
]
