"""The YAML sidecar next to each dataset, and the names of the pins it is derived from.

``<dataset>.lance`` gets ``<dataset>.lance.yaml``, readable by a person and by
``yaml.safe_load``:

    dataset: /data/lance/models/churn-3f9a1c0b2e4d.lance
    lance_latest_version: 7
    runs:                       # every version a run logged that is still stored
      4f0c...:
      - {lance_version: 6, model_id: m-81a..., artifact_path: model, step: 2, time: '...'}
      - {lance_version: 7, model_id: m-9c2..., artifact_path: model, step: 3, time: '...'}
    logged_models:              # logged models MLflow still lists (pinned)
      m-9c2...: {lance_version: 7, run_id: 4f0c..., artifact_path: model, step: 3}
    registered_models:          # by binding: a registered model's durable identity
      3f9a1c0b2e4d:
        name: churn
        versions: {'3': {lance_version: 7}}
    pins: {model.m-9c2...: 7, mv.3f9a1c0b2e4d.3: 7}

The sidecar is derived data. The truth is in the Lance dataset: each version's commit
properties carry the run ID, model ID, artifact name and step, and Lance tags (*pins*) hold
every version MLflow references: ``model.<model id>`` for a logged model,
``mv.<binding>.<version>`` for a registered model version (the binding is a registered-model
tag that survives renames, see lifecycle.py). Versions written before pins named their
registered model carry ``run.<run id>`` / ``model-version.<n>``, which are kept until a
``sync`` or ``gc`` replaces them.

The sidecar is rebuilt whenever it is missing, damaged, too large, stale (behind the
dataset's latest version or its pins) or disagrees with the commit it names, so concurrent
writers never lose an entry and a tampered sidecar never picks the weights. Writes are atomic
(rename locally, a single PUT on object storage).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone

import yaml

from . import store
from .fs import parse_yaml, read_text, write_text

MODEL_PIN = "model."
MODEL_VERSION_PIN = "mv."
RUN_PIN = "run."
LEGACY_MODEL_VERSION_PIN = "model-version."
PIN_PREFIXES = (MODEL_PIN, MODEL_VERSION_PIN, RUN_PIN, LEGACY_MODEL_VERSION_PIN)
MAX_SIDECAR_BYTES = 8 << 20  # larger files are not parsed: the sidecar is rebuilt instead
_HEADER = (
    "# Written by mlflow-lance: which Lance version each MLflow run, logged model and registered\n"
    "# model version holds. Derived from the dataset's commits and pins; `mlflow-lance sync` rebuilds it.\n"
)


def sidecar_uri(dataset_uri: str) -> str:
    return dataset_uri.rstrip("/") + ".yaml"


def model_pin(model_id: str) -> str:
    """The pin of a logged model's version."""
    return f"{MODEL_PIN}{model_id}"


def model_version_pin(binding: str, version: int | str) -> str:
    """The pin of a registered model version (``binding``: the registered model's identity)."""
    return f"{MODEL_VERSION_PIN}{binding}.{version}"


def run_pin(run_id: str) -> str:
    """The pin of a version a run saved without a logged model (``log_state_dict``, and
    ``log_model`` before pins named logged models)."""
    return f"{RUN_PIN}{run_id}"


def is_pin(tag: str) -> bool:
    """True for the Lance tags mlflow-lance manages (as opposed to a person's tags)."""
    return tag.startswith(PIN_PREFIXES)


def parse_model_version_pin(tag: str) -> tuple[str, str] | None:
    """(binding, version) of an ``mv.<binding>.<version>`` pin, else None."""
    if not tag.startswith(MODEL_VERSION_PIN):
        return None
    binding, _, version = tag[len(MODEL_VERSION_PIN) :].rpartition(".")
    return (binding, version) if binding and version.isdigit() else None


# --------------------------------------------------------------------------- the mapping


