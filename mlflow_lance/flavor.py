"""The MLflow flavor: log_model / save_model / load_model, log_state_dict and pyfunc.

The model directory MLflow stores holds MLmodel, the environment files, the architecture
(a weight-free skeleton, a TorchScript or ``torch.export`` program without its weights, or a
factory reference)
and ``data/lance.yaml``, a pointer to the
Lance dataset and version that hold the weights. Weight bytes never enter MLflow's artifact
store and are never downloaded through it: loading reads them straight from Lance.

Order of work in ``save_model``, so that a failure leaves no half state: validate inputs and
write every small file first, then commit the Lance version, then write MLmodel (which is
what makes the directory a model). A failure after the commit leaves a Lance version that
no run references, and the error says so.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import mlflow
import torch
import yaml
from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelInputExample, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.utils.file_utils import write_to

from . import __version__, bindings, distributed, fs, modeldir, program, registry, store, writer
from .artifacts import dataset_location, options
from .compat import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _copy_extra_files,
    _get_experiment_id,
    _infer_signature_from_input_example,
    _mlflow_conda_env,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _save_example,
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
    _validate_env_arguments,
    _validate_model_name,
)
from .dataset import Dataset
from .errors import after_commit
from .format import check_compression
from .modeldir import FLAVOR_NAME
from .modelload import (
    DATA_SUBPATH,
    POINTER_FILE,
    PROGRAM_FILE,
    STATE_DICT_POINTER,
    load_from_local,
    load_model,
    model_pointer,
    model_state_dict,
    refuse_unknown,
    state_dict_pointer,
)
from .pyfunc_model import LanceModelWrapper, default_device
from .sidecar import model_pin, run_pin
from .skeleton import (
    SKELETON_FILE,
    check_factory,
    dump_skeleton,
)

__all__ = [  # the flavor contract, as mlflow.pytorch names it; loading lives in modelload.py
    "get_default_conda_env",
    "get_default_pip_requirements",
    "load_model",
    "log_model",
    "log_state_dict",
    "model_pointer",
    "model_state_dict",
    "save_model",
    "state_dict_pointer",
]

# torch.save options mlflow.pytorch passes through; they concern pickle files, which are never written
_TORCH_SAVE_OPTIONS = {"pickle_protocol", "_use_new_zipfile_serialization", "_disable_byteorder_record"}
_logger = logging.getLogger(__name__)


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def get_default_pip_requirements() -> list[str]:
    """Return the pip requirements of models this flavor writes.

    Fixed, so that log_model never runs MLflow's requirement inference, which loads the
    model a second time in a subprocess (3-7 s a call here).

    Returns:
        mlflow-lance, torch and pylance, each pinned to the version installed (torch without
        its local build suffix such as ``+cpu``).

    Example:
        >>> get_default_pip_requirements()
        ['mlflow-lance==0.2.0', 'torch==2.13.0', 'pylance==...']
    """
    torch_version = str(torch.__version__).split("+")[0]
    return [
        f"mlflow-lance=={__version__}",
        f"torch=={torch_version}",
        f"pylance=={_dist_version('pylance')}",
    ]


def get_default_conda_env() -> dict:
    """Return the default Conda environment of models this flavor writes (as mlflow.pytorch's).

    Returns:
        MLflow's Conda environment dict, whose pip dependencies are
        ``get_default_pip_requirements()``.

    Example:
        >>> env = get_default_conda_env()
        >>> env["dependencies"]
    """
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


# --------------------------------------------------------------------------- saving


@dataclass(frozen=True)
class Capture:
    """What a save writes, captured (and checked) once: the prepared state (a model's state
    dict, or a checkpoint's whole tree), the architecture when it was captured earlier (a
    skeleton pickled at staging time; None: taken from the module at save time), and where the
    model's own tensors sit in the tree (``state_prefix``, for checkpoints). A state whose data
    files are written already (``written``: by every rank of a distributed save) is committed
    as it is, to the dataset it was written to."""

    prepared: writer.Prepared | None
    skeleton: bytes | None = None
    state_prefix: str | None = None
    written: writer.Written | None = None
    compression: str | None = None  # save_state_dict's compression= (checked by the caller)


class _Saver:
    """The flavor ``Model.log`` saves with: ``save_model`` of an already captured state (so
    that ``log_model`` checks it once, and checkpoints pass theirs without private keyword
    arguments through the public API)."""

    __name__ = __name__  # Model.log names the flavor after its module

    def __init__(self, capture: Capture):
        self.capture = capture

    def save_model(self, path: str, mlflow_model: Model, *, pytorch_model: torch.nn.Module, **kwargs: Any) -> None:
        _save(pytorch_model, path, self.capture, mlflow_model=mlflow_model, **kwargs)


def save_model(
    pytorch_model: torch.nn.Module,
    path: str,
    *,
    lance_uri: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    compression: str | None = None,
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
    serialization_format: str | None = None,
    pickle_module: Any = None,
    **torch_save_kwargs: Any,
) -> None:
    """Save ``pytorch_model`` as an MLflow model directory at ``path``.

    The weights become a new version of the Lance dataset ``lance_uri`` (default: a dataset
    inside ``path``). The architecture, without its weights, is:

    - with ``model_factory`` (``"package.module:callable"`` and JSON ``factory_kwargs``): a
      reference that loads without pickle (the factory wins over any format);
    - for a TorchScript module (``torch.jit.script``/``trace``): its program;
    - with ``serialization_format="pt2"``, or with an ``input_example`` and no format named:
      the ``torch.export`` program (no pickle on load). Named, the module is exported as it
      is, as mlflow.pytorch does; by default in eval mode, and when torch.export fails a
      warning says why and the skeleton is stored instead;
    - else (``"pickle"``, or no input example): a pickled skeleton.

    ``lance_properties`` are stored with the Lance version. A version
    written for a logged model is pinned (Lance tag ``model.<model id>``) as soon as it is
    committed. A signature is inferred from ``input_example`` as mlflow.pytorch does
    (``signature=False`` turns that off).

    Accepted for drop-in compatibility with ``mlflow.pytorch.save_model``: ``pickle_module``
    and torch.save's options (no pickle file is written, so they change nothing).

    Args:
        pytorch_model: the module to save.
        path: the model directory to create (it must not exist, or be empty).
        lance_uri / storage_options: the dataset the weights go to (default: one inside ``path``).
        model_factory / factory_kwargs: ``"package.module:callable"`` and JSON keyword
            arguments that build the module without pickle at load time.
        serialization_format: ``"pt2"`` (a ``torch.export`` program; needs an array or tensor
            ``input_example``), ``"pickle"`` (a pickled skeleton), or None (see above).
        message / lance_properties: stored with the Lance version (``versions()`` shows them).
        compression: how the weights' payloads are stored, for a new dataset (fixed per
            dataset): None (default) or ``"none"``: raw bytes, the fastest to load;
            ``"auto"``: byte-grouped zstd per tensor (~0.68x the bytes of bf16 weights, ~0.85x
            of fp32), for object storage or an MLflow proxy, where fewer bytes beat the decode;
            ``"zstd"``: one zstd frame per payload. None keeps what an existing ``lance_uri``
            was created with; another value than that raises ValueError (docs/storage.md).
        mlflow_model, conda_env, code_paths, signature, input_example, pip_requirements,
            extra_pip_requirements, extra_files, metadata: as in ``mlflow.pytorch.save_model``.
        pickle_module, **torch_save_kwargs: see above.

    Raises:
        TypeError: ``pytorch_model`` is not a ``torch.nn.Module``, a keyword argument
            ``mlflow.pytorch.save_model`` does not take, or a value that cannot be stored.
        ValueError: ``serialization_format="pt2"`` with no array or tensor input example, with
            a factory, a TorchScript module, or a model torch.export cannot trace; an unknown
            ``serialization_format``; a bad key or factory reference; a ``compression`` that
            is not one, or not the one ``lance_uri`` was created with. Nothing is written.
        MlflowException: ``path`` exists and is not empty.
        CommittedError: a step after the weights were committed failed (names the version).

    Example:
        >>> save_model(model, "model_dir", input_example=x)
        >>> model = load_model("model_dir")
    """
    _check_module(pytorch_model)
    check_compression(compression)
    _save(
        pytorch_model,
        path,
        Capture(writer.prepare(pytorch_model.state_dict()), compression=compression),
        lance_uri=lance_uri,
        storage_options=storage_options,
        mlflow_model=mlflow_model,
        conda_env=conda_env,
        code_paths=code_paths,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        extra_files=extra_files,
        metadata=metadata,
        model_factory=model_factory,
        factory_kwargs=factory_kwargs,
        message=message,
        lance_properties=lance_properties,
        serialization_format=serialization_format,
        **torch_save_kwargs,
    )


def _save(
    module: torch.nn.Module,
    path: str,
    capture: Capture,
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
    serialization_format: str | None = None,
    pickle_module: Any = None,
    **torch_save_kwargs: Any,
) -> None:
    """``save_model`` of a state captured and checked already (see ``Capture``)."""
    _check_pytorch_options(serialization_format, torch_save_kwargs)
    exportable = capture.skeleton is None and capture.state_prefix is None and capture.written is None
    if serialization_format == "pt2":
        _check_pt2(module, model_factory, input_example, exportable)
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    factory = (model_factory, check_factory(model_factory, factory_kwargs, resolve=True)) if model_factory else None
    path = os.path.abspath(path)
    _validate_and_prepare_target_save_path(path)
    mlflow_model = mlflow_model or Model()
    location = _weights_location(path, lance_uri, storage_options)
    with _removed_on_failure(path):  # nothing committed yet: a retry can start over
        conf = _write_small_files(
            module,
            path,
            mlflow_model,
            factory,
            signature,
            input_example,
            metadata,
            code_paths,
            extra_files,
            capture.skeleton,
            serialization_format if exportable else "pickle",
        )
        if capture.state_prefix:  # a checkpoint: the model's tensors live under this prefix
            conf["state_prefix"] = capture.state_prefix
        # MLflow's requirement checks (~1.5 s in a fresh process: it maps every installed
        # distribution to its modules) run while the weights are written. An error of theirs
        # (a requirements file that is not there) then comes after the commit: that version is
        # referenced by nothing, and gc reclaims it.
        with ThreadPoolExecutor(1, thread_name_prefix="mlflow-lance-env") as pool:
            env_job = pool.submit(_environment, conda_env, pip_requirements, extra_pip_requirements)
            info = _save_weights(capture, location, mlflow_model, message, lance_properties)
            env = env_job.result()
    _describe_model(path, mlflow_model, location, info, conf, env, self_contained=not lance_uri)


@contextlib.contextmanager
def _removed_on_failure(path: str) -> Iterator[None]:
    """Remove the model directory if the block fails, so that no half-written model remains."""
    try:
        yield
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def _weights_location(path: str, lance_uri: str | None, storage_options: Mapping[str, str] | None) -> Dataset:
    """Where the weights go: ``lance_uri`` (a local path made absolute, so that the pointer does
    not depend on the cwd), else a dataset inside the model directory."""
    if not lance_uri:
        return Dataset(os.path.join(path, DATA_SUBPATH, "weights.lance"))
    if fs.local_path(os.fspath(lance_uri)) is not None:
        lance_uri = os.path.abspath(lance_uri)
    return Dataset(os.fspath(lance_uri), options(os.fspath(lance_uri), storage_options))


def _save_weights(
    capture: Capture,
    location: Dataset,
    mlflow_model: Model,
    message: str | None,
    lance_properties: Mapping[str, str] | None,
) -> store.VersionInfo:
    """Commit the weights (with a checkpoint's other state) as a new Lance version, recording
    the run, logged model and name they were saved for (those that are set)."""
    properties = {
        "mlflow.run_id": mlflow_model.run_id,
        "mlflow.model_id": getattr(mlflow_model, "model_id", None),
        "mlflow.artifact_path": mlflow_model.artifact_path,
        **dict(lance_properties or {}),
    }
    message = message or (f"mlflow run {mlflow_model.run_id}" if mlflow_model.run_id else None)
    properties = {k: v for k, v in properties.items() if v}
    if capture.written is not None:  # written by every rank of a distributed save
        if capture.written.dataset.uri != location.uri:
            raise ValueError(
                f"the shards were written to {capture.written.dataset.uri}, but this model's weights "
                f"go to {location.uri}; nothing was committed"
            )
        return writer.commit_version(capture.written, message=message, properties=properties)
    return store.save_state_dict(
        capture.prepared,
        location.uri,
        message=message,
        properties=properties,
        storage_options=location.storage_options,
        compression=capture.compression,
    )


def _describe_model(
    path: str,
    mlflow_model: Model,
    location: Dataset,
    info: store.VersionInfo,
    conf: dict,
    env: tuple,
    *,
    self_contained: bool,
) -> None:
    """After the weights are committed: pin their version, then write the pointer, the flavor,
    the environment and MLmodel (which makes the directory a model). On failure the directory
    goes, and the error names the version that nothing references now."""
    try:
        model_id = getattr(mlflow_model, "model_id", None)
        pin = model_pin(model_id) if model_id else run_pin(mlflow_model.run_id) if mlflow_model.run_id else None
        if pin:  # before anything else: from here on gc keeps this version
            store.tag(location.uri, pin, info.version, storage_options=location.storage_options)
        _write_pointer(path, "weights.lance" if self_contained else location.uri, info.version)
        mlflow_model.add_flavor(
            FLAVOR_NAME,
            lance_uri="weights.lance" if self_contained else location.uri,  # inside: no path of this machine
            lance_version=info.version,
            tensors=info.num_tensors,
            bytes=info.total_bytes,
            bytes_written=info.bytes_written,
            tensors_changed=len(info.changed),
            parent_version=info.parent,
            pytorch_version=str(torch.__version__),
            pylance_version=_dist_version("pylance"),
            mlflow_lance_version=__version__,
            **({"self_contained": True} if self_contained else {}),
            **conf,
        )
        pyfunc.add_to_model(
            mlflow_model,
            loader_module="mlflow_lance.flavor",
            data=DATA_SUBPATH,
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
        raise after_commit(
            err,
            f"saving the model failed after its weights were committed as version "
            f"{info.version} of {location.uri}; no run or model references that version, "
            f"and mlflow_lance.gc() can remove it. Cause: {err}",
            uri=location.uri,
            version=info.version,
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
    skeleton: bytes | None = None,
    serialization_format: str | None = None,
) -> dict:
    """Everything but the weights; returns the flavor's configuration entries."""
    os.makedirs(os.path.join(path, DATA_SUBPATH))
    saved_example = None
    if input_example is not None:
        try:
            saved_example = _save_example(mlflow_model, input_example, path)
        except MlflowException:  # tensors and lists of arrays: saved nowhere, as in mlflow.pytorch
            saved_example = None
    if signature is None and saved_example is not None:
        signature = _infer_signature_from_input_example(saved_example, LanceModelWrapper(module, torch.device("cpu")))
    if signature:  # False: no signature
        mlflow_model.signature = signature
    if metadata is not None:
        mlflow_model.metadata = metadata
    conf = _write_architecture(module, path, factory, skeleton, serialization_format, input_example, signature)
    code = _validate_and_copy_code_paths(code_paths, path)
    if code:
        conf["code"] = code
    conf.update(_copy_extra_files(extra_files, path))
    return conf


def _write_architecture(
    module: torch.nn.Module,
    path: str,
    factory: tuple[str, dict] | None,
    skeleton: bytes | None,
    serialization_format: str | None,
    input_example: ModelInputExample | None,
    signature: ModelSignature | None,
) -> dict[str, Any]:
    """The architecture (see ``save_model``); returns its flavor configuration entry."""
    if factory:
        return {"model_factory": factory[0], "factory_kwargs": factory[1]}
    if isinstance(module, torch.jit.ScriptModule):
        with open(os.path.join(path, DATA_SUBPATH, PROGRAM_FILE), "wb") as f:
            f.write(_program_without_weights(module))
        return {"torchscript": f"{DATA_SUBPATH}/{PROGRAM_FILE}"}
    if serialization_format != "pickle" and input_example is not None:
        exported = _exported(module, input_example, signature, required=serialization_format == "pt2")
        if exported is not None:
            with open(os.path.join(path, DATA_SUBPATH, program.PROGRAM_FILE), "wb") as f:
                f.write(exported)
            return {"exported_program": f"{DATA_SUBPATH}/{program.PROGRAM_FILE}"}
    with open(os.path.join(path, DATA_SUBPATH, SKELETON_FILE), "wb") as f:
        f.write(skeleton if skeleton is not None else dump_skeleton(module))
    return {"skeleton": f"{DATA_SUBPATH}/{SKELETON_FILE}"}


def _exported(
    module: torch.nn.Module, input_example: ModelInputExample, signature: ModelSignature | None, *, required: bool
) -> bytes | None:
    """The ``torch.export`` program of ``module`` without its weights; None (with a warning
    that says why) when it cannot be made and ``pt2`` was not asked for. Asked for, the module
    is exported as it is (train or eval mode), as mlflow.pytorch exports it; by default in eval
    mode, as ``load_model`` has always returned a model."""
    inputs = program.tensor_inputs(input_example)
    try:
        if inputs is None:
            raise ValueError("the input example is not an array or tensor, or a tuple or list of them")
        exported = program.export(module, inputs, signature or None, eval_mode=not required)
        return program.dump(exported, list(module.state_dict()))
    except Exception as err:  # torch.export raises anything for a model it cannot trace
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        if required:
            raise ValueError(
                f"serialization_format='pt2': this model cannot be stored as a torch.export program ({reason}). "
                f"Pass serialization_format='pickle' to store it as a skeleton, or a model_factory"
            ) from err
        warnings.warn(
            f"mlflow_lance stores this model's architecture as a pickled skeleton, not as a torch.export "
            f"(pt2) program, because export failed ({reason}); loading it will need pickle. Pass "
            f"serialization_format='pickle' to skip the attempt, or model_factory= to load without pickle.",
            UserWarning,
            stacklevel=2,
        )
        return None


def _check_pytorch_options(serialization_format: str | None, torch_save_kwargs: Mapping[str, Any]) -> None:
    if serialization_format not in (None, "pickle", "pt2"):
        raise ValueError(
            f"serialization_format={serialization_format!r} is not supported: pass 'pt2' (a torch.export "
            f"program, with an input example), 'pickle' (a weight-free skeleton) or leave it out; the weights "
            f"always go to Lance"
        )
    refuse_unknown("save_model", torch_save_kwargs, _TORCH_SAVE_OPTIONS)


def _check_pt2(
    module: torch.nn.Module, model_factory: str | None, input_example: ModelInputExample | None, exportable: bool
) -> None:
    """Refuse ``serialization_format="pt2"`` where no program can be stored, before anything is written."""
    if model_factory:
        raise ValueError(
            "serialization_format='pt2' and model_factory both name the architecture; pass one (a factory "
            "loads without pickle too)"
        )
    if isinstance(module, torch.jit.ScriptModule):
        raise ValueError(
            "The 'pt2' serialization format is not supported for torch.jit.ScriptModule models, please set "
            "`serialization_format` to 'pickle' (mlflow_lance stores the TorchScript program without its weights)."
        )
    if not exportable:
        raise ValueError("serialization_format='pt2' is not supported for checkpoints and sharded models")
    if program.tensor_inputs(input_example) is None:
        raise ValueError(  # mlflow.pytorch's words
            "If `serialization_format` is set to 'pt2', then input_example is required. It must be a numpy "
            "array or torch tensor, or a tuple/list of numpy arrays or torch tensors. This is because 'pt2' is "
            "a traced-graph format: PyTorch traces the model graph by virtually executing model.forward with "
            "the provided example input."
        )


def _program_without_weights(module: torch.jit.ScriptModule) -> bytes:
    """The TorchScript program with every state-dict tensor replaced by an empty one of its
    dtype: code and structure (a few KB), not the weights, which go to Lance."""
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    copy = torch.jit.load(io.BytesIO(buf.getvalue()), map_location="cpu")
    for _, sub in copy.named_modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=p.requires_grad))
        for name, b in list(sub.named_buffers(recurse=False)):
            setattr(sub, name, torch.empty(0, dtype=b.dtype))
    out = io.BytesIO()
    torch.jit.save(copy, out)
    return out.getvalue()


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
    with open(os.path.join(path, DATA_SUBPATH, POINTER_FILE), "w") as f:
        f.write(modeldir.pointer_text(uri, version))


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
    self_contained: bool = False,
    compression: str | None = None,
    **kwargs: Any,
) -> mlflow.models.model.ModelInfo:
    """Log ``pytorch_model`` to the active run (started if none), as ``mlflow.pytorch.log_model``.

    Its weights become a new version of a Lance dataset, the rest (MLmodel, environment,
    architecture) goes to MLflow; every parameter of ``mlflow.pytorch.log_model`` is accepted.

    Afterwards the run, the logged model and the model version carry ``lance.*`` tags, the
    version is pinned, and the sidecar next to the dataset is up to date. Bookkeeping for the
    UI that fails (a model version deleted at once) is a warning: the weights are safe.

    Args:
        pytorch_model: the module (a TorchScript module is stored as its program without weights).
        name: the logged model's name (``artifact_path`` is its older alias).
        registered_model_name: register a new version of this model; its weights go to the
            dataset the model is bound to for its whole life.
        lance_uri / storage_options: an explicit dataset for the weights.
        model_factory / factory_kwargs: ``"package.module:callable"`` and JSON keyword
            arguments that build the module without pickle at load time.
        self_contained: log the weights inside the model's own artifacts, as a one-version
            dataset (no shared dataset, no dedup, no pins): for targets that only see MLflow's
            artifact store (see ``bundle_model``).
        compression: how the weights' payloads are stored, chosen when the dataset is created
            (a registered model's first version, or a new ``lance_uri``) and fixed for it:
            None (default) or ``"none"``: raw bytes, the fastest to load (memory-mapped);
            ``"auto"``: each tensor byte-grouped and zstd-compressed where that saves bytes
            (~0.68x for bf16 weights, ~0.85x for fp32), worth it where bytes cost more than
            the decode (~1 GB/s per core): object storage, an MLflow artifact proxy;
            ``"zstd"``: one zstd frame per payload. None keeps what an existing dataset was
            created with; another value than that raises ValueError before anything is logged.
        **kwargs: ``serialization_format`` (``"pt2"``: the ``torch.export`` program, which needs
            an array or tensor ``input_example``; ``"pickle"``: the skeleton; left out: ``pt2``
            when there is an input example and torch.export succeeds, see ``save_model``),
            ``pickle_module`` and torch.save's options, as ``mlflow.pytorch.log_model`` takes them.
        signature, input_example, pip_requirements, extra_pip_requirements, conda_env,
            code_paths, extra_files, metadata, tags, params, step, await_registration_for:
            as in ``mlflow.pytorch.log_model``.

    Returns:
        MLflow's ModelInfo; ``info.flavors["mlflow_lance"]`` names the Lance URI and version.

    Raises:
        TypeError / ValueError: a module or state dict that cannot be stored, a registered
            model name the registry refuses; nothing is created.
        CommittedError: a step after the weights were committed failed (names the version).

    Example:
        >>> with mlflow.start_run():
        ...     info = log_model(model, name="model", registered_model_name="churn", input_example=x)
    """
    _check_module(pytorch_model)
    check_compression(compression)
    if registered_model_name is not None:  # before anything is created: the registry's own rules
        _validate_model_name(registered_model_name)
    if self_contained and (lance_uri or distributed.collective(pytorch_model)):
        raise ValueError(
            "self_contained=True keeps the weights in the model's artifacts: pass no lance_uri, one process"
        )
    if distributed.collective(pytorch_model):
        if kwargs.get("serialization_format") == "pt2":
            raise ValueError("serialization_format='pt2' is not supported for sharded models; nothing was written")
        return _log_sharded(
            pytorch_model,
            name or artifact_path or "model",
            registered_model_name=registered_model_name,
            lance_uri=lance_uri,
            storage_options=storage_options,
            signature=False if signature is None and input_example is not None else signature,
            input_example=input_example,
            await_registration_for=await_registration_for,
            metadata=metadata,
            tags=tags,
            params=params,
            step=step,
            conda_env=conda_env,
            code_paths=code_paths,
            pip_requirements=pip_requirements,
            extra_pip_requirements=extra_pip_requirements,
            extra_files=extra_files,
            model_factory=model_factory,
            factory_kwargs=factory_kwargs,
            compression=compression,
            **kwargs,
        )
    return _log(
        pytorch_model,
        name or artifact_path or "model",
        Capture(writer.prepare(pytorch_model.state_dict()), compression=compression),
        self_contained=self_contained,
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        metadata=metadata,
        tags=tags,
        params=params,
        step=step,
        lance_uri=lance_uri,
        storage_options=storage_options,
        conda_env=conda_env,
        code_paths=code_paths,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        extra_files=extra_files,
        model_factory=model_factory,
        factory_kwargs=factory_kwargs,
        **kwargs,
    )


