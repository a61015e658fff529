"""Loading a model this flavor logged: find its directory, read the pointer to its Lance
version, build the architecture (factory, TorchScript or pt2 program, or skeleton) and fill it
with the weights; ``load_model`` for every MLflow URI form.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.models.model import MLMODEL_FILE_NAME

from . import bindings, fs, modeldir, program, store, tree
from .artifacts import options
from .compat import (
    _add_code_from_conf_to_system_path,
    _download_artifact_from_uri,
)
from .fs import read_bytes
from .modeldir import FLAVOR_NAME
from .skeleton import (
    build_from_factory,
    load_skeleton,
    materialize,
    pickle_allowed,
    retie,
    tie_groups,
)

DATA_SUBPATH = "data"
POINTER_FILE = "lance.yaml"
PROGRAM_FILE = "program.pt"  # a TorchScript program without its weights
STATE_DICT_POINTER = "lance-state-dict.yaml"  # what log_state_dict leaves in the run's artifacts
# torch.load options mlflow.pytorch passes through: accepted; weights are never unpickled
TORCH_LOAD_OPTIONS = {"weights_only", "pickle_module", "mmap", "encoding"}
_logger = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_downloads():
    """No 'Downloading artifacts' bars for the few KB of MLmodel and pointers we fetch."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def refuse_unknown(function: str, given: Mapping[str, Any], accepted: set[str]) -> None:
    """TypeError, worded as Python's, for keyword arguments outside those mlflow.pytorch's
    ``function`` passes through (which are accepted, and change nothing)."""
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")


