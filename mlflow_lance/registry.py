"""Bookkeeping between the Lance datasets and MLflow's tracking server and model registry.

After a ``log_model`` (or ``register_model``): pin the Lance version for the registered model
version, put ``lance.*`` tags and a markdown description on the run, the logged model and the
model version, write the registered model's version history into its description (what the
MLflow UI shows on the registered-model page), and refresh the sidecar. Versions of the model
that were registered or copied with plain MLflow calls are caught up at the same time.

``sync`` does all of that on demand from the truth (lifecycle.py reads what MLflow
references); ``sync`` of one registered model only ever adds or removes that model's pins.

Only the pin is safety; everything else is for the UI. Each description and tag value is kept
within MLflow's limits on every backend (read from MLflow's schema, see ``limits``), a UI step
that fails after a log is a logged warning (the weights are saved and pinned by then), and a
registered model or model version that is deleted or renamed while any of this runs is done
with, not an error.

Split from flavor.py, which keeps to MLflow's flavor contract (save, log, load, pyfunc).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

from . import bindings, lifecycle, sidecar, store
from .artifacts import is_dataset_target, options
from .bindings import DATASET_TAG, flavor_conf
from .lifecycle import References
from .modeldir import FLAVOR_NAME

HISTORY_MARKER = "<!-- mlflow-lance history -->"
FALLBACK_LIMIT = 5000  # the shortest column mlflow-lance writes to (MLflow 3.x), if the schema cannot be read

_logger = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass
class SyncReport:
    """What ``sync`` found and changed in one dataset."""

    dataset: str
    registered_model: str | None = None
    model_versions: dict[str, int] = field(default_factory=dict)  # model version -> Lance version
    pinned: list[str] = field(default_factory=list)
    unpinned: list[str] = field(default_factory=list)
    runs: int = 0
    skipped: str | None = None  # why this dataset was left alone, or its model's sync not finished
    updated: list[str] = field(default_factory=list)  # model versions whose UI tags or description were rewritten
    gone: list[str] = field(default_factory=list)  # model versions deleted while sync ran
    reindexed: list[int] = field(default_factory=list)  # versions whose missing index sync wrote


@dataclass(frozen=True)
class Limits:
    """The most characters MLflow stores in each field mlflow-lance writes, on every backend."""

    registered_model_description: int
    model_version_description: int
    registered_model_tag: int
    model_version_tag: int
    run_tag: int
    logged_model_tag: int


@functools.cache
def limits() -> Limits:
    """MLflow's limits: the length of each registry column in its SQL schema (PostgreSQL and
    MySQL enforce them, SQLite does not) or its validation constant, whichever is smaller; for
    run and logged-model tags the validation constant for tags (the run-tag column's length
    too; importing the tracking schema would add 0.2 s to a process's first log_model).
    FALLBACK_LIMIT each where the schema cannot be imported (mlflow-skinny has no SQLAlchemy)."""
    try:
        schema = importlib.import_module("mlflow.store.model_registry.dbmodels.models")
        validation = importlib.import_module("mlflow.utils.validation")

        def least(column: Any, constant: str | None = None) -> int:
            found = [getattr(column.type, "length", None), getattr(validation, constant or "", None)]
            return min((n for n in found if isinstance(n, int)), default=FALLBACK_LIMIT)

        return Limits(
            registered_model_description=least(schema.SqlRegisteredModel.description),
            model_version_description=least(schema.SqlModelVersion.description),
            registered_model_tag=least(schema.SqlRegisteredModelTag.value, "MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH"),
            model_version_tag=least(schema.SqlModelVersionTag.value, "MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH"),
            run_tag=validation.MAX_TAG_VAL_LENGTH,
            logged_model_tag=validation.MAX_TAG_VAL_LENGTH,
        )
    except (ImportError, AttributeError):
        return Limits(*[FALLBACK_LIMIT] * 6)


def _limit(text_length: int, which: str) -> int:
    """MLflow's limit ``which`` (a ``Limits`` field) for a text of ``text_length`` characters.
    Texts no longer than every column mlflow-lance writes to (the usual case) never read the
    schema, whose import costs 0.2-0.5 s in a process's first log_model."""
    return FALLBACK_LIMIT if text_length <= FALLBACK_LIMIT else getattr(limits(), which)


def _fitting(tags: Mapping[str, str], which: str, where: str) -> dict[str, str]:
    """The tags whose values MLflow can store (``which``: the ``Limits`` field that bounds
    them); one that is too long is left out with a warning (cut, a URI would name another
    dataset)."""
    limit = _limit(max(map(len, tags.values()), default=0), which)
    too_long = sorted(k for k, v in tags.items() if len(v) > limit)
    if too_long:
        _logger.warning(
            "mlflow-lance: not tagging %s with %s: longer than MLflow's %d characters",
            where,
            ", ".join(too_long),
            limit,
        )
    return {k: v for k, v in tags.items() if k not in too_long}


def _clip(text: str, which: str) -> str:
    """``text`` cut to MLflow's limit ``which`` (a ``Limits`` field)."""
    limit = _limit(len(text), which)
    return text if len(text) <= limit else text[: limit - 1] + "\N{HORIZONTAL ELLIPSIS}"


def _for_the_ui(what: str, step: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
    """Run one bookkeeping step for the UI after a log: its result, or None with a warning if it
    failed (never an error: the weights are saved and pinned by then, and ``mlflow-lance sync``
    redoes the step)."""
    try:
        return step(*args, **kwargs)
    except Exception as err:  # UI bookkeeping never fails a log
        if bindings.not_found(err):
            _logger.warning(
                "mlflow-lance: skipped %s: it was deleted or renamed meanwhile (%s)",
                what,
                getattr(err, "message", err),
            )
        else:
            _logger.warning(
                "mlflow-lance: %s failed; the weights are saved and pinned, and `mlflow-lance sync` redoes it: %s: %s",
                what,
                type(err).__name__,
                err,
            )
            _logger.debug("", exc_info=True)
        return None


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
        "lance_uri": uri,
        "lance_version": info.version,
        "parent_version": info.parent,
        "tensors": info.num_tensors,
        "tensors_changed": len(info.changed),
        "bytes": info.total_bytes,
        "bytes_written": info.bytes_written,
    }


def _describe(conf: Mapping) -> str:
    """A model version's description (markdown), within MLflow's limit."""
    written, total = int(conf.get("bytes_written", 0)), int(conf.get("bytes", 0)) or 1
    parent = conf.get("parent_version")
    return _clip(
        f"**Lance version {conf['lance_version']}** of `{conf['lance_uri']}`"
        + (f", parent version {parent}" if parent else " (first version)")
        + f". {conf.get('tensors_changed', '?')} of {conf.get('tensors', '?')} tensors changed; "
        f"{written:,} bytes written for {total:,} bytes of weights ({written / total:.1%}).",
        "model_version_description",
    )


def _pin(uri: str, pin: str, version: int, opts: Mapping[str, str] | None) -> bool:
    """Point ``pin`` at ``version``; True if anything changed."""
    if store.tags(uri, storage_options=opts).get(pin) == version:
        return False
    store.tag(uri, pin, version, storage_options=opts)
    return True


def _present_version(
    client: MlflowClient, name: str, version: str, conf: Mapping, current: ModelVersion | None = None
) -> bool:
    """Give one model version its ``lance.*`` tags and description; True if anything was
    written. With ``current`` (the version as last read) only what differs is written.

    Another writer may be setting the same values at the same moment (its own version, our
    catch-up): a racing insert that fails is fine when the value it wanted is there. A version
    that is gone raises MLflow's "not found" for the caller to judge.
    """
    have = (current.tags or {}) if current is not None else {}
    wrote = False
    tags = _fitting(lance_tags(conf), "model_version_tag", f"model version {version} of {name!r}")
    for key, value in tags.items():
        if have.get(key) == value:
            continue
        bindings.racing_set(
            lambda key=key, value=value: client.set_model_version_tag(name, version, key, value),
            lambda key=key: (client.get_model_version(name, version).tags or {}).get(key),
            value,
        )
        wrote = True
    description = _describe(conf)
    if current is None or current.description != description:
        client.update_model_version(name, version, description=description)
        wrote = True
    return wrote


def after_log(
    model_info: ModelInfo,
    registered_model_name: str | None,
    binding: str | None,
    opts: Mapping[str, str] | None,
) -> None:
    """After ``log_model``: pin the model version (safety: a failure fails the log), then, for
    the UI, tag the run, the logged model and the model version, describe the version, catch
    up the model's other versions, write its history and refresh the sidecar. Each UI step that
    fails is a warning; a model version deleted right after it was made only skips its own."""
    conf = model_info.flavors[FLAVOR_NAME]
    uri, version = conf["lance_uri"], int(conf["lance_version"])
    client = MlflowClient()
    mv = model_info.registered_model_version
    registered = registered_model_name is not None and mv is not None and binding is not None
    if registered:
        _pin(uri, sidecar.model_version_pin(binding, mv), version, opts)
    tags = lance_tags(conf)
    if model_info.run_id:
        run_tags = _fitting(tags, "run_tag", f"run {model_info.run_id}")
        _for_the_ui(
            f"tagging run {model_info.run_id}",
            client.log_batch,
            model_info.run_id,
            tags=[RunTag(k, v) for k, v in run_tags.items()],
        )
    if model_info.model_id:
        model_tags = _fitting(tags, "logged_model_tag", f"logged model {model_info.model_id}")
        _for_the_ui(
            f"tagging logged model {model_info.model_id}",
            client.set_logged_model_tags,
            model_info.model_id,
            model_tags,
        )
    if registered:
        name = registered_model_name
        _for_the_ui(f"describing model version {mv} of {name!r}", _present_version, client, name, str(mv), conf)
        listed = _for_the_ui(f"catching up the other versions of {name!r}", _catch_up, client, name, binding)
        _for_the_ui(f"the version history of {name!r}", write_history, name, binding, uri, opts, versions=listed)
    _for_the_ui(
        f"refreshing the sidecar of {uri}",
        sidecar.refresh,
        uri,
        opts,
        model_names={binding: registered_model_name} if registered else None,
    )


def _model_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of registered model ``name``, as MLflow lists them now."""
    return list(
        bindings.paged(
            client.search_model_versions,
            filter_string=f"name = {bindings.quote_filter(name)}",
            max_results=1000,
        )
    )


def _catch_up(client: MlflowClient, name: str, binding: str) -> list[ModelVersion] | None:
    """Pin and tag the model's versions that plain MLflow calls registered or copied (one that
    is deleted meanwhile needs neither). The versions as listed if none needed it (for the
    history to reuse: listing a model's versions takes ~2 s at 1,000 on PostgreSQL), else None."""
    versions = _model_versions(client, name)
    changed = False
    for mv in versions:
        if "lance.version" in (mv.tags or {}):
            continue
        try:
            changed |= _bookkeep_version(client, name, str(mv.version), binding)
        except MlflowException as err:
            if not bindings.not_found(err):
                raise
            client.get_registered_model(name)  # the model itself gone: its "not found" ends the catch-up
    return None if changed else versions


def _bookkeep_version(client: MlflowClient, name: str, version: str, binding: str) -> bool:
    """Pin one model version's Lance version and show it in the UI; False if it holds no
    mlflow_lance weights."""
    conf = flavor_conf(f"models:/{name}/{version}")
    if conf is None or conf.get("self_contained"):  # its weights travel with it: nothing to pin
        return False
    uri = conf["lance_uri"]
    _pin(
        uri,
        sidecar.model_version_pin(binding, version),
        int(conf["lance_version"]),
        options(uri),
    )
    _present_version(client, name, version, conf)
    return True


def register_model(model_uri: str, name: str, **kwargs: Any) -> ModelVersion:
    """Register a model version, as ``mlflow.register_model`` does, and pin its weights.

    Then does what ``log_model`` does for a new version: the pin (a Lance tag that keeps the
    version from ``gc``), then, for the UI, the ``lance.*`` tags, the description, the history
    table and the sidecar (a failure of these is a warning). A version deleted, or its model
    renamed, before the pin is set is left to ``gc`` and ``sync``, which pin from what MLflow
    lists, with a warning. A model logged with ``self_contained=True`` carries its weights
    and gets no pin.

    Args:
        model_uri: the model to register (``runs:/<run id>/<name>``, ``models:/<model id>``, ...).
        name: the registered model (created if it does not exist).
        **kwargs: passed to ``mlflow.register_model`` (``await_registration_for``, ``tags``).

    Returns:
        MLflow's ModelVersion.

    Raises:
        MlflowException: as ``mlflow.register_model`` raises it (a registered model name the
            registry refuses, a model URI it cannot resolve).

    Example:
        >>> mv = register_model(f"models:/{info.model_id}", "churn")
        >>> load_model(f"models:/churn/{mv.version}")
    """
    mv = mlflow.register_model(model_uri, name, **kwargs)
    client = MlflowClient()
    version = str(mv.version)
    try:
        binding, _ = bindings.bind(client, name)
        conf = flavor_conf(f"models:/{name}/{version}")
    except MlflowException as err:
        if not bindings.not_found(err):
            raise
        _logger.warning(
            "mlflow-lance: model version %s of %r was deleted or renamed right after it was registered; "
            "not pinned here (%s)",
            version,
            name,
            err.message,
        )
        return mv
    if conf is not None and not conf.get("self_contained"):  # its weights travel with it: nothing to pin
        uri = conf["lance_uri"]
        opts = options(uri)
        _pin(uri, sidecar.model_version_pin(binding, version), int(conf["lance_version"]), opts)
        _for_the_ui(f"describing model version {version} of {name!r}", _present_version, client, name, version, conf)
        _for_the_ui(f"the version history of {name!r}", _bind_and_write_history, client, name, binding, uri)
        _for_the_ui(f"refreshing the sidecar of {uri}", sidecar.refresh, uri, opts, model_names={binding: name})
    return mv


def _bind_dataset(client: MlflowClient, name: str, uri: str) -> None:
    """Bind registered model ``name`` to dataset ``uri`` (where its later versions are logged)."""
    for key, value in _fitting({DATASET_TAG: uri}, "registered_model_tag", f"registered model {name!r}").items():
        bindings.racing_set(
            lambda key=key, value=value: client.set_registered_model_tag(name, key, value),
            lambda key=key: (client.get_registered_model(name).tags or {}).get(key),
            value,
        )


def _bind_and_write_history(client: MlflowClient, name: str, binding: str, uri: str) -> None:
    """Bind a model that has no dataset yet to ``uri`` (registering earlier-logged weights binds
    them), then write the history of the dataset it is bound to."""
    bound = (client.get_registered_model(name).tags or {}).get(DATASET_TAG)
    if not bound:
        _bind_dataset(client, name, uri)
        bound = uri
    write_history(name, binding, bound, options(bound))


def write_history(
    name: str,
    binding: str,
    uri: str,
    opts: Mapping[str, str] | None,
    *,
    versions: Iterable[ModelVersion] | None = None,
) -> None:
    """Put the version history table into the registered model's description, below any text a
    person wrote above the marker: the newest versions first, as many as MLflow's limit allows,
    then how many older ones are not shown. The person's text is never cut; where it leaves no
    room for the table, none is written. An unchanged description is not written again.

    ``versions``: the model's versions if just listed (else they are listed here).
    """
    client = MlflowClient()
    registered = client.get_registered_model(name)
    aliases: dict[str, list[str]] = {}
    for alias, mv in (registered.aliases or {}).items():
        aliases.setdefault(str(mv), []).append(alias)
    pins = store.tags(uri, storage_options=opts)
    infos = {v.version: v for v in store.versions(uri, storage_options=opts)}
    rows = []
    for mv in sorted(_model_versions(client, name) if versions is None else versions, key=lambda m: -int(m.version)):
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
    head = [
        HISTORY_MARKER,
        f"**Weights:** Lance dataset `{uri}` (sidecar `{sidecar.sidecar_uri(uri)}`).",
        "",
        "| model version | Lance version | aliases | run | tensors changed | bytes written | written / weights |",
        "|---|---|---|---|---|---|---|",
    ]
    own = (registered.description or "").split(HISTORY_MARKER)[0].rstrip()
    description = _history_description(own, head, rows)
    if description != (registered.description or ""):
        client.update_registered_model(name, description=description)


def _history_description(own: str, head: list[str], rows: list[str]) -> str:
    """``own`` text, then the table ``head`` with the first ``rows`` that fit in MLflow's limit
    for a registered model's description and a line counting the rest; ``own`` alone where
    not even the head and that line fit."""
    prefix = f"{own}\n\n" if own else ""
    whole = prefix + "\n".join([*head, *rows])
    limit = _limit(len(whole), "registered_model_description")
    if len(whole) <= limit:
        return whole
    budget = limit - len(prefix) - len(_not_shown(len(rows)))  # the longest count line
    used, shown = len("\n".join(head)), 0
    for row in rows:
        if used + 1 + len(row) > budget:
            break
        used, shown = used + 1 + len(row), shown + 1
    if used > budget:
        return own
    return prefix + "\n".join([*head, *rows[:shown]]) + _not_shown(len(rows) - shown)


def _not_shown(count: int) -> str:
    return f"\n\n*{count:,} older model version{'' if count == 1 else 's'} not shown.*"


def dataset_for_model(name: str) -> str:
    """The Lance dataset registered model ``name`` is bound to (for a model that was never
    bound, the dataset its versions were logged to)."""
    client = MlflowClient()
    try:
        bound = (client.get_registered_model(name).tags or {}).get(DATASET_TAG)
    except MlflowException as err:
        if bindings.not_found(err):
            raise LookupError(
                f"no dataset found for {name!r}: it is neither a path or URI that exists nor a registered model"
            ) from None
        raise
    if bound:
        return bound
    return lifecycle.datasets_for(name, References(client))[0]


def sync(target: str | os.PathLike | None = None, *, all: bool = False) -> list[SyncReport]:
    """Reconcile pins, UI tags, history tables and sidecars with what MLflow references.

    ``target`` is a registered model name (only that model's pins are touched: its
    model-version pins wherever its weights live, and the logged-model pins of its own
    dataset) or a dataset URI (every pin of that dataset); ``all=True`` does every registered
    model, then every dataset under the Lance roots. Tags and descriptions that are right
    already are not written again.

    A registered model or model version deleted or renamed while this runs is done with, not
    an error: its report says so (``skipped``: the model's sync ended there; ``gone``: model
    versions that vanished) and every other model and dataset is synced. A version that lacks
    its version index gets one (``store.reindex``).

    Args:
        target: a registered model name or a dataset URI.
        all: every registered model, then every dataset under the Lance roots (``target`` is
            then not needed).

    Returns:
        A SyncReport per dataset: the model versions it holds, the pins set and removed, the
        model versions whose UI tags or description were rewritten, the versions reindexed,
        and what was skipped or gone.

    Raises:
        ValueError: neither ``target`` nor ``all`` given.
        LookupError: ``target`` is neither a registered model nor a dataset URI that exists,
            or a registered model with no version logged with mlflow_lance.

    Example:
        >>> sync("churn")
        >>> sync(all=True)
    """
    refs = References()
    reports: list[SyncReport] = []
    if all:
        for name in sorted(refs.registered):
            if lifecycle.model_datasets(name, refs):
                reports += _sync_model(name, refs)
        done = [r.dataset for r in reports if not r.skipped]
        for uri in lifecycle.datasets_for(None, refs, all=True):
            try:
                reports.append(_sync_dataset(uri, refs, full=not any(bindings.same_dataset(uri, d) for d in done)))
            except lifecycle.ForeignDataset as err:  # logged through another tracking server
                reports.append(SyncReport(dataset=uri, skipped=str(err)))
        return reports
    if target is None:
        raise ValueError("name a registered model or a dataset URI, or pass all=True")
    target = os.fspath(target)
    if is_dataset_target(target) or target not in refs.registered:
        if not is_dataset_target(target):
            raise LookupError(f"{target!r} is neither a registered model nor a dataset URI that exists")
        return [_sync_dataset(target, refs, full=True)]
    return _sync_model(target, refs)


def _changed_underneath(err: MlflowException) -> str:
    return (
        f"a registered model or model version was deleted or renamed while sync ran; left as far as it "
        f"got ({err.message})"
    )


def _sync_dataset(uri: str, refs: References, *, full: bool) -> SyncReport:
    opts = options(uri)
    report = SyncReport(dataset=uri)
    try:
        if full:
            p = lifecycle.survey(uri, refs, opts)
            report.pinned, report.unpinned = lifecycle.apply_pins(p, refs, opts)
        doc = sidecar.refresh(uri, opts, force=True, model_names=refs.bindings())
        report.runs = len(doc["runs"])
        report.reindexed = store.reindex(uri, storage_options=opts)
    except MlflowException as err:
        if not bindings.not_found(err):
            raise
        report.skipped = _changed_underneath(err)
    return report


def _sync_model(name: str, refs: References) -> list[SyncReport]:
    uris = lifecycle.model_datasets(name, refs)
    if not uris:
        raise LookupError(f"registered model {name!r} has no version logged with mlflow_lance")
    reports = [SyncReport(dataset=uri, registered_model=name) for uri in uris]
    try:
        _reconcile_model(name, refs, reports)
    except MlflowException as err:
        if not bindings.not_found(err):
            raise
        for report in reports:
            report.skipped = _changed_underneath(err)
    return reports


def _reconcile_model(name: str, refs: References, reports: list[SyncReport]) -> None:
    """Sync one registered model into ``reports`` (one per dataset it uses, the first its own)."""
    client = refs.client
    binding = refs.binding(name, store_tag=True)
    bound = (refs.registered[name].tags or {}).get(DATASET_TAG)
    if not bound:
        bound = reports[0].dataset
        _bind_dataset(client, name, bound)
    own_versions = sidecar.model_version_pin(binding, "")
    for report in reports:
        opts = options(report.dataset)
        p = lifecycle.survey(report.dataset, refs, opts)
        home = bindings.same_dataset(report.dataset, bound)

        def scope(pin: str, home: bool = home) -> bool:
            return pin.startswith(own_versions) or (home and pin.startswith(sidecar.MODEL_PIN))

        report.pinned, report.unpinned = lifecycle.apply_pins(p, refs, opts, scope)
        report.model_versions = {
            pin[len(own_versions) :]: v for pin, v in p.desired.items() if pin.startswith(own_versions)
        }
    read = {str(mv.version): mv for mv in refs.model_versions if mv.name == name}
    for report in reports:  # the UI: tags and a description on every version, where not right yet
        infos = {v.version: v for v in store.versions(report.dataset, storage_options=options(report.dataset))}
        for mv_number, version in report.model_versions.items():
            if version not in infos:
                continue
            try:
                if _present_version(
                    client, name, mv_number, _conf(report.dataset, infos[version]), read.get(mv_number)
                ):
                    report.updated.append(mv_number)
            except MlflowException as err:
                if not bindings.not_found(err):
                    raise
                client.get_registered_model(name)  # the model itself gone: its "not found" ends this sync
                report.gone.append(mv_number)
    write_history(name, binding, bound, options(bound))
    for report in reports:
        opts = options(report.dataset)
        doc = sidecar.refresh(report.dataset, opts, force=True, model_names=refs.bindings())
        report.runs = len(doc["runs"])
        report.reindexed = store.reindex(report.dataset, storage_options=opts)
