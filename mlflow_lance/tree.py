"""Nested checkpoint state <-> flat tensors plus a JSON description of everything else.

A training checkpoint is a tree: ``{"model": state_dict, "optimizer": opt.state_dict(),
"epoch": 3, ...}``. Its tensors become rows of the weight store like any state dict (so they
are deduplicated, typed exactly and never pickled), named by their path in the tree; the rest
(numbers, strings, None, lists, tuples, dicts with str or int keys) becomes a small JSON
*spec* stored with the version. Loading rebuilds the tree with the same types: int keys of
``optimizer.state_dict()["state"]`` stay ints, tuples stay tuples, an ``OrderedDict`` (a
module's ``state_dict()``) stays one and a ``dict`` a dict (other mapping types come back as
dicts), NaN stays NaN.

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

SPEC_FORMAT = 1
MAX_SPEC_BYTES = 16 << 20  # a spec larger than this is refused on save and on load
_MAX_DEPTH = 64


def is_flat(state: Mapping) -> bool:
    """A plain state dict: str keys to tensors only (stored without a spec)."""
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


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

    def walk(value: Any, path: tuple) -> dict:
        if len(path) > _MAX_DEPTH:
            raise ValueError(f"checkpoint entry {_where(path[:8])}... is nested deeper than {_MAX_DEPTH} levels")
        if isinstance(value, torch.Tensor):
            name = "/".join(_component(k) for k in path)
            tensors[name] = value
            return {"t": "tensor", "n": name}
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
            if isinstance(value, OrderedDict):  # readers before this key ignore it: a dict
                return {"t": "dict", "v": entries, "c": "OrderedDict"}
            return {"t": "dict", "v": entries}
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

    spec = {"format": SPEC_FORMAT, "root": walk(state, ())}
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
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT or not isinstance(spec.get("root"), dict):
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
            return out
        raise ValueError(f"checkpoint spec is malformed (node type {kind!r})")

    return build(spec["root"], 0)


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
