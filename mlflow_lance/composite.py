"""Quantized and sparse tensors <-> dense component tensors plus a small JSON description.

A quantized tensor is its integer values (``int_repr()``), its scale and its zero point (one
per channel, with the channel axis, for a per-channel tensor); a sparse tensor is its index
tensors and its values, with its size and layout. Each component is an ordinary dense tensor,
so it is stored as rows like any other (typed exactly, deduplicated, never pickled), and the
description says how to put them back together with torch's own constructors.

On load every claim of the description and every component is input, not a promise:
``compose`` checks dtypes, shapes, the channel axis, the scale count and every index against
the size before torch builds anything, and raises ValueError naming the tensor otherwise.
Nothing here knows about Lance or MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from . import compat

MAX_DIMS = 64  # as format.MAX_DIMS: the most dims a stored shape may claim
_INT64_MAX = (1 << 63) - 1

#: Quantized dtype name -> the dtype of its integer values (``int_repr()``).
_QUANTIZED = {"qint8": torch.int8, "quint8": torch.uint8, "qint32": torch.int32}
_QSCHEMES = ("per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams")

#: Sparse layout name -> the names of its components, in the order torch's constructor takes them.
_SPARSE = {
    "sparse_coo": ("indices", "values"),
    "sparse_csr": ("crow_indices", "col_indices", "values"),
    "sparse_csc": ("ccol_indices", "row_indices", "values"),
    "sparse_bsr": ("crow_indices", "col_indices", "values"),
    "sparse_bsc": ("ccol_indices", "row_indices", "values"),
}
_LAYOUTS = {name: getattr(torch, name) for name in _SPARSE}


def is_composite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is stored as components: quantized, or of a non-strided layout.

    Args:
        tensor: any tensor.

    Returns:
        True for a quantized or sparse (or other non-strided) tensor.
    """
    return tensor.is_quantized or tensor.layout != torch.strided


