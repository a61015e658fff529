"""Bookkeeping between the Lance datasets and MLflow's tracking server and model registry.

After a ``log_model`` (or ``register_model``): pin the Lance version for the registered model
version, put ``lance.*`` tags and a markdown description on the run, the logged model and the
model version, write the registered model's version history into its description (what the
MLflow UI shows on the registered-model page), and refresh the sidecar. Versions of the model
that were registered or copied with plain MLflow calls are caught up at the same time.

``sync`` does all of that on demand from the truth (lifecycle.py reads what MLflow
references); ``sync`` of one registered model only ever adds or removes that model's pins.

Split from flavor.py, which keeps to MLflow's flavor contract (save, log, load, pyfunc).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from . import lifecycle, sidecar, store
from .artifacts import storage_options_for
from .lifecycle import DATASET_TAG, FLAVOR_NAME, References, flavor_conf

HISTORY_MARKER = "<!-- mlflow-lance history -->"


@dataclass
class SyncReport:
    """What ``sync`` found and changed in one dataset."""

    dataset: str
    registered_model: str | None = None
    model_versions: dict[str, int] = field(default_factory=dict)  # model version -> Lance version
    pinned: list[str] = field(default_factory=list)
    unpinned: list[str] = field(default_factory=list)
    runs: int = 0
    skipped: str | None = None  # why this dataset was left alone (``all=True`` only)


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


def _conf(uri: str, info: store.VersionInfo) -> dict[str, Any]:
    """The flavor-conf figures of a stored version (what the UI shows), from its commit."""
    return {
        "lance_uri": uri, "lance_version": info.version, "parent_version": info.parent,
        "tensors": info.num_tensors, "tensors_changed": len(info.changed), "bytes": info.total_bytes,
        "bytes_written": info.bytes_written,
    }  # fmt: skip


def _describe(conf: Mapping) -> str:
    written, total = int(conf.get("bytes_written", 0)), int(conf.get("bytes", 0)) or 1
    parent = conf.get("parent_version")
    return (
        f"**Lance version {conf['lance_version']}** of `{conf['lance_uri']}`"
        + (f", parent version {parent}" if parent else " (first version)")
        + f". {conf.get('tensors_changed', '?')} of {conf.get('tensors', '?')} tensors changed; "
        f"{written:,} bytes written for {total:,} bytes of weights ({written / total:.1%})."
    )


def _pin(uri: str, pin: str, version: int, opts: Mapping[str, str] | None) -> bool:
    """Point ``pin`` at ``version``; True if anything changed."""
    if store.tags(uri, storage_options=opts).get(pin) == version:
        return False
    store.tag(uri, pin, version, storage_options=opts)
    return True


def _present_version(client: MlflowClient, name: str, version: str, conf: Mapping) -> None:
    """The ``lance.*`` tags and the description of one model version. Another writer may be
    setting the same values at the same moment (its own version, our catch-up): a racing
    insert that fails is fine when the value it wanted is there."""
    for key, value in lance_tags(conf).items():
        try:
            client.set_model_version_tag(name, version, key, value)
        except MlflowException:
            if (client.get_model_version(name, version).tags or {}).get(key) != value:
                raise
    client.update_model_version(name, version, description=_describe(conf))


def after_log(model_info, registered_model_name: str | None, binding: str | None,
              opts: Mapping[str, str] | None) -> None:  # fmt: skip
    """Pin, tag, describe and refresh the sidecar after ``log_model``."""
    conf = model_info.flavors[FLAVOR_NAME]
    uri, version = conf["lance_uri"], int(conf["lance_version"])
    client = MlflowClient()
    mv = model_info.registered_model_version
    registered = registered_model_name is not None and mv is not None and binding is not None
    if registered:  # pin first: the rest is presentation
        _pin(uri, sidecar.model_version_pin(binding, mv), version, opts)
    tags = lance_tags(conf)
    if model_info.run_id:
        client.log_batch(model_info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if model_info.model_id:
        client.set_logged_model_tags(model_info.model_id, tags)
    if registered:
        _present_version(client, registered_model_name, str(mv), conf)
        _catch_up(client, registered_model_name, binding)
        write_history(registered_model_name, binding, uri, opts)
    sidecar.refresh(uri, opts, names={binding: registered_model_name} if registered else None)


def _catch_up(client: MlflowClient, name: str, binding: str) -> None:
    """Pin and tag the model's versions that plain MLflow calls registered or copied."""
    for mv in lifecycle.paged(client.search_model_versions, filter_string=f"name = {lifecycle.quote_filter(name)}",
                               max_results=1000):  # fmt: skip
        if "lance.version" not in (mv.tags or {}):
            _bookkeep_version(client, name, str(mv.version), binding)