def _int(value: object) -> int | None:
    """``value`` as an int, or None where it is none: YAML's .inf and .nan, a fraction, a bool."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        return None
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None


def build(
    dataset: str | store.Dataset,
    storage_options: Mapping[str, str] | None = None,
    *,
    model_names: Mapping[str, str] | None = None,
) -> dict:
    """The sidecar document, from the dataset's commit properties and pins alone.

    ``model_names`` maps bindings to registered model names (the registry knows them; without it
    the name recorded at log time is used).
    """
    dataset = store.Dataset.of(dataset, storage_options)
    infos = store.versions(dataset)
    pins = _pins(dataset)
    known_names = {
        v.properties["mlflow.binding"]: v.properties.get("mlflow.registered_model_name")
        for v in infos
        if v.properties.get("mlflow.binding")
    }
    known_names.update(model_names or {})
    logged, registered, legacy = _pinned({v.version: v for v in infos}, pins, known_names)
    doc = {
        "dataset": dataset.uri,
        "lance_latest_version": infos[-1].version if infos else 0,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": _runs(infos),
        "logged_models": logged,
        "registered_models": registered,
        "pins": dict(sorted(pins.items())),
    }
    if legacy:
        doc["legacy_pins"] = legacy
    return doc


def _runs(infos: list[store.VersionInfo]) -> dict[str, list[dict]]:
    """Run ID -> the versions it logged, oldest first, from their commit properties."""
    runs: dict[str, list[dict]] = {}
    for v in infos:
        run_id = v.properties.get("mlflow.run_id")
        if run_id:
            runs.setdefault(run_id, []).append(
                {
                    "lance_version": v.version,
                    "model_id": v.properties.get("mlflow.model_id"),
                    "artifact_path": v.properties.get("mlflow.artifact_path"),
                    "step": _int(v.properties.get("mlflow.step")),
                    "time": v.timestamp.isoformat(timespec="seconds"),
                }
            )
    return runs


def _pinned(
    by_version: Mapping[int, store.VersionInfo],
    pins: Mapping[str, int],
    known_names: Mapping[str, str | None],
) -> tuple[dict[str, dict], dict[str, dict], dict[str, int]]:
    """The logged models, the registered models (by binding) and the legacy pins, from the
    pins and the commit properties of the versions they hold."""
    logged: dict[str, dict] = {}
    registered: dict[str, dict] = {}
    legacy: dict[str, int] = {}
    for tag, version in sorted(pins.items()):
        info = by_version.get(version)
        props = info.properties if info else {}
        if tag.startswith(MODEL_PIN):
            logged[tag[len(MODEL_PIN) :]] = {
                "lance_version": version,
                "run_id": props.get("mlflow.run_id"),
                "artifact_path": props.get("mlflow.artifact_path"),
                "step": _int(props.get("mlflow.step")),
            }
        elif (parsed := parse_model_version_pin(tag)) is not None:
            binding, mv = parsed
            entry = registered.setdefault(binding, {"name": known_names.get(binding), "versions": {}})
            entry["versions"][mv] = {"lance_version": version, "model_id": props.get("mlflow.model_id")}
        else:
            legacy[tag] = version
    for entry in registered.values():
        entry["versions"] = dict(sorted(entry["versions"].items(), key=lambda kv: int(kv[0])))
    return logged, registered, legacy


def _pins(dataset: store.Dataset) -> dict[str, int]:
    """The dataset's pins: its Lance tags that mlflow-lance manages."""
    return {t: v for t, v in store.tags(dataset).items() if is_pin(t)}


def _valid(doc: object) -> bool:
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("runs"), dict)
        and all(isinstance(v, list) and all(isinstance(e, dict) for e in v) for v in doc["runs"].values())
        and isinstance(doc.get("logged_models"), dict)
        and isinstance(doc.get("registered_models"), dict)
        and isinstance(doc.get("pins"), dict)
        and isinstance(doc.get("lance_latest_version"), int)
    )


def read(dataset_uri: str, storage_options: Mapping[str, str] | None = None) -> dict | None:
    """The sidecar as stored, or None if it is missing, damaged, too large or of an old format."""
    text = read_text(sidecar_uri(dataset_uri), storage_options, limit=MAX_SIDECAR_BYTES)
    if text is None:
        return None
    try:
        doc = parse_yaml(text)
    except (yaml.YAMLError, RecursionError, ValueError):
        return None
    return doc if _valid(doc) else None