def decompose(tensor: torch.Tensor, where: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A quantized or sparse tensor as a JSON-able description and dense components.

    Args:
        tensor: a tensor for which ``is_composite`` holds.
        where: how to name the tensor in an error (its key path).

    Returns:
        (description, components by part name); the components are dense tensors.

    Raises:
        TypeError: a layout or quantization this module does not store (mkldnn, jagged,
            4- and 2-bit quantized dtypes).
        ValueError: the tensor is on the meta device (it has no data).
    """
    if tensor.device.type == "meta":
        raise ValueError(f"tensor {where} is on the meta device and has no data to store")
    tensor = tensor.detach()
    if tensor.is_quantized:
        return _decompose_quantized(tensor, where)
    layout = str(tensor.layout).removeprefix("torch.")
    if layout not in _SPARSE:
        raise TypeError(
            f"tensor {where} has layout {tensor.layout}, which mlflow-lance does not store; supported: "
            f"strided, {', '.join(_SPARSE)}. Call .to_dense() first."
        )
    size = list(tensor.shape)
    if layout == "sparse_coo":
        info = {"layout": layout, "size": size, "coalesced": bool(tensor.is_coalesced())}
        return info, {"indices": tensor._indices(), "values": tensor._values()}
    compressed, plain = (
        (tensor.crow_indices(), tensor.col_indices())
        if layout in ("sparse_csr", "sparse_bsr")
        else (tensor.ccol_indices(), tensor.row_indices())
    )
    names = _SPARSE[layout]
    return {"layout": layout, "size": size}, dict(zip(names, (compressed, plain, tensor.values()), strict=True))


def _decompose_quantized(tensor: torch.Tensor, where: str) -> tuple[dict, dict[str, torch.Tensor]]:
    dtype = str(tensor.dtype).removeprefix("torch.")
    qscheme = str(tensor.qscheme()).removeprefix("torch.")
    if dtype not in _QUANTIZED or qscheme not in _QSCHEMES:
        raise TypeError(
            f"tensor {where} is quantized as {tensor.dtype} ({tensor.qscheme()}), which mlflow-lance does "
            f"not store; supported: {', '.join(_QUANTIZED)} per tensor or per channel. Call .dequantize() first."
        )
    info: dict = {"quantized": dtype, "qscheme": qscheme}
    values = tensor.int_repr()
    if qscheme == "per_tensor_affine":
        scale = torch.tensor(tensor.q_scale(), dtype=torch.float64)
        zero_point = torch.tensor(tensor.q_zero_point(), dtype=torch.int64)
    else:
        info["axis"] = tensor.q_per_channel_axis()
        scale, zero_point = tensor.q_per_channel_scales(), tensor.q_per_channel_zero_points()
    return info, {"int_repr": values, "scale": scale, "zero_point": zero_point}


def parts(info: Mapping) -> tuple[str, ...]:
    """The component names a description needs.

    Args:
        info: a description, as ``decompose`` returns it or as read from a dataset.

    Returns:
        The part names, in the order they are stored.

    Raises:
        ValueError: the description names no known quantization or layout.
    """
    if not isinstance(info, Mapping):
        raise ValueError("a composite tensor's description is not an object")
    if "quantized" in info:
        return ("int_repr", "scale", "zero_point")
    layout = info.get("layout")
    if not isinstance(layout, str) or layout not in _SPARSE:
        raise ValueError(f"a composite tensor has unknown layout {str(layout)[:40]!r}; upgrade mlflow-lance")
    return _SPARSE[layout]


def compose(info: Mapping, components: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
    """The quantized or sparse tensor ``decompose`` described, rebuilt from its components.

    Args:
        info: the description.
        components: the dense components by part name (as loaded).
        where: how to name the tensor in an error.

    Returns:
        The tensor, bit for bit the one that was decomposed.

    Raises:
        ValueError: the description or a component is inconsistent (unknown dtype or layout,
            a shape, an axis or a scale count that does not fit, an index out of bounds), before
            torch builds anything from it.
    """
    names = parts(info)
    if set(components) != set(names):
        raise ValueError(f"tensor {where} needs components {list(names)}, got {sorted(components)[:10]}")
    if "quantized" in info:
        return _compose_quantized(info, components, where)
    return _compose_sparse(info, components, where)


def _compose_quantized(info: Mapping, c: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
    dtype, qscheme = info.get("quantized"), info.get("qscheme")
    if not isinstance(dtype, str) or dtype not in _QUANTIZED or qscheme not in _QSCHEMES:
        raise ValueError(f"tensor {where} claims quantization {str(dtype)[:40]!r}/{str(qscheme)[:40]!r}, unknown here")
    values, scale, zero_point = c["int_repr"], c["scale"], c["zero_point"]
    if values.dtype != _QUANTIZED[dtype]:
        raise ValueError(f"tensor {where}: {dtype} values must be {_QUANTIZED[dtype]}, not {values.dtype}")
    info_ = torch.iinfo(values.dtype)
    if qscheme == "per_tensor_affine":
        if (
            scale.shape != ()
            or scale.dtype != torch.float64
            or zero_point.shape != ()
            or zero_point.dtype != torch.int64
        ):
            raise ValueError(f"tensor {where}: a per-tensor scale and zero point must be one float64 and one int64")
        s, z = float(scale), int(zero_point)
        if not (math.isfinite(s) and s > 0) or not info_.min <= z <= info_.max:
            raise ValueError(f"tensor {where}: scale {s} or zero point {z} is out of range for {dtype}")
        return _built(where, compat._make_per_tensor_quantized_tensor, values, s, z)
    axis = info.get("axis")
    if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < values.dim():
        raise ValueError(f"tensor {where}: channel axis {str(axis)[:40]} is out of range for {values.dim()} dims")
    float_zeros = qscheme == "per_channel_affine_float_qparams"
    scale_dtypes = (torch.float32, torch.float64) if float_zeros else (torch.float64,)
    zero_dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16) if float_zeros else (torch.int64,)
    channels = values.shape[axis]
    if scale.shape != (channels,) or zero_point.shape != (channels,):
        raise ValueError(
            f"tensor {where}: {channels} channels along axis {axis}, but {list(scale.shape)} scales and "
            f"{list(zero_point.shape)} zero points"
        )
    if scale.dtype not in scale_dtypes or zero_point.dtype not in zero_dtypes:
        raise ValueError(
            f"tensor {where}: scales of {scale.dtype} or zero points of {zero_point.dtype} do not fit {qscheme}"
        )
    # float qparams come from packed embedding rows as torch hands them out (any float bits)
    if not float_zeros and not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError(f"tensor {where}: a scale is not a positive finite number")
    if not float_zeros and not bool(((zero_point >= info_.min) & (zero_point <= info_.max)).all()):
        raise ValueError(f"tensor {where}: a zero point is out of range for {dtype}")
    return _built(where, compat._make_per_channel_quantized_tensor, values, scale, zero_point, axis)


def _check_size(size: object, where: str) -> list[int]:
    if (
        not isinstance(size, list)
        or len(size) > MAX_DIMS
        or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= _INT64_MAX for s in size)
        or math.prod(size) > _INT64_MAX
    ):
        raise ValueError(f"tensor {where}: size {str(size)[:80]} is not a list of at most {MAX_DIMS} sizes")
    return size


def _compose_sparse(info: Mapping, c: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
    layout = info["layout"]
    size = _check_size(info.get("size"), where)
    values = c["values"]
    if values.dim() == 0:
        raise ValueError(f"tensor {where}: its values must have at least one dimension")
    if layout == "sparse_coo":
        indices, coalesced = c["indices"], info.get("coalesced")
        if not isinstance(coalesced, bool):
            raise ValueError(f"tensor {where}: 'coalesced' must be true or false")
        if indices.dtype != torch.int64 or indices.dim() != 2 or indices.shape[1] != values.shape[0]:
            raise ValueError(
                f"tensor {where}: indices of {indices.dtype} {list(indices.shape)} do not index "
                f"{values.shape[0]} values (int64, [sparse dims, nnz])"
            )
        sparse_dims = indices.shape[0]
        if sparse_dims + values.dim() - 1 != len(size) or list(values.shape[1:]) != size[sparse_dims:]:
            raise ValueError(f"tensor {where}: values {list(values.shape)} do not fit size {size}")
        bounds = torch.tensor(size[:sparse_dims], dtype=torch.int64).reshape(-1, 1)
        if indices.numel() and not bool(((indices >= 0) & (indices < bounds)).all()):
            raise ValueError(f"tensor {where}: an index is out of bounds for size {size}")
        out = _built(where, torch.sparse_coo_tensor, indices, values, size, is_coalesced=False)
        if coalesced:
            merged = out.coalesce()
            if merged._nnz() != out._nnz() or not torch.equal(merged._indices(), indices):
                raise ValueError(f"tensor {where} claims to be coalesced, but its indices are unsorted or repeat")
            out = _built(where, torch.sparse_coo_tensor, indices, values, size, is_coalesced=True)
        return out
    compressed, plain = (c[n] for n in _SPARSE[layout][:2])
    if compressed.dtype not in (torch.int32, torch.int64) or plain.dtype != compressed.dtype:
        raise ValueError(f"tensor {where}: its indices must both be int32 or both int64")
    if compressed.dim() < 1 or plain.dim() != compressed.dim():
        raise ValueError(f"tensor {where}: its index tensors have {compressed.dim()} and {plain.dim()} dims")
    return _built(
        where,
        torch.sparse_compressed_tensor,
        compressed,
        plain,
        values,
        size,
        layout=_LAYOUTS[layout],
        dtype=values.dtype,
    )


def _built(where: str, constructor: Callable[..., torch.Tensor], *args: object, **kwargs: object) -> torch.Tensor:
    """``constructor(*args, **kwargs)`` with torch's sparse invariants checked; ValueError if
    torch refuses what the checks above let through."""
    try:
        with torch.sparse.check_sparse_tensor_invariants(enable=True):
            return constructor(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise ValueError(
            f"tensor {where} is not a valid tensor of its kind: {str(err).splitlines()[0][:300]}"
        ) from None
