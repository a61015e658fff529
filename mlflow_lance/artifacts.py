"""Where each model's Lance dataset lives, and how to reach it.

MLflow keeps a model's small files (MLmodel, environment, architecture) in its artifact
store; the weights live in one Lance dataset per registered model under a *Lance root*:

    <Lance root>/models/<registered model name slug>-<binding>.lance
    <Lance root>/experiments/<experiment id>/<safe model name>.lance   (unregistered models)

A registered model's dataset is chosen once, when the model is first bound (lifecycle.py),
and kept in a registered-model tag, so renaming the model keeps it and a new model that
reuses a name gets a dataset of its own.

The Lance root is, in order: ``log_model(lance_uri=...)`` (a dataset URI, used as is), the
``MLFLOW_LANCE_ROOT`` environment variable, or ``<artifact root>/lance`` where the artifact
root is the experiment's artifact location without its trailing experiment id. Where that
location is a store Lance opens itself (a path, ``s3://``, ``gs://``, ``az://``) the dataset is
written there directly; where MLflow proxies it (``mlflow-artifacts:/``, the default of
``mlflow server``) or only MLflow has a repository for it (``dbfs:/``, ...), the dataset lives
at ``mlflow-artifacts:/lance/...`` and is reached through ``transport``, with no credentials on
the client. Credentials and endpoints come from the environment, as MLflow reads them
(``MLFLOW_S3_ENDPOINT_URL``, ``AWS_*``, ``AZURE_STORAGE_*``, ...); they are passed to Lance as
storage options and never written anywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from urllib.parse import urlparse

from .dataset import Dataset
from .fs import local_path, proxied

ROOT_ENV = "MLFLOW_LANCE_ROOT"


def safe_name(name: str, suffix: str | None = None) -> str:
    """A file-system and URL safe, collision-free dataset name for a model name.

    Readable slug plus ``suffix`` (a binding) or 10 hex digits of the exact name's sha256:
    names that differ only in case or punctuation get different datasets, and no name can
    traverse paths.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:64] or "model"
    if suffix is not None and not re.fullmatch(r"[0-9a-f]{6,64}", suffix):
        raise ValueError(f"binding must be hex digits, got {suffix!r}")
    return f"{slug}-{suffix or hashlib.sha256(name.encode()).hexdigest()[:10]}"


def is_dataset_target(target: str) -> bool:
    """Whether a command's TARGET names a dataset (a URI, an existing path, or a path ending
    in ``.lance``) rather than a registered model: the one rule for gc, sync and the CLI."""
    return "://" in target or os.path.exists(target) or target.endswith(".lance") or proxied(target)


def options(uri: str, explicit: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The storage options dataset ``uri`` is opened with, by one rule everywhere: those the
    environment MLflow itself reads gives for its scheme, updated key by key by ``explicit``
    ones (which win); None when there are none. Never persisted."""
    return {**_from_environment(uri), **dict(explicit or {})} or None


def _from_environment(uri: str) -> dict[str, str]:
    """Lance storage options for ``uri`` from the environment MLflow itself reads."""
    scheme = urlparse(uri).scheme
    opts: dict[str, str] = {}
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["aws_endpoint"] = endpoint
            if endpoint.startswith("http://"):
                opts["allow_http"] = "true"
        for env, key in (
            ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
            ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
            ("AWS_SESSION_TOKEN", "aws_session_token"),
        ):
            if os.environ.get(env):
                opts[key] = os.environ[env]
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        opts["aws_region"] = region or "us-east-1"
        if os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() == "true":
            opts["allow_invalid_certificates"] = "true"
    elif scheme in ("az", "abfs", "abfss", "wasb", "wasbs"):
        for env, key in (
            ("AZURE_STORAGE_ACCOUNT_NAME", "azure_storage_account_name"),
            ("AZURE_STORAGE_ACCOUNT_KEY", "azure_storage_account_key"),
            ("AZURE_STORAGE_ACCESS_KEY", "azure_storage_account_key"),
            ("AZURE_STORAGE_SAS_TOKEN", "azure_storage_sas_token"),
        ):
            if os.environ.get(env):
                opts[key] = os.environ[env]
    elif scheme in ("gs", "gcs"):
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            opts["google_service_account"] = os.environ["GOOGLE_APPLICATION_CREDENTIALS"]
    return opts


def to_lance_uri(location: str) -> str:
    """An MLflow artifact location as a URI Lance opens.

    ``wasbs://container@account.blob.core.windows.net/p`` becomes ``az://container/p`` (the
    account then comes from ``AZURE_STORAGE_ACCOUNT_NAME``); ``file:///p`` becomes ``/p``.
    """
    parsed = urlparse(location)
    if parsed.scheme in ("wasb", "wasbs", "abfs", "abfss") and "@" in parsed.netloc:
        container = parsed.netloc.partition("@")[0]
        return f"az://{container}{parsed.path}"
    if parsed.scheme == "file":
        return parsed.path
    return location


def lance_root(artifact_location: str | None, experiment_id: str | None = None) -> str:
    """The Lance root for an experiment whose artifacts go to ``artifact_location``."""
    root = os.environ.get(ROOT_ENV)
    if root:
        return to_lance_uri(root.rstrip("/"))
    if not artifact_location or urlparse(artifact_location).scheme in ("runs", "models"):
        raise ValueError(
            f"cannot place the Lance dataset: the experiment's artifact location is "
            f"{artifact_location!r}. Set {ROOT_ENV} to a URI every trainer and reader can open "
            f"(e.g. s3://bucket/mlflow-lance or /shared/mlflow-lance), or pass log_model(lance_uri=...)."
        )
    base = artifact_location.rstrip("/")
    if experiment_id and base.rsplit("/", 1)[-1] == str(experiment_id):
        base = base.rsplit("/", 1)[0]
    return to_lance_uri(base) + "/lance"


def dataset_location(
    *,
    model_name: str,
    registered: bool,
    artifact_location: str | None,
    experiment_id: str | None,
    lance_uri: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    binding: str | None = None,
) -> Dataset:
    """Where the weights of ``model_name`` go (see the module docstring for the rules)."""
    if lance_uri:
        uri = to_lance_uri(os.fspath(lance_uri))
        if local_path(uri) is not None:  # recorded in MLmodel and the registry: must not depend on the cwd
            uri = os.path.abspath(uri)
    else:
        root = lance_root(artifact_location, experiment_id)
        sub = "models" if registered else f"experiments/{experiment_id or '0'}"
        uri = f"{root}/{sub}/{safe_name(model_name, binding)}.lance"
    return Dataset(uri, options(uri, storage_options))
