"""A model's architecture without its weights, and the pickle-free factory alternative.

The skeleton is the module pickled (with cloudpickle, so classes from ``__main__`` work) with
every tensor of its state dict replaced by a shape/dtype placeholder; its size depends on the
architecture, not on the weights. Tensors outside the state dict (non-persistent buffers such
as causal masks) keep their values. Ties survive: a Parameter shared by two modules is one
pickled object.

Two kinds of module need more than that. torch.ao's quantized modules keep their weights
packed (a ``ScriptObject``) and hand out a fresh quantized tensor on every unpack, which no
state-dict tensor is: every quantized tensor the pickler meets becomes a zero placeholder of
its shape, dtype and scheme (so a quantized tensor outside the state dict would not keep its
values; torch.ao's modules have none), and their other state-dict tensors (biases) zeros
rather than meta tensors, which packing refuses; the state dict's load repacks over them.
They are pickled by their attributes, as other modules are, not by the ``__getstate__`` of
their own, which drops ``Module``'s. Modules with ``torch.nn.utils.parametrize``
parametrizations (``weight_norm``, ``orthogonal``, ``spectral_norm``, a user's own) are
instances of a class torch makes on the fly and refuses to pickle; they are pickled as their
own class and made parametrized again when unpickled, their parametrizations (with spectral
norm's ``u``/``v`` buffers, which are state-dict tensors) pickled like any submodule.

The factory is a ``"package.module:callable"`` plus JSON-serialisable keyword arguments that
build the module; nothing is unpickled on load. When pickle is refused, the model directory
is untrusted, so the factory it names must be vouched for by the installed environment
before anything is imported or called (``trusted_factory``): a callable an installed
distribution registers in the entry-point group ``mlflow_lance.factories``, or a
``torch.nn.Module`` subclass of a module the process has already imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import io
import json
import os
import re
import sys
from collections.abc import Callable, Mapping

import cloudpickle
import torch
from torch.nn.utils import parametrize

from . import compat

SKELETON_FILE = "skeleton.pkl"
FACTORY_GROUP = "mlflow_lance.factories"
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"


def _meta_tensor(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _zeros(shape: tuple, dtype: torch.dtype, requires_grad: bool | None) -> torch.Tensor:
    """A tensor of zeros (a Parameter unless ``requires_grad`` is None)."""
    t = torch.zeros(shape, dtype=dtype)
    return t if requires_grad is None else torch.nn.Parameter(t, requires_grad=requires_grad)


def _zero_quantized(shape: tuple, dtype: torch.dtype, axis: int | None) -> torch.Tensor:
    """A quantized tensor of zeros (scale 1, zero point 0; per channel along ``axis``)."""
    values = torch.zeros(shape, dtype={torch.qint8: torch.int8, torch.quint8: torch.uint8}.get(dtype, torch.int32))
    if axis is None:
        return compat._make_per_tensor_quantized_tensor(values, 1.0, 0)
    channels = shape[axis]
    scales, zero_points = torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.int64)
    return compat._make_per_channel_quantized_tensor(values, scales, zero_points, axis)


def _quantized_placeholder(t: torch.Tensor) -> tuple:
    per_channel = t.qscheme() in (torch.per_channel_affine, torch.per_channel_affine_float_qparams)
    return _zero_quantized, (tuple(t.shape), t.dtype, t.q_per_channel_axis() if per_channel else None)


def _parametrized_base(cls: type) -> type | None:
    """The module's own class of an instance ``torch.nn.utils.parametrize`` gave a class of
    its own (``Parametrized<Class>``, which refuses to pickle), else None."""
    base = cls.__bases__[0] if len(cls.__bases__) == 1 else None
    made = base is not None and cls.__name__ == f"Parametrized{base.__name__}" and "__getstate__" in vars(cls)
    return base if made and cls.__module__ == parametrize.__name__ else None


def _set_module_state(module: torch.nn.Module, state: dict) -> None:
    """Give an unpickled module its attributes as ``torch.nn.Module`` does, whatever
    ``__setstate__`` its class has (torch.ao's quantized convolutions take a tuple of their own)."""
    torch.nn.Module.__setstate__(module, state)


def _set_parametrized_state(module: torch.nn.Module, state: dict) -> None:
    """Give an unpickled module its attributes, then make it parametrized again as
    ``register_parametrization`` did: its class of its own, a property per parametrized name."""
    _set_module_state(module, state)
    parametrize._inject_new_class(module)
    for name in module.parametrizations:
        parametrize._inject_property(module, name)


def _meta_parameter(shape: tuple, dtype: torch.dtype, requires_grad: bool) -> torch.nn.Parameter:
    return torch.nn.Parameter(_meta_tensor(shape, dtype), requires_grad=requires_grad)


class _SkeletonPickler(cloudpickle.Pickler):
    def __init__(self, file, weights: set[int], packed: set[int]):
        super().__init__(file)
        self._weights = weights
        self._packed = packed  # of quantized modules: their packing takes no meta tensor

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.is_quantized:
            return _quantized_placeholder(obj)
        if isinstance(obj, torch.Tensor) and id(obj) in self._packed:
            return _zeros, (
                tuple(obj.shape),
                obj.dtype,
                obj.requires_grad if isinstance(obj, torch.nn.Parameter) else None,
            )
        if isinstance(obj, torch.Tensor) and id(obj) in self._weights:  # a DTensor's shape is the global one
            if isinstance(obj, torch.nn.Parameter):
                return _meta_parameter, (tuple(obj.shape), obj.dtype, obj.requires_grad)
            return _meta_tensor, (tuple(obj.shape), obj.dtype)
        if isinstance(obj, torch.nn.Module) and (base := _parametrized_base(type(obj))) is not None:
            state = _without_distributed_hooks(obj.__dict__)
            return _new_module, (base,), obj.__dict__ if state is None else state, None, None, _set_parametrized_state
        if isinstance(obj, torch.nn.Module) and _is_quantized_module(obj):  # its __getstate__ drops Module's own
            state = _without_distributed_hooks(obj.__dict__)
            return _new_module, (type(obj),), obj.__dict__ if state is None else state, None, None, _set_module_state
        if isinstance(obj, torch.nn.Module):
            plain, state = _unsharded_class(type(obj)), _without_distributed_hooks(obj.__dict__)
            if plain is not None or state is not None:
                return _new_module, (plain or type(obj),), obj.__dict__ if state is None else state
        return super().reducer_override(obj)


def _unsharded_class(cls: type) -> type | None:
    """The model's own class of a module ``fully_shard`` (FSDP2) made an ``FSDP<Class>``, else
    None: the skeleton is the plain architecture, which loads without a process group."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    base = getattr(fsdp, "FSDPModule", None)
    if base is None or not issubclass(cls, base):
        return None
    return next((b for b in cls.__bases__ if not issubclass(b, base)), None)


def _without_distributed_hooks(state: dict) -> dict | None:
    """A module's attributes without the hooks and state torch.distributed registered (bound to
    process groups, which neither pickle nor mean anything in the process that loads the
    model); None when it has none."""
    out = {k: v for k, v in state.items() if not k.startswith("__composable_api")}  # fully_shard's state
    dropped: set = set()
    for key, hooks in out.items():
        if key.endswith("hooks") and isinstance(hooks, dict):
            kept = type(hooks)()
            for k, hook in hooks.items():
                owner = getattr(hook, "__self__", hook)
                if (getattr(type(owner), "__module__", "") or "").startswith("torch.distributed") or (
                    getattr(hook, "__module__", "") or ""
                ).startswith("torch.distributed"):
                    dropped.add(k)
                else:
                    kept[k] = hook
            out[key] = kept
    for key, value in out.items():  # the sets and dicts that record options of those hooks
        if "hooks_" in key and isinstance(value, (dict, set)):
            out[key] = type(value)(
                {k: value[k] for k in value if k not in dropped} if isinstance(value, dict) else value - dropped
            )
    return out if dropped or len(out) != len(state) else None


def _new_module(cls: type) -> torch.nn.Module:
    """An empty module of ``cls``; unpickling then gives it its attributes (``__setstate__``)."""
    return cls.__new__(cls)


def dump_skeleton(module: torch.nn.Module) -> bytes:
    """The module pickled without the bytes of its state dict's tensors."""
    state = module.state_dict(keep_vars=True)  # alive while pickling: the ids stay its tensors'
    weights = {id(t) for t in _tensors(list(state.values()))}
    quantized = [f"{name}." if name else "" for name, m in module.named_modules() if _is_quantized_module(m)]
    packed = {id(t) for k, v in state.items() if any(k.startswith(p) for p in quantized) for t in _tensors([v])}
    buf = io.BytesIO()
    _SkeletonPickler(buf, weights, packed).dump(module)
    return buf.getvalue()