def _bookkeep_version(client: MlflowClient, name: str, version: str, binding: str) -> dict | None:
    """Pin one model version's Lance version and show it in the UI; its flavor conf, or None."""
    conf = flavor_conf(f"models:/{name}/{version}")
    if conf is None:
        return None
    uri = conf["lance_uri"]
    opts = storage_options_for(uri) or None
    _pin(uri, sidecar.model_version_pin(binding, version), int(conf["lance_version"]), opts)
    _present_version(client, name, version, conf)
    return conf


def register_model(model_uri: str, name: str, **kwargs: Any):
    """``mlflow.register_model`` plus what ``log_model`` does for a new version: the pin, the
    ``lance.*`` tags, the description, the history table and the sidecar."""
    mv = mlflow.register_model(model_uri, name, **kwargs)
    client = MlflowClient()
    binding, _ = lifecycle.bind(client, name)
    conf = _bookkeep_version(client, name, str(mv.version), binding)
    if conf is not None:
        uri = conf["lance_uri"]
        opts = storage_options_for(uri) or None
        rm = client.get_registered_model(name)
        if not (rm.tags or {}).get(DATASET_TAG):  # registering earlier-logged weights binds them
            client.set_registered_model_tag(name, DATASET_TAG, uri)
        write_history(name, binding, (rm.tags or {}).get(DATASET_TAG) or uri, opts)
        sidecar.refresh(uri, opts, names={binding: name})
    return mv


