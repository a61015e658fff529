"""What MLflow still references, and the pins and gc that follow it.

A Lance version must stay while MLflow can still resolve something to it:

- a **logged model** that is not deleted (``get_logged_model`` finds it; a soft-deleted run
  keeps its logged models, so a run that can be restored keeps its weights);
- a **registered model version** that exists, whatever its source: ``models:/<model id>``
  (``log_model``, ``register_model`` later), ``models:/<name>/<version>``
  (``copy_model_version``) or a path whose MLmodel points at Lance.

Pins are Lance tags, one per reference (``model.<model id>``, ``mv.<binding>.<version>``,
see sidecar.py), set as soon as a reference is made through mlflow_lance. ``gc`` never trusts
the pins alone: it reads MLflow first, adds the pins that are missing (versions registered
or copied with plain MLflow calls), removes the pins whose reference is gone, then lets the
store delete unpinned versions. A pin is removed only when its reference is positively gone;
anything that cannot be checked stays pinned.

Which dataset a registered model's versions go to is its *binding* (bindings.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from . import sidecar, store
from .artifacts import ROOT_ENV, is_dataset_target, lance_root, options
from .bindings import (
    BINDING_TAG,
    DATASET_TAG,
    binding_id,
    exists,
    flavor_conf,
    not_found,
    paged,
    quote_filter,
    same_dataset,
    set_registered_tag,
)
from .compat import is_tracking_uri_set
from .fs import list_dirs, local_path

_MODEL_ID_SOURCE = re.compile(r"^models:/(m-[0-9A-Za-z]+)/?$")
_MODEL_VERSION_SOURCE = re.compile(r"^models:/[^@]+/\d+/?$")
_LOGGED_MODEL_LOCATION = re.compile(r"/models/(m-[0-9a-f]{32})/artifacts/?$")


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Target:
    """What a model version points at: a logged model's id, or a Lance (URI, version)."""

    model_id: str | None = None
    uri: str | None = None
    version: int | None = None


