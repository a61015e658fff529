"""``load_state_dict`` for any URI, importing MLflow only when the URI is MLflow's.

A Lance dataset URI (a path, ``s3://``, ...) is read by the store alone, at a version, a tag,
or the version a run logged (found through the sidecar, no tracking server). ``runs:/``,
``models:/``, ``mlflow-artifacts:`` and local model directories go through the flavor, which
reads the model's MLmodel (or a ``log_state_dict`` pointer) to find the dataset and version.
A fresh process that loads a dataset never pays MLflow's import (about a second here), nor,
for a local dataset whose version index checks out, Lance's (see index.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from . import fs, store
from .artifacts import options

_MLFLOW_SCHEMES = ("runs", "models")


def is_mlflow_uri(uri: str) -> bool:
    """An MLflow model URI or a local MLflow model directory, as opposed to a dataset (one rule
    a planted MLmodel cannot flip: a directory with ``_versions/`` is a dataset, see modeldir)."""
    from .modeldir import kind

    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme in _MLFLOW_SCHEMES:
        return True
    if fs.proxied(uri):  # an artifact URI: a dataset if it has versions, else a model directory
        return not fs.list_names(fs.join(uri, "_versions"))
    return kind(uri) == "model"


def load_state_dict(
    uri: str | os.PathLike,
    version: store.Version | None = None,
    *,
    map_location: str | torch.device | None = None,
    names: str | list[str] | None = None,
    storage_options: Mapping[str, str] | None = None,
    verify: bool = False,
    run_id: str | None = None,
    step: int | None = None,
    model_id: str | None = None,
) -> Any:
    """Load the weights of a Lance dataset URI or an MLflow model URI, straight from Lance.

    The weights come back as a state dict, or as the checkpoint dict that was saved.

    Args:
        uri: a dataset URI (a path, ``s3://``, ...), an MLflow model URI (``runs:/``,
            ``models:/``, ``mlflow-artifacts:``), a local model directory, or the artifact URI
            of a ``log_state_dict`` artifact in any form MLflow hands out
            (``mlflow.get_artifact_uri("ckpt")``: a path, ``file://``, ``s3://``, ...).
        version: for a dataset: a version number or a tag (default: the latest).
        map_location: the device the tensors go to (default CPU: local datasets come back as
            copy-on-write memory maps, no copy).
        names: a list of keys, or one string that is a prefix or a glob; only their bytes are read.
        storage_options: for object storage; merged over what the environment gives.
        verify: rehash every byte read (and return private memory instead of maps).
        run_id / step / model_id: for a dataset: the version a run logged (with ``step=`` or
            ``model_id=`` when it logged several), found through the sidecar, no tracking server.

    Returns:
        An OrderedDict of tensors in saved order, or the checkpoint dict that was saved.

    Raises:
        VersionNotFoundError: no such version, tag, run or tensor (the message lists what exists).
        CorruptionError: the version's files or metadata are damaged or crafted; nothing loaded.
        FileNotFoundError: nothing was saved at ``uri``.

    Example:
        >>> sd = load_state_dict("models:/churn@champion", names="encoder.*")
        >>> sd = load_state_dict("weights.lance", "best", map_location="cuda:0")
    """
    uri = os.fspath(uri)
    if is_mlflow_uri(uri):
        if run_id is not None:
            raise ValueError(f"{uri} names one model; run_id= selects a version of a dataset URI")
        from .modelload import model_state_dict as from_model

        return from_model(uri, version, map_location=map_location, names=names, verify=verify)
    opts = options(uri, storage_options)
    if run_id is not None:
        if version is not None:
            raise ValueError("pass either version= or run_id=, not both")
        from . import sidecar  # YAML: only a run's version needs the sidecar

        version = sidecar.version_for_run(uri, run_id, opts, step=step, model_id=model_id)
    try:
        return store.read_state_dict(
            uri, version, map_location=map_location, names=names, storage_options=opts, verify=verify
        )
    except FileNotFoundError:
        from .modeldir import kind

        if version is not None or kind(uri) == "dataset":  # a planted pointer never turns a dataset into one
            raise
        from .modelload import state_dict_pointer  # not a dataset: perhaps a log_state_dict artifact

        pointer = state_dict_pointer(uri)
        if pointer is None:
            raise
    dataset, version = pointer
    return store.read_state_dict(
        dataset, version, map_location=map_location, names=names, storage_options=options(dataset), verify=verify
    )