def _log(
    module: torch.nn.Module,
    name: str,
    capture: Capture,
    *,
    registered_model_name: str | None = None,
    run_id: str | None = None,
    lance_uri: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    step: int = 0,
    self_contained: bool = False,
    **kwargs: Any,
) -> mlflow.models.model.ModelInfo:
    """``log_model`` of a state captured and checked already, to run ``run_id`` (default: the
    active one): the entry point of checkpoints, which write from a background thread."""
    weights: dict[str, Any] = {}  # self-contained: the weights go with the artifacts, nothing to pin
    new = False
    if not self_contained:
        client = mlflow.MlflowClient()
        new = registered_model_name is not None and not bindings.registered(client, registered_model_name)
        location, experiment_id, binding = _location_for(
            name, registered_model_name, lance_uri, storage_options, run_id
        )
        if capture.compression is not None and capture.written is None:  # before MLflow logs anything
            writer.check_dataset_compression(location, capture.compression)
        weights = {
            "lance_uri": location.uri,
            "storage_options": location.storage_options,
            "lance_properties": _logged_properties(step, experiment_id, registered_model_name, binding),
        }
    with _new_model_announced(registered_model_name) if new else contextlib.nullcontext():
        info = Model.log(
            artifact_path=None,
            name=name,
            flavor=_Saver(capture),
            registered_model_name=registered_model_name,
            run_id=run_id,
            step=step,
            pytorch_model=module,
            **weights,
            **kwargs,
        )
    if not self_contained:
        registry.after_log(info, registered_model_name, binding, location.storage_options)
    return info


