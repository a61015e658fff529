"""Nested checkpoint state <-> flat tensors plus a JSON description of everything else.

A training checkpoint is a tree: ``{"model": state_dict, "optimizer": opt.state_dict(),
"epoch": 3, ...}``. Its tensors become rows of the weight store like any state dict (so they
are deduplicated, typed exactly and never pickled), named by their path in the tree; the rest
(numbers, strings, None, lists, tuples, dicts with str or int keys) becomes a small JSON
*spec* stored with the version. Loading rebuilds the tree with the same types: int keys of
``optimizer.state_dict()["state"]`` stay ints, tuples stay tuples, an ``OrderedDict`` (a
module's ``state_dict()``) stays one and a ``dict`` a dict (other mapping types come back as
dicts), NaN stays NaN, a ``torch.dtype`` (the packed parameters of quantized modules hold
one) stays that dtype.

A quantized or sparse tensor becomes its dense components (see composite.py), stored as rows
named ``<its path>/%.<part>`` (``fc.weight/%.int_repr``, ``fc.weight/%.scale``, ...: quoting
never produces ``%.``, so no key of the tree can name them), and a ``composite`` node of the
spec that describes how to rebuild it. A spec that holds such nodes or dtypes is written as
format 2, which readers before them refuse with "upgrade mlflow-lance" instead of misreading.

Anything else is refused with the key path and what to do: nothing is ever pickled.
Nothing here knows about Lance or MLflow.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote

import torch

from . import composite

SPEC_FORMAT = 1
#: The format of a spec holding composite tensors or dtypes (readers of format 1 refuse it).
SPEC_FORMAT_COMPOSITE = 2
_FORMATS = (SPEC_FORMAT, SPEC_FORMAT_COMPOSITE)
PART_MARK = "%."  # a composite tensor's parts are named <path>/%.<part>
#: Every torch dtype by its name (a checkpoint may hold dtypes as values).
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
MAX_SPEC_BYTES = 16 << 20  # a spec larger than this is refused on save and on load
_MAX_DEPTH = 64


def is_flat(state: Mapping) -> bool:
    """A plain state dict: str keys to dense tensors only (stored without a spec)."""
    return all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and not composite.is_composite(v) for k, v in state.items()
    )


def _where(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path) or "the top level"


def _component(key: str | int) -> str:
    """One path component of a flat tensor name: '/' separates components, so '/', '%',
    spaces and control characters are %-escaped; int keys are ``%i<n>`` and the empty key
    ``%%`` (forms quoting never produces), so ``1`` and ``"1"`` never share a name."""
    if isinstance(key, int):
        return f"%i{key}"
    if key == "":
        return "%%"
    return quote(key, safe="!\"#$&'()*+,-.:;<=>?@[\\]^_`{|}~")


def flatten(state: Mapping[Any, Any]) -> tuple[OrderedDict[str, torch.Tensor], dict]:
    """(tensors by path name, spec) of a nested checkpoint state.

    Raises TypeError naming the key path of the first value that is neither a tensor, a
    number, a string, None, nor a list, tuple or dict of those.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"a checkpoint must be a mapping (a dict), got {type(state).__name__}")
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    extended = False  # holds composite tensors or dtypes: spec format 2

    def walk(value: Any, path: tuple) -> dict:
        nonlocal extended
        if len(path) > _MAX_DEPTH:
            raise ValueError(f"checkpoint entry {_where(path[:8])}... is nested deeper than {_MAX_DEPTH} levels")
        if isinstance(value, torch.Tensor):
            name = "/".join(_component(k) for k in path)
            if not composite.is_composite(value):
                tensors[name] = value
                return {"t": "tensor", "n": name}
            extended = True
            info, components = composite.decompose(value, _where(path))
            names = {}
            for part, component in components.items():
                names[part] = f"{name}/{PART_MARK}{part}"
                tensors[names[part]] = component
            return {"t": "composite", "v": info, "n": names}
        if isinstance(value, torch.dtype):
            extended = True
            return {"t": "dtype", "v": str(value).removeprefix("torch.")}
        if value is None or isinstance(value, (bool, str)):
            return {"t": "v", "v": value}
        if isinstance(value, int):
            return {"t": "v", "v": int(value)}
        if isinstance(value, float):
            return {"t": "f", "v": value if math.isfinite(value) else repr(value)}
        if isinstance(value, (list, tuple)):
            items = [walk(v, (*path, i)) for i, v in enumerate(value)]
            return {"t": "list" if isinstance(value, list) else "tuple", "v": items}
        if isinstance(value, Mapping):
            entries = []
            for k, v in value.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(
                        f"checkpoint key {k!r} at {_where(path)} is a {type(k).__name__}; keys must be str or int"
                    )
                entries.append([k, walk(v, (*path, k))])
            node = {"t": "dict", "v": entries}
            if isinstance(value, OrderedDict):  # readers before this key ignore it: a dict
                node["c"] = "OrderedDict"
            if (metadata := _module_versions(getattr(value, "_metadata", None))) is not None:  # as "c"
                node["m"] = metadata
            return node
        hint = ""
        if hasattr(value, "item") and callable(value.item):
            hint = " (a numpy scalar? pass value.item())"
        elif hasattr(value, "state_dict"):
            hint = " (pass its .state_dict())"
        raise TypeError(
            f"checkpoint entry {_where(path)} is a {type(value).__module__}.{type(value).__name__}, which "
            f"mlflow-lance does not store (it never pickles): use tensors, numbers, strings, None, and "
            f"lists, tuples or dicts of them{hint}"
        )

    root = walk(state, ())
    spec = {"format": SPEC_FORMAT_COMPOSITE if extended else SPEC_FORMAT, "root": root}
    if len(encode(spec)) > MAX_SPEC_BYTES:
        raise ValueError(
            f"the non-tensor part of the checkpoint is over {MAX_SPEC_BYTES >> 20} MiB of JSON; store large "
            f"arrays as tensors"
        )
    return tensors, spec