class References:
    """What MLflow references, read as gc needs it: model versions (and the registered models
    they belong to) re-read on demand with ``reread``, logged models and runs looked up one at
    a time and remembered (a logged model found deleted never comes back; one found live is
    kept, which only ever keeps more).

    ``assume_logged_here`` skips the check that this tracking server logged a dataset (for
    datasets whose experiments, runs and models were all purged).
    """

    def __init__(self, client: MlflowClient | None = None, *, assume_logged_here: bool = False):
        self.client = client or MlflowClient()
        self.assume_logged_here = assume_logged_here
        self._bindings: dict[str, str] = {}
        self._logged: dict[str, bool] = {}
        self._runs: dict[str, bool] = {}
        self._targets: dict[tuple[str, str], Target | None] = {}
        self.reread()

    def reread(self) -> None:
        """Read every registered model and model version afresh. gc calls this after it has
        looked up the logged models and runs of a dataset, so that a model version registered
        before that (even of a logged model deleted since) is seen."""
        self.registered = {rm.name: rm for rm in paged(self.client.search_registered_models, max_results=1000)}
        self.model_versions = list(
            paged(
                self.client.search_model_versions,
                max_results=10000,
                order_by=["name ASC", "version_number ASC"],
            )
        )

    def binding(self, name: str, *, store_tag: bool = False) -> str:
        """The binding of registered model ``name`` (computed from its name and creation time
        when it has no tag yet); ``store_tag`` stores a computed one as its tag (only a step
        that writes asks: see ``apply_pins``)."""
        if name not in self.registered:  # registered (or renamed) after the snapshot was read
            self.registered[name] = self.client.get_registered_model(name)
        rm = self.registered[name]
        found = (rm.tags or {}).get(BINDING_TAG) or self._bindings.get(name)
        if found:
            return found
        found = binding_id(name, rm.creation_timestamp)
        if store_tag:
            set_registered_tag(self.client, name, BINDING_TAG, found)
            self._bindings[name] = found
        return found

    def stored(self, name: str) -> bool:
        """Whether registered model ``name`` has its binding tag (as read, or stored since)."""
        return bool(
            (self.registered.get(name) and (self.registered[name].tags or {}).get(BINDING_TAG))
            or name in self._bindings
        )

    def bindings(self) -> dict[str, str]:
        """binding -> current registered model name, for every registered model."""
        return {self.binding(name): name for name in self.registered}

    def logged_model_live(self, model_id: str) -> bool:
        """True unless MLflow says the logged model does not exist (deleted or purged)."""
        if model_id not in self._logged:
            self._logged[model_id] = exists(self.client.get_logged_model, model_id)
        return self._logged[model_id]

    def experiment_exists(self, experiment_id: str) -> bool:
        """True if this tracking server has the experiment (in any lifecycle stage)."""
        return exists(self.client.get_experiment, experiment_id)

    def knows(self, infos: list[store.VersionInfo], p: Survey) -> bool:
        """Whether this tracking server is the one that logged these versions: something it
        references lives there, or it has their experiment or one of their runs. If not,
        "not found" means "wrong server", and nothing may be judged unreferenced."""
        if p.desired or p.kept_unknown:
            return True
        experiments = {i.properties.get("mlflow.experiment_id") for i in infos} - {None, ""}
        runs = {i.properties.get("mlflow.run_id") for i in infos} - {None, ""}
        return any(self.experiment_exists(e) for e in sorted(experiments)) or any(
            self.run_live(r) for r in sorted(runs)
        )

    def still_referenced(self, pin: str) -> bool:
        """A fresh look (no snapshot, no cache) at whether a pin's reference exists now.

        Only pins that a reference made after the snapshot could have set are looked at:
        ``model.`` and ``mv.`` pins. Old ``run.``/``model-version.`` pins are judged by the plan
        alone, so that gc replaces them (a run that still exists must not keep a version its
        logged models already pin, or no longer reference).
        """
        if pin.startswith(sidecar.MODEL_PIN):
            return exists(self.client.get_logged_model, pin[len(sidecar.MODEL_PIN) :])
        if (parsed := sidecar.parse_model_version_pin(pin)) is not None:
            binding, version = parsed
            models = self.client.search_registered_models(
                filter_string=f"tags.`{BINDING_TAG}` = {quote_filter(binding)}", max_results=10
            )
            return any(exists(self.client.get_model_version, rm.name, version) for rm in models)
        return False

    def run_live(self, run_id: str) -> bool:
        """True unless MLflow says the run does not exist (a deleted run can still be restored)."""
        if run_id not in self._runs:
            self._runs[run_id] = exists(self.client.get_run, run_id)
        return self._runs[run_id]

    def target(self, mv: Any) -> Target | None:
        """What model version ``mv`` points at, or None when that cannot be told (kept pinned)."""
        key = (mv.name, str(mv.version))
        if key in self._targets:
            return self._targets[key]
        source = mv.source or ""
        found: Target | None = None
        if m := _MODEL_ID_SOURCE.match(source):
            found = Target(model_id=m.group(1))
        elif _MODEL_VERSION_SOURCE.match(source):  # a copy: its source's *name* may since name
            try:  # another model, so ask where its files live
                location = self.client.get_model_version_download_uri(mv.name, str(mv.version))
            except MlflowException:
                location = ""
            if m := _LOGGED_MODEL_LOCATION.search(location or ""):
                found = Target(model_id=m.group(1))
        if found is None:
            found = self.target_from_mlmodel(mv)
        self._targets[key] = found
        return found

    def target_from_mlmodel(self, mv: Any) -> Target | None:
        try:
            conf = flavor_conf(f"models:/{mv.name}/{mv.version}")
        except (MlflowException, OSError, ValueError):  # gone, unreachable or malformed
            conf = None
            tags = mv.tags or {}
            if "lance.uri" in tags and str(tags.get("lance.version", "")).isdigit():
                conf = {"lance_uri": tags["lance.uri"], "lance_version": tags["lance.version"]}
            else:
                return None  # nothing can be told: its pin is kept
        if conf is None or conf.get("self_contained"):
            return Target()  # another flavor, or weights that travel inside the model directory
        uri, version = conf.get("lance_uri"), str(conf.get("lance_version", ""))
        if not isinstance(uri, str) or not version.isascii() or not version.isdigit() or len(version) > 18:
            return None  # a malformed MLmodel: nothing can be told
        return Target(uri=uri, version=int(version))


class ForeignDataset(LookupError):
    """The dataset was logged through another tracking server than the one configured."""


