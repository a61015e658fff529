"""MLflow reads every MLflow-aware module shares, and registered-model bindings.

A registered model's *binding* is a registered-model tag that survives renames: its
identity (``mlflow_lance.binding``, from the name and creation time of the model it was
first seen as) and its dataset (``mlflow_lance.dataset``). Renaming keeps both; a new model
that reuses an old name gets a new binding and a new dataset. Several writers may bind the
same model at once: a racing tag write that fails is fine when the value it wanted is there.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

from . import modeldir
from .compat import _download_artifact_from_uri
from .fs import local_path
from .modeldir import FLAVOR_NAME

BINDING_TAG = "mlflow_lance.binding"
DATASET_TAG = "mlflow_lance.dataset"


# --------------------------------------------------------------------------- reading MLflow


def model_dir_uri(uri: str) -> str:
    """The artifact URI of a model's directory, so that single files can be fetched from it.

    ``models:/...`` resolves through the registry; ``runs:/<run>/<name>`` to the newest
    logged model of that name in the run (MLflow 3), else to the run's own artifacts.
    """
    if uri.startswith("models:"):
        return ModelsArtifactRepository.get_underlying_uri(uri)
    if uri.startswith("runs:"):
        run_id, name = runs_uri(uri)
        client = MlflowClient()
        experiment_id = client.get_run(run_id).info.experiment_id
        models = client.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"name = {quote_filter(name)}"
        )
        matches = [m for m in models if m.source_run_id == run_id]
        if matches:
            newest = max(matches, key=lambda m: m.creation_timestamp)
            return ModelsArtifactRepository.get_underlying_uri(f"models:/{newest.model_id}")
    return uri


def runs_uri(uri: str) -> tuple[str, str]:
    """(run id, artifact path) of a ``runs:/<run id>/<path>`` URI (the path without slashes
    at its ends; empty if the URI names none)."""
    run_id, _, name = uri[len("runs:") :].lstrip("/").partition("/")
    return run_id, name.strip("/")


def flavor_conf(model_uri: str) -> dict | None:
    """The mlflow_lance flavor section of a model's MLmodel (fetches that one file, and reads
    it as untrusted input: see modeldir.py)."""
    with tempfile.TemporaryDirectory(prefix="mlflow_lance_") as local:
        _download_artifact_from_uri(model_dir_uri(model_uri).rstrip("/") + "/" + MLMODEL_FILE_NAME, local)
        conf = (modeldir.mlmodel(local).flavors or {}).get(FLAVOR_NAME)
        return conf if isinstance(conf, dict) else None


def quote_filter(value: str) -> str:
    """A string literal for MLflow's filter syntax (quotes in names escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def not_found(err: BaseException) -> bool:
    """True if MLflow said the thing does not exist (as opposed to any other failure), or
    that the row an update meant to change vanished under it (deleted meanwhile)."""
    return isinstance(err, MlflowException) and (
        err.error_code == "RESOURCE_DOES_NOT_EXIST" or "0 were matched" in str(err.message)
    )


def exists(lookup: Callable[..., Any], *args: Any) -> bool:
    """Whether MLflow finds the thing; False only when it says it does not exist, or refuses
    the id as malformed (ids come from a dataset's commits: a crafted one names nothing)."""
    try:
        lookup(*args)
        return True
    except MlflowException as err:
        if not_found(err) or err.error_code == "INVALID_PARAMETER_VALUE":
            return False
        raise


def paged(search: Callable[..., Any], **kwargs: Any) -> Iterator[Any]:
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def same_dataset(a: str, b: str) -> bool:
    """Whether two dataset URIs name the same dataset (local paths compared resolved)."""

    def norm(uri: str) -> str:
        local = local_path(uri)
        return os.path.realpath(local) if local is not None else uri.rstrip("/")

    return norm(a) == norm(b)


# --------------------------------------------------------------------------- bindings


def binding_id(name: str, creation_timestamp: int | None) -> str:
    """A registered model's identity: the same for every writer that sees the same model."""
    return hashlib.sha256(f"{name}\0{creation_timestamp}".encode()).hexdigest()[:12]


def racing_set(set_tag: Callable[[], object], now: Callable[[], str | None], value: str) -> None:
    """``set_tag()``, the set of a tag that concurrent writers may be setting to the same
    value: a racing insert of the same key fails on some backends, which is fine when the
    value it wanted is there (``now()`` re-reads it); "not found" and anything else raise."""
    try:
        set_tag()
    except MlflowException as err:
        if not_found(err) or now() != value:
            raise


def set_registered_tag(client: MlflowClient, name: str, key: str, value: str) -> None:
    """Set a registered-model tag that concurrent writers set to the same value."""
    racing_set(
        lambda: client.set_registered_model_tag(name, key, value),
        lambda: (client.get_registered_model(name).tags or {}).get(key),
        value,
    )


def registered(client: MlflowClient, name: str) -> bool:
    """Whether registered model ``name`` exists."""
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if not_found(err):
            return False
        raise
    return True


def bind(client: MlflowClient, name: str, *, create: bool = False) -> tuple[str, Any]:
    """(binding, registered model) of ``name``, creating either if missing.

    The binding is computed from the name and creation time, so concurrent writers that
    bind the same new model agree without coordination, and stored as a tag, so a rename
    keeps it.
    """
    try:
        rm = client.get_registered_model(name)
    except MlflowException as err:
        if not (create and not_found(err)):
            raise
        try:
            client.create_registered_model(name)
        except MlflowException as exists:
            if exists.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        rm = client.get_registered_model(name)
    binding = (rm.tags or {}).get(BINDING_TAG)
    if not binding:
        binding = binding_id(name, rm.creation_timestamp)
        set_registered_tag(client, name, BINDING_TAG, binding)
    return binding, rm


def dataset_of(client: MlflowClient, name: str, default: Callable[[str], str]) -> tuple[str, str]:
    """(binding, dataset URI) where ``log_model(registered_model_name=name)`` writes.

    The dataset the model is bound to; else the one its earliest mlflow_lance version was
    logged to (registered later, or bound before the binding existed), which then becomes
    its binding; else ``default(binding)``, a new dataset of its own.
    """
    binding, rm = bind(client, name, create=True)
    uri = (rm.tags or {}).get(DATASET_TAG)
    if not uri:
        uri = _adopt(client, name) or default(binding)
        set_registered_tag(client, name, DATASET_TAG, uri)
    return binding, uri


def _adopt(client: MlflowClient, name: str) -> str | None:
    versions = sorted(
        paged(client.search_model_versions, filter_string=f"name = {quote_filter(name)}", max_results=1000),
        key=lambda mv: int(mv.version),
    )
    for mv in versions:
        try:
            conf = flavor_conf(f"models:/{name}/{mv.version}")
        except (MlflowException, OSError):
            continue
        if conf is not None and not conf.get("self_contained") and not conf.get("state_prefix"):
            return conf["lance_uri"]  # (a checkpoint's dataset belongs to its run)
    return None