def encode(spec: dict) -> str:
    return json.dumps(spec, separators=(",", ":"), allow_nan=False)


def decode(text: str) -> dict:
    """The spec stored with a version; ValueError if it is malformed or too large."""
    if len(text) > MAX_SPEC_BYTES:
        raise ValueError(f"checkpoint spec is over {MAX_SPEC_BYTES >> 20} MiB")
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"checkpoint spec is not valid JSON: {err}") from None
    if not isinstance(spec, dict) or spec.get("format") not in _FORMATS or not isinstance(spec.get("root"), dict):
        raise ValueError("checkpoint spec has an unknown format; upgrade mlflow-lance")
    return spec


def unflatten(spec: dict, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The tree ``flatten`` described, with its tensors taken from ``tensors``."""

    def build(node: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH or not isinstance(node, dict):
            raise ValueError("checkpoint spec is malformed (too deep or not an object)")
        kind, value = node.get("t"), node.get("v")
        if kind == "tensor":
            name = node.get("n")
            if not isinstance(name, str) or name not in tensors:
                raise ValueError(f"checkpoint spec names tensor {str(name)[:200]!r}, which the version does not hold")
            return tensors[name]
        if kind == "composite":
            return _composite(node, tensors)
        if kind == "dtype" and isinstance(value, str) and value in _DTYPES:
            return _DTYPES[value]
        if kind == "v" and (value is None or isinstance(value, (bool, int, str))):
            return value
        if kind == "f" and _float_like(value):
            return float(value)
        if kind in ("list", "tuple") and isinstance(value, list):
            items = [build(v, depth + 1) for v in value]
            return items if kind == "list" else tuple(items)
        if kind == "dict" and isinstance(value, list):
            out = OrderedDict() if node.get("c") == "OrderedDict" else {}
            for entry in value:
                if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], (str, int))):
                    raise ValueError("checkpoint spec is malformed (a dict entry)")
                out[entry[0]] = build(entry[1], depth + 1)
            if "m" in node and isinstance(out, OrderedDict):
                if _module_versions(node["m"]) is None:
                    raise ValueError("checkpoint spec is malformed (a state dict's module versions)")
                out._metadata = OrderedDict((k, dict(v)) for k, v in node["m"].items())  # type: ignore[attr-defined]
            return out
        raise ValueError(f"checkpoint spec is malformed (node type {kind!r})")

    return build(spec["root"], 0)


def _module_versions(metadata: object) -> dict | None:
    """A state dict's ``_metadata`` (module prefix -> ``{"version": n}``, which
    ``Module.load_state_dict`` passes to each module's loader: torch.ao's quantized modules
    read their state dicts by it) as plain dicts, when it is a mapping of str keys to mappings
    of str keys to int or str values (as saved, or a spec's ``"m"`` entry); else None."""
    if not isinstance(metadata, Mapping):
        return None
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, Mapping):
            return None
        if not all(isinstance(a, str) and isinstance(b, (int, str)) and not isinstance(b, bool) for a, b in v.items()):
            return None
    return {k: dict(v) for k, v in metadata.items()}


def _composite(node: dict, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The quantized or sparse tensor a ``composite`` node describes, from its stored parts."""
    info, names = node.get("v"), node.get("n")
    wanted = composite.parts(info)
    if not isinstance(names, dict) or sorted(names) != sorted(wanted):
        raise ValueError(f"checkpoint spec is malformed (a composite tensor's parts should be {list(wanted)})")
    for name in names.values():
        if not isinstance(name, str) or name not in tensors:
            raise ValueError(f"checkpoint spec names tensor {str(name)[:200]!r}, which the version does not hold")
    where = str(next(iter(names.values()))).rpartition("/" + PART_MARK)[0]
    return composite.compose(info, {part: tensors[name] for part, name in names.items()}, repr(where[:200]))


def _float_like(value: Any) -> bool:
    """A float as ``flatten`` stores one: a finite number, or the repr of nan or an infinity."""
    if isinstance(value, str):
        return value in ("nan", "inf", "-inf")
    if isinstance(value, bool):
        return False
    return isinstance(value, float) or (isinstance(value, int) and abs(value) < 2**1023)


def subtree_prefix(*keys: str | int) -> str:
    """The flat-name prefix of the tensors under ``keys`` (e.g. ``"model/"``)."""
    return "".join(_component(k) + "/" for k in keys)


def strip_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> OrderedDict[str, torch.Tensor]:
    """The tensors under ``prefix`` with their own names (a flat state dict below the prefix:
    its keys are the original state-dict keys, unescaped)."""
    return OrderedDict((unquote(k[len(prefix) :]), v) for k, v in tensors.items() if k.startswith(prefix))