def write_history(name: str, binding: str, uri: str, opts: Mapping[str, str] | None) -> None:
    """Put the version history table into the registered model's description (kept below
    any text a person wrote above the marker)."""
    client = MlflowClient()
    registered = client.get_registered_model(name)
    aliases: dict[str, list[str]] = {}
    for alias, mv in (registered.aliases or {}).items():
        aliases.setdefault(str(mv), []).append(alias)
    pins = store.tags(uri, storage_options=opts)
    infos = {v.version: v for v in store.versions(uri, storage_options=opts)}
    rows = []
    versions = lifecycle.paged(client.search_model_versions, filter_string=f"name = {lifecycle.quote_filter(name)}",
                                max_results=1000)  # fmt: skip
    for mv in sorted(versions, key=lambda m: -int(m.version)):
        tags = mv.tags or {}
        pinned = pins.get(sidecar.model_version_pin(binding, mv.version))
        if pinned is not None and pinned in infos:
            info, where = infos[pinned], ""
        elif tags.get("lance.version", "").isdigit():  # weights in another dataset (a copy)
            info, where = None, f" in `{tags.get('lance.uri', '?')}`"
        else:
            continue
        version = info.version if info else tags["lance.version"]
        changed = f"{len(info.changed)} of {info.num_tensors}" if info else tags.get("lance.tensors_changed", "")
        written = info.bytes_written if info else int(tags.get("lance.bytes_written") or 0)
        total = info.total_bytes if info else int(tags.get("lance.bytes") or 0)
        run = (info.properties.get("mlflow.run_id", "") if info else mv.run_id or "")[:12]
        rows.append(
            f"| {mv.version} | {version}{where} | {', '.join(sorted(aliases.get(str(mv.version), [])))} | "
            f"`{run}` | {changed} | {written:,} | {written / total if total else 0:.1%} |"
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


def dataset_for_model(name: str) -> str:
    """The Lance dataset registered model ``name`` is bound to (for a model that was never
    bound, the dataset its versions were logged to)."""
    client = MlflowClient()
    try:
        bound = (client.get_registered_model(name).tags or {}).get(DATASET_TAG)
    except MlflowException as err:
        if lifecycle.not_found(err):
            raise LookupError(
                f"no dataset found for {name!r}: it is neither a path or URI that exists nor a registered model"
            ) from None
        raise
    if bound:
        return bound
    return lifecycle.datasets_for(name, References(client, write_bindings=False))[0]


def sync(target: str | os.PathLike | None = None, *, all: bool = False) -> list[SyncReport]:
    """Reconcile pins, UI tags, history tables and sidecars with what MLflow references.

    ``target`` is a registered model name (only that model's pins are touched: its
    model-version pins wherever its weights live, and the logged-model pins of its own
    dataset) or a dataset URI (every pin of that dataset); ``all=True`` does every registered
    model, then every dataset under the Lance roots.
    """
    refs = References()
    reports: list[SyncReport] = []
    if all:
        for name in sorted(refs.registered):
            if lifecycle.model_datasets(name, refs):
                reports += _sync_model(name, refs)
        done = [r.dataset for r in reports]
        for uri in lifecycle.datasets_for(None, refs, all=True):
            try:
                reports.append(_sync_dataset(uri, refs, full=not any(lifecycle.same_dataset(uri, d) for d in done)))
            except lifecycle.ForeignDataset as err:  # logged through another tracking server
                reports.append(SyncReport(dataset=uri, skipped=str(err)))
        return reports
    if target is None:
        raise ValueError("name a registered model or a dataset URI, or pass all=True")
    target = os.fspath(target)
    if lifecycle.looks_like_dataset(target) or target not in refs.registered:
        if not lifecycle.looks_like_dataset(target):
            raise LookupError(f"{target!r} is neither a registered model nor a dataset URI that exists")
        return [_sync_dataset(target, refs, full=True)]
    return _sync_model(target, refs)


def _sync_dataset(uri: str, refs: References, *, full: bool) -> SyncReport:
    opts = storage_options_for(uri) or None
    report = SyncReport(dataset=uri)
    if full:
        p = lifecycle.plan(uri, refs, opts)
        report.pinned, report.unpinned = lifecycle.apply_pins(p, refs, opts)
    doc = sidecar.refresh(uri, opts, force=True, names=refs.bindings())
    report.runs = len(doc["runs"])
    return report


def _sync_model(name: str, refs: References) -> list[SyncReport]:
    client = refs.client
    binding = refs.binding(name, store_tag=True)
    uris = lifecycle.model_datasets(name, refs)
    if not uris:
        raise LookupError(f"registered model {name!r} has no version logged with mlflow_lance")
    bound = (refs.registered[name].tags or {}).get(DATASET_TAG)
    if not bound:
        bound = uris[0]
        client.set_registered_model_tag(name, DATASET_TAG, bound)
    own_versions = sidecar.model_version_pin(binding, "")
    reports = []
    plans = {}
    for uri in uris:
        opts = storage_options_for(uri) or None
        p = plans[uri] = lifecycle.plan(uri, refs, opts)
        home = lifecycle.same_dataset(uri, bound)

        def scope(pin: str, home: bool = home) -> bool:
            return pin.startswith(own_versions) or (home and pin.startswith(sidecar.MODEL_PIN))

        report = SyncReport(dataset=uri, registered_model=name)
        report.pinned, report.unpinned = lifecycle.apply_pins(p, refs, opts, scope)
        report.model_versions = {pin[len(own_versions):]: v for pin, v in p.desired.items()
                                 if pin.startswith(own_versions)}  # fmt: skip
        reports.append(report)
    for uri, p in plans.items():  # the UI: tags and a description on every version
        opts = storage_options_for(uri) or None
        infos = {v.version: v for v in store.versions(uri, storage_options=opts)}
        for mv_number, version in (r for rep in reports if rep.dataset == uri for r in rep.model_versions.items()):
            if version in infos:
                _present_version(client, name, mv_number, _conf(uri, infos[version]))
    write_history(name, binding, bound, storage_options_for(bound) or None)
    for report in reports:
        doc = sidecar.refresh(report.dataset, storage_options_for(report.dataset) or None, force=True,
                              names=refs.bindings())  # fmt: skip
        report.runs = len(doc["runs"])
    return reports
