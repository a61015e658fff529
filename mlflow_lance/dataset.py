"""A weights dataset as Lance sees it: a handle that opens it once, checking out versions and
tags, a version's commit properties and fragment table, and what Lance's errors mean.

Lance follows links and blocks on FIFOs, so a local dataset is checked (fs.check_tree) before
Lance is handed it; Lance's own errors about a dataset (a manifest that does not decode, a
missing file, an unreachable store) become this package's errors naming the dataset and
version (``lance_error``). Lance is imported only here and where a version is written or its
rows decoded: a load through the version index never imports it.
"""

from __future__ import annotations

import os
import random
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TypeVar

import pyarrow as pa

from .errors import CorruptionError, VersionNotFoundError, WeightsError
from .format import FORMAT_KEY, PROP, Version, check_tag_name, plain_name
from .fs import StorageOptions, check_tree, lance_target, local_path, logical, unreachable
from .index import Fragment

if TYPE_CHECKING:
    import lance

T = TypeVar("T")

# Retry jitter: never draws from the global RNG that training resumes bit-exactly.
JITTER = random.Random()


def lance_error(uri: str, err: BaseException, what: str, elapsed: float = 0.0) -> Exception:
    """What an error Lance raised while reading ``what`` of ``uri`` means: ConnectionError for
    storage that cannot be reached, else a CorruptionError naming the dataset and the part."""
    uri = logical(uri)
    if (gone := unreachable(uri, err, elapsed)) is not None:
        return gone
    text = " ".join(str(err).split())[:300]
    return CorruptionError(
        f"{what} of {uri} cannot be read: {text}. The dataset's files are damaged or crafted; "
        f"restore them or load another version"
    )


