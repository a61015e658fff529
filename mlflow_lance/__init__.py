"""mlflow-lance: PyTorch weights versioned in one Lance dataset, as an MLflow flavor."""

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
    load_into,
    load_state_dict,
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
    "gc",
    "load_into",
    "load_state_dict",
    "save_state_dict",
    "tag",
    "tags",
    "untag",
    "verify",
    "versions",
]
