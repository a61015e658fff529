"""Reading a version: where its rows come from and where its bytes come from, behind one
interface (``VersionReader``).

Rows (the metadata of each chunk and where its payload lies) come from, in this order:
1. the version index alone (index.py), for a local or remote load of the latest or a
   numbered version: no Lance at all;
2. the version index checked against the manifest and the commit (through Lance);
3. a decode of the version's data files, in the decoder child (decoder.py), so that corrupt
   or crafted bytes cannot abort the process.
The Lance docs example's format (``name`` / ``value list<float64>`` / ``shape``) is decoded in
the decoder too, rows and values alike.

Bytes come from the data files at the positions the rows give: locally with ``preadv`` into
memory the caller owns (4 threads, 16 MiB pieces) or mapped copy-on-write (each data file
once, its tensors views of that mapping; a load holds at most ``MAX_OPEN`` descriptors,
whatever the number of tensors or data files); on object storage
with ranged GETs (pyarrow), or Lance's blob API for stores pyarrow cannot read. Each data file
is opened relative to the dataset's own data/ directory without following links and without
waiting on FIFOs, and must hold every byte its rows claim before anything is allocated for
them. Every row is checked against the rules of format.py first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import stat
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch
import zstandard

from . import decoder, encodings, index
from .dataset import (
    Dataset,
    check_format,
    commit_properties,
    fragment_table,
    lance_error,
    recorded_digest,
    schema_of,
)
from .errors import CorruptionError
from .format import (
    COMPRESSION_KEY,
    FORMAT_VERSION,
    MAX_DIMS,
    PROP,
    Entry,
    Located,
    Problem,
    Row,
    build_entries,
    codec,
    problems,
    rows_digest,
)
from .fs import (
    RemoteFiles,
    StorageOptions,
    Unreachable,
    join,
    lance_options,
    lance_target,
    local_path,
    remote_supported,
)
from .tensors import META_COLUMNS, dtype_from_name, hash_bytes, readonly_bytes, stored_nbytes, uint8_view

if TYPE_CHECKING:
    import lance

PIECE = 16 << 20
MAX_OPEN = 16  # local data files a reader holds open at once (see _LocalFiles)
THREADS = min(4, os.cpu_count() or 1)
_ZSTD_HEADER = 18  # the longest zstd frame header: enough to read the frame's content size


def mmap_enabled() -> bool:
    """MLFLOW_LANCE_MMAP=0 makes load_state_dict read into fresh memory instead of mapping
    files (for filesystems where a mapped file may change or vanish under the reader)."""
    return os.environ.get("MLFLOW_LANCE_MMAP", "1").lower() not in ("0", "false", "no")


# --------------------------------------------------------------------------- where bytes come from


class _Bytes:
    """A source of stored payloads: ``fill`` copies the start of one into ``dst``."""

    def __init__(self, uri: str, version: int):
        self.uri = uri.rstrip("/")
        self.version = version

    def path_of(self, file: str) -> str:
        return join(self.uri, "data", file)

    def size(self, row: Row) -> int | None:
        """Bytes in the row's data file (None: not known before reading)."""
        return None

    def fill(self, row: Row, dst: torch.Tensor) -> int:
        raise NotImplementedError

    def fill_many(self, parts: list[tuple[Row, torch.Tensor]]) -> list[int]:
        """``fill`` of each (row, dst), in order."""
        return [self.fill(row, dst) for row, dst in parts]

    def mapped(self, row: Row, dtype: torch.dtype, shape: list[int]) -> torch.Tensor | None:
        return None

    def parallel(self) -> bool:
        """Whether pieces of payloads may be filled by several threads at once."""
        return False

    def close(self) -> None:
        pass