@dataclass
class Survey:
    """The pins a dataset must carry according to MLflow, and what nothing references."""

    dataset: str
    versions: list[int]
    desired: dict[str, int] = field(default_factory=dict)  # pin -> version
    stale: list[str] = field(default_factory=list)  # pins whose reference is gone
    kept_unknown: list[str] = field(default_factory=list)  # pins that could not be checked
    referenced: dict[int, list[str]] = field(default_factory=dict)  # version -> pins
    from_mlflow: set[int] = field(default_factory=set)  # versions that MLflow logged
    by_model: dict[str, int] = field(default_factory=dict)  # logged model id -> version
    unbound: dict[str, str] = field(default_factory=dict)  # pin -> model whose binding tag it needs


def survey(uri: str, refs: References, opts: Mapping[str, str] | None = None) -> Survey:
    """Compare dataset ``uri``'s pins with what MLflow references.

    The order is what makes gc safe against registry operations made while it runs: the pins
    first (a pin set later is never judged against an older view of MLflow), then the
    liveness of each logged model and run the dataset's commits name, and only then every
    model version, read afresh: a version registered before that read is seen, and one
    registered after it needs a logged model that was still live when it was looked up,
    whose weights are then kept anyway (MLflow refuses to register a deleted logged model).
    """
    pins = {t: v for t, v in store.tags(uri, storage_options=opts).items() if sidecar.is_pin(t)}
    infos = store.versions(uri, storage_options=opts)
    p = Survey(uri, [v.version for v in infos])
    by_model = p.by_model
    for info in infos:
        model_id = info.properties.get("mlflow.model_id")
        if model_id:
            by_model[model_id] = info.version
        if model_id or info.properties.get("mlflow.run_id"):
            p.from_mlflow.add(info.version)
    for model_id, version in by_model.items():
        if refs.logged_model_live(model_id):
            p.desired[sidecar.model_pin(model_id)] = version
    for info in infos:  # saved in a run without a logged model: kept while the run exists
        run_id = info.properties.get("mlflow.run_id")
        if run_id and not info.properties.get("mlflow.model_id") and refs.run_live(run_id):
            p.referenced.setdefault(info.version, []).append(f"run {run_id}")
            p.desired[sidecar.run_pin(run_id)] = info.version  # the run's newest such version
    refs.reread()
    unknown_bindings = _model_version_pins(p, refs)
    for pin in pins:
        if pin in p.desired:
            continue
        parsed = sidecar.parse_model_version_pin(pin)
        legacy = pin.startswith(sidecar.LEGACY_MODEL_VERSION_PIN)
        if (parsed is not None and parsed[1] in unknown_bindings.get(parsed[0], ())) or (legacy and unknown_bindings):
            p.kept_unknown.append(pin)
        else:
            p.stale.append(pin)
    for pin, version in {**{t: pins[t] for t in p.kept_unknown}, **p.desired}.items():
        p.referenced.setdefault(version, []).append(pin)
    if p.from_mlflow and not refs.assume_logged_here and not refs.knows(infos, p):
        raise ForeignDataset(
            f"the tracking server at {mlflow.get_tracking_uri()} knows none of the experiments, runs, logged "
            f"models or model versions that wrote {uri}; nothing was changed. Point MLFLOW_TRACKING_URI at the "
            f"server that logged them (or, if its experiments were purged, pass assume_logged_here=True / "
            f"--assume-logged-here)."
        )
    return p


def _model_version_pins(p: Survey, refs: References) -> dict[str, set[str]]:
    """Add the pin of every model version whose weights are in this dataset to ``p.desired``;
    binding -> the model versions whose target could not be told (their pins are kept)."""
    unknown: dict[str, set[str]] = {}
    for mv in refs.model_versions:
        try:
            binding = refs.binding(mv.name)
        except MlflowException as err:
            if not_found(err):
                continue  # the registered model was deleted or renamed since the read
            raise
        target = refs.target(mv)
        if target is None:
            unknown.setdefault(binding, set()).add(str(mv.version))
            continue
        if target.model_id is not None and target.model_id in p.by_model:
            version = p.by_model[target.model_id]
        elif target.uri is not None and same_dataset(target.uri, p.dataset) and target.version in p.versions:
            version = target.version
        else:
            continue  # references another dataset, or no Lance weights at all
        pin = sidecar.model_version_pin(binding, mv.version)
        p.desired[pin] = version
        if not refs.stored(mv.name):  # a plan writes nothing: apply_pins stores the binding first
            p.unbound[pin] = mv.name
    return unknown


