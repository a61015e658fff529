"""Bookkeeping between the Lance dataset and MLflow's tracking server and model registry.

After a ``log_model``: pin the Lance version for the registered model version, put
``lance.*`` tags and a markdown description on the run, the logged model and the model
version, write the registered model's version history into its description (what the
MLflow UI shows on the registered-model page), and refresh the sidecar.

``sync(name)`` does all of that on demand from the truth: the registry's model versions
(what each one's MLmodel points at) and the dataset's commits and tags; pins what is
referenced and unpins versions whose model version was deleted.

Split from flavor.py, which keeps to MLflow's flavor contract (save, log, load, pyfunc).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.tracking.artifact_utils import _download_artifact_from_uri

from . import sidecar, store
from .artifacts import storage_options_for

FLAVOR_NAME = "mlflow_lance"
HISTORY_MARKER = "<!-- mlflow-lance history -->"


@dataclass
class SyncReport:
    """What ``sync`` found and changed."""

    dataset: str
    model_versions: dict[str, int] = field(default_factory=dict)  # model version -> Lance version
    pinned: list[str] = field(default_factory=list)
    unpinned: list[str] = field(default_factory=list)
    runs: int = 0


def model_dir_uri(uri: str) -> str:
    """The artifact URI of a model's directory, so that single files can be fetched from it.

    ``models:/...`` resolves through the registry; ``runs:/<run>/<name>`` to the newest
    logged model of that name in the run (MLflow 3), else to the run's own artifacts.
    """
    if uri.startswith("models:"):
        return ModelsArtifactRepository.get_underlying_uri(uri)
    if uri.startswith("runs:"):
        run_id, _, name = uri[len("runs:"):].lstrip("/").partition("/")
        client = MlflowClient()
        experiment_id = client.get_run(run_id).info.experiment_id
        models = client.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"name = '{name.rstrip('/')}'"
        )
        matches = [m for m in models if m.source_run_id == run_id]
        if matches:
            newest = max(matches, key=lambda m: m.creation_timestamp)
            return ModelsArtifactRepository.get_underlying_uri(f"models:/{newest.model_id}")
    return uri


def flavor_conf(model_uri: str) -> dict | None:
    """The mlflow_lance flavor section of a model's MLmodel (fetches that one file)."""
    local = tempfile.mkdtemp(prefix="mlflow_lance_")
    path = _download_artifact_from_uri(model_dir_uri(model_uri).rstrip("/") + "/" + MLMODEL_FILE_NAME, local)
    return Model.load(path).flavors.get(FLAVOR_NAME)


def _tag_dataset(uri: str, tag: str, version: int, opts: Mapping[str, str] | None) -> bool:
    """Point ``tag`` at ``version``; True if anything changed."""
    if store.tags(uri, storage_options=opts).get(tag) == version:
        return False
    store.tag(uri, tag, version, storage_options=opts)
    return True


def lance_tags(conf: Mapping) -> dict[str, str]:
    """The ``lance.*`` tags shown in the MLflow UI for one logged Lance version."""
    return {
        "lance.version": str(conf["lance_version"]),
        "lance.uri": str(conf["lance_uri"]),
        "lance.parent_version": str(conf.get("parent_version") or ""),
        "lance.tensors": str(conf.get("tensors", "")),
        "lance.tensors_changed": str(conf.get("tensors_changed", "")),
        "lance.bytes": str(conf.get("bytes", "")),
        "lance.bytes_written": str(conf.get("bytes_written", "")),
    }


def _describe(conf: Mapping) -> str:
    written, total = int(conf.get("bytes_written", 0)), int(conf.get("bytes", 0)) or 1
    parent = conf.get("parent_version")
    return (
        f"**Lance version {conf['lance_version']}** of `{conf['lance_uri']}`"
        + (f", parent version {parent}" if parent else " (first version)")
        + f". {conf.get('tensors_changed', '?')} of {conf.get('tensors', '?')} tensors changed; "
        f"{written:,} bytes written for {total:,} bytes of weights ({written / total:.1%})."
    )


