"""Every private name of MLflow and torch that mlflow-lance uses, in one place.

The flavor follows ``mlflow.pytorch``, which calls helpers MLflow does not export (how a model
directory's environment files, code paths and input examples are written); a few other
modules need one private name each. They are listed here, resolved on first use (so that
importing the store never imports MLflow), and ``tests/test_compat.py`` checks that every
one exists in the installed MLflow and torch: an upgrade that moves one fails there, naming
it, instead of deep inside a ``log_model``.

Use: ``from .compat import _save_example`` (resolved when the importing module loads) or
``compat.resolve("_artifact_repository_registry")`` (resolved at the call).
"""

from __future__ import annotations

import importlib
from typing import Any

#: name -> the module it lives in. Names keep their own spelling, so that a reader can grep
#: MLflow's or torch's source for them.
PRIVATE: dict[str, str] = {
    # mlflow.pytorch's model-directory helpers (flavor.py)
    "_infer_signature_from_input_example": "mlflow.models.signature",
    "_save_example": "mlflow.models.utils",
    "_download_artifact_from_uri": "mlflow.tracking.artifact_utils",
    "_CONDA_ENV_FILE_NAME": "mlflow.utils.environment",
    "_CONSTRAINTS_FILE_NAME": "mlflow.utils.environment",
    "_PYTHON_ENV_FILE_NAME": "mlflow.utils.environment",
    "_REQUIREMENTS_FILE_NAME": "mlflow.utils.environment",
    "_mlflow_conda_env": "mlflow.utils.environment",
    "_process_conda_env": "mlflow.utils.environment",
    "_process_pip_requirements": "mlflow.utils.environment",
    "_PythonEnv": "mlflow.utils.environment",
    "_validate_env_arguments": "mlflow.utils.environment",
    "_add_code_from_conf_to_system_path": "mlflow.utils.model_utils",
    "_copy_extra_files": "mlflow.utils.model_utils",
    "_validate_and_copy_code_paths": "mlflow.utils.model_utils",
    "_validate_and_prepare_target_save_path": "mlflow.utils.model_utils",
    "_validate_model_name": "mlflow.utils.validation",
    # the active experiment when no run is (flavor.py)
    "_get_experiment_id": "mlflow.tracking.fluent",
    # whether the user chose a tracking server (lifecycle.py): public in name, private in module
    "is_tracking_uri_set": "mlflow.tracking._tracking_service.utils",
    # the artifact schemes MLflow (and its plugins) can open (transport.py)
    "_artifact_repository_registry": "mlflow.store.artifact.artifact_repository_registry",
    # a DTensor shard's place in the global tensor (distributed.py)
    "compute_local_shape_and_global_offset": "torch.distributed.tensor._utils",
    # a quantized tensor from its integer values and parameters (composite.py, skeleton.py)
    "_make_per_tensor_quantized_tensor": "torch",
    "_make_per_channel_quantized_tensor": "torch",
    # a torch.export program as JSON without its weights, and back (program.py; what
    # torch.export.save and load call, minus their pickled parts)
    "serialize": "torch._export.serde.serialize",
    "deserialize": "torch._export.serde.serialize",
    "SerializedArtifact": "torch._export.serde.serialize",
    # what a call target of a program from someone else must resolve to (program.py)
    "OpOverload": "torch._ops",
    "OpOverloadPacket": "torch._ops",
    "HigherOrderOperator": "torch._ops",
}
# Also private, and not importable: Lightning's ``trainer._checkpoint_connector`` (the
# checkpoint dict Lightning itself would save; integrations/lightning.py, tested on 2.6).


def resolve(name: str) -> Any:
    """The private name ``name`` (one of ``PRIVATE``), imported now.

    Args:
        name: a key of ``PRIVATE``.

    Returns:
        The object MLflow or torch defines under that name.

    Raises:
        ImportError: the installed MLflow or torch no longer has it where ``PRIVATE`` says
            (the message names both, and the versions to use meanwhile).
    """
    module = PRIVATE[name]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"mlflow-lance uses {module}.{name}, which the installed "
            f"{module.partition('.')[0]} does not have ({err}); install the versions "
            f"pyproject.toml names, or an mlflow-lance release that supports yours"
        ) from None


def __getattr__(name: str) -> Any:
    if name in PRIVATE:
        return resolve(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