def retrying(
    call: Callable[[], T],
    *,
    retry: Callable[[Exception], bool],
    attempts: int,
    pause: float,
    between: Callable[[], object] | None = None,
) -> T:
    """``call()``, called again while it raises an error ``retry`` accepts, at most ``attempts``
    times, after a jittered pause that doubles each time (from ``pause`` seconds, up to 64x)
    and ``between()``; the last error otherwise. The one retry loop of the package: concurrent
    commits, tags moved by another writer, files another gc removed under a listing."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:
            if not retry(err) or attempt == attempts - 1:
                raise
            time.sleep(JITTER.uniform(0, pause * 2 ** min(attempt, 6)))
            if between is not None:
                between()
    raise AssertionError("unreachable")


def _lance_failure(err: BaseException) -> bool:
    """An error Lance raised about a dataset (as opposed to one of ours, or an interrupt); a
    Rust panic is a ``PanicException``, a BaseException that ``except Exception`` misses."""
    return (
        isinstance(err, (ValueError, OSError, RuntimeError))
        and not isinstance(err, (WeightsError, ConnectionError, FileNotFoundError))
    ) or type(err).__name__ == "PanicException"


def _vanished(err: Exception) -> bool:
    text = str(err).lower()
    return _lance_failure(err) and ("not found" in text or "no such file" in text)


def lance_call(call: Callable[[], T], uri: str, what: str, *, retry_vanished: bool = True) -> T:
    """``call()``, a read or write of ``what`` of dataset ``uri`` through Lance, with Lance's
    failures turned into this package's errors (``lance_error``), a Rust panic while a manifest
    is decoded (a crafted schema type) included. ``retry_vanished``: retried while what it
    reads vanishes under it (another gc removing a version or a tag between Lance's listing
    and its read)."""
    started = time.monotonic()
    try:
        return retrying(call, retry=_vanished if retry_vanished else (lambda err: False), attempts=8, pause=0.005)
    except BaseException as err:
        if _lance_failure(err):
            raise lance_error(uri, err, what, time.monotonic() - started) from None
        raise


def open_lance(uri: str, storage_options: StorageOptions = None) -> lance.LanceDataset:
    """The dataset at ``uri``, at its latest version; FileNotFoundError that says so if nothing
    was saved there, ConnectionError if its storage cannot be reached, CorruptionError if its
    files are not what they must be."""
    import lance

    root = local_path(uri)
    if root is not None:
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"no weights dataset at {uri!r}: nothing has been saved there yet "
                f"(check the URI, or save a version first)"
            )
        check_tree(root)

    def call() -> lance.LanceDataset:
        try:
            target, opts = lance_target(uri, storage_options)
            return lance.dataset(target, storage_options=opts)
        except (ValueError, OSError, RuntimeError) as e:
            if ("was not found" in str(e) or "Not found" in str(e)) and unreachable(uri, e) is None:
                raise FileNotFoundError(
                    f"no weights dataset at {uri!r}: nothing has been saved there yet "
                    f"(check the URI, or save a version first)"
                ) from None
            raise

    ds = lance_call(call, uri, "the latest version", retry_vanished=False)
    schema_of(ds)  # decoded now: a manifest that cannot be is a CorruptionError from here on
    return ds


class Dataset:
    """A handle on one weights dataset: its URI and storage options, resolved once, and the
    Lance dataset, opened on first use and then kept, so that several reads of the same
    dataset (a sidecar refresh) open it once. Every store verb takes one in place of a URI.

    The open dataset is the version that was latest at the first use; its version and tag
    listings are read afresh each time.
    """

    def __init__(self, uri: str | os.PathLike, storage_options: StorageOptions = None):
        self.uri = os.fspath(uri)
        self.storage_options = storage_options
        self._lance: lance.LanceDataset | None = None

    def __repr__(self) -> str:  # never the storage options: they hold credentials
        return f"Dataset({self.uri!r})"

    @classmethod
    def of(cls, uri: str | os.PathLike | Dataset, storage_options: StorageOptions = None) -> Dataset:
        """``uri`` itself if it is a handle already (with its own storage options), else a new one."""
        return uri if isinstance(uri, Dataset) else cls(uri, storage_options)

    @property
    def lance(self) -> lance.LanceDataset:
        """The open dataset; FileNotFoundError if nothing has been saved there yet."""
        if self._lance is None:
            self._lance = open_lance(self.uri, self.storage_options)
        return self._lance

    @property
    def opened(self) -> bool:
        """Whether the dataset has been opened in Lance (its latest version is then fixed)."""
        return self._lance is not None

    def existing(self) -> lance.LanceDataset | None:
        """The open dataset, or None if nothing has been saved there yet."""
        try:
            return self.lance
        except FileNotFoundError:
            return None

    def checkout(self, version: Version | None) -> lance.LanceDataset:
        """Version ``version`` (a number or a tag; None: the open one)."""
        return checkout(self.lance, version)


def tag_list(ds: lance.LanceDataset) -> dict:
    """Lance's tag listing (see ``lance_call``)."""
    return lance_call(ds.tags.list, ds.uri, "the tags")


def version_list(ds: lance.LanceDataset) -> list[dict]:
    """Lance's listing of the dataset's versions, each manifest decoded (see ``lance_call``)."""
    return lance_call(ds.versions, ds.uri, "the version list")


_SCHEMAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # checked-out dataset -> its schema


def schema_of(ds: lance.LanceDataset) -> pa.Schema:
    """The checked-out version's schema, decoded once (see ``lance_call``)."""
    if ds not in _SCHEMAS:
        _SCHEMAS[ds] = lance_call(
            lambda: ds.schema, ds.uri, f"the schema of version {ds.version}", retry_vanished=False
        )
    return _SCHEMAS[ds]


def available(ds: lance.LanceDataset) -> str:
    """The versions and tags that exist, for an error message."""
    versions = [v["version"] for v in version_list(ds)]
    tags = sorted(tag_list(ds))
    span = f"{versions[0]}..{versions[-1]}" if len(versions) > 2 else ", ".join(map(str, versions))
    return f"versions: {span}" + (f"; tags: {', '.join(t[:100] for t in tags[:50])}" if tags else "; no tags")