def _is_quantized_module(module: torch.nn.Module) -> bool:
    """A torch.ao quantized module, whose weights are packed for its kernels."""
    return type(module).__module__.startswith(("torch.ao.nn.quantized.", "torch.ao.nn.intrinsic.quantized."))


def _tensors(values: list) -> list[torch.Tensor]:
    """The tensors among ``values`` and inside their tuples and lists (quantized modules'
    packed parameters are a (weight, bias) tuple in the state dict)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(_tensors(list(v)))
    return out


def pickle_allowed(allow_pickle: bool | None) -> bool:
    """An explicit argument wins; else MLflow's MLFLOW_ALLOW_PICKLE_DESERIALIZATION."""
    if allow_pickle is not None:
        return allow_pickle
    value = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    return value.strip().lower() in ("1", "true", "yes")


def load_skeleton(data: bytes, where: str, *, allow_pickle: bool | None = None) -> torch.nn.Module:
    """Unpickle a skeleton (``data``, read from ``where``): a module whose state-dict tensors
    are on the meta device."""
    if not pickle_allowed(allow_pickle):
        raise PermissionError(
            f"refusing to unpickle the model architecture at {where}: pickle deserialization is "
            f"disabled (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false or allow_pickle=False). Log "
            f"the model with model_factory='package.module:callable' to load it without pickle, "
            f"or load only the weights with mlflow_lance.load_state_dict()."
        )
    module = cloudpickle.loads(data)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{where} holds a {type(module).__name__}, not a torch.nn.Module")
    return module


