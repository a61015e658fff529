"""Nested checkpoint state <-> flat tensors + JSON spec (tree.py): exact round trips, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlflow_lance import tree


def roundtrip(state):
    tensors, spec = tree.flatten(state)
    return tree.unflatten(tree.decode(tree.encode(spec)), dict(tensors)), tensors


def test_optimizer_and_scheduler_state_round_trip_with_their_types():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": 3,
        "loss": float("nan"),
        "best": float("-inf"),
        "tag": None,
        "shape": (2, 3),
    }
    back, tensors = roundtrip(state)
    assert set(back["optimizer"]["state"]) == {0, 1}  # int keys stay ints
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["scheduler"] == state["scheduler"] and back["epoch"] == 3 and back["shape"] == (2, 3)
    assert math.isnan(back["loss"]) and back["best"] == float("-inf") and back["tag"] is None
    assert list(tree.strip_prefix(tensors, tree.subtree_prefix("model"))) == list(model.state_dict())
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 2).parameters())
    opt2.load_state_dict(back["optimizer"])  # torch accepts what came back


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"a": {"b": object()}}, "['a']['b']"),
        ({"a": [1, {2, 3}]}, "['a'][1]"),
        ({("x", 1): torch.ones(1)}, "keys must be str or int"),
        ({"opt": torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)}, ".state_dict()"),
    ],
)
def test_values_that_are_neither_are_refused_with_their_key_path(bad, where):
    with pytest.raises(TypeError) as err:
        tree.flatten(bad)
    assert where in str(err.value) and "never pickles" in str(err.value) or "keys must be" in str(err.value)


def test_malformed_specs_are_errors_not_crashes():
    for text in (
        "null",
        "[]",
        "{",
        '{"format": 1, "root": {"t": "tensor", "n": "missing"}}',
        '{"format": 1, "root": {"t": "dict", "v": [[1]]}}',
        '{"format": 9, "root": {}}',
        "[" * 100000 + "]" * 100000,
    ):
        with pytest.raises(ValueError):
            tree.unflatten(tree.decode(text), {})


keys = st.one_of(st.text(min_size=1, max_size=8), st.integers(-5, 5))
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.builds(lambda n: torch.arange(n, dtype=torch.float32), st.integers(0, 4)),
)
trees = st.recursive(
    leaves,
    lambda c: st.one_of(st.lists(c, max_size=3), st.tuples(c, c), st.dictionaries(keys, c, max_size=3)),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, trees, max_size=4))
def test_any_tree_of_supported_values_round_trips_exactly(state):
    back, tensors = roundtrip(state)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return type(a) is type(b) and a == b

    assert same(state, back)
    assert len(set(tensors)) == len(tensors)  # no two paths share a flat name


def test_keys_that_look_alike_get_distinct_valid_names():
    from mlflow_lance.tensors import validate_state_dict

    state = {
        1: torch.ones(1),
        "1": torch.zeros(1),
        "": torch.ones(2),
        " a/b%\n": torch.ones(3),
        "x": {"": torch.ones(4)},
    }
    back, tensors = roundtrip(state)
    assert len(tensors) == 5 and torch.equal(back["1"], torch.zeros(1)) and torch.equal(back[1], torch.ones(1))
    validate_state_dict(tensors)  # every flat name is a valid stored tensor name
