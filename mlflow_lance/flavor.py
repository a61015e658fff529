"""The MLflow flavor: log_model / save_model / load_model / load_state_dict and pyfunc.

The model directory MLflow stores holds MLmodel, the environment files, the architecture
(a weight-free skeleton, or a factory reference) and ``data/lance.yaml``, a pointer to the
Lance dataset and version that hold the weights. Weight bytes never enter MLflow's artifact
store and are never downloaded through it: loading reads them straight from Lance.

Order of work in ``save_model``, so that a failure leaves no half state: validate inputs and
write every small file first, then commit the Lance version, then write MLmodel (which is
what makes the directory a model). A failure after the commit leaves a Lance version that
no run references, and the error says so.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from mlflow import pyfunc
from mlflow.models import Model, ModelInputExample, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import write_to
from mlflow.utils.validation import _validate_model_name
from mlflow.utils.model_utils import (
    _add_code_from_conf_to_system_path,
    _copy_extra_files,
    _get_flavor_configuration,
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)

from . import lifecycle, registry, sidecar, store
from .artifacts import Location, dataset_location, storage_options_for
from .skeleton import (
    SKELETON_FILE,
    build_from_factory,
    check_factory,
    dump_skeleton,
    load_skeleton,
    materialize,
    pickle_allowed,
    retie,
    tie_groups,
)
from .sidecar import legacy_run_pin, model_pin
from .tensors import validate_state_dict

FLAVOR_NAME = "mlflow_lance"
_DATA_SUBPATH = "data"
_POINTER_FILE = "lance.yaml"


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def get_default_pip_requirements() -> list[str]:
    """Fixed requirements (mlflow-lance, torch, pylance pinned to what is installed).

    Fixed, so that log_model never runs MLflow's requirement inference, which loads the
    model a second time in a subprocess (3-7 s a call here).
    """
    torch_version = str(torch.__version__).split("+")[0]
    return [
        f"mlflow-lance=={_dist_version('mlflow-lance')}",
        f"torch=={torch_version}",
        f"pylance=={_dist_version('pylance')}",
    ]


# --------------------------------------------------------------------------- saving


def save_model(
    pytorch_model: torch.nn.Module,
    path: str,
    *,
    lance_uri: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    mlflow_model: Model | None = None,
    conda_env: dict | str | None = None,
    code_paths: list[str] | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    extra_files: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    model_factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    message: str | None = None,
    lance_properties: Mapping[str, str] | None = None,
) -> None:
    """Save ``pytorch_model`` as an MLflow model directory at ``path``.

    The weights become a new version of the Lance dataset ``lance_uri`` (default: a dataset
    inside ``path``). The architecture is a weight-free skeleton, or with ``model_factory``
    (``"package.module:callable"`` and JSON ``factory_kwargs``) a reference that loads
    without pickle. ``lance_properties`` are stored with the Lance version. A version
    written inside a run is pinned (Lance tag ``run.<run id>``) as soon as it is committed.
    """
    if not isinstance(pytorch_model, torch.nn.Module):
        raise TypeError(f"pytorch_model must be a torch.nn.Module, got {type(pytorch_model).__name__}")
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    factory = (model_factory, check_factory(model_factory, factory_kwargs)) if model_factory else None
    state_dict = pytorch_model.state_dict()
    validate_state_dict(state_dict)
    path = os.path.abspath(path)
    _validate_and_prepare_target_save_path(path)
    mlflow_model = mlflow_model or Model()
    if lance_uri and "://" not in os.fspath(lance_uri):  # the pointer must not depend on the cwd
        lance_uri = os.path.abspath(lance_uri)
    location = Location(os.fspath(lance_uri), dict(storage_options or {})) if lance_uri else None
    try:
        conf = _write_small_files(
            pytorch_model, path, mlflow_model, factory, signature, input_example, metadata,
            code_paths, extra_files,
        )  # fmt: skip
        if location is None:  # a self-contained model directory
            location = Location(os.path.join(path, _DATA_SUBPATH, "weights.lance"))
            uri_in_pointer = "weights.lance"
        else:
            uri_in_pointer = location.uri
        env = _environment(conda_env, pip_requirements, extra_pip_requirements)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise

    properties = {
        k: v
        for k, v in {
            "mlflow.run_id": mlflow_model.run_id,
            "mlflow.model_id": getattr(mlflow_model, "model_id", None),
            "mlflow.artifact_path": mlflow_model.artifact_path,
            **dict(lance_properties or {}),
        }.items()
        if v
    }
    try:  # nothing committed if this fails: leave no directory behind, so a retry can start over
        info = store.save_state_dict(
            state_dict,
            location.uri,
            message=message or (f"mlflow run {mlflow_model.run_id}" if mlflow_model.run_id else None),
            properties=properties,
            storage_options=location.storage_options or None,
        )
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    try:
        model_id = getattr(mlflow_model, "model_id", None)
        pin = model_pin(model_id) if model_id else legacy_run_pin(mlflow_model.run_id) if mlflow_model.run_id else None
        if pin:  # before anything else: from here on gc keeps this version
            store.tag(location.uri, pin, info.version, storage_options=location.storage_options or None)
        _write_pointer(path, uri_in_pointer, info.version)
        mlflow_model.add_flavor(
            FLAVOR_NAME,
            lance_uri=location.uri,
            lance_version=info.version,
            tensors=info.num_tensors,
            bytes=info.total_bytes,
            bytes_written=info.bytes_written,
            tensors_changed=len(info.changed),
            parent_version=info.parent,
            pytorch_version=str(torch.__version__),
            pylance_version=_dist_version("pylance"),
            mlflow_lance_version=_dist_version("mlflow-lance"),
            **({"self_contained": True} if uri_in_pointer == "weights.lance" else {}),
            **conf,
        )
        pyfunc.add_to_model(
            mlflow_model,
            loader_module="mlflow_lance.flavor",
            data=_DATA_SUBPATH,
            code=conf.get("code"),
            conda_env=_CONDA_ENV_FILE_NAME,
            python_env=_PYTHON_ENV_FILE_NAME,
            model_config={"device": None},
        )
        _write_environment(path, *env)
        mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))
    except BaseException as err:
        shutil.rmtree(path, ignore_errors=True)
        if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: as they are
            raise
        raise RuntimeError(
            f"saving the model failed after its weights were committed as version "
            f"{info.version} of {location.uri}; no run or model references that version, "
            f"and mlflow_lance.gc() can remove it. Cause: {err}"
        ) from err


def _write_small_files(
    module: torch.nn.Module,
    path: str,
    mlflow_model: Model,
    factory: tuple[str, dict] | None,
    signature: ModelSignature | None,
    input_example: ModelInputExample | None,
    metadata: dict | None,
    code_paths: list[str] | None,
    extra_files: list[str] | None,
) -> dict:
    """Everything but the weights; returns the flavor's configuration entries."""
    os.makedirs(os.path.join(path, _DATA_SUBPATH))
    conf: dict[str, Any] = {}
    if factory:
        conf["model_factory"], conf["factory_kwargs"] = factory
    else:
        with open(os.path.join(path, _DATA_SUBPATH, SKELETON_FILE), "wb") as f:
            f.write(dump_skeleton(module))
        conf["skeleton"] = f"{_DATA_SUBPATH}/{SKELETON_FILE}"
    if input_example is not None:
        _save_example(mlflow_model, input_example, path)
    if signature is not None:
        mlflow_model.signature = signature
    if metadata is not None:
        mlflow_model.metadata = metadata
    code = _validate_and_copy_code_paths(code_paths, path)
    if code:
        conf["code"] = code
    conf.update(_copy_extra_files(extra_files, path))
    return conf