def apply_pins(
    p: Survey, refs: References, opts: Mapping[str, str] | None, scope: Callable[[str], bool] = lambda pin: True
) -> tuple[list[str], list[str]]:
    """Set the desired pins and remove the stale ones (within ``scope``); (pinned, unpinned).

    MLflow was read before this dataset's pins were, so each stale pin's reference is looked
    up again, fresh, right before the pin goes: a registration made while gc runs keeps it.
    """
    current = store.tags(p.dataset, storage_options=opts)
    pinned, unpinned = [], []
    for pin, version in sorted(p.desired.items()):
        if scope(pin) and current.get(pin) != version:
            if pin in p.unbound and not _bound(refs, p.unbound[pin]):
                continue  # its model is gone since the read: nothing references the pin any more
            store.tag(p.dataset, pin, version, storage_options=opts)
            pinned.append(pin)
    for pin in sorted(p.stale):
        if scope(pin) and pin in current and not refs.still_referenced(pin):
            try:
                store.untag(p.dataset, pin, storage_options=opts)
            except store.VersionNotFoundError:
                pass  # removed concurrently
            unpinned.append(pin)
    return pinned, unpinned


def _bound(refs: References, name: str) -> bool:
    """Store model ``name``'s binding tag before a pin names it; False if the model is gone."""
    try:
        refs.binding(name, store_tag=not refs.stored(name))
        return True
    except MlflowException as err:
        if not_found(err):
            return False
        raise


# --------------------------------------------------------------------------- gc


@dataclass
class GcResult:
    """What ``gc`` did (or, dry, would do) to one dataset."""

    dataset: str
    removed_versions: list[int]
    bytes_removed: int  # everything freed, orphans included
    pinned: list[str]
    unpinned: list[str]
    kept_referenced: list[int]  # versions a live logged model or model version references
    dry_run: bool = False
    skipped: str | None = None  # why this dataset was left alone (``all=True`` only)
    orphan_files: int = 0  # files no version named (what killed saves left)
    orphan_bytes: int = 0
    # why each version that stays stays, every reason that holds: "mlflow_reference",
    # "tag:<name>", "latest", "keep_last", "older_than" (newer than the cutoff), "grace"
    # (superseded less than grace ago), "not_logged_by_mlflow" (no keep_last/older_than given,
    # and MLflow never logged it)
    kept: dict[int, list[str]] = field(default_factory=dict)


def is_managed(uri: str, opts: Mapping[str, str] | None = None) -> bool:
    """Whether MLflow logged any version of the dataset (so MLflow decides what gc removes)."""
    return any(sidecar.is_pin(t) for t in store.tags(uri, storage_options=opts)) or any(
        v.properties.get("mlflow.model_id") or v.properties.get("mlflow.run_id")
        for v in store.versions(uri, storage_options=opts)
    )


def gc_dataset(
    uri: str,
    refs: References,
    *,
    keep_last: int | None = None,
    older_than: timedelta | None = None,
    grace: timedelta = timedelta(minutes=30),
    dry_run: bool = False,
    storage_options: Mapping[str, str] | None = None,
) -> GcResult:
    """Reconcile the dataset's pins with MLflow, then remove what nothing references.

    Removed: versions MLflow logged that no live logged model or model version references
    (plus, with ``keep_last``/``older_than``, other unreferenced versions outside that
    policy), never the latest, a version superseded less than ``grace`` ago, or one a person
    tagged; then every data file no surviving version shares, and the files no version names
    that are older than ``grace`` (what killed saves left). See ``survey`` for the order of the
    reads that keeps this safe while the registry changes.
    """
    opts = options(uri, storage_options)
    p = survey(uri, refs, opts)
    pinned, unpinned = ([], list(p.stale)) if dry_run else apply_pins(p, refs, opts)
    policy = keep_last is not None or older_than is not None
    pool = set(p.versions) if policy else p.from_mlflow
    report = store.prune(
        uri,
        keep_last=keep_last,
        older_than=older_than,
        grace=grace,
        storage_options=opts,
        candidates=pool - set(p.referenced),
        ignore_tags=p.stale if dry_run else (),
        dry_run=dry_run,
    )
    if not dry_run and (report.removed_versions or pinned or unpinned):
        sidecar.refresh(uri, opts, model_names=refs.bindings())
    kept = {}
    for version, why in report.kept.items():
        # a pin is a tag MLflow's references put there, not a person's; outside the candidates
        # means referenced, or (no keep_last / older_than) never logged by MLflow
        outside = "mlflow_reference" if version in p.referenced else "not_logged_by_mlflow"
        named = [
            "mlflow_reference"
            if r.startswith("tag:") and sidecar.is_pin(r[4:])
            else outside
            if r == "not_a_candidate"
            else r
            for r in why
        ]
        kept[version] = list(dict.fromkeys(named))
    return GcResult(
        uri,
        report.removed_versions,
        report.bytes_removed,
        pinned,
        unpinned,
        sorted(p.referenced),
        dry_run=dry_run,
        orphan_files=report.orphan_files,
        orphan_bytes=report.orphan_bytes,
        kept=kept,
    )