_announcing = threading.local()  # the registered model this thread's log just created, if any
_announcer_lock = threading.Lock()
_announcer_installed = False


def _install_announcer() -> None:
    """Once per process: MLflow's event stream (what its ``eprint`` writes to) rewrites "already
    exists" into "Successfully registered model" for the thread inside ``_new_model_announced``
    and that model only; every other line, and every other thread's, passes unchanged. Nothing
    is swapped per call (``sys.stderr`` never), so concurrent logs cannot see each other's
    rewrite or restore a stream under each other. Without that stream (another MLflow),
    MLflow's own line stays."""
    global _announcer_installed
    with _announcer_lock:
        if _announcer_installed:
            return
        _announcer_installed = True
        try:
            from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM as stream
        except ImportError:
            return
        original = stream.write

        def write(text: str) -> Any:
            name = getattr(_announcing, "name", None)
            if (
                name is not None
                and text == f"Registered model {name!r} already exists. Creating a new version of this model..."
            ):
                text = f"Successfully registered model '{name}'."
            return original(text)

        stream.write = write


@contextlib.contextmanager
def _new_model_announced(name: str) -> Iterator[None]:
    """For a registered model this log creates (the binding creates it just before MLflow
    registers the version): the line MLflow prints for a new model, not "already exists"."""
    _install_announcer()
    outer = getattr(_announcing, "name", None)
    _announcing.name = name
    try:
        yield
    finally:
        _announcing.name = outer