def _environment(conda_env, pip_requirements, extra_pip_requirements) -> tuple:
    if conda_env is None:
        default = get_default_pip_requirements() if pip_requirements is None else None
        return _process_pip_requirements(default, pip_requirements, extra_pip_requirements)
    return _process_conda_env(conda_env)


def _write_environment(path: str, conda_env: dict, pip_requirements: list, pip_constraints: list) -> None:
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if pip_constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))


def _write_pointer(path: str, uri: str, version: int) -> None:
    with open(os.path.join(path, _DATA_SUBPATH, _POINTER_FILE), "w") as f:
        yaml.safe_dump({"lance_uri": uri, "lance_version": int(version)}, f)


def log_model(
    pytorch_model: torch.nn.Module,
    name: str | None = None,
    *,
    registered_model_name: str | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    conda_env: dict | str | None = None,
    code_paths: list[str] | None = None,
    extra_files: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    step: int = 0,
    await_registration_for: int = 300,
    lance_uri: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    model_factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    artifact_path: str | None = None,
    **kwargs: Any,
) -> mlflow.models.model.ModelInfo:
    """Log ``pytorch_model`` to the active run (started if none): weights to Lance, the rest
    to MLflow. Same parameters as ``mlflow.pytorch.log_model``, plus ``lance_uri`` (a dataset
    URI; default: the registered model's dataset under the Lance root, see artifacts.py),
    ``storage_options`` and ``model_factory``/``factory_kwargs``. Afterwards the run, the
    logged model and the model version carry ``lance.*`` tags, the version is pinned and the
    sidecar next to the dataset is up to date.
    """
    name = name or artifact_path or "model"
    if registered_model_name is not None:  # the registry's own rules, before anything is written
        _validate_model_name(registered_model_name)
    if not isinstance(pytorch_model, torch.nn.Module):
        raise TypeError(f"pytorch_model must be a torch.nn.Module, got {type(pytorch_model).__name__}")
    validate_state_dict(pytorch_model.state_dict())  # before the registered model is created
    location, experiment_id, binding = _location_for(name, registered_model_name, lance_uri, storage_options)
    lance_properties = {"mlflow.step": str(int(step or 0)), "mlflow.experiment_id": str(experiment_id)}
    if registered_model_name:
        lance_properties.update({"mlflow.registered_model_name": registered_model_name, "mlflow.binding": binding})
    info = Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        metadata=metadata,
        tags=tags,
        params=params,
        step=step,
        pytorch_model=pytorch_model,
        lance_uri=location.uri,
        storage_options=location.storage_options,
        conda_env=conda_env,
        code_paths=code_paths,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        extra_files=extra_files,
        model_factory=model_factory,
        factory_kwargs=factory_kwargs,
        lance_properties=lance_properties,
        **kwargs,
    )
    registry.after_log(info, registered_model_name, binding, location.storage_options or None)
    return info


