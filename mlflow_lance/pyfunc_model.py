"""The ``mlflow.pyfunc`` view of a loaded module (what ``predict`` does with each input type),
as mlflow.pytorch's. The flavor (flavor.py) loads the module and wraps it here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


class LanceModelWrapper:
    """``mlflow.pyfunc`` view of the module, as mlflow.pytorch's: a DataFrame in (cast to
    float32 as mlflow.pytorch casts it) gives a DataFrame out with the input's index; numpy
    arrays and dicts of arrays (keyword inputs, an extension) give numpy; lists and anything
    else are refused with mlflow.pytorch's errors; ``params`` are passed to ``forward`` as
    keyword arguments."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module = module
        self.device = device

    def get_raw_model(self) -> torch.nn.Module:
        return self.module

    def _tensor(self, value: Any) -> torch.Tensor:
        array = value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)
        if any(s < 0 for s in array.strides):  # torch takes any other layout as it is, as mlflow.pytorch does
            array = np.ascontiguousarray(array)
        t = torch.from_numpy(array)
        if t.is_floating_point():
            t = t.to(self._float_dtype())
        return t.to(self.device)

    def _float_dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def predict(self, data: Any, params: dict | None = None) -> Any:
        import pandas as pd

        if params and "device" in params:
            raise ValueError(
                "'device' can no longer be specified as an inference parameter. It must be specified at "
                "load time, for example: mlflow.pyfunc.load_model(model_uri, model_config={'device': 'cuda'})."
            )
        kwargs = dict(params or {})
        with torch.no_grad():
            if isinstance(data, pd.DataFrame):
                out = self.module(self._tensor(float32(data)), **kwargs)
                if isinstance(out, torch.Tensor):
                    return pd.DataFrame(out.detach().cpu().numpy(), index=data.index)
            elif isinstance(data, Mapping):  # an extension: keyword inputs
                out = self.module(**{k: self._tensor(v) for k, v in data.items()}, **kwargs)
            elif isinstance(data, np.ndarray):
                out = self.module(self._tensor(data), **kwargs)
            elif isinstance(data, list):  # mlflow.pytorch's errors, word for word
                raise TypeError(
                    "The PyTorch flavor does not support List or Dict input types. "
                    "Please use a pandas.DataFrame or a numpy.ndarray"
                )
            else:
                raise TypeError("Input data should be pandas.DataFrame or numpy.ndarray")
        return to_numpy(out)


def float32(frame: Any) -> np.ndarray:
    """A DataFrame as float32, as mlflow.pytorch feeds it; an error names what cannot be cast."""
    try:
        return frame.to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as err:
        from pandas.api.types import is_bool_dtype, is_numeric_dtype

        bad = [str(c) for c, t in frame.dtypes.items() if not (is_numeric_dtype(t) or is_bool_dtype(t))]
        raise TypeError(
            f"the model takes float32 input; DataFrame column(s) {bad or list(frame.columns)} cannot be cast "
            f"({err}). Convert them to numbers first."
        ) from None


def to_numpy(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().cpu().numpy()
    if isinstance(out, Mapping):
        return {k: to_numpy(v) for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        arrays = [to_numpy(v) for v in out if isinstance(v, torch.Tensor)]
        return arrays[0] if len(arrays) == 1 else arrays
    return out


def default_device(model_config: dict | None) -> str:
    """model_config's device, else MLFLOW_DEFAULT_PREDICTION_DEVICE, else CUDA when available."""
    return (
        (model_config or {}).get("device")
        or os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE")
        or ("cuda" if torch.cuda.is_available() else "cpu")
    )
