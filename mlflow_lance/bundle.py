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

import os
import shutil
import stat
import tempfile

from . import modeldir, store
from .artifacts import options
from .errors import CorruptionError

__all__ = ["bundle_model"]

_WEIGHTS = "weights.lance"


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
    from .flavor import model_pointer

    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise FileExistsError(f"{dst} exists and is not an empty directory; bundle into a new one")
    with tempfile.TemporaryDirectory(prefix="mlflow_lance_bundle_") as tmp:
        staged = os.path.join(tmp, "model")
        _copy_model_dir(model_uri, staged)
        with model_pointer(staged) as pointer:  # the source's pointer, checked as a load checks it
            dataset, version = pointer
            weights = store.load_state_dict(dataset, version, storage_options=options(dataset))
            info = store.save_state_dict(
                weights,
                os.path.join(staged, modeldir.DATA, _WEIGHTS + ".new"),
                message=f"bundled from version {version} of {dataset}",
                properties={"mlflow_lance.bundled_from": f"{dataset}#{version}"},
            )
            del weights  # maps of the source: released before anything is replaced
        inside = os.path.join(staged, modeldir.DATA, _WEIGHTS)
        if os.path.lexists(inside):
            shutil.rmtree(inside)
        os.rename(inside + ".new", inside)
        _point_inside(staged, info.version, model_uri, dataset, version)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(dst):
            os.rmdir(dst)
        shutil.move(staged, dst)
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

    from .flavor import _quiet_downloads

    os.makedirs(target)
    with _quiet_downloads():
        local = download_artifacts(artifact_uri=model_uri, dst_path=target)
    if os.path.realpath(local) != os.path.realpath(target):  # the model's own folder inside
        for name in os.listdir(local):
            shutil.move(os.path.join(local, name), os.path.join(target, name))
    if modeldir.kind(target) != "model":
        raise store.WeightsError(f"{model_uri} is not an MLflow model (no MLmodel)")


def _copy_tree(src: str, dst: str) -> None:
    """Copy regular files and directories; a link or a special file is refused, naming it."""
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        path, out = os.path.join(src, name), os.path.join(dst, name)
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            _copy_tree(path, out)
        elif stat.S_ISREG(mode):
            shutil.copyfile(path, out, follow_symlinks=False)
        else:
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
            raise CorruptionError(f"{path} is {kind}; a model directory is bundled only from regular files in it")


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
