"""A model's architecture without its weights, and the pickle-free factory alternative.

The skeleton is the module pickled (with cloudpickle, so classes from ``__main__`` work) with
every tensor of its state dict replaced by a shape/dtype placeholder; its size depends on the
architecture, not on the weights. Tensors outside the state dict (non-persistent buffers such
as causal masks) keep their values. Ties survive: a Parameter shared by two modules is one
pickled object.

The factory is a ``"package.module:callable"`` plus JSON-serialisable keyword arguments that
build the module; nothing is unpickled on load.
"""

from __future__ import annotations

import importlib
import io
import json
import os
from collections.abc import Mapping

import cloudpickle
import torch

SKELETON_FILE = "skeleton.pkl"


def _meta_tensor(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _meta_parameter(shape: tuple, dtype: torch.dtype, requires_grad: bool) -> torch.nn.Parameter:
    return torch.nn.Parameter(_meta_tensor(shape, dtype), requires_grad=requires_grad)


class _SkeletonPickler(cloudpickle.Pickler):
    def __init__(self, file, weights: set[int]):
        super().__init__(file)
        self._weights = weights

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and id(obj) in self._weights:
            if isinstance(obj, torch.nn.Parameter):
                return _meta_parameter, (tuple(obj.shape), obj.dtype, obj.requires_grad)
            return _meta_tensor, (tuple(obj.shape), obj.dtype)
        return super().reducer_override(obj)


def dump_skeleton(module: torch.nn.Module) -> bytes:
    """The module pickled without the bytes of its state dict's tensors."""
    weights = {id(t) for t in module.state_dict(keep_vars=True).values()}
    buf = io.BytesIO()
    _SkeletonPickler(buf, weights).dump(module)
    return buf.getvalue()


def pickle_allowed(allow_pickle: bool | None) -> bool:
    """An explicit argument wins; else MLflow's MLFLOW_ALLOW_PICKLE_DESERIALIZATION."""
    if allow_pickle is not None:
        return allow_pickle
    value = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    return value.strip().lower() in ("1", "true", "yes")


def load_skeleton(path: str, *, allow_pickle: bool | None = None) -> torch.nn.Module:
    """Unpickle a skeleton: a module whose state-dict tensors are on the meta device."""
    if not pickle_allowed(allow_pickle):
        raise PermissionError(
            f"refusing to unpickle the model architecture at {path}: pickle deserialization is "
            f"disabled (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false or allow_pickle=False). Log "
            f"the model with model_factory='package.module:callable' to load it without pickle, "
            f"or load only the weights with mlflow_lance.load_state_dict()."
        )
    with open(path, "rb") as f:
        module = cloudpickle.load(f)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{path} holds a {type(module).__name__}, not a torch.nn.Module")
    return module


def check_factory(model_factory: str, factory_kwargs: Mapping | None) -> dict:
    """Validate a factory spec before anything is saved; returns the kwargs as a plain dict."""
    if not isinstance(model_factory, str) or model_factory.count(":") != 1:
        raise ValueError(
            f"model_factory must look like 'package.module:callable', got {model_factory!r}"
        )
    kwargs = dict(factory_kwargs or {})
    try:
        return json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as err:
        raise ValueError(f"factory_kwargs must be JSON-serialisable: {err}") from None


def build_from_factory(model_factory: str, factory_kwargs: Mapping | None) -> torch.nn.Module:
    """Import and call ``package.module:callable`` with the recorded keyword arguments."""
    module_name, _, attr = model_factory.partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"cannot import model factory {model_factory!r} ({err}); install the package that "
            f"defines it or log the model with code_paths=[...]"
        ) from None
    module = target(**dict(factory_kwargs or {}))
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"model factory {model_factory!r} returned {type(module).__name__}, not a Module")
    return module


def materialize(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Give every meta tensor real (uninitialised) memory on ``device`` and move the rest.

    Unlike ``Module.to_empty``, tensors that already hold values (non-persistent buffers)
    keep them, and a Parameter shared by several modules stays one Parameter (tied).
    """
    memo: dict[int, torch.Tensor] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            data = torch.empty_like(t, device=device) if t.is_meta else t.detach().to(device)
            if isinstance(t, torch.nn.Parameter):
                memo[id(t)] = t if data is t else torch.nn.Parameter(data, requires_grad=t.requires_grad)
            else:
                memo[id(t)] = data
        return memo[id(t)]

    for mod in module.modules():
        for registry in (mod._parameters, mod._buffers):
            for key, t in registry.items():
                if t is not None:
                    registry[key] = convert(t)
    return module


def tie_groups(module: torch.nn.Module) -> list[list[tuple[torch.nn.Module, str]]]:
    """Every Parameter registered under more than one (module, name): the model's ties."""
    places: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((mod, name))
    return [group for group in places.values() if len(group) > 1]


def retie(groups: list[list[tuple[torch.nn.Module, str]]]) -> None:
    """Make each group share the first place's Parameter again (after ``assign`` loads)."""
    for (first_mod, first_name), *rest in groups:
        shared = first_mod._parameters[first_name]
        for mod, name in rest:
            mod._parameters[name] = shared
