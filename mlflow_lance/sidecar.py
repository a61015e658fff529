"""The YAML sidecar next to each dataset: which Lance version each run and model version holds.

``<dataset>.lance`` gets ``<dataset>.lance.yaml``, readable by a person and by
``yaml.safe_load``:

    dataset: /data/lance/models/churn-3f9a1c0b2e.lance
    model_name: churn
    lance_latest_version: 7
    runs:
      4f0c...:  {lance_version: 7, model_id: m-81a..., artifact_path: model, time: '...'}
    model_versions:
      '3': {lance_version: 7, run_id: 4f0c...}

The sidecar is derived data. The truth is in the Lance dataset: each version's commit
properties carry the run and model ids, and Lance tags pin every version a run
(``run.<run id>``) or a registered model version (``model-version.<n>``) references. The
sidecar is rebuilt from that truth whenever it is missing, damaged or stale (its
``lance_latest_version`` behind the dataset's), so concurrent writers never lose an entry:
each rebuild sees every committed version. Writes are atomic (rename locally, a single PUT
on object storage).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, timezone
from urllib.parse import urlparse

import yaml

from . import store

RUN_TAG = "run."
MODEL_VERSION_TAG = "model-version."
_HEADER = (
    "# Written by mlflow-lance: which Lance version each MLflow run and registered model version\n"
    "# holds. Derived from the dataset's commits and tags; `mlflow-lance sync` rebuilds it.\n"
)


def sidecar_uri(dataset_uri: str) -> str:
    return dataset_uri.rstrip("/") + ".yaml"


def run_tag(run_id: str) -> str:
    return f"{RUN_TAG}{run_id}"


def model_version_tag(version: int | str) -> str:
    return f"{MODEL_VERSION_TAG}{version}"


# --------------------------------------------------------------------------- small-file IO


def _filesystem(uri: str, storage_options: Mapping[str, str] | None):
    """A pyarrow filesystem and path for ``uri`` (object storage), configured like Lance."""
    from pyarrow import fs

    opts = dict(storage_options or {})
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        endpoint = opts.get("aws_endpoint")
        kwargs = {
            "access_key": opts.get("aws_access_key_id"),
            "secret_key": opts.get("aws_secret_access_key"),
            "session_token": opts.get("aws_session_token"),
            "region": opts.get("aws_region", "us-east-1"),
        }
        if endpoint:
            ep = urlparse(endpoint)
            kwargs["endpoint_override"] = ep.netloc or endpoint
            kwargs["scheme"] = ep.scheme or "https"
        return fs.S3FileSystem(**{k: v for k, v in kwargs.items() if v}), f"{parsed.netloc}{parsed.path}"
    filesystem, path = fs.FileSystem.from_uri(uri)
    return filesystem, path


def read_text(uri: str, storage_options: Mapping[str, str] | None = None) -> str | None:
    """The file's text, or None if it does not exist."""
    local = store._local_path(uri)
    try:
        if local is not None:
            with open(local, encoding="utf-8") as f:
                return f.read()
        filesystem, path = _filesystem(uri, storage_options)
        with filesystem.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        if "not found" in str(err).lower() or "NoSuchKey" in str(err) or "does not exist" in str(err):
            return None
        raise


def write_text(uri: str, text: str, storage_options: Mapping[str, str] | None = None) -> None:
    """Replace the file atomically: readers see the old or the new text, never a mix."""
    local = store._local_path(uri)
    if local is not None:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        tmp = f"{local}.{os.getpid()}.{datetime.now().timestamp()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local)
        return
    filesystem, path = _filesystem(uri, storage_options)
    with filesystem.open_output_stream(path) as f:  # one PUT: atomic on S3-compatible stores
        f.write(text.encode("utf-8"))


# --------------------------------------------------------------------------- the mapping


