"""gc's deletions: the versions gc decided to remove, the files only they used, and the files
no version names at all (what a killed save left), each removed inside the dataset and
nowhere else.

This replaces Lance's ``cleanup_old_versions`` for two reasons. It is confined: every
directory is opened without following links and every delete goes through those
descriptors (fs.Tree), so a dataset whose ``data/`` or ``_versions/`` was replaced by a link
to someone else's, or a link swapped in while gc runs, never loses anyone else's files. And
it reclaims orphans: Lance keeps files that no version names while they are younger than
7 days; here they go once they are older than the grace period, which every save finishes
within (the same rule that lets a save reuse the latest version's files).

Order, so that a crash at any point loses nothing that is referenced: (1) read which files
every version uses (Lance decodes each manifest); (2) delete the doomed versions'
manifests, and flush ``_versions/``; (3) list the versions again and add the files of any
committed since; (4) delete the files that only doomed versions used, and the orphans.
A crash after (2) leaves files no version names: the next gc reclaims them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import pairwise
from typing import TYPE_CHECKING

from .dataset import Dataset, check_format, lance_call, open_lance, tag_list, utc, version_list
from .format import FORMAT_VERSION, plain_name
from .fs import Tree, proxied
from .index import INDEX_DIR, manifests

if TYPE_CHECKING:
    import lance

# Where Lance keeps the files a version names, and which of them gc may delete (index files
# live in nested directories of _indices/ and are left alone: weights datasets have none).
_DELETABLE = ("data", "_transactions", "_deletions", "_versions")
_INDEX = "/".join(INDEX_DIR)


@dataclass(frozen=True)
class Swept:
    """What one sweep removed (or, dry, would remove)."""

    versions: list[int]
    bytes_removed: int
    orphans: int  # files no version named
    orphan_bytes: int


def _tracked(dataset: Dataset, min_version: int | None = None) -> dict[int, set[str]]:
    """Version -> the paths (relative to the dataset) of every file it names."""
    ds = open_lance(dataset.uri, dataset.storage_options) if min_version is not None else dataset.lance
    table = lance_call(
        lambda: ds.tracked_files(min_version=min_version).read_all().to_pylist(), dataset.uri, "the manifests"
    )
    out: dict[int, set[str]] = {}
    for row in table:
        out.setdefault(int(row["version"]), set()).add(str(row["path"]))
    return out


def _split(path: str) -> tuple[str, str] | None:
    """(directory, name) of a file gc may delete, or None for anything else."""
    folder, _, name = path.rpartition("/")
    return (folder, name) if folder in _DELETABLE and plain_name(name) else None


def _leftover(folder: str, name: str, versions: Collection[int]) -> bool:
    """A file no version names that a crashed writer may have left in ``folder``."""
    if folder == "_versions":  # temporary manifests and hints; never a listed manifest
        return name.startswith(".tmp") or ".manifest#" in name
    if folder == _INDEX:  # the index of a version that is gone, or a temporary file
        stem = name[: -len(".json")] if name.endswith(".json") else ""
        return name.endswith(".tmp") or (stem.isdigit() and int(stem) not in versions)
    return True


def sweep(dataset: Dataset, doomed: Collection[int], *, grace: timedelta, dry_run: bool = False) -> Swept:
    """Remove the versions ``doomed`` (none of them the latest), the files only they used, and
    the files no version names that are older than ``grace``; what was (or would be) freed."""
    if not dry_run and proxied(dataset.uri):  # finish dead writers' claimed commits first
        from . import transport

        transport.settle(dataset.uri, grace.total_seconds())
    with Tree(dataset.uri, dataset.storage_options, dry_run=dry_run) as tree:
        tree.check()
        tracked = _tracked(dataset)
        doomed = sorted(set(doomed) & set(tracked))
        present = {f"{folder}/{e.name}": e for folder in (*_DELETABLE, _INDEX) for e in tree.files(folder)}
        manifests_gone = sorted(p for v in doomed for p in tracked[v] if p.startswith("_versions/") and _split(p))
        indexes_gone = [p for v in doomed if (p := f"{_INDEX}/{v}.json") in present]
        removed = manifests_gone + indexes_gone
        if not dry_run:
            removed = _remove(tree, removed)
            tree.sync(["_versions"])
        newest = max(tracked, default=0)
        listed = manifests(dataset.uri, dataset.storage_options)
        if not dry_run and any(v > newest for v in listed):  # committed while gc ran: their files stay
            tracked.update(_tracked(dataset, min_version=newest + 1))
        kept = set().union(*(files for v, files in tracked.items() if v not in doomed))
        named = set().union(*tracked.values())
        only_doomed = sorted(p for v in doomed for p in tracked[v] if p not in kept and _split(p))
        cutoff = datetime.now(timezone.utc) - grace
        orphans = sorted(
            p
            for p, e in present.items()
            if p not in named and e.modified < cutoff and p not in indexes_gone and _leftover(*p.rsplit("/", 1), listed)
        )
        files = [p for p in only_doomed if p not in manifests_gone] + orphans
        if not dry_run:
            files = _remove(tree, files)
            tree.sync(_DELETABLE)
    orphans = [p for p in orphans if p in set(files)]
    size = lambda paths: sum(present[p].size for p in paths if p in present)  # noqa: E731
    return Swept(doomed, size(removed + files), len(orphans), size(orphans))


def _remove(tree: Tree, paths: list[str]) -> list[str]:
    """Delete each path (``folder/name``); the ones that were there to delete."""
    return [path for path in paths if tree.remove(*path.rsplit("/", 1))]


def choose_versions(
    ds: lance.LanceDataset,
    keep_last: int | None,
    older_than: timedelta | None,
    grace: timedelta,
    candidates: Collection[int] | None = None,
    ignore_tags: Collection[str] = (),
) -> tuple[list[int], dict[int, list[str]]]:
    """(versions to remove, why each other version stays: see ``GcReport.kept``), as if the
    tags in ``ignore_tags`` (about to be removed) were gone."""
    if keep_last is None and older_than is None and candidates is None:
        raise ValueError("gc needs keep_last=N and/or older_than=timedelta(...) to know what to remove")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    check_format(ds, FORMAT_VERSION)  # refuses a dataset that holds no weights
    all_versions = version_list(ds)
    tags: dict[int, list[str]] = {}
    for name, t in sorted(tag_list(ds).items()):
        if name not in ignore_tags:
            tags.setdefault(t["version"], []).append(name)
    latest = all_versions[-1]["version"] if all_versions else None
    newest = {v["version"] for v in all_versions[-(keep_last or 1) :]}
    now = datetime.now(timezone.utc)
    cutoff = now - older_than if older_than is not None else None
    superseded = {  # when each version stopped being the latest
        v["version"]: utc(nxt["timestamp"]) for v, nxt in pairwise(all_versions)
    }
    doomed, kept = [], {}
    for v in all_versions:
        version = v["version"]
        why = ["latest"] if version == latest else ["keep_last"] if version in newest else []
        why += [f"tag:{name}" for name in tags.get(version, ())]
        if candidates is not None and version not in candidates:
            why.append("not_a_candidate")
        if cutoff is not None and utc(v["timestamp"]) >= cutoff:
            why.append("older_than")
        if version in superseded and superseded[version] > now - grace:
            why.append("grace")
        if why:
            kept[version] = why
        else:
            doomed.append(version)
    return doomed, kept