def gc(
    target: str | os.PathLike | None = None,
    *,
    all: bool = False,
    keep_last: int | None = None,
    older_than: timedelta | None = None,
    grace: timedelta = timedelta(minutes=30),
    dry_run: bool = False,
    assume_logged_here: bool = False,
    storage_options: Mapping[str, str] | None = None,
) -> list[GcResult]:
    """Remove the weights nothing references any more, one result per dataset.

    Where MLflow logged the versions, MLflow's references decide, read in an order no
    registry operation can beat (see ``survey``); a version is never removed while it is the
    latest, superseded less than ``grace`` ago, or tagged by a person. Files no version names
    (what killed saves left) go once older than ``grace``. Deletes stay inside each dataset.

    Args:
        target: a dataset URI, or a registered model name (the datasets its versions use).
        all: every dataset under the Lance roots and every registered model's.
        keep_last / older_than: also remove versions MLflow never logged, outside this policy
            (required for a dataset MLflow never wrote to; applied only to a dataset named
            here or under a Lance root).
        grace: keep versions superseded less than this long ago (a save in flight reuses the
            latest version's files), and files younger than this.
        dry_run: report what would go; write and delete nothing.
        assume_logged_here: trust that this tracking server logged the datasets even though it
            knows none of their experiments, runs or models (all purged).
        storage_options: for object storage.

    Returns:
        A GcResult per dataset: versions removed, bytes freed (orphans included), pins set and
        removed, why each version kept stays (``kept``: an MLflow reference, a person's tag,
        latest, keep_last, older_than, grace, or never logged by MLflow), and, with ``all``,
        why a dataset was left alone (``skipped``).

    Raises:
        ValueError: neither ``target`` nor ``all`` given; for a dataset MLflow never logged
            to, neither ``keep_last`` nor ``older_than``.
        LookupError: a registered model with no version logged with mlflow_lance, or a
            dataset logged through another tracking server than the one configured.
        FileNotFoundError / WeightsError / MlflowException: a dataset or model named in
            ``target`` cannot be read (with ``all``, such a dataset is ``skipped`` instead).

    Example:
        >>> gc(all=True, dry_run=True)
        >>> gc("churn")   # the datasets registered model "churn" uses
    """
    if not all and target is not None and is_dataset_target(os.fspath(target)):
        uri = os.fspath(target)
        opts = options(uri, storage_options)
        if not is_tracking_uri_set() and not is_managed(uri, opts):  # the cheap check first
            r = store.prune(
                uri,
                keep_last=keep_last,
                older_than=older_than,
                grace=grace,
                storage_options=opts,
                dry_run=dry_run,
            )
            return [
                GcResult(
                    uri,
                    r.removed_versions,
                    r.bytes_removed,
                    [],
                    [],
                    [],  # MLflow references nothing here: tagged versions are in ``kept``
                    dry_run=dry_run,
                    orphan_files=r.orphan_files,
                    orphan_bytes=r.orphan_bytes,
                    kept=r.kept,
                )
            ]
    refs = References(assume_logged_here=assume_logged_here)
    results = []
    explicit = not all and target is not None and is_dataset_target(os.fspath(target))
    roots = [] if explicit else lance_roots(refs.client)
    for u in datasets_for(target, refs, all=all):
        # keep_last / older_than remove versions nothing in MLflow speaks for: only in a dataset
        # named here or under a Lance root, never one that only a model version's MLmodel or
        # tags name (anyone who can edit those could aim it at any dataset this machine reaches)
        policy = explicit or any(under(u, root) for root in roots)
        try:
            results.append(
                gc_dataset(
                    u,
                    refs,
                    keep_last=keep_last if policy else None,
                    older_than=older_than if policy else None,
                    grace=grace,
                    dry_run=dry_run,
                    storage_options=storage_options,
                )
            )
        except (ForeignDataset, store.WeightsError, FileNotFoundError, MlflowException) as err:
            if not all or (isinstance(err, MlflowException) and not not_found(err)):
                raise
            # one dataset changed underneath (gone, renamed away, damaged): the others go on
            results.append(GcResult(u, [], 0, [], [], [], dry_run=dry_run, skipped=_first_line(err)))
    return results


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:500]