def _location_for(
    name: str, registered_model_name: str | None, lance_uri: str | None, storage_options
) -> tuple[Location, str, str | None]:
    """Where the weights go, the experiment, and the registered model's binding (see lifecycle.py).

    A registered model writes to the dataset it is bound to for its whole life (renames
    included); an explicit ``lance_uri`` wins but does not rebind the model.
    """
    run = mlflow.active_run()
    experiment_id = run.info.experiment_id if run else mlflow.tracking.fluent._get_experiment_id()
    binding = None
    if registered_model_name:
        client = mlflow.MlflowClient()
        if lance_uri:
            binding, _ = lifecycle.bind(client, registered_model_name, create=True)
        else:
            artifact_location = mlflow.get_experiment(experiment_id).artifact_location

            def default(b: str) -> str:
                return dataset_location(model_name=registered_model_name, registered=True, binding=b,
                                        artifact_location=artifact_location, experiment_id=experiment_id).uri

            binding, lance_uri = lifecycle.dataset_of(client, registered_model_name, default)
    artifact_location = None
    if not lance_uri:
        artifact_location = mlflow.get_experiment(experiment_id).artifact_location
    location = dataset_location(
        model_name=registered_model_name or name,
        registered=registered_model_name is not None,
        artifact_location=artifact_location,
        experiment_id=experiment_id,
        lance_uri=lance_uri,
        storage_options=dict(storage_options or {}),
    )
    return location, experiment_id, binding