def after_log(model_info, registered_model_name: str | None, opts: Mapping[str, str] | None) -> None:
    """Pin, tag, describe and refresh the sidecar after ``log_model``."""
    conf = model_info.flavors[FLAVOR_NAME]
    uri, version = conf["lance_uri"], int(conf["lance_version"])
    client = MlflowClient()
    tags = lance_tags(conf)
    mv = model_info.registered_model_version
    if registered_model_name and mv is not None:  # pin first: the rest is presentation
        _tag_dataset(uri, sidecar.model_version_tag(mv), version, opts)
    if model_info.run_id:
        client.log_batch(model_info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if model_info.model_id:
        client.set_logged_model_tags(model_info.model_id, tags)
    if registered_model_name and mv is not None:
        for key, value in tags.items():
            client.set_model_version_tag(registered_model_name, str(mv), key, value)
        client.update_model_version(registered_model_name, str(mv), description=_describe(conf))
        write_history(registered_model_name, uri, opts)
    sidecar.refresh(uri, opts)


def write_history(name: str, uri: str, opts: Mapping[str, str] | None) -> None:
    """Put the version history table into the registered model's description (kept below
    any text a person wrote above the marker)."""
    client = MlflowClient()
    infos = {v.version: v for v in store.versions(uri, storage_options=opts)}
    aliases: dict[str, list[str]] = {}
    registered = client.get_registered_model(name)
    for alias, mv in (registered.aliases or {}).items():
        aliases.setdefault(str(mv), []).append(alias)
    rows = []
    for mv, version in sorted(_model_version_tags(uri, opts).items(), key=lambda kv: -int(kv[0])):
        info = infos.get(version)
        if info is None:
            continue
        share = info.bytes_written / info.total_bytes if info.total_bytes else 0.0
        rows.append(
            f"| {mv} | {version} | {', '.join(sorted(aliases.get(mv, []))) or ''} | "
            f"`{info.properties.get('mlflow.run_id', '')[:12]}` | {len(info.changed)} of {info.num_tensors} | "
            f"{info.bytes_written:,} | {share:.1%} |"
        )
    table = "\n".join(
        [
            HISTORY_MARKER,
            f"**Weights:** Lance dataset `{uri}` (sidecar `{sidecar.sidecar_uri(uri)}`).",
            "",
            "| model version | Lance version | aliases | run | tensors changed | bytes written | written / weights |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    own = (registered.description or "").split(HISTORY_MARKER)[0].rstrip()
    client.update_registered_model(name, description=f"{own}\n\n{table}" if own else table)


def _model_version_tags(uri: str, opts: Mapping[str, str] | None) -> dict[str, int]:
    prefix = sidecar.MODEL_VERSION_TAG
    return {t[len(prefix):]: v for t, v in store.tags(uri, storage_options=opts).items() if t.startswith(prefix)}


def dataset_for_model(name: str) -> str:
    """The Lance dataset of registered model ``name`` (from its newest model version's MLmodel)."""
    try:
        live = MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException as err:
        raise LookupError(f"registered model {name!r} cannot be read from the registry: {err}") from None
    for mv in sorted(live, key=lambda m: -int(m.version)):
        conf = flavor_conf(f"models:/{name}/{mv.version}")
        if conf is not None:
            return conf["lance_uri"]
    raise LookupError(
        f"no dataset found for {name!r}: it is neither a path or URI that exists nor a registered "
        f"model with versions logged by mlflow_lance"
    )


def sync(name: str, *, lance_uri: str | None = None) -> SyncReport:
    """Reconcile registered model ``name`` with its Lance dataset and rewrite the sidecar.

    Pins (Lance tag ``model-version.<n>``) the version every live model version's MLmodel
    points at, unpins those of deleted model versions, re-applies the UI tags and history,
    and rebuilds the sidecar from the dataset's commits and tags.
    """
    client = MlflowClient()
    try:
        live = client.search_model_versions(f"name = '{name}'")
    except MlflowException as err:
        raise LookupError(f"registered model {name!r} cannot be read from the registry: {err}") from None
    pointers: dict[str, dict] = {}
    for mv in live:
        conf = flavor_conf(f"models:/{name}/{mv.version}")
        if conf is not None:
            pointers[str(mv.version)] = conf
    uris = {c["lance_uri"] for c in pointers.values()} | ({lance_uri} if lance_uri else set())
    if len(uris) != 1:
        raise LookupError(
            f"registered model {name!r} has {'no' if not uris else 'several'} mlflow_lance datasets "
            f"({', '.join(sorted(uris)) or 'none logged'}); pass lance_uri= to choose one"
        )
    uri = uris.pop()
    opts = storage_options_for(uri) or None
    report = SyncReport(dataset=uri)
    for mv, conf in pointers.items():
        if conf["lance_uri"] != uri:
            continue
        version = int(conf["lance_version"])
        report.model_versions[mv] = version
        if _tag_dataset(uri, sidecar.model_version_tag(mv), version, opts):
            report.pinned.append(sidecar.model_version_tag(mv))
        for key, value in lance_tags(conf).items():
            client.set_model_version_tag(name, mv, key, value)
    for mv in _model_version_tags(uri, opts):
        if mv not in report.model_versions:
            store.untag(uri, sidecar.model_version_tag(mv), storage_options=opts)
            report.unpinned.append(sidecar.model_version_tag(mv))
    if report.model_versions:
        write_history(name, uri, opts)
    doc = sidecar.refresh(uri, opts, force=True)
    report.runs = len(doc["runs"])
    return report

