"""The version index: a JSON copy of a version's metadata rows, blob positions and fragment
list, kept next to the dataset at ``_mlflow_lance/index/<version>.json``, so that opening a
version reads one small file instead of one footer per data file (40 ms for GPT-2's 148
files locally, one request per file on object storage) and never asks Lance to decode a data
file. It is derived data, written (durably) right after each commit, and used two ways:

- **with Lance**: when its fragments are the manifest's and its rows hash to the digest the
  version's commit recorded (``mlflow_lance.rows``);
- **alone** (``alone``), for a load of the latest version or a numbered one: when that
  version's manifest is listed, the index carries the hash of the manifest's bytes, the
  commit's properties, and rows that hash to the digest among them. Lance is then never
  imported (about half a second of a fresh process), and the rows get every check a scan's get.

Anything else (missing, stale, unparsable, oversized, a version committed without a digest,
an index of an older format) is not used, and the version's rows are decoded from its data
files instead (see decoder.py). Reading an index never writes one: only a save, a ``sync``
or gc write them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from .format import (
    COMPRESSION_KEY,
    COMPRESSIONS,
    FORMAT_KEY,
    FORMAT_VERSION,
    PROP,
    Located,
    plain_name,
    rows_digest,
)
from .fs import StorageOptions, Tree, join, list_names, local_path, read_bytes
from .tensors import META_COLUMNS, hash_bytes

INDEX_DIR = ("_mlflow_lance", "index")
INDEX_FORMAT = 2
MAX_INDEX_BYTES = 16 << 20  # a version index larger than this is ignored (~80,000 rows)
INDEXED_PROPERTIES = (PROP + "rows", PROP + "tree", PROP + "container")  # what a load reads from a commit

Fragment = tuple[int, str, int]  # (fragment id, data file, rows)


def index_uri(uri: str, version: int) -> str:
    return join(uri, *INDEX_DIR, f"{version}.json")


def _linked_folder(uri: str) -> bool:
    """Whether a local dataset's index folder (or its parent) is a link: then it is not the
    dataset's own, and nothing is read from it or written into it."""
    root = local_path(uri)
    return root is not None and any(os.path.islink(os.path.join(root, *INDEX_DIR[:i])) for i in (1, 2))


def read(uri: str, storage_options: StorageOptions, version: int) -> dict | None:
    """The parsed index of ``version`` if it is well-formed (types and counts), else None."""
    if _linked_folder(uri):
        return None
    try:
        data = read_bytes(index_uri(uri, version), storage_options, limit=MAX_INDEX_BYTES, follow_links=False)
        if data is not None and data.count(b"[") + data.count(b"{") > len(data) // 25 + 64:
            return None  # a row takes >= 60 bytes and two brackets: this is a pile of tiny objects
        doc = json.loads(data) if data is not None else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("index_format") != INDEX_FORMAT or doc.get("version") != version:
        return None
    rows, fragments, props, schema = (
        doc.get("rows"),
        doc.get("fragments"),
        doc.get("properties"),
        doc.get("schema"),
    )
    n = len(META_COLUMNS)
    if (
        not isinstance(rows, list)
        or not isinstance(schema, dict)
        or not all(type(v) is str for v in schema.values())
        or not isinstance(fragments, list)
        or not all(_valid_fragment(f) for f in fragments)
        or len(rows) != sum(f[2] for f in fragments)
        or not all(valid_row(row, n) for row in rows)
        or not isinstance(props, dict)
        or not all(type(k) is str and type(v) is str for k, v in props.items())
    ):
        return None
    return doc


def valid_row(row: object, n: int) -> bool:
    """Each value of an index row has its column's JSON type (ints are never bools) and
    range (the chunk an int32, every other number a non-negative int64, as Lance stores them);
    the row holds the ``n`` metadata columns, then the payload's position and stored size."""
    if type(row) is not list or len(row) != n + 2 or n != len(META_COLUMNS):
        return False
    name, chunk, offset, nbytes, dtype, shape, digest, alias, position, stored = row  # META_COLUMNS' order
    return (
        type(name) is str
        and type(dtype) is str
        and type(digest) is str
        and (alias is None or type(alias) is str)
        and type(chunk) is int
        and 0 <= chunk < 1 << 31
        and _count(offset)
        and _count(nbytes)
        and type(shape) is list
        and all(map(_count, shape))
        and (position is None or _count(position))
        and (stored is None or _count(stored))
    )


def _count(v: object) -> bool:
    """A non-negative int64 (never a bool)."""
    return type(v) is int and 0 <= v < 1 << 63


def _valid_fragment(f: object) -> bool:
    """[fragment id, data file, rows]: the file a plain name in data/."""
    return (
        type(f) is list
        and len(f) == 3
        and type(f[0]) is int
        and 0 <= f[0] < 1 << 32
        and type(f[1]) is str
        and plain_name(f[1])
        and type(f[2]) is int
        and f[2] >= 0
    )