def load_torchscript(program: bytes, state_dict: Mapping[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """A TorchScript program given the stored weights (each tensor set on its submodule)."""
    module = torch.jit.load(io.BytesIO(program), map_location=device)
    subs = dict(module.named_modules())
    for key, tensor in state_dict.items():
        owner, _, name = key.rpartition(".")
        sub = subs[owner]
        current = getattr(sub, name)
        value = tensor.to(device)
        setattr(
            sub,
            name,
            torch.nn.Parameter(value, requires_grad=current.requires_grad)
            if isinstance(current, torch.nn.Parameter)
            else value,
        )
    return module


def load_from_local(
    local_path: str,
    *,
    map_location: str | torch.device | None,
    strict: bool,
    verify: bool,
    allow_pickle: bool | None,
) -> torch.nn.Module:
    """Build the architecture and give it the weights of the recorded Lance version.

    A skeleton's parameters become the loaded tensors themselves (``assign``): on a local
    dataset those are copy-on-write maps of the data files, so loading copies nothing and
    several processes serving one model share its pages. A factory-built module is
    filled in place (``load_into``). With pickle refused the directory is untrusted: its
    code/ is not put on sys.path and a factory must pass ``skeleton.trusted_factory``.
    """
    conf = modeldir.flavor_conf(local_path)
    uri, version = modeldir.pointer(local_path)
    device = torch.device(map_location) if map_location is not None else torch.device("cpu")
    opts = options(uri)
    saved_with = str(conf.get("pytorch_version", ""))
    saved_with = saved_with if re.fullmatch(r"[0-9][0-9A-Za-z.+_-]{0,40}", saved_with) else "unknown"
    if conf.get("pytorch_version") and saved_with != str(torch.__version__):
        _logger.warning(
            "Stored model version '%s' does not match installed PyTorch version '%s'",
            saved_with,
            torch.__version__,
        )
    trusted_only = not pickle_allowed(allow_pickle)
    if not trusted_only:
        _add_code_from_conf_to_system_path(local_path, conf)
    if "torchscript" in conf:  # a program: code from the artifact, refused like the skeleton pickle
        if trusted_only:
            raise PermissionError(
                f"refusing to load the TorchScript program at {local_path}: pickle deserialization is "
                f"disabled, and a program is code from the model directory. Load only the weights with "
                f"mlflow_lance.load_state_dict()."
            )
        script = modeldir.read(local_path, conf["torchscript"], limit=modeldir.MAX_ARCHITECTURE)
        with _reaching(local_path, uri, version):
            state_dict = store.read_state_dict(uri, version, storage_options=opts, verify=verify)
        return load_torchscript(script, state_dict, device).eval()
    if "exported_program" in conf:  # JSON and raw bytes: loads with pickle refused (checked, untrusted)
        where = os.path.join(local_path, conf["exported_program"])
        data = modeldir.read(local_path, conf["exported_program"], limit=modeldir.MAX_ARCHITECTURE)
        with _reaching(local_path, uri, version):
            state_dict = store.read_state_dict(uri, version, map_location=device, storage_options=opts, verify=verify)
        return program.load(data, where, state_dict, device, untrusted=trusted_only, strict=strict)
    if "model_factory" in conf:
        with _reaching(local_path, uri, version):
            module = _built_to_fit(conf, local_path, trusted_only, store.Dataset(uri, opts), version, strict)
            store.load_into(module.to(device), uri, version, strict=strict, storage_options=opts, verify=verify)
        return module.eval()
    skeleton = modeldir.read(local_path, conf["skeleton"], limit=modeldir.MAX_ARCHITECTURE)
    module = load_skeleton(skeleton, os.path.join(local_path, conf["skeleton"]), allow_pickle=allow_pickle)
    ties = tie_groups(module)
    prefix = conf.get("state_prefix")  # a checkpoint: the model's tensors only
    with _reaching(local_path, uri, version):
        state_dict = store.read_state_dict(
            uri, version, map_location=device, storage_options=opts, verify=verify, names=prefix
        )
    if prefix:
        state_dict = tree.strip_prefix(state_dict, prefix)
    module.load_state_dict(state_dict, strict=strict, assign=True)
    retie(ties)
    return materialize(module, device).eval()  # what the weights did not cover (strict=False)


@contextlib.contextmanager
def _reaching(local_path: str, uri: str, version: int) -> Iterator[None]:
    """Reads of a model's dataset: one that cannot be reached from here (a path of another
    machine, a bucket without credentials) is named, with how to take a model elsewhere."""
    try:
        yield
    except (FileNotFoundError, ConnectionError) as err:
        if os.path.abspath(uri).startswith(os.path.abspath(local_path) + os.sep):
            raise  # a bundle's own weights: nothing elsewhere to reach
        kind = FileNotFoundError if isinstance(err, FileNotFoundError) else ConnectionError
        raise kind(
            f"{err}\nThis model keeps its weights in version {version} of {uri}, which cannot be read from "
            f"here. To take a model elsewhere, bundle it where that dataset is reachable: "
            f"`mlflow-lance bundle MODEL_URI DIR` (mlflow_lance.bundle_model), or log it with "
            f"log_model(..., self_contained=True); or give this machine access to {uri}."
        ) from err


def _built_to_fit(
    conf: Mapping, local_path: str, trusted_only: bool, dataset: store.Dataset, version: int, strict: bool
) -> torch.nn.Module:
    """The factory's module, built only once its shapes are known to fit the stored version:
    it is built on the meta device first (no memory), checked against the version's keys
    and shapes, and only then for real, so that a crafted MLmodel cannot make a trusted
    factory allocate what the dataset does not hold. A factory that cannot build on the meta
    device is built directly (and checked by the load)."""
    spec = (conf["model_factory"], conf.get("factory_kwargs"))
    try:
        shape = build_from_factory(*spec, trusted_only=trusted_only, model_dir=local_path, device="meta")
    except PermissionError:
        raise
    except Exception:  # noqa: BLE001 (the meta build is an early check only; the real build decides)
        shape = None
    if shape is not None:
        store.check_fits(shape, dataset, version, strict=strict)
    return build_from_factory(*spec, trusted_only=trusted_only, model_dir=local_path)


def load_model(
    model_uri: str,
    dst_path: str | None = None,
    *,
    map_location: str | torch.device | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
    verify: bool = False,
    allow_pickle: bool | None = None,
    **torch_load_kwargs: Any,
) -> torch.nn.Module:
    """Load a model logged with this flavor, as ``mlflow.pytorch.load_model``.

    The architecture comes from MLflow's artifact store (a few KB), the weights straight from
    the Lance version it was logged with.

    Args:
        model_uri: ``runs:/<run id>/<name>``, ``models:/<model id>``, ``models:/<name>/<version>``,
            ``models:/<name>@<alias>``, ``models:/<name>/latest``, or a local model directory.
        dst_path: where to download MLmodel and the architecture (default: a temp directory).
        map_location / device: the device the weights go to.
        strict: refuse missing and unexpected keys.
        verify: rehash every byte of the weights.
        allow_pickle: False refuses the skeleton pickle and TorchScript programs and treats the
            directory as untrusted: a ``pt2`` program loads only after ``program.check``
            (default: MLFLOW_ALLOW_PICKLE_DESERIALIZATION).
        torch_load_kwargs: ``weights_only``, ``pickle_module``, ``mmap``, ``encoding``: accepted,
            as ``mlflow.pytorch.load_model`` passes them; weights are never unpickled.

    Returns:
        The module, in eval mode, its parameters the loaded tensors; for a ``pt2`` model the
        program's ``ExportedProgram.module()`` (a ``torch.fx.GraphModule``), as
        ``mlflow.pytorch.load_model`` returns it.

    Raises:
        PermissionError: pickle refused and the model needs it (or its factory is not trusted).
        CorruptionError / VersionNotFoundError: its weights cannot be loaded as recorded, or its
            ``pt2`` program is damaged or (pickle refused) names more than torch's operators.

    Example:
        >>> model = load_model("models:/churn@champion", map_location="cuda:0")
    """
    refuse_unknown("load_model", torch_load_kwargs, TORCH_LOAD_OPTIONS)
    if device is not None and map_location is not None and torch.device(device) != torch.device(map_location):
        raise ValueError(f"device={device!r} and map_location={map_location!r} disagree; pass one")
    map_location = map_location if map_location is not None else device
    options = {"map_location": map_location, "strict": strict, "verify": verify, "allow_pickle": allow_pickle}
    if os.path.isdir(model_uri):
        if modeldir.kind(model_uri) == "dataset":
            raise store.WeightsError(
                f"{model_uri} is a Lance dataset, not a model directory; load its weights with "
                f"mlflow_lance.load_state_dict({model_uri!r}) or a model with its MLflow URI"
            )
        return load_from_local(model_uri, **options)
    if dst_path is not None:
        return load_from_local(download_model(model_uri, dst_path), **options)
    tmp = tempfile.mkdtemp(prefix="mlflow_lance_")
    try:
        return load_from_local(download_model(model_uri, tmp), **options)
    finally:  # keep the download only if its code/ went onto sys.path (imports may still need it)
        if not any(p.startswith(tmp) for p in sys.path):
            shutil.rmtree(tmp, ignore_errors=True)


def model_state_dict(
    uri: str | os.PathLike,
    version: store.Version | None = None,
    *,
    map_location: str | torch.device | None = None,
    names: str | list[str] | None = None,
    verify: bool = False,
) -> Any:
    """The weights (or checkpoint dict) an MLflow model URI, a model directory or a
    ``log_state_dict`` artifact points at; reads MLmodel or the pointer, nothing else
    (``mlflow_lance.load_state_dict`` calls this for MLflow URIs)."""
    uri = os.fspath(uri)
    with model_pointer(uri) as model:
        if model is None:
            raise ValueError(f"{uri} is neither an MLflow model URI nor a model directory")
        if version is not None:
            raise ValueError(f"{uri} names one model version; do not pass version= as well")
        dataset, version = model
        return store.read_state_dict(
            dataset,
            version,
            map_location=map_location,
            names=names,
            storage_options=options(dataset),
            verify=verify,
        )


def download_model(model_uri: str, dst_path: str) -> str:
    """Fetch what loading needs (MLmodel, data/ with the architecture and pointer, code/)
    and nothing else: no environment files, no examples, never weights."""
    base = bindings.model_dir_uri(model_uri).rstrip("/")
    os.makedirs(dst_path, exist_ok=True)
    with quiet_downloads():
        _download_artifact_from_uri(f"{base}/{MLMODEL_FILE_NAME}", output_path=dst_path)
        conf = modeldir.flavor_conf(dst_path)
        for sub in (DATA_SUBPATH, conf.get("code")):
            if sub:
                _download_artifact_from_uri(f"{base}/{sub}", output_path=dst_path)
    return dst_path


@contextlib.contextmanager
def model_pointer(uri: str) -> Iterator[tuple[str, int] | None]:
    """(Lance URI, version) of an MLflow model URI, a model directory or a state dict that
    ``log_state_dict`` logged; None for anything else (a dataset URI). A self-contained model
    directory's dataset is downloaded for the duration (maps of it stay valid after)."""
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme in ("runs", "models", "mlflow-artifacts"):
        with quiet_downloads():
            try:
                conf = bindings.flavor_conf(uri)
            except (MlflowException, OSError):
                pointer = state_dict_pointer(uri)
                if pointer is None:
                    raise
                yield pointer
                return
        if conf is None:
            raise ValueError(f"{uri} was not logged with mlflow_lance (no {FLAVOR_NAME} flavor)")
        if not conf.get("self_contained"):
            where = f"MLmodel of {uri} (its {FLAVOR_NAME} flavor)"
            yield modeldir.checked_pointer(conf.get("lance_uri"), conf.get("lance_version"), where)
            return
        with tempfile.TemporaryDirectory(prefix="mlflow_lance_") as tmp:
            yield modeldir.pointer(download_model(uri, tmp))
        return
    if modeldir.kind(uri) == "model":
        yield modeldir.pointer(uri)
        return
    yield None


def state_dict_pointer(uri: str) -> tuple[str, int] | None:
    """The (Lance URI, version) a ``log_state_dict`` artifact points at, or None. The pointer
    is untrusted: it must name an absolute path or a URI (never one relative to the cwd), and
    a local one is read within its size limit where it lies, not copied first."""
    where = f"{uri.rstrip('/')}/{STATE_DICT_POINTER}"
    local = fs.local_path(uri)
    if local is not None:
        path = os.path.join(local, STATE_DICT_POINTER)
        if not os.path.lexists(path):
            return None
        data = read_bytes(path, limit=1 << 20, follow_links=False)
    else:
        with tempfile.TemporaryDirectory(prefix="mlflow_lance_") as tmp, quiet_downloads():
            try:
                path = _download_artifact_from_uri(where, output_path=tmp)
            except (MlflowException, OSError):
                return None
            data = read_bytes(path, limit=1 << 20, follow_links=False)
    if data is None:
        raise store.CorruptionError(f"{where} is not a regular file of at most 1 MiB")
    dataset, version = modeldir.parse_pointer(data, where)
    if fs.local_path(dataset) is not None and not os.path.isabs(dataset):
        raise store.CorruptionError(f"{where} names a relative dataset path; a pointer names an absolute one or a URI")
    return dataset, version