class _NoAliases(yaml.SafeDumper):
    """Writes a shared object out again instead of as an alias (read() refuses aliases)."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def write(dataset_uri: str, doc: dict, storage_options: Mapping[str, str] | None = None) -> None:
    text = _HEADER + yaml.dump(doc, Dumper=_NoAliases, sort_keys=False, default_flow_style=False)
    write_text(sidecar_uri(dataset_uri), text, storage_options)


def refresh(
    dataset_uri: str,
    storage_options: Mapping[str, str] | None = None,
    *,
    force: bool = False,
    model_names: Mapping[str, str] | None = None,
    save: bool = True,
) -> dict:
    """The current sidecar; rebuilt if missing, damaged, stale or ``force``, and then written
    unless ``save`` is False (a read: it uses the rebuilt document and leaves no trace).

    Stale means behind the dataset's latest version or its pins: a model version is pinned
    after its Lance commit, so a sidecar another writer wrote in between can lack it.
    """
    dataset = store.Dataset(dataset_uri, storage_options)  # opened once for the check and the build
    doc = None if force else read(dataset_uri, storage_options)
    if doc is not None and (
        doc["lance_latest_version"] != store.latest_version(dataset) or doc["pins"] != _pins(dataset)
    ):
        doc = None
    if doc is None:
        previous = read(dataset_uri, storage_options) if model_names is None else None
        carried = {
            b: e.get("name")
            for b, e in (previous or {}).get("registered_models", {}).items()
            if isinstance(e, dict) and isinstance(e.get("name"), str)
        }
        doc = build(dataset, model_names={**carried, **(model_names or {})})
        if save:
            write(dataset_uri, doc, storage_options)
    return doc


def version_for_run(
    dataset_uri: str,
    run_id: str,
    storage_options: Mapping[str, str] | None = None,
    *,
    step: int | None = None,
    model_id: str | None = None,
) -> int:
    """The Lance version run ``run_id`` logged, from the sidecar (rebuilt if it lacks the run).

    A run that logged several versions (checkpoints, several models) needs ``step=`` or
    ``model_id=``; the error lists what the run logged. The entry found is checked against
    the commit it names, so a sidecar that lies is rebuilt instead of trusted.
    """
    for attempt in range(2):
        doc = refresh(dataset_uri, storage_options, force=attempt > 0, save=False)  # a read writes nothing
        entries = [e for e in doc["runs"].get(run_id, []) if isinstance(e, dict)]
        if step is not None:
            entries = [e for e in entries if e.get("step") == step]
        if model_id is not None:
            entries = [e for e in entries if e.get("model_id") == model_id]
        if len(entries) == 1:
            version = _int(entries[0].get("lance_version"))
            if version is not None and _commit_matches(dataset_uri, version, run_id, entries[0], storage_options):
                return version
        elif len(entries) > 1:
            if attempt == 0:
                continue  # confirm against a fresh build before asking the caller to choose
            listed = "; ".join(
                f"version {e.get('lance_version')} (model_id={e.get('model_id')}, "
                f"step={e.get('step')}, name={e.get('artifact_path')})"
                for e in entries
            )
            raise store.VersionNotFoundError(
                f"run {run_id!r} logged {len(entries)} versions to {dataset_uri}: {listed}; pass step= or "
                f"model_id= to choose one"
            )
    recorded = ", ".join(list(doc["runs"])[:5]) or "none"
    wanted = "".join(f", {k}={v!r}" for k, v in (("step", step), ("model_id", model_id)) if v is not None)
    raise store.VersionNotFoundError(
        f"run {run_id!r}{wanted} has no stored version in {dataset_uri} (runs recorded: {recorded}); "
        f"check the run ID, or whether gc removed that version"
    )


def _commit_matches(uri: str, version: int, run_id: str, entry: dict, opts: Mapping[str, str] | None) -> bool:
    """Whether version ``version``'s commit properties say it was logged by this run (and model)."""
    try:
        props = store.version_properties(uri, version, storage_options=opts)
    except store.WeightsError:  # gone, or its commit is malformed: not to be trusted
        return False
    return props.get("mlflow.run_id") == run_id and (
        entry.get("model_id") is None or props.get("mlflow.model_id") == entry.get("model_id")
    )