# --------------------------------------------------------------------------- finding datasets


def datasets_for(target: str | os.PathLike | None, refs: References, *, all: bool = False) -> list[str]:
    """The dataset URIs a target names: a URI as is; a registered model's bound dataset and the
    datasets its versions point at; with ``all``, every dataset anyone logged to."""
    if all:
        found = [*_datasets_under_roots(refs)]
        for name in refs.registered:
            found += model_datasets(name, refs)
        return _unique(found)
    if target is None:
        raise ValueError("name a dataset URI or a registered model, or pass all=True")
    target = os.fspath(target)
    if target in refs.registered and not os.path.exists(target):
        uris = model_datasets(target, refs)
        if not uris:
            raise LookupError(f"registered model {target!r} has no version logged with mlflow_lance")
        return uris
    return [target]


def model_datasets(name: str, refs: References) -> list[str]:
    """The datasets registered model ``name`` uses: the one it is bound to and those its
    versions' weights live in (their ``lance.uri`` tags, else their MLmodel)."""
    uris = []
    rm = refs.registered.get(name)
    if rm is None:  # renamed or deleted since the registry was (re)read
        return []
    bound = (rm.tags or {}).get(DATASET_TAG)
    if bound:
        uris.append(bound)
    for mv in refs.model_versions:
        if mv.name != name:
            continue
        tagged = (mv.tags or {}).get("lance.uri")
        if tagged:
            uris.append(tagged)
            continue
        t = refs.target(mv)
        if t is not None and t.uri is None and t.model_id is not None:
            t = refs.target_from_mlmodel(mv)  # the dataset that logged model wrote to
        if t is not None and t.uri:
            uris.append(t.uri)
    return _unique(u for u in uris if local_path(u) is None or os.path.exists(local_path(u)))


def under(uri: str, root: str) -> bool:
    """Whether dataset ``uri`` lies inside Lance root ``root``, by its path as written (a link
    on the way is not followed: see fs.list_dirs, which lists no link)."""
    local, base = local_path(uri), local_path(root)
    if (local is None) != (base is None):
        return False
    if local is not None:
        uri, root = os.path.normpath(os.path.abspath(local)), os.path.normpath(os.path.abspath(base))
    return uri.rstrip("/").startswith(root.rstrip("/") + "/")


def _unique(uris: Iterable[str]) -> list[str]:
    out: list[str] = []
    for u in uris:
        if not any(same_dataset(u, seen) for seen in out):
            out.append(u)
    return out


def lance_roots(client: MlflowClient) -> list[str]:
    """Every Lance root in use: MLFLOW_LANCE_ROOT, and each experiment's default one."""
    roots = [os.environ[ROOT_ENV]] if os.environ.get(ROOT_ENV) else []
    from mlflow.entities import ViewType

    for exp in paged(client.search_experiments, view_type=ViewType.ALL, max_results=1000):
        try:
            roots.append(lance_root(exp.artifact_location, exp.experiment_id))
        except ValueError:
            continue  # proxied artifacts: only MLFLOW_LANCE_ROOT can say where
    return _unique(r.rstrip("/") for r in roots)


def _datasets_under_roots(refs: References) -> list[str]:
    found = []
    for root in lance_roots(refs.client):
        opts = options(root)
        found += [d for d in list_dirs(f"{root}/models", opts) if d.endswith(".lance")]
        for exp in list_dirs(f"{root}/experiments", opts):
            found += [d for d in list_dirs(exp, opts) if d.endswith(".lance")]
            found += [d for d in list_dirs(f"{exp}/checkpoints", opts) if d.endswith(".lance")]  # one per run
    return found