def checkout(ds: lance.LanceDataset, version: Version | None) -> lance.LanceDataset:
    """Version ``version`` of ``ds`` (a number or a tag; None: ``ds`` itself)."""
    if version is None:
        return ds
    if isinstance(version, bool) or not isinstance(version, (int, str)):
        raise TypeError(f"version must be an int or a tag name, got {version!r}")
    if isinstance(version, str):
        check_tag_name(version)
    if isinstance(version, int) and not 0 <= version < 1 << 63:
        raise VersionNotFoundError(f"version {version} does not exist in {ds.uri}; {available(ds)}")

    def call() -> lance.LanceDataset:
        try:
            out = ds.checkout_version(version)
        except (ValueError, OSError, RuntimeError) as err:
            text = str(err).lower()
            if "not found" in text or "does not exist" in text or "not exist" in text:
                kind = "tag" if isinstance(version, str) else "version"
                raise VersionNotFoundError(f"{kind} {version!r} does not exist in {ds.uri}; {available(ds)}") from None
            raise
        schema_of(out)
        return out

    what = (
        f"tag {version[:100]!r} (_refs/tags/{version[:100]}.json)" if isinstance(version, str) else f"version {version}"
    )
    return lance_call(call, ds.uri, what, retry_vanished=False)


def is_weights(ds: lance.LanceDataset) -> bool | None:
    """True for our format, False for the Lance docs example's, None for any other dataset."""
    schema = schema_of(ds)
    if FORMAT_KEY.encode() in (schema.metadata or {}):
        return True
    if {"name", "value", "shape"} <= set(schema.names) and pa.types.is_list(schema.field("value").type):
        return False
    return None


_COMMITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # checked-out dataset -> its commit's properties


def commit_properties(ds: lance.LanceDataset) -> dict[str, str] | None:
    """The transaction properties of the checked-out version (None if its commit cannot be
    read), read once per checked-out dataset: a load asks for the rows digest and the
    checkpoint spec, verify for the summary."""
    if ds not in _COMMITS:
        try:
            txn = lance_call(lambda: ds.read_transaction(ds.version), ds.uri, "a commit", retry_vanished=False)
            props = dict(txn.transaction_properties or {}) if txn is not None else {}
        except CorruptionError:
            return None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in props.items()):
            return None
        _COMMITS[ds] = props
    return _COMMITS[ds]


def recorded_digest(ds: lance.LanceDataset) -> str | None:
    """The digest of the version's rows its commit recorded (None: committed without one)."""
    return (commit_properties(ds) or {}).get(PROP + "rows")


def fragment_table(ds: lance.LanceDataset, fragments: list | None = None) -> list[Fragment]:
    """(fragment id, data file, rows) of each fragment, in order (rows as the manifest says).

    Data files must be plain names in the dataset's own data/ directory: a manifest that
    points elsewhere (``../x``, an absolute path, another base) is refused, naming the file.
    """
    out = []
    listed = (
        fragments
        if fragments is not None
        else lance_call(ds.get_fragments, ds.uri, f"the fragments of version {ds.version}", retry_vanished=False)
    )
    for f in listed:
        files = f.metadata.files
        path = files[0].path if files else ""
        if files and (len(files) != 1 or files[0].base_id is not None or not plain_name(path)):
            raise CorruptionError(
                f"version {ds.version} of {ds.uri} names data file {path[:200]!r} for fragment "
                f"{f.fragment_id}, which is not a file of the dataset's data/ directory; only "
                f"files inside the dataset are read"
            )
        out.append((f.fragment_id, path, f.metadata.physical_rows))
    return out


def check_format(ds: lance.LanceDataset, newest: int) -> bool:
    """Whether ``ds`` holds our format (True) or the docs example's (False); WeightsError for
    any other dataset or a format newer than ``newest``."""
    kind = is_weights(ds)
    if kind is None:
        raise WeightsError(
            f"{ds.uri} is a Lance dataset but not a weights dataset (columns: "
            f"{', '.join(schema_of(ds).names)[:300]}); point at a dataset written by mlflow-lance"
        )
    if kind:
        text = (schema_of(ds).metadata or {})[FORMAT_KEY.encode()].decode("utf-8", "replace")
        found = int(text) if text.isascii() and text.isdigit() and len(text) < 10 else None
        if found is None or found > newest:
            raise WeightsError(
                f"{ds.uri} uses weights format {text[:20]}, newer than this mlflow-lance reads "
                f"({newest}); upgrade mlflow-lance"
            )
    return kind


def utc(ts: datetime) -> datetime:
    """A Lance version timestamp as an aware UTC datetime."""
    return ts.astimezone(timezone.utc)