def build(dataset_uri: str, storage_options: Mapping[str, str] | None = None) -> dict:
    """The sidecar document, from the dataset's commit properties and pin tags alone."""
    infos = store.versions(dataset_uri, storage_options=storage_options)
    tags = store.tags(dataset_uri, storage_options=storage_options)
    by_version = {v.version: v for v in infos}
    runs: dict[str, dict] = {}
    names = set()
    for v in infos:
        run_id = v.properties.get("mlflow.run_id")
        if v.properties.get("mlflow.registered_model_name"):
            names.add(v.properties["mlflow.registered_model_name"])
        if run_id and tags.get(run_tag(run_id)) == v.version:
            runs[run_id] = {
                "lance_version": v.version,
                "model_id": v.properties.get("mlflow.model_id"),
                "artifact_path": v.properties.get("mlflow.artifact_path"),
                "time": v.timestamp.isoformat(timespec="seconds"),
            }
    model_versions = {}
    for tag, version in tags.items():
        if tag.startswith(MODEL_VERSION_TAG):
            info = by_version.get(version)
            model_versions[tag[len(MODEL_VERSION_TAG):]] = {
                "lance_version": version,
                "run_id": info.properties.get("mlflow.run_id") if info else None,
            }
    return {
        "dataset": dataset_uri,
        "model_name": sorted(names)[0] if len(names) == 1 else (sorted(names) or None),
        "lance_latest_version": infos[-1].version if infos else 0,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
        "model_versions": dict(sorted(model_versions.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0)),
    }


def _valid(doc: object) -> bool:
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("runs"), dict)
        and isinstance(doc.get("model_versions"), dict)
        and isinstance(doc.get("lance_latest_version"), int)
    )


def read(dataset_uri: str, storage_options: Mapping[str, str] | None = None) -> dict | None:
    """The sidecar as stored, or None if it is missing or damaged."""
    text = read_text(sidecar_uri(dataset_uri), storage_options)
    if text is None:
        return None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return doc if _valid(doc) else None


def write(dataset_uri: str, doc: dict, storage_options: Mapping[str, str] | None = None) -> None:
    text = _HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    write_text(sidecar_uri(dataset_uri), text, storage_options)


def _pins(doc: dict) -> dict[str, int]:
    """The pin tags a sidecar document reflects."""
    pins = {run_tag(r): e.get("lance_version") for r, e in doc["runs"].items()}
    pins.update({model_version_tag(m): e.get("lance_version") for m, e in doc["model_versions"].items()})
    return pins


def refresh(dataset_uri: str, storage_options: Mapping[str, str] | None = None, *, force: bool = False) -> dict:
    """The current sidecar; rebuilt (and rewritten) if missing, damaged, stale or ``force``.

    Stale means behind the dataset's latest version or its pin tags: a model version is pinned
    after its Lance commit, so a sidecar another writer wrote in between can lack it.
    """
    doc = None if force else read(dataset_uri, storage_options)
    latest = store.latest_version(dataset_uri, storage_options=storage_options)
    pins = {
        t: v for t, v in store.tags(dataset_uri, storage_options=storage_options).items()
        if t.startswith((RUN_TAG, MODEL_VERSION_TAG))
    }  # fmt: skip
    if doc is None or doc["lance_latest_version"] != latest or _pins(doc) != pins:
        doc = build(dataset_uri, storage_options)
        write(dataset_uri, doc, storage_options)
    return doc


def version_for_run(dataset_uri: str, run_id: str, storage_options: Mapping[str, str] | None = None) -> int:
    """The Lance version run ``run_id`` logged, from the sidecar (rebuilt if it lacks the run)."""
    doc = read(dataset_uri, storage_options)
    if doc is None or run_id not in doc["runs"]:
        doc = refresh(dataset_uri, storage_options, force=True)
    if run_id not in doc["runs"]:
        known = ", ".join(list(doc["runs"])[:5]) or "none"
        raise store.VersionNotFoundError(
            f"run {run_id!r} has no pinned version in {dataset_uri} (runs recorded: {known}); "
            f"check the run ID, or run `mlflow-lance sync` if the run logged here"
        )
    return int(doc["runs"][run_id]["lance_version"])
