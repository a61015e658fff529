"""The Lance docs example "Deep Learning Artefact Management using Lance", as published.

The baseline mlflow-lance is measured against, and the writer of seed-format datasets that
mlflow-lance must still read: name / value list<float64> / shape, a full copy per version.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict

import lance
import pyarrow as pa
import torch

GLOBAL_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string()),
        pa.field("value", pa.list_(pa.float64(), -1)),
        pa.field("shape", pa.list_(pa.int64(), -1)),
    ]
)


def _save_model_writer(state_dict):
    for param_name, param in state_dict.items():
        param_shape = list(param.size())
        param_value = param.flatten().tolist()
        yield pa.RecordBatch.from_arrays(
            [
                pa.array([param_name], pa.string()),
                pa.array([param_value], pa.list_(pa.float64(), -1)),
                pa.array([param_shape], pa.list_(pa.int64(), -1)),
            ],
            ["name", "value", "shape"],
        )


def docs_save_model(state_dict: OrderedDict, file_name: str, version: bool = False) -> None:
    reader = pa.RecordBatchReader.from_batches(GLOBAL_SCHEMA, _save_model_writer(state_dict))
    if os.path.exists(file_name):
        if version:
            lance.write_dataset(reader, file_name, schema=GLOBAL_SCHEMA, mode="overwrite")
        else:
            shutil.rmtree(file_name)
            lance.write_dataset(reader, file_name, schema=GLOBAL_SCHEMA)
    else:
        lance.write_dataset(reader, file_name, schema=GLOBAL_SCHEMA)


def _load_weight(weight: dict) -> torch.Tensor:
    return torch.tensor(weight["value"], dtype=torch.float64).reshape(weight["shape"])


def docs_load_state_dict(file_name: str, version: int = 1, map_location=None) -> OrderedDict:
    ds = lance.dataset(file_name, version=version)
    weights = ds.take([x for x in range(ds.count_rows())]).to_pylist()
    state_dict = OrderedDict()
    for weight in weights:
        state_dict[weight["name"]] = _load_weight(weight).to(map_location)
    return state_dict