def _log_sharded(
    module: torch.nn.Module,
    name: str,
    *,
    registered_model_name: str | None,
    lance_uri: str | None,
    storage_options: Mapping[str, str] | None,
    compression: str | None = None,
    **kwargs: Any,
) -> mlflow.models.model.ModelInfo:
    """``log_model`` of a model sharded over the process group (FSDP2, tensor parallel, DDP),
    every rank calling: rank 0 names the dataset; every rank writes its own shards
    (``distributed.write``); rank 0 logs one model whose save commits them as one version; the
    ModelInfo (or the first error) on every rank. No signature is inferred from an input
    example: that would run the sharded model on rank 0 alone (pass ``signature=``)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    distributed.settle()
    group = distributed.checkpoint_group()
    rank = dist.get_rank(group)

    def where() -> tuple[str, dict | None]:
        if mlflow.active_run() is None:
            mlflow.start_run()
        location, _, _ = _location_for(name, registered_model_name, lance_uri, storage_options)
        return location.uri, location.storage_options

    uri, uri_options = distributed.from_rank0(where, group, "naming the model's dataset")
    plain = distributed.unwrapped(module)
    shards, skeleton, failed = {}, None, None
    try:  # a failure here is every rank's, at the first step of the write
        shards = distributed.stage(get_model_state_dict(module), clone=False)
        skeleton = dump_skeleton(plain) if rank == 0 else None
    except Exception as err:  # noqa: BLE001 (raised on every rank by distributed.write_and_commit)
        failed = err

    def log(written: writer.Written) -> mlflow.models.model.ModelInfo:
        capture = Capture(None, skeleton, written=written)
        return _log(
            plain,
            name,
            capture,
            registered_model_name=registered_model_name,
            lance_uri=lance_uri,
            storage_options=storage_options,
            **kwargs,
        )

    return distributed.write_and_commit(
        shards,
        Dataset(uri, uri_options),
        log,
        group=group,
        what="logging the model",
        failed=failed,
        compression=compression,
    )


def _check_module(module: object) -> None:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"pytorch_model must be a torch.nn.Module, got {type(module).__name__}")


def _logged_properties(
    step: int, experiment_id: str, registered_model_name: str | None, binding: str | None
) -> dict[str, str]:
    """What a logged model's Lance version records beyond save_model's: its step, experiment
    and the registered model (name and binding) it was logged for."""
    properties = {"mlflow.step": str(int(step or 0)), "mlflow.experiment_id": str(experiment_id)}
    if registered_model_name:
        properties.update({"mlflow.registered_model_name": registered_model_name, "mlflow.binding": binding})
    return properties


def _location_for(
    name: str,
    registered_model_name: str | None,
    lance_uri: str | None,
    storage_options,
    run_id: str | None = None,
) -> tuple[Dataset, str, str | None]:
    """Where the weights go, the experiment, and the registered model's binding (see bindings.py).

    A registered model writes to the dataset it is bound to for its whole life (renames
    included); an explicit ``lance_uri`` wins but does not rebind the model.
    """
    run = mlflow.MlflowClient().get_run(run_id) if run_id else mlflow.active_run()
    experiment_id = run.info.experiment_id if run else _get_experiment_id()
    binding = None
    if registered_model_name:
        client = mlflow.MlflowClient()
        if lance_uri:
            binding, _ = bindings.bind(client, registered_model_name, create=True)
        else:
            artifact_location = mlflow.get_experiment(experiment_id).artifact_location

            def default(b: str) -> str:
                return dataset_location(
                    model_name=registered_model_name,
                    registered=True,
                    binding=b,
                    artifact_location=artifact_location,
                    experiment_id=experiment_id,
                ).uri

            binding, lance_uri = bindings.dataset_of(client, registered_model_name, default)
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


def log_state_dict(
    state_dict: Mapping[str, Any], artifact_path: str, *, compression: str | None = None, **kwargs: Any
) -> None:
    """Log a state dict, or any checkpoint dict, to the active run (started if none).

    As ``mlflow.pytorch.log_state_dict`` does, with optimizer and scheduler states and
    counters too: its tensors become a Lance version (deduplicated against the last one
    logged at the same ``artifact_path`` in the experiment), the rest JSON; the run's
    artifacts get a small pointer at ``artifact_path``, so that
    ``load_state_dict("runs:/<run id>/<artifact_path>")`` reads it back.

    Args:
        state_dict: name -> tensor, or a checkpoint dict (tensors nested in dicts, lists and
            tuples next to numbers, strings and None).
        artifact_path: where the pointer goes in the run's artifacts.
        compression: as ``log_model``'s: None (default; raw for a new dataset, else what it
            was created with), ``"none"``, ``"auto"`` or ``"zstd"``.
        **kwargs: torch.save's options and ``pickle_module``: accepted, and change nothing
            (nothing is pickled).

    Raises:
        TypeError / ValueError: a value that cannot be stored (nothing is written), or a
            keyword argument ``mlflow.pytorch.log_state_dict`` does not take.

    Example:
        >>> with mlflow.start_run() as run:
        ...     log_state_dict({"model": model.state_dict(), "epoch": 3}, "ckpt")
        >>> load_state_dict(f"runs:/{run.info.run_id}/ckpt")
    """
    refuse_unknown("log_state_dict", kwargs, _TORCH_SAVE_OPTIONS | {"pickle_module"})
    check_compression(compression)
    run = mlflow.active_run() or mlflow.start_run()
    experiment_id = run.info.experiment_id
    location = dataset_location(
        model_name=artifact_path.strip("/") or "state_dict",
        registered=False,
        experiment_id=experiment_id,
        artifact_location=mlflow.get_experiment(experiment_id).artifact_location,
    )
    info = store.save_state_dict(
        state_dict,
        location.uri,
        message=f"mlflow run {run.info.run_id}: {artifact_path}",
        compression=compression,
        properties={
            "mlflow.run_id": run.info.run_id,
            "mlflow.artifact_path": artifact_path,
            "mlflow.experiment_id": str(experiment_id),
        },
        storage_options=location.storage_options,
    )
    store.tag(
        location.uri,
        run_pin(run.info.run_id),
        info.version,
        storage_options=location.storage_options,
    )
    with tempfile.TemporaryDirectory(prefix="mlflow_lance_") as tmp:
        with open(os.path.join(tmp, STATE_DICT_POINTER), "w", encoding="utf-8") as f:
            f.write(modeldir.pointer_text(location.uri, info.version))
        mlflow.log_artifact(os.path.join(tmp, STATE_DICT_POINTER), artifact_path)


# --------------------------------------------------------------------------- pyfunc


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> LanceModelWrapper:
    """Called by ``mlflow.pyfunc.load_model`` with the model's ``data`` directory."""
    device = default_device(model_config)
    local_path = os.path.dirname(os.path.abspath(data_path))
    module = load_from_local(local_path, map_location=device, strict=True, verify=False, allow_pickle=None)
    return LanceModelWrapper(module, torch.device(device))