class _LocalFiles(_Bytes):
    """Local data files, opened relative to data/ (no links, no FIFOs).

    Descriptors are bounded whatever the number of tensors or data files: at most
    ``MAX_OPEN`` files stay open (least recently used closed first; a file in use by a
    reading thread is never closed under it), and a mapped file holds none (``_Mapped``).
    Each data file is mapped once, and the tensors it holds are views of that one mapping.
    """

    def __init__(self, uri: str, version: int, root: str):
        super().__init__(root, version)
        self.dataset_uri = uri
        self._dir: int | None = None
        self._open_files: OrderedDict[str, list[int]] = OrderedDict()  # data file -> [fd, readers using it]
        self._sizes: dict[str, int] = {}  # data file -> bytes, as first opened
        self._maps: dict[str, np.ndarray] = {}  # data file -> its whole mapping
        self._lock = threading.Lock()

    def _open(self, file: str) -> int:
        path = self.path_of(file)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        if self._dir is None:
            try:
                self._dir = os.open(join(self.uri, "data"), flags | os.O_DIRECTORY)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise CorruptionError(not_a_directory(self.dataset_uri, join(self.uri, "data"))) from None
                raise
        try:
            fd = os.open(file, flags, dir_fd=self._dir)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptionError(not_regular(self.dataset_uri, self.version, path)) from None
            if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):  # the process's trouble, not the file's
                raise
            raise CorruptionError(
                f"data file {path} of version {self.version} of {self.dataset_uri} cannot be "
                f"opened ({err.strerror}); restore it or load another version"
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CorruptionError(not_regular(self.dataset_uri, self.version, path))
        self._sizes.setdefault(file, st.st_size)
        return fd

    @contextlib.contextmanager
    def _using(self, file: str) -> Iterator[int]:
        """An open descriptor of ``file``, not closed before the block ends."""
        with self._lock:
            handle = self._open_files.get(file)
            if handle is None:
                handle = self._open_files[file] = [self._open(file), 0]
            self._open_files.move_to_end(file)
            handle[1] += 1
        try:
            yield handle[0]
        finally:
            with self._lock:
                handle[1] -= 1
                excess = len(self._open_files) - MAX_OPEN
                idle = [name for name, (_, users) in self._open_files.items() if not users][: max(excess, 0)]
                for name in idle:
                    os.close(self._open_files.pop(name)[0])

    def size(self, row: Row) -> int:
        if row.file not in self._sizes:
            with self._using(row.file):  # opening it records its size
                pass
        return self._sizes[row.file]

    def fill(self, row: Row, dst: torch.Tensor) -> int:
        with self._using(row.file) as fd:
            _pread_exact(fd, self.path_of(row.file), row.position or 0, dst)
        return dst.numel()

    def fill_many(self, parts: list[tuple[Row, torch.Tensor]]) -> list[int]:
        """As ``fill``, each run of parts in one data file through one descriptor."""
        i = 0
        while i < len(parts):
            file = parts[i][0].file
            with self._using(file) as fd:
                path = self.path_of(file)
                while i < len(parts) and parts[i][0].file == file:
                    row, dst = parts[i]
                    _pread_exact(fd, path, row.position or 0, dst)
                    i += 1
        return [dst.numel() for _, dst in parts]

    def mapped(self, row: Row, dtype: torch.dtype, shape: list[int]) -> torch.Tensor | None:
        if row.size == 0 or row.position is None or row.position % dtype.itemsize:
            return None
        whole = self._maps.get(row.file)
        if whole is None:
            with self._using(row.file) as fd:
                size = os.fstat(fd).st_size
                whole = self._maps[row.file] = np.asarray(_Mapped(fd, size)) if size else np.empty(0, np.uint8)
        if row.position + row.size > whole.size:
            raise CorruptionError(
                f"data file {self.path_of(row.file)} holds {whole.size} bytes, but chunk {row.chunk} of "
                f"version {self.version} claims bytes {row.position}..{row.position + row.size}; "
                f"the file was truncated. Run verify() on {self.dataset_uri}"
            )
        flat = torch.frombuffer(whole, dtype=dtype, count=row.size // dtype.itemsize, offset=row.position)
        return flat if len(shape) == 1 else flat.view(shape)

    def parallel(self) -> bool:
        return True

    def close(self) -> None:
        for fd, _ in self._open_files.values():
            os.close(fd)
        self._open_files.clear()
        self._maps.clear()  # each mapping lives on as long as a tensor refers to it
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None


class _Mapped:
    """The first ``size`` (> 0) bytes of an open file, mapped copy-on-write, as a numpy array
    interface (``np.asarray`` of it, and every view of that, keep it alive); unmapped once
    nothing refers to it. It holds no descriptor: ``mmap.mmap`` keeps a duplicate of the
    one it maps for as long as the mapping lives (Python < 3.13), which made a load of n
    tensors hold n descriptors."""

    def __init__(self, fd: int, size: int):
        address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
        if address in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"cannot map a data file: {os.strerror(err)}")
        self.__array_interface__ = {"data": (address, False), "shape": (size,), "typestr": "|u1", "version": 3}
        # Not at exit: tensors may outlive the finalizers run then, and the process unmaps everything anyway.
        weakref.finalize(self, _libc.munmap, address, size).atexit = False


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


class _RemoteFiles(_Bytes):
    """Data files on object storage, read with ranged GETs at the rows' positions."""

    def __init__(self, uri: str, version: int, storage_options: StorageOptions):
        super().__init__(uri, version)
        self._files = RemoteFiles(lance_options(uri, storage_options))
        self._sizes: dict[str, int] = {}

    def size(self, row: Row) -> int:
        if row.file not in self._sizes:
            try:
                self._sizes[row.file] = self._files.size(self.path_of(row.file))
            except OSError as err:
                raise lance_error(self.uri, err, f"data file {row.file} of version {self.version}") from None
        return self._sizes[row.file]

    def fill(self, row: Row, dst: torch.Tensor) -> int:
        try:
            return self._files.read_into(self.path_of(row.file), row.position or 0, memoryview(dst.numpy()))
        except OSError as err:
            raise lance_error(self.uri, err, f"data file {row.file} of version {self.version}") from None

    def parallel(self) -> bool:
        return True

    def close(self) -> None:
        self._files.close()


class _LanceBlobs(_Bytes):
    """Payloads through Lance's blob API: object stores pyarrow cannot read itself."""

    def __init__(self, uri: str, version: int, ds: Callable[[], lance.LanceDataset]):
        super().__init__(uri, version)
        self._ds = ds

    def fill(self, row: Row, dst: torch.Tensor) -> int:
        (blob,) = self._ds().take_blobs("data", addresses=[row.address])
        view, got = memoryview(dst.numpy()), 0
        while got < dst.numel():
            n = blob.readinto(view[got : got + PIECE])
            if not n:
                break
            got += n
        return got


class _SeedValues(_Bytes):
    """The Lance docs example's float64 value lists, decoded in the decoder child."""

    def __init__(self, uri: str, version: int, storage_options: StorageOptions):
        super().__init__(uri, version)
        self._target = lance_target(uri, storage_options)

    def fill(self, row: Row, dst: torch.Tensor) -> int:
        count, data = decoder.request(
            "docs_example_values",
            *self._target,
            what=f"row {row.index} of version {self.version}",
            memory=row.size,
            version=self.version,
            index=row.index,
        )
        src = readonly_bytes(data)
        dst[: min(src.numel(), dst.numel())].copy_(src[: dst.numel()])
        return src.numel()


# --------------------------------------------------------------------------- a version


class VersionReader:
    """One version of a dataset: its rows (see the module docstring), the problems they have,
    its commit properties, and its payload bytes. Use as a context manager (it holds open
    files). Choose one with ``open_version`` or ``describe``."""

    def __init__(
        self,
        uri: str,
        version: int,
        compression: str | None,
        located: list[Located],
        properties: dict[str, str] | None,
        source: _Bytes,
        *,
        agree: bool = True,
        writable: bool = True,
        hashed: bool = True,
    ):
        self.uri = uri
        self.version = version
        self.codec = compression
        self.located = located
        self._properties = properties
        self.source = source
        self.agree = agree  # whether the rows hash to the digest the commit recorded
        self.writable = writable  # whether new versions may be saved on top of this format
        self.hashed = hashed  # whether rows record content hashes (the docs example's do not)
        self._entries: OrderedDict[str, Entry] | None = None
        self._problems: list[Problem] | None = None

    def __enter__(self) -> VersionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.source.close()

    @property
    def entries(self) -> OrderedDict[str, Entry]:
        """Every tensor of the version, in saved order, as its rows claim (``problems`` says
        whether they hold together)."""
        if self._entries is None:
            self._entries = build_entries(self.located)
        return self._entries

    def problems(self) -> list[Problem]:
        """What is wrong with the version's metadata (format.problems), and whether its rows
        are those its commit recorded (found once; a new list each call)."""
        if self._problems is None:
            self._problems = problems(self.entries, self.codec is not None)
            if not self.agree:
                self._problems.append(
                    Problem(
                        "",
                        -1,
                        "",
                        f"the rows differ from what commit {self.version} recorded "
                        f"({PROP}rows): they were rewritten after the commit",
                    )
                )
        return list(self._problems)

    def properties(self) -> dict[str, str] | None:
        """The version's commit properties (None if its commit cannot be read)."""
        return None if self._properties is None else dict(self._properties)

    def path_of(self, file: str) -> str:
        """The full path or URI of a data file named in the manifest."""
        return self.source.path_of(file)

    def file_of(self, row: Row) -> str:
        return self.source.path_of(row.file)

    def bad_hash(self, row: Row, chunk: torch.Tensor) -> str | None:
        """The content hash of ``chunk`` (the row's bytes) if it differs from the recorded one."""
        if not self.hashed:
            return None
        got = hash_bytes(memoryview(chunk.numpy()))
        return got if got != row.hash else None

    def check_stored(self, rows: Iterable[Row]) -> None:
        """Before anything is allocated or written: each data file holds its chunk's bytes; a
        compressed chunk's frame decompresses to exactly its size."""
        for row in rows:
            if not row.stored:
                continue
            size = self.source.size(row)
            if size is not None and (row.position or 0) + row.stored > size:
                raise CorruptionError(
                    f"data file {self.file_of(row)} holds {size} bytes, but chunk {row.chunk} of "
                    f"version {self.version} claims bytes {row.position}..{(row.position or 0) + row.stored}; "
                    f"the file was truncated or the metadata is crafted. Run verify() on {self.uri}"
                )
            if self.codec:
                self._check_frame(row)

    def _check_frame(self, row: Row) -> None:
        head = torch.empty(min(row.stored, max(_ZSTD_HEADER, encodings.HEADER.size)), dtype=torch.uint8)
        self._read_stored(row, head, whole=False)
        if self.codec == "auto" and bytes(head[:3].numpy()) == encodings.MAGIC:
            self._check_encoded(row, memoryview(head.numpy()))
            return
        try:
            size = zstandard.frame_content_size(memoryview(head[:_ZSTD_HEADER].numpy()))
            what = f"a zstd frame of {size} bytes" if size >= 0 else "a zstd frame of unknown size"
        except zstandard.ZstdError:
            size, what = None, "not a zstd frame"
        if size != row.size:
            raise CorruptionError(
                f"chunk {row.chunk} at {self.file_of(row)} is {what}, but its tensor "
                f"records {row.size} bytes; run verify() on {self.uri}"
            )

    def _check_encoded(self, row: Row, blob: memoryview, *, whole: bool = False) -> None:
        """An encoded chunk (``compression="auto"``): its header (the whole blob's with
        ``whole``) agrees with the chunk, and it needs no parent (this release writes none)."""
        try:
            header = encodings.read_header(blob, row.size, total=None if whole else row.stored)
        except CorruptionError as err:
            raise CorruptionError(
                f"chunk {row.chunk} at {self.file_of(row)}: {err}; run verify() on {self.uri}"
            ) from None
        if header.encoding == encodings.XOR:
            raise CorruptionError(
                f"chunk {row.chunk} at {self.file_of(row)} is a delta against an earlier version, which this "
                f"mlflow-lance does not read; upgrade mlflow-lance"
            )

    def mapped(self, row: Row, dtype: torch.dtype, shape: list[int]) -> torch.Tensor | None:
        """The chunk as a view of a copy-on-write memory map of its data file (lazy, no
        copy), or None (see ``mmap_enabled``)."""
        return None if self.codec else self.source.mapped(row, dtype, shape)

    def read_many(self, jobs: list[tuple[Row, torch.Tensor]]) -> None:
        """Fill each flat, contiguous uint8 CPU tensor with its chunk's bytes (several threads
        where the source allows: page-cache copies and GETs both gain from them)."""
        if self.codec:  # a chunk per task: zstd and numpy let go of the GIL while they decode
            if len(jobs) > 1 and THREADS > 1 and self.source.parallel():
                with ThreadPoolExecutor(THREADS) as pool:
                    list(pool.map(lambda job: self._decompress(*job), jobs))
            else:
                for row, dst in jobs:
                    self._decompress(row, dst)
            return
        if not self.source.parallel():
            for row, dst in jobs:
                self._read_stored(row, dst)
            return
        pieces = [
            (row, start, dst[start : start + PIECE])
            for row, dst in jobs
            if row.size
            for start in range(0, row.size, PIECE)
        ]

        def read(batch: list[tuple[Row, int, torch.Tensor]]) -> None:
            parts = [
                (
                    row
                    if start == 0 and dst.numel() == row.stored
                    else row._replace(position=(row.position or 0) + start, stored=dst.numel()),
                    dst,
                )
                for row, start, dst in batch
            ]
            for (part, dst), got in zip(parts, self.source.fill_many(parts), strict=True):
                self._check_read(part, dst.numel(), got)

        # Consecutive pieces in batches of about PIECE bytes, a task each: thousands of small
        # tensors as one task each spent more time in the thread pool than in their reads.
        batches: list[list[tuple[Row, int, torch.Tensor]]] = []
        size = PIECE
        for p in pieces:
            if size + p[2].numel() > PIECE:
                batches.append([])
                size = 0
            batches[-1].append(p)
            size += p[2].numel()
        if len(batches) > 1 and THREADS > 1:
            with ThreadPoolExecutor(THREADS) as pool:
                list(pool.map(read, batches))
        else:
            for batch in batches:
                read(batch)

    def _read_stored(self, row: Row, dst: torch.Tensor, whole: bool = True) -> None:
        """The payload as stored (or its first ``dst.numel()`` bytes unless ``whole``)."""
        self._check_read(row, dst.numel(), self.source.fill(row, dst) if row.stored else 0, whole)

    def _check_read(self, row: Row, want: int, got: int, whole: bool = True) -> None:
        """CorruptionError unless ``got`` bytes of the row's payload are the ``want`` asked for
        (and, if ``whole``, all of it)."""
        if got != want or (whole and want != row.stored):
            raise CorruptionError(
                f"chunk {row.chunk} at {self.file_of(row)} holds {got} bytes, expected "
                f"{want}; run verify() on {self.uri}"
            )

    def _decompress(self, row: Row, dst: torch.Tensor) -> None:
        """Decode a compressed chunk into ``dst``. Its stored bytes are a view of the data
        file's mapping where there is one (see ``mmap_enabled``), so that decoding allocates
        little beside the tensor; else they are read into fresh memory first."""
        packed = (
            self.source.mapped(row._replace(size=row.stored), torch.uint8, [row.stored])
            if row.stored and mmap_enabled()
            else None
        )
        if packed is None:
            packed = torch.empty(row.stored, dtype=torch.uint8)
            self._read_stored(row, packed)
        if self.codec == "auto" and bytes(packed[:3].numpy()) == encodings.MAGIC:
            blob = memoryview(packed.numpy())
            self._check_encoded(row, blob, whole=True)
            try:
                encodings.decode(blob, dst.numpy())
            except CorruptionError as err:
                raise CorruptionError(
                    f"chunk {row.chunk} at {self.file_of(row)} does not decode ({err}); run verify() on {self.uri}"
                ) from None
            return
        try:
            raw = zstandard.ZstdDecompressor().decompress(memoryview(packed.numpy()), max_output_size=row.size)
        except zstandard.ZstdError as err:
            raise CorruptionError(
                f"chunk {row.chunk} at {self.file_of(row)} does not decompress ({err}); run verify() on {self.uri}"
            ) from None
        if len(raw) != row.size:
            raise CorruptionError(
                f"chunk {row.chunk} at {self.file_of(row)} decompresses to {len(raw)} bytes, expected {row.size}"
            )
        dst.copy_(readonly_bytes(raw))


def _bytes_of(dataset: Dataset, version: int) -> _Bytes:
    root = local_path(dataset.uri)
    if root is not None:
        return _LocalFiles(dataset.uri, version, root)
    if remote_supported(dataset.uri):
        return _RemoteFiles(dataset.uri, version, dataset.storage_options)
    return _LanceBlobs(dataset.uri, version, lambda: dataset.checkout(version))


# --------------------------------------------------------------------------- opening a version


def open_version(dataset: Dataset, version: int | str | None, *, index_alone: bool = True) -> VersionReader:
    """The reader of a version (a number or a tag; None: latest): from its version index alone
    when ``index_alone`` and the index is complete and consistent (no Lance import), else
    through Lance (``describe``)."""
    if index_alone and not dataset.opened and (version is None or type(version) is int):
        try:
            found = index.alone(dataset.uri, dataset.storage_options, version)
        except Unreachable as err:
            raise err.about(dataset.uri) from None
        if found is not None:
            number, doc, located = found
            reader = VersionReader(
                dataset.uri,
                number,
                codec(doc["schema"].get(COMPRESSION_KEY, "none")),
                located,
                doc["properties"],
                _bytes_of(dataset, number),
            )
            if not reader.problems():
                return reader
    return describe(dataset, dataset.checkout(version))


def describe(dataset: Dataset, ds: lance.LanceDataset, *, rows_themselves: bool = False) -> VersionReader:
    """The reader of checked-out version ``ds``: its rows from its index when that matches the
    manifest and the commit, else (or with ``rows_themselves``) decoded from its data files.
    Rows from an index that break a rule are never blamed on the version: the data files
    are asked."""
    if not check_format(ds, FORMAT_VERSION):
        return _docs_example(dataset, ds)
    uri, opts = dataset.uri, dataset.storage_options
    table = fragment_table(ds)
    digest = recorded_digest(ds)
    compression = codec(
        (schema_of(ds).metadata or {}).get(COMPRESSION_KEY.encode(), b"none").decode("utf-8", "replace")
    )
    located = None if rows_themselves else index.matching(uri, opts, ds.version, table, digest)
    if located is not None:
        reader = VersionReader(
            uri, ds.version, compression, located, commit_properties(ds), _bytes_of(dataset, ds.version)
        )
        if not reader.problems():
            return reader
    located = scan(dataset, ds, table)
    agree = digest is None or rows_digest(r.meta for r in located) == digest
    return VersionReader(
        uri,
        ds.version,
        compression,
        located,
        commit_properties(ds),
        _bytes_of(dataset, ds.version),
        agree=agree,
    )


def scan(dataset: Dataset, ds: lance.LanceDataset, table: list[index.Fragment]) -> list[Located]:
    """Every row of checked-out version ``ds``, decoded from its data files in the decoder."""
    check_local_files(dataset.uri, ds.version, table)
    what = f"the rows of version {ds.version}"
    try:
        found, _ = decoder.request(
            "scan",
            *lance_target(dataset.uri, dataset.storage_options),
            what=what,
            version=ds.version,
        )
    except (OSError, ValueError) as err:
        if isinstance(err, CorruptionError):
            raise
        raise lance_error(dataset.uri, err, what) from None
    files = {fid: path for fid, path, _ in table}
    n = len(META_COLUMNS)
    if not isinstance(found, list) or not all(
        index.valid_row(row[:-1], n) and type(row[-1]) is int and 0 <= row[-1] < 1 << 64 for row in found
    ):
        raise CorruptionError(f"{what} of {dataset.uri} are malformed (a value of the wrong type or range)")
    return [
        Located(
            dict(zip(META_COLUMNS, row[:n], strict=True)), row[-1], row[n], files.get(row[-1] >> 32, ""), row[n + 1]
        )
        for row in found
    ]


def _docs_example(dataset: Dataset, ds: lance.LanceDataset) -> VersionReader:
    """A Lance docs example dataset: one row per tensor (``name``, ``shape``, float64 ``value``
    list). It records no hashes, compression or commit properties of ours, takes no new
    versions, and is decoded entirely in the decoder."""
    what = f"the rows of version {ds.version}"
    try:
        found, _ = decoder.request(
            "docs_example_rows",
            *lance_target(dataset.uri, dataset.storage_options),
            what=what,
            version=ds.version,
        )
    except (OSError, ValueError) as err:
        if isinstance(err, CorruptionError):
            raise
        raise lance_error(dataset.uri, err, what) from None
    located, seen = [], set()
    for i, row in enumerate(found if isinstance(found, list) else [None]):
        name, shape, address, count = row if isinstance(row, list) and len(row) == 4 else (None, None, None, None)
        shape = shape if shape is not None else []
        if (
            not isinstance(name, str)
            or name in seen
            or not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(type(s) is int and 0 <= s < 1 << 62 for s in shape)
            or type(address) is not int
        ):
            raise CorruptionError(
                f"row {i} of {ds.uri} (version {ds.version}) repeats the name {str(name)[:200]!r} or has "
                f"shape {str(shape)[:80]}, which is not a list of non-negative sizes"
            )
        nbytes = stored_nbytes("float64", shape)
        if nbytes != 8 * (count or 0):  # the shape claims what the row holds: nothing more is allocated
            raise CorruptionError(
                f"row {i} ({name[:200]!r}) of {ds.uri} (version {ds.version}) has shape {str(shape)[:80]}, "
                f"but holds {count} values"
            )
        seen.add(name)
        meta = {
            "name": name,
            "chunk": 0,
            "offset": 0,
            "nbytes": nbytes,
            "dtype": "float64",
            "shape": shape,
            "hash": "",
            "alias": None,
        }
        located.append(Located(meta, address, None, "", nbytes))
    return VersionReader(
        dataset.uri,
        ds.version,
        None,
        located,
        {},
        _SeedValues(dataset.uri, ds.version, dataset.storage_options),
        writable=False,
        hashed=False,
    )


def check_local_files(uri: str, version: int, table: list[index.Fragment]) -> None:
    """Before a local version's data files are decoded: each is a regular file in data/ (a
    symlink or FIFO there is refused, naming it, instead of followed or waited on)."""
    root = local_path(uri)
    if root is None:
        return
    data = os.path.join(root, "data")
    try:
        if not stat.S_ISDIR(os.lstat(data).st_mode):
            raise CorruptionError(not_a_directory(uri, data))
    except FileNotFoundError:
        return
    for _, name, _ in table:
        path = os.path.join(data, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue  # missing: the decoder says so
        if not stat.S_ISREG(st.st_mode):
            raise CorruptionError(not_regular(uri, version, path))


def not_a_directory(uri: str, path: str) -> str:
    return f"{path} of {uri} is not a directory (a symbolic link?); only files inside the dataset are read"


def not_regular(uri: str, version: int, path: str) -> str:
    return (
        f"data file {path} of version {version} of {uri} is not a regular file (a symbolic "
        f"link, FIFO, device or directory); only regular files inside the dataset are read"
    )


# --------------------------------------------------------------------------- materializing


def device_of(map_location: str | torch.device | None) -> torch.device:
    if map_location is None:
        return torch.device("cpu")
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    raise TypeError(
        f"map_location must be None, a device string such as 'cuda:0', or a torch.device; got {map_location!r}"
    )


def check_row(reader: VersionReader, e: Entry, row: Row, chunk: torch.Tensor) -> None:
    """Raise CorruptionError unless ``chunk`` (the chunk's bytes) hashes to what was recorded."""
    got = reader.bad_hash(row, chunk)
    if got is not None:
        raise CorruptionError(
            f"tensor {e.name[:200]!r} (chunk {row.chunk}) of version {reader.version} in {reader.uri} "
            f"is corrupt: content hash {got} != recorded {row.hash[:64]} (file "
            f"{reader.file_of(row)}); restore that file or load another version"
        )


def materialize(reader: VersionReader, entries: list[Entry], *, verify: bool) -> dict[str, torch.Tensor]:
    """The stored tensors on the CPU: lazy copy-on-write maps where possible, else read
    (all in one ``read_many``, so that the reads run in parallel).

    With ``verify`` they are always read into fresh memory and hashed, so that what comes
    back is exactly what was checked: nothing outside the process can change it afterwards.
    """
    out: dict[str, torch.Tensor] = {}
    jobs: list[tuple[Entry, Row, torch.Tensor]] = []
    maps = not verify and mmap_enabled()
    for e in entries:
        dtype = dtype_from_name(e.dtype, key=e.name)
        reader.check_stored(e.rows)
        t = reader.mapped(e.rows[0], dtype, e.shape) if maps and len(e.rows) == 1 else None
        if t is None:
            t = torch.empty(e.shape, dtype=dtype)
            flat = uint8_view(t)
            jobs += [(e, row, flat[row.offset : row.offset + row.size]) for row in e.rows]
        out[e.name] = t
    reader.read_many([(row, dst) for _, row, dst in jobs])
    if verify:
        for e, row, dst in jobs:
            check_row(reader, e, row, dst)
    return out


def _pread_exact(fd: int, path: str, position: int, dst: torch.Tensor) -> None:
    view, got = memoryview(dst.numpy()), 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], position + got)
        if n == 0:
            raise CorruptionError(f"{path} ends at byte {position + got}, before its tensor does")
        got += n


def write_index(
    dataset: Dataset,
    ds: lance.LanceDataset,
    located: list[Located],
    table: list[index.Fragment],
    *,
    sync: bool = True,
) -> None:
    """Write the version index of checked-out version ``ds`` from rows known to be its own."""
    schema = {k.decode(): v.decode() for k, v in (schema_of(ds).metadata or {}).items()}
    index.write(
        dataset.uri,
        dataset.storage_options,
        ds.version,
        schema=schema,
        properties=commit_properties(ds) or {},
        table=table,
        located=located,
        sync=sync,
    )
