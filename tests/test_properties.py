"""Property-based: random state dicts and random version histories always load back exactly."""

from __future__ import annotations

import shutil
import tempfile
from collections import OrderedDict

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlflow_lance as ml
from conftest import raw as _bits
from mlflow_lance.tensors import DTYPES

NAMES = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zs", "Zl", "Zp"]),
    min_size=1,
    max_size=12,
)
SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3)


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(SHAPES)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    raw = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
    if dtype == torch.bool:
        raw = bytes(b % 2 for b in raw)
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return t.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


@st.composite
def version_histories(draw) -> list[OrderedDict]:
    out = []
    current: OrderedDict[str, torch.Tensor] = OrderedDict()
    for _ in range(draw(st.integers(1, 6))):
        sd = OrderedDict(current)
        for name in draw(st.lists(NAMES, max_size=4)):
            sd[name.strip() or "x"] = draw(tensors())
        for name in list(sd):
            if len(sd) > 1 and draw(st.integers(0, 5)) == 0:
                del sd[name]
        if not sd:
            sd["x"] = draw(tensors())
        if len(sd) > 1 and draw(st.booleans()):  # tie two names to one tensor
            a, b = list(sd)[:2]
            sd[b] = sd[a]
        out.append(sd)
        current = sd
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=version_histories(), chunk=st.sampled_from([7, 64, 1 << 30]))
def test_every_version_loads_exactly_what_was_saved(history, chunk):
    root = tempfile.mkdtemp()
    uri = f"{root}/w.lance"
    try:
        saved = [ml.save_state_dict(sd, uri, chunk_bytes=chunk).version for sd in history]
        assert saved == list(range(1, len(history) + 1))
        for version, sd in zip(saved, history, strict=True):
            out = ml.load_state_dict(uri, version)
            assert list(out) == list(sd)
            for k, v in sd.items():
                assert out[k].dtype == v.dtype and out[k].shape == v.shape and _bits(out[k]) == _bits(v)
        assert ml.verify(uri).ok
    finally:
        shutil.rmtree(root)