def check_factory(model_factory: str, factory_kwargs: Mapping | None, *, resolve: bool = False) -> dict:
    """Validate a factory spec (at save and at load); returns the kwargs as a plain dict.

    ``resolve`` (at save time, in the process that logs the model) also imports the factory,
    so that a spec that names nothing fails at log time, not at the first load.
    """
    if not isinstance(model_factory, str) or not re.fullmatch(f"{_DOTTED}:{_DOTTED}", model_factory):
        raise ValueError(f"model_factory must look like 'package.module:callable', got {model_factory!r}")
    if factory_kwargs is not None and not isinstance(factory_kwargs, Mapping):
        raise ValueError(f"factory_kwargs must be a mapping, got {type(factory_kwargs).__name__}")
    kwargs = dict(factory_kwargs or {})
    try:
        kwargs = json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as err:
        raise ValueError(f"factory_kwargs must be JSON-serialisable: {err}") from None
    if resolve and not callable(_import_factory(model_factory)):
        raise TypeError(f"model factory {model_factory!r} is not callable")
    return kwargs


def build_from_factory(
    model_factory: str,
    factory_kwargs: Mapping | None,
    *,
    trusted_only: bool,
    model_dir: str,
    device: str | None = None,
) -> torch.nn.Module:
    """Build the module with ``package.module:callable(**factory_kwargs)`` (under
    ``torch.device(device)`` when given: "meta" builds shapes without memory).

    ``trusted_only`` (pickle refused): the factory must pass ``trusted_factory``, checked
    before anything is imported; else it is imported like any code the model ships.
    """
    kwargs = check_factory(model_factory, factory_kwargs)
    target = trusted_factory(model_factory, model_dir) if trusted_only else _import_factory(model_factory)
    with torch.device(device) if device else contextlib.nullcontext():
        module = target(**kwargs)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"model factory {model_factory!r} returned {type(module).__name__}, not a Module")
    return module


def trusted_factory(model_factory: str, model_dir: str) -> Callable:
    """The factory, if the installed environment vouches for it; else PermissionError before
    anything is imported or called.

    Vouched for: (1) the value of an entry point in group ``mlflow_lance.factories`` of an
    installed distribution, whose package does not resolve inside ``model_dir`` (code the
    model ships cannot shadow it); (2) a ``torch.nn.Module`` subclass of a module already
    imported from outside ``model_dir``, found without running any code (no import, no
    ``__getattr__``).
    """
    module_name, _, attr = model_factory.partition(":")
    inside = os.path.realpath(model_dir) + os.sep

    def shipped(path: str | None) -> bool:  # a file of the model directory?
        return bool(path) and os.path.isabs(path) and os.path.realpath(path).startswith(inside)

    registered = {f"{ep.module}:{ep.attr}" for ep in importlib.metadata.entry_points(group=FACTORY_GROUP)}
    if model_factory in registered:
        spec = importlib.util.find_spec(module_name.split(".")[0])  # top level: imports nothing
        places = [spec.origin or "", *(spec.submodule_search_locations or [])] if spec else []
        if spec is not None and not any(shipped(p) for p in places):
            return _import_factory(model_factory)
    module = sys.modules.get(module_name)
    target = module
    if module is not None and not shipped(getattr(module, "__file__", None)):
        for part in attr.split("."):
            try:
                target = inspect.getattr_static(target, part)
            except AttributeError:
                target = None
                break
        if isinstance(target, type) and issubclass(target, torch.nn.Module):
            return target
    raise PermissionError(
        f"refusing to build the model with factory {model_factory!r}: pickle deserialization "
        f"is disabled (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false or allow_pickle=False), so "
        f"the model directory is untrusted and only factories the installed environment "
        f"vouches for run: a callable an installed package registers in the entry-point group "
        f"{FACTORY_GROUP!r}, or a torch.nn.Module subclass of a module this process has "
        f"already imported. Register the factory (README, Security), import its module "
        f"first, or pass allow_pickle=True if you trust this model. Nothing was imported or run."
    )


def _import_factory(model_factory: str) -> Callable:
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
    return target


def materialize(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Give every meta tensor real (zeroed) memory on ``device`` and move the rest.

    Unlike ``Module.to_empty``, tensors that already hold values (non-persistent buffers)
    keep them, and a Parameter shared by several modules stays one Parameter (tied).
    """
    memo: dict[int, torch.Tensor] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            data = torch.zeros_like(t, device=device) if t.is_meta else t.detach().to(device)
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
