"""Self-contained model bundles: an MLflow model directory that holds its own weights.

A model logged with mlflow_lance keeps its weights in a Lance dataset outside MLflow's
artifact store. MLflow's deployment paths (``mlflow models build-docker``, serving on another
host, ``spark_udf`` executors, managed serving) copy the *model directory* somewhere else,
where that dataset may not be reachable. ``bundle_model`` writes a directory that needs
nothing else: the model directory as MLflow has it (MLmodel with its signature, input
example, requirements and metadata; the architecture; code) with the weights of exactly its
version as a one-version Lance dataset in ``data/weights.lance``. It loads with
``mlflow_lance.load_model(DIR)``, ``mlflow.pyfunc.load_model(DIR)`` and ``mlflow models serve
-m DIR`` with no tracking server and the original dataset gone. Its size is the weights of
one version.

The source is read as a load reads it: its pointer, its MLmodel and its dataset are checked
as untrusted input, and a local model directory is copied only if every entry is a regular
file or directory inside it (a link or a special file is refused, as a load refuses it).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile

from . import modeldir, store
from .artifacts import options
from .errors import CorruptionError

__all__ = ["bundle_model"]

_WEIGHTS = "weights.lance"
_MAX_DEPTH = 64


def bundle_model(model_uri: str, dst: str | os.PathLike) -> str:
    """Write a self-contained copy of a model logged with mlflow_lance to directory ``dst``.

    Args:
        model_uri: any URI ``load_model`` takes: ``models:/<name>/<version>``,
            ``models:/<name>@<alias>``, ``models:/<model id>``, ``runs:/<run id>/<name>``, or a
            local model directory.
        dst: a directory that does not exist yet (or is empty).

    Returns:
        ``dst`` as an absolute path: a model directory that loads with no tracking server and
        without the dataset the model was logged to.

    Raises:
        FileExistsError: ``dst`` exists and is not empty.
        CorruptionError: the source is malformed or crafted (a link, a special file, a pointer
            or dataset a load would refuse); nothing is written.
        FileNotFoundError / ConnectionError: the model's dataset cannot be read from here.

    Example:
        >>> bundle_model("models:/churn@champion", "churn-bundle")
        >>> # mlflow models build-docker -m churn-bundle -n churn
    """
    from .modelload import model_pointer

    dst = os.path.abspath(os.fspath(dst))
    if os.path.islink(dst) or (os.path.lexists(dst) and (not os.path.isdir(dst) or os.listdir(dst))):
        raise FileExistsError(f"{dst} exists and is not an empty directory; bundle into a new one")
    local = os.path.isdir(model_uri)
    if os.path.lexists(model_uri) and not local:
        raise store.WeightsError(f"{model_uri} is a file, not a model directory or an MLflow model URI")
    if local:  # checked where it lies, so that errors name the source's own files
        modeldir.flavor_conf(model_uri)
        modeldir.pointer(model_uri)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".mlflow_lance_bundle_", dir=parent)  # beside dst: one rename at the end
    try:
        staged = os.path.join(tmp, "model")
        _copy_model_dir(model_uri, staged)
        _refuse_foreign_loader(staged)
        with model_pointer(staged) as pointer:  # the source's pointer, checked as a load checks it
            dataset, version = pointer
            # verify: a bundle never launders damaged bytes into a version whose hashes match them
            weights = store.read_state_dict(dataset, version, storage_options=options(dataset), verify=True)
            info = store.save_state_dict(  # outside the copy: nothing of the source can be built upon
                weights,
                os.path.join(tmp, _WEIGHTS),
                message=f"bundled from version {version} of {dataset}",
                properties={"mlflow_lance.bundled_from": f"{dataset}#{version}"},
            )
            del weights
        if info.parent is not None or info.version != 1:
            raise CorruptionError(f"the bundle's dataset was not new (version {info.version}); nothing was written")
        inside = os.path.join(staged, modeldir.DATA, _WEIGHTS)
        if os.path.lexists(inside):
            shutil.rmtree(inside)
        os.rename(os.path.join(tmp, _WEIGHTS), inside)
        _point_inside(staged, info.version, model_uri, dataset, version)
        os.rename(staged, dst)  # replaces an empty dst; atomic on one file system
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _copy_model_dir(model_uri: str, target: str) -> None:
    """The whole model directory (MLmodel, data/, code/, environment files, examples) at
    ``target``: downloaded for an MLflow URI, copied for a local directory."""
    if os.path.isdir(model_uri):
        if modeldir.kind(model_uri) != "model":
            raise store.WeightsError(f"{model_uri} is not an MLflow model directory")
        _copy_tree(model_uri, target)
        return
    from mlflow.artifacts import download_artifacts

    from .modelload import quiet_downloads

    os.makedirs(target)
    with quiet_downloads():
        local = download_artifacts(artifact_uri=model_uri, dst_path=target)
    if os.path.realpath(local) != os.path.realpath(target):  # the model's own folder inside
        for name in os.listdir(local):
            shutil.move(os.path.join(local, name), os.path.join(target, name))
    if modeldir.kind(target) != "model":
        raise store.WeightsError(f"{model_uri} is not an MLflow model (no MLmodel)")


def _copy_tree(src: str, dst: str) -> None:
    """Copy regular files and directories (at most ``_MAX_DEPTH`` deep); a link or a special
    file is refused, naming it."""
    todo = [(src, dst, 0)]
    while todo:
        here, out, depth = todo.pop()
        if depth > _MAX_DEPTH:
            raise CorruptionError(f"{here} is nested more than {_MAX_DEPTH} directories deep in the model directory")
        os.makedirs(out)
        for name in sorted(os.listdir(here)):
            path = os.path.join(here, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                todo.append((path, os.path.join(out, name), depth + 1))
            elif stat.S_ISREG(mode):
                _copy_sparse(path, os.path.join(out, name))
            else:
                kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
                raise CorruptionError(f"{path} is {kind}; a model directory is bundled only from regular files in it")


def _copy_sparse(src: str, dst: str) -> None:
    """Copy a regular file (opened without following a link or waiting on a FIFO) keeping its
    holes: only the ranges ``SEEK_DATA`` / ``SEEK_HOLE`` report as data are written, the rest
    stays a hole of the new file, so the copy takes on disk what the source does (a file system
    without holes reports one range: all data). Never more than the source's size at the start."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            for start, end in _data_ranges(fd, size):
                while start < end:
                    chunk = os.pread(fd, min(end - start, 1 << 20), start)
                    if not chunk:  # the source shrank meanwhile
                        break
                    os.pwrite(out, chunk, start)
                    start += len(chunk)
            os.ftruncate(out, size)  # a trailing hole is a hole
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) ranges of the file that hold data (all of it where the platform cannot tell)."""
    if not hasattr(os, "SEEK_DATA"):  # Windows
        return [(0, size)]
    ranges, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole from pos to the end
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start >= end:
            break
        ranges.append((start, end))
        pos = end
    return ranges


def _refuse_foreign_loader(model_dir: str) -> None:
    """A bundle carries MLmodel as it is: its pyfunc loader must be this flavor's."""
    flavors = modeldir.mlmodel(model_dir).flavors
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    loader = pyfunc.get("loader_module") if isinstance(pyfunc, dict) else None
    if pyfunc is not None and loader != "mlflow_lance.flavor":
        raise CorruptionError(
            "the model's MLmodel names another pyfunc loader module (not mlflow_lance.flavor); "
            "it is not bundled (its content is not shown)"
        )


def _point_inside(model_dir: str, version: int, model_uri: str, dataset: str, source_version: int) -> None:
    """The pointer and MLmodel of a bundle: the weights are the dataset inside it."""
    from mlflow.models import Model

    with open(os.path.join(model_dir, modeldir.DATA, modeldir.POINTER), "w") as f:
        f.write(modeldir.pointer_text(_WEIGHTS, version))
    modeldir.flavor_conf(model_dir)  # MLmodel checked as a load checks it, before MLflow parses it
    path = os.path.join(model_dir, modeldir.MLMODEL)
    model = Model.load(path)
    conf = model.flavors[modeldir.FLAVOR_NAME]
    conf.update(
        lance_uri=_WEIGHTS,
        lance_version=version,
        self_contained=True,
        bundled_from={"model_uri": str(model_uri), "lance_uri": dataset, "lance_version": int(source_version)},
    )
    model.save(path)