# --------------------------------------------------------------------------- loading


def _read_pointer(data_path: str) -> tuple[str, int]:
    path = os.path.join(data_path, _POINTER_FILE)
    with open(path) as f:
        doc = yaml.safe_load(f.read(1 << 16))
    uri = doc.get("lance_uri") if isinstance(doc, dict) else None
    version = doc.get("lance_version") if isinstance(doc, dict) else None
    if not isinstance(uri, str) or not uri or isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{path} must map lance_uri to a URI and lance_version to a version number")
    if "://" not in uri and not os.path.isabs(uri):  # a dataset inside the model directory
        uri = os.path.join(data_path, uri)
    return uri, version


def _load_from_local(
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
    conf = _get_flavor_configuration(local_path, FLAVOR_NAME)
    uri, version = _read_pointer(os.path.join(local_path, _DATA_SUBPATH))
    device = torch.device(map_location) if map_location is not None else torch.device("cpu")
    opts = storage_options_for(uri) or None
    trusted_only = not pickle_allowed(allow_pickle)
    if not trusted_only:
        _add_code_from_conf_to_system_path(local_path, conf)
    if "model_factory" in conf:
        module = build_from_factory(
            conf["model_factory"], conf.get("factory_kwargs"), trusted_only=trusted_only, model_dir=local_path
        ).to(device)
        store.load_into(module, uri, version, strict=strict, storage_options=opts, verify=verify)
        return module.eval()
    module = load_skeleton(os.path.join(local_path, conf["skeleton"]), allow_pickle=allow_pickle)
    ties = tie_groups(module)
    state_dict = store.load_state_dict(uri, version, map_location=device, storage_options=opts, verify=verify)
    module.load_state_dict(state_dict, strict=strict, assign=True)
    retie(ties)
    return materialize(module, device).eval()  # what the weights did not cover (strict=False)


def load_model(
    model_uri: str,
    dst_path: str | None = None,
    *,
    map_location: str | torch.device | None = None,
    strict: bool = True,
    verify: bool = False,
    allow_pickle: bool | None = None,
) -> torch.nn.Module:
    """Load a model logged with this flavor (``runs:/``, ``models:/``, a path, ...).

    The architecture comes from MLflow's artifact store (a few KB), the weights straight
    from the Lance version the model was logged with, onto ``map_location``.
    ``allow_pickle=False`` (or MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false) refuses the
    skeleton pickle and treats the model as untrusted: its ``model_factory`` must be one the
    installed environment vouches for (see ``skeleton.trusted_factory``).
    """
    options = {"map_location": map_location, "strict": strict, "verify": verify, "allow_pickle": allow_pickle}
    if os.path.isdir(model_uri):
        return _load_from_local(model_uri, **options)
    if dst_path is not None:
        return _load_from_local(_download_model(model_uri, dst_path), **options)
    tmp = tempfile.mkdtemp(prefix="mlflow_lance_")
    try:
        return _load_from_local(_download_model(model_uri, tmp), **options)
    finally:  # keep the download only if its code/ went onto sys.path (imports may still need it)
        if not any(p.startswith(tmp) for p in sys.path):
            shutil.rmtree(tmp, ignore_errors=True)


def load_state_dict(
    uri: str | os.PathLike,
    version: store.Version | None = None,
    *,
    map_location: str | torch.device | None = None,
    names: str | list[str] | None = None,
    storage_options: Mapping[str, str] | None = None,
    verify: bool = False,
    run_id: str | None = None,
    step: int | None = None,
    model_id: str | None = None,
) -> OrderedDict[str, torch.Tensor]:
    """Load weights from a Lance dataset URI, or from an MLflow model URI.

    One dispatch: ``runs:/``, ``models:/`` and a local model directory read the Lance URI and
    version from the model's MLmodel (nothing else is downloaded); anything else is a Lance
    dataset URI, read at ``version`` (default: latest) or at the version run ``run_id``
    logged, found through the sidecar with no tracking server (a run that logged several
    versions needs ``step=`` or ``model_id=``).
    """
    uri = os.fspath(uri)
    model = _model_pointer(uri)
    if model is not None or run_id is not None:
        if version is not None:
            raise ValueError(f"{uri} names one model version; do not pass version= as well")
    if model is not None:
        uri, version = model
    elif run_id is not None:
        opts = dict(storage_options or {}) or storage_options_for(uri)
        version = sidecar.version_for_run(uri, run_id, opts, step=step, model_id=model_id)
    return store.load_state_dict(
        uri,
        version,
        map_location=map_location,
        names=names,
        storage_options=dict(storage_options or {}) or storage_options_for(uri) or None,
        verify=verify,
    )


def _download_model(model_uri: str, dst_path: str) -> str:
    """Fetch what loading needs (MLmodel, data/ with the architecture and pointer, code/)
    and nothing else: no environment files, no examples, never weights."""
    base = lifecycle.model_dir_uri(model_uri).rstrip("/")
    os.makedirs(dst_path, exist_ok=True)
    _download_artifact_from_uri(f"{base}/{MLMODEL_FILE_NAME}", output_path=dst_path)
    conf = _get_flavor_configuration(dst_path, FLAVOR_NAME)
    for sub in (_DATA_SUBPATH, conf.get("code")):
        if sub:
            _download_artifact_from_uri(f"{base}/{sub}", output_path=dst_path)
    return dst_path


def _model_pointer(uri: str) -> tuple[str, int] | None:
    """(Lance URI, version) of an MLflow model URI or model directory, else None."""
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme in ("runs", "models", "mlflow-artifacts"):
        conf = lifecycle.flavor_conf(uri)
        if conf is None:
            raise ValueError(f"{uri} was not logged with mlflow_lance (no {FLAVOR_NAME} flavor)")
        return conf["lance_uri"], int(conf["lance_version"])
    if os.path.isfile(os.path.join(uri, MLMODEL_FILE_NAME)):
        return _read_pointer(os.path.join(uri, _DATA_SUBPATH))
    return None


# --------------------------------------------------------------------------- pyfunc


class _LanceModelWrapper:
    """``mlflow.pyfunc`` view of the module: numpy / pandas / dict of arrays in, numpy out."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module = module
        self.device = device

    def get_raw_model(self) -> torch.nn.Module:
        return self.module

    def _tensor(self, value: Any) -> torch.Tensor:
        array = value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)
        t = torch.from_numpy(np.ascontiguousarray(array))
        if t.is_floating_point():
            t = t.to(self._float_dtype())
        return t.to(self.device)

    def _float_dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def predict(self, data: Any, params: dict | None = None) -> Any:
        with torch.no_grad():
            if isinstance(data, Mapping):
                out = self.module(**{k: self._tensor(v) for k, v in data.items()})
            else:
                out = self.module(self._tensor(data))
        return _to_numpy(out)


def _to_numpy(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().cpu().numpy()
    if isinstance(out, Mapping):
        return {k: _to_numpy(v) for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        arrays = [_to_numpy(v) for v in out if isinstance(v, torch.Tensor)]
        return arrays[0] if len(arrays) == 1 else arrays
    return out


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> _LanceModelWrapper:
    """Called by ``mlflow.pyfunc.load_model`` with the model's ``data`` directory."""
    device = (model_config or {}).get("device") or os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE") or "cpu"
    local_path = os.path.dirname(os.path.abspath(data_path))
    module = _load_from_local(local_path, map_location=device, strict=True, verify=False, allow_pickle=None)
    return _LanceModelWrapper(module, torch.device(device))
