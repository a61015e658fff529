"""A local MLflow model directory of this flavor, read as input from someone else.

A model directory holds ``MLmodel`` (the flavor configuration), ``data/lance.yaml`` (the
pointer to a Lance dataset and version) and the architecture (a skeleton pickle, a
TorchScript or torch.export program or nothing, for a factory). Each file is read here, once, with the same
rules: it lies inside the directory (a relative path without ``..``, no symbolic link on the
way), it is a regular file (a FIFO is never waited on), it is no larger than a limit, and
what does not parse is an error that names the file and never quotes it (a pointer linked
to ``~/.aws/credentials`` must not print a line of it).

What a path is, is decided by one rule that a planted file cannot flip (``kind``): a
directory with a ``_versions/`` directory is a Lance dataset; else one with ``MLmodel`` is a
model directory.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml

from .errors import CorruptionError
from .fs import check_scheme, local_path, parse_yaml, read_bytes

FLAVOR_NAME = "mlflow_lance"
MLMODEL = "MLmodel"
DATA = "data"
POINTER = "lance.yaml"
_MAX_SMALL = 16 << 20  # MLmodel, pointers
MAX_ARCHITECTURE = 4 << 30  # a skeleton or program: the module without its weights
_ARCHITECTURES = ("skeleton", "torchscript", "exported_program", "model_factory")


def kind(path: str) -> str | None:
    """ "dataset" for a local Lance dataset, "model" for a model directory, else None."""
    try:
        if stat.S_ISDIR(os.lstat(os.path.join(path, "_versions")).st_mode):
            return "dataset"
    except OSError:
        pass
    try:
        return "model" if os.path.lexists(os.path.join(path, MLMODEL)) and os.path.isdir(path) else None
    except OSError:
        return None


def member(model_dir: str, relative: object, named_by: str | None = None) -> str:
    """The path of file ``relative`` of the model directory, checked: a relative path with no
    '..' and no link on the way. CorruptionError names what is wrong, and the file that names
    ``relative`` (``named_by``; by default the directory's MLmodel)."""
    if (
        not isinstance(relative, str)
        or not relative
        or os.path.isabs(relative)
        or "\\" in relative
        or any(part in ("", ".", "..") for part in relative.split("/"))
    ):
        raise CorruptionError(
            f"{named_by or f'MLmodel of {model_dir}'} names {str(relative)[:200]!r}, which is not a file inside "
            f"the model directory"
        )
    path = model_dir
    for part in relative.split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise CorruptionError(f"{path} is a symbolic link; files of a model directory are read only from inside it")
    return path


def read(model_dir: str, relative: str, *, limit: int = _MAX_SMALL) -> bytes:
    """The bytes of file ``relative`` of the model directory (see ``member``): a regular file
    of at most ``limit`` bytes, else CorruptionError saying which."""
    path = member(model_dir, relative)
    data = read_bytes(path, limit=limit, follow_links=False)
    if data is None:
        if not os.path.lexists(path):
            raise FileNotFoundError(f"{path} does not exist: {model_dir} is not a complete mlflow_lance model")
        raise CorruptionError(f"{path} is not a regular file of at most {limit} bytes (a FIFO, device or link?)")
    return data


def _yaml(model_dir: str, relative: str) -> Any:
    data = read(model_dir, relative)
    try:
        return parse_yaml(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError):
        raise CorruptionError(
            f"{os.path.join(model_dir, relative)} is not valid YAML (its content is not shown)"
        ) from None


def mlmodel(model_dir: str) -> Any:
    """The directory's MLmodel as an ``mlflow.models.Model``."""
    from mlflow.models import Model

    doc = _yaml(model_dir, MLMODEL)
    if not isinstance(doc, dict):
        raise CorruptionError(f"{os.path.join(model_dir, MLMODEL)} is not a mapping")
    try:
        return Model.from_dict(doc)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise CorruptionError(f"{os.path.join(model_dir, MLMODEL)} is malformed ({type(err).__name__})") from None


def flavor_conf(model_dir: str) -> dict:
    """The mlflow_lance section of the directory's MLmodel, checked: exactly one architecture
    (``skeleton``, ``torchscript`` or ``exported_program``: a file of the directory; or
    ``model_factory``), and
    optional strings where strings belong.

    Raises:
        MlflowException: the MLmodel has no mlflow_lance flavor (worded as mlflow.pytorch
            words it for its own flavor, error code RESOURCE_DOES_NOT_EXIST).
        CorruptionError: the MLmodel or its mlflow_lance section is malformed.
    """
    flavors = mlmodel(model_dir).flavors
    where = os.path.join(model_dir, MLMODEL)
    if not isinstance(flavors, dict):
        raise CorruptionError(f"{where}: flavors must be a mapping")
    if FLAVOR_NAME not in flavors:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

        raise MlflowException(  # mlflow.pytorch's words (mlflow.utils.model_utils), then ours
            f'Model does not have the "{FLAVOR_NAME}" flavor: {where} was not logged with mlflow_lance '
            f"(its flavors: {', '.join(sorted(map(str, flavors))) or 'none'}); load it with "
            f"mlflow.pyfunc.load_model() or with the load_model() of a flavor it has",
            RESOURCE_DOES_NOT_EXIST,
        )
    conf = flavors[FLAVOR_NAME]
    if not isinstance(conf, dict):
        raise CorruptionError(f"{where}: its {FLAVOR_NAME} flavor must be a mapping")
    kinds = [k for k in _ARCHITECTURES if k in conf]
    if len(kinds) != 1:
        raise CorruptionError(
            f"{where} must name exactly one architecture ({', '.join(_ARCHITECTURES)}); it names {kinds or 'none'}"
        )
    for key in (*_ARCHITECTURES, "state_prefix", "code", "pytorch_version"):
        if key in conf and conf[key] is not None and not isinstance(conf[key], str):
            raise CorruptionError(f"{where}: {FLAVOR_NAME}.{key} must be a string")
    if "factory_kwargs" in conf and conf["factory_kwargs"] is not None and not isinstance(conf["factory_kwargs"], dict):
        raise CorruptionError(f"{where}: {FLAVOR_NAME}.factory_kwargs must be a mapping")
    for key in ("skeleton", "torchscript", "exported_program", "code"):
        if conf.get(key) is not None:
            member(model_dir, conf[key])
    return conf


def parse_pointer(data: bytes, where: str) -> tuple[str, int]:
    """(Lance URI, version) from a pointer file's bytes (``where`` names it in errors)."""
    try:
        doc = parse_yaml(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError):
        raise CorruptionError(f"{where} is not valid YAML (its content is not shown)") from None
    uri = doc.get("lance_uri") if isinstance(doc, dict) else None
    version = doc.get("lance_version") if isinstance(doc, dict) else None
    return checked_pointer(uri, version, where)


def checked_pointer(uri: object, version: object, where: str) -> tuple[str, int]:
    """(Lance URI, version) if ``uri`` is a non-empty string with a scheme mlflow-lance reads
    (``fs.check_scheme``) and ``version`` a version number; else CorruptionError naming
    ``where``, never quoting the values."""
    if (
        not isinstance(uri, str)
        or not uri
        or isinstance(version, bool)
        or not isinstance(version, int)
        or not 0 <= version < 1 << 63
    ):
        raise CorruptionError(f"{where} must map lance_uri to a URI and lance_version to a version number")
    check_scheme(uri, where)
    return uri, version


def pointer_text(uri: str, version: int) -> str:
    """A pointer file's content: the Lance URI and version of a model's weights."""
    import yaml

    return yaml.safe_dump({"lance_uri": uri, "lance_version": int(version)})


def pointer(model_dir: str) -> tuple[str, int]:
    """(Lance URI, version) the directory's weights are; a relative URI is a dataset inside
    the directory (a self-contained model), confined like every other file of it."""
    relative = f"{DATA}/{POINTER}"
    where = os.path.join(model_dir, relative)
    uri, version = parse_pointer(read(model_dir, relative), where)
    if local_path(uri) is not None and not os.path.isabs(uri):
        uri = member(os.path.join(model_dir, DATA), uri, named_by=where)  # data/ itself was checked by read()
    return uri, version