def rows(doc: dict) -> list[Located]:
    """A checked index's rows, addressed fragment by fragment as the index lists them."""
    n = len(META_COLUMNS)
    places = [(fid << 32 | i, path) for fid, path, count in doc["fragments"] for i in range(count)]
    return [
        Located(dict(zip(META_COLUMNS, row[:n], strict=True)), address, row[n], path, row[n + 1])
        for row, (address, path) in zip(doc["rows"], places, strict=True)
    ]


def matching(
    uri: str, storage_options: StorageOptions, version: int, table: list[Fragment], digest: str | None
) -> list[Located] | None:
    """The version's rows from its index, if the index checks out against the manifest's
    fragments (``table``) and the digest its commit recorded; else None."""
    if digest is None:
        return None
    doc = read(uri, storage_options, version)
    if doc is None or [tuple(f) for f in doc["fragments"]] != table:
        return None
    located = rows(doc)
    return located if rows_digest(r.meta for r in located) == digest else None


def write(
    uri: str,
    storage_options: StorageOptions,
    version: int,
    *,
    schema: Mapping[str, str],
    properties: Mapping[str, str],
    table: list[Fragment],
    located: list[Located],
    sync: bool = True,
) -> None:
    """Write (atomically; durably unless ``sync`` is False) the index of ``version``, through
    the dataset's directory descriptors (fs.Tree): a folder that is a link is a
    CorruptionError, and nothing is written outside the dataset."""
    if len(located) != sum(count for *_, count in table):
        return
    doc = {
        "index_format": INDEX_FORMAT,
        "version": version,
        "schema": {k: v for k, v in sorted(schema.items()) if k.startswith(PROP)},
        "properties": {k: properties[k] for k in INDEXED_PROPERTIES if k in properties},
        "manifest": next(
            filter(None, (manifest_digest(uri, storage_options, name) for name in manifest_names(version))),
            None,
        ),
        "fragments": [list(f) for f in table],
        "rows": [[r.meta[c] for c in META_COLUMNS] + [r.position, r.stored] for r in located],
    }
    with Tree(uri, storage_options) as tree:  # through directory descriptors: never through a link
        tree.write("/".join(INDEX_DIR), f"{version}.json", json.dumps(doc, separators=(",", ":")).encode(), sync=sync)


def manifests(uri: str, storage_options: StorageOptions) -> dict[int, str]:
    """Version -> manifest file name of each version the dataset lists (``<n>.manifest``, or
    the 20-digit ``u64::MAX - n`` names of Lance's newer layout); empty if none."""
    names = list_names(join(uri, "_versions"), storage_options) or []
    out = {}
    for name in names:
        digits, dot, ext = name.partition(".")
        if ext == "manifest" and dot and digits.isascii() and digits.isdigit() and len(digits) <= 20:
            out[(1 << 64) - 1 - int(digits) if len(digits) == 20 else int(digits)] = name
    return out


def manifest_names(version: int) -> tuple[str, str]:
    """The two names a version's manifest may have (Lance's newer layout first)."""
    return f"{(1 << 64) - 1 - version:020d}.manifest", f"{version}.manifest"


def manifest_digest(uri: str, storage_options: StorageOptions, name: str | None) -> str | None:
    """Hash of a manifest file's bytes: binds an index to the manifest it was made from, so an
    index outliving its dataset (a copied or recreated directory) is never read alone."""
    try:
        data = (
            read_bytes(join(uri, "_versions", name), storage_options, limit=MAX_INDEX_BYTES, follow_links=False)
            if name
            else None
        )
    except OSError:
        return None
    return hash_bytes(data) if data is not None else None


def alone(uri: str, storage_options: StorageOptions, version: int | None) -> tuple[int, dict, list[Located]] | None:
    """(version, index, rows) of the latest (or a numbered) version from its index alone, or
    None when that takes Lance: no index, or one that does not check out (see above)."""
    listed = manifests(uri, storage_options)
    number = max(listed, default=None) if version is None else version
    if number not in listed:
        return None
    doc = read(uri, storage_options, number)
    if (
        doc is None
        or type(doc.get("manifest")) is not str
        or any(row[-2] is None or row[-1] is None for row in doc["rows"])  # a read needs every position
        or doc["schema"].get(FORMAT_KEY) != str(FORMAT_VERSION)
        or doc["schema"].get(COMPRESSION_KEY, "none") not in ("none", *COMPRESSIONS)
        or doc["manifest"] != manifest_digest(uri, storage_options, listed[number])
    ):
        return None
    located = rows(doc)
    if rows_digest(r.meta for r in located) != doc["properties"].get(PROP + "rows"):
        return None
    return number, doc, located
