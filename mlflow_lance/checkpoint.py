"""Training checkpoints through MLflow: log them while training, resume anywhere, keep the best.

A checkpoint is an MLflow 3 logged model (``name="checkpoint"``, with its ``step`` and its
metrics linked to it) whose Lance version holds, under one commit:

- ``model/...``: the model's state dict (``load_model`` on the checkpoint gives the model);
- ``optimizer``: the optimizer's state with parameters named, not numbered (``state`` keyed
  by parameter name, ``param_groups[i]["params"]`` as names), so a checkpoint survives a
  change in parameter order;
- ``scheduler``, ``rng`` (torch CPU and CUDA, numpy, python), ``extra``, ``step``, ``metrics``.

Tensors are deduplicated against the run's previous checkpoint (one Lance dataset per run),
so frozen parameters and their absent optimizer state cost nothing after the first.

The three steps are kept apart, as in ``torch.distributed.checkpoint``: **staging** copies
the state to CPU memory (the only part that blocks training with ``blocking=False``);
**writing** hashes, writes and commits the Lance version and logs the model (a background
thread, at most one checkpoint in flight); **retention** deletes the logged models that fall
out of ``keep_last`` / ``keep_best`` (never one registered as a model version), whose bytes
``mlflow-lance gc`` then reclaims.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric

from . import bindings, distributed, flavor, modelload, store, tree, writer
from .artifacts import lance_root, options
from .dataset import Dataset
from .format import check_compression
from .skeleton import dump_skeleton

CHECKPOINT_NAME = "checkpoint"
MODEL_KEY = "model"  # where a checkpoint's version keeps the model's own tensors
_REGISTERED_SOURCE = re.compile(r"(m-[0-9a-f]{32})(?:/artifacts)?/?$")
_STEP_TAG = "mlflow_lance.checkpoint.step"
_METRICS_TAG = "mlflow_lance.checkpoint.metrics"  # this checkpoint's own metrics (retention ranks by them)


# --------------------------------------------------------------------------- staging


def _copier(clone: bool = True) -> Any:
    """Copies tensors to CPU once each (ties stay ties); pinned memory for device tensors.
    Without ``clone`` (a blocking write) CPU tensors are used as they are: nothing changes
    them before the write returns."""
    memo: dict[int, torch.Tensor] = {}

    def copy(t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in memo:
            src = t.detach()
            if src.device.type == "cpu":
                memo[key] = src.clone() if clone else src
            else:
                dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=torch.cuda.is_available())
                memo[key] = dst.copy_(src, non_blocking=True)
        return memo[key]

    return copy


def _deep_copy(value: Any, copy, leaf: type = torch.Tensor) -> Any:
    """``value`` with every ``leaf`` (a tensor) in its dicts, lists and tuples replaced by ``copy(leaf)``."""
    if isinstance(value, leaf):
        return copy(value)
    if isinstance(value, Mapping):
        return {k: _deep_copy(v, copy, leaf) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v, copy, leaf) for v in value]
    if isinstance(value, tuple):
        return tuple(_deep_copy(v, copy, leaf) for v in value)
    return value


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The model's name for each of the optimizer's parameters, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    order = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [i for i, p in enumerate(order) if id(p) not in names]
    if missing:
        raise ValueError(
            f"the optimizer holds {len(missing)} parameter(s) that are not parameters of the model "
            f"(positions {missing[:5]}); pass the model the optimizer trains"
        )
    return [names[id(p)] for p in order]


def _named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    names = _param_names(model, optimizer)
    sd = optimizer.state_dict()
    return {
        "state": {names[i]: s for i, s in sd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


def _indexed_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, named: dict) -> dict:
    """The stored, name-keyed optimizer state in the form this optimizer loads.

    torch pairs saved groups and parameters with the current ones by position, so the groups
    are rebuilt in the current optimizer's order: each current group takes the hyperparameters
    of the saved group that holds the same parameters; a different grouping is refused.
    """
    names = _param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    unknown = [n for n in named["state"] if n not in index]
    if unknown:
        raise store.WeightsError(
            f"the checkpoint has optimizer state for {unknown[:5]}, which this optimizer does not train"
        )
    saved = {frozenset(g["params"]): g for g in named["param_groups"]}
    groups, start = [], 0
    for group in optimizer.param_groups:
        mine = names[start : start + len(group["params"])]
        start += len(group["params"])
        match = saved.get(frozenset(mine))
        if match is None:
            raise ValueError(
                f"the optimizer's parameter groups differ from the checkpoint's (a group of {mine[:3]}... "
                f"has no saved counterpart); build the optimizer with the same groups"
            )
        bad = [k for k, v in match.items() if k != "params" and not _same_kind(v, group.get(k, v))]
        if bad:
            raise store.CorruptionError(
                f"the checkpoint's optimizer hyperparameters {bad[:5]} are not of the kind this optimizer's are"
            )
        groups.append({**match, "params": [index[n] for n in mine]})
    return {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def _same_kind(saved: Any, live: Any) -> bool:
    """Whether a stored hyperparameter can stand where the optimizer has ``live`` (numbers for
    numbers, a sequence of as many for a sequence, the same for anything else)."""
    number = (int, float, torch.Tensor)
    if isinstance(live, bool) or isinstance(saved, bool):
        return type(saved) is type(live)
    if isinstance(live, number):
        return isinstance(saved, number) and not isinstance(saved, bool)
    if isinstance(live, (list, tuple)):
        return (
            isinstance(saved, (list, tuple))
            and len(saved) == len(live)
            and all(_same_kind(a, b) for a, b in zip(saved, live, strict=True))
        )
    return live is None or type(saved) is type(live) or saved is None


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.array(keys, dtype=np.uint32)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gathered_rng_states(group: Any) -> list[dict]:
    """Every rank's random number generators (``_rng_state``'s form), in rank order, on every
    rank of ``group`` (a gloo group: an object collective)."""
    import torch.distributed as dist

    rngs: list = [None] * dist.get_world_size(group)
    as_arrays = _deep_copy(_rng_state(), lambda t: t.numpy())  # tensors do not unpickle there
    dist.all_gather_object(rngs, as_arrays, group=group)
    return [_deep_copy(r, torch.from_numpy, np.ndarray) for r in rngs]


@dataclass(frozen=True)
class Generators:
    """Generator states checked by ``check_rng_state``, in the form each generator takes."""

    torch: torch.Tensor
    numpy: tuple
    python: tuple
    cuda: tuple[torch.Tensor, ...] | None  # None: the checkpoint kept none, or this machine has no CUDA


_MT_WORDS = 624  # MT19937's state: 624 32-bit words and a position in 0..624


def _malformed_rng(where: str, field: str, why: str) -> store.CorruptionError:
    return store.CorruptionError(
        f"{where}: the checkpoint's rng state is malformed: {field} {why}; load it with restore_rng=False "
        f"(no generator was changed)"
    )


def _shown(value: Any) -> str:
    """A stored value as an error shows it: a number itself (short), anything else its type."""
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
        return text if len(text) <= 40 else f"{text[:37]}..."
    return f"a {type(value).__name__}"


def _integer(value: Any) -> bool:
    return type(value) is int


def _finite(value: Any) -> bool:
    """A real number (not a bool) that converts to a finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _mt_words(words: Any) -> str | None:
    """Why 624 MT19937 words (a sequence of ints or a uint32 array) cannot be a generator's
    state, or None: a word outside 32 bits, or the all-zero state, which no seeding reaches
    (the first word's top bit and every other word zero) and which draws only zeros."""
    if isinstance(words, np.ndarray):
        if words.dtype != np.uint32 or words.shape != (_MT_WORDS,):
            return f"is {words.dtype} of shape {list(words.shape)}, not {_MT_WORDS} uint32 words"
        first, rest_zero = int(words[0]), not words[1:].any()
    else:
        if len(words) != _MT_WORDS or not all(_integer(w) and 0 <= w < 1 << 32 for w in words):
            return f"is not {_MT_WORDS} integers in 0..2**32-1"
        first, rest_zero = words[0], not any(words[1:])
    if first & 0x80000000 == 0 and rest_zero:
        return "is the all-zero state, which no seeding reaches (the generator would draw only zeros)"
    return None


def _check_torch_state(where: str, field: str, value: Any, device: str = "cpu") -> torch.Tensor:
    """A torch generator state: a 1-D uint8 CPU tensor that a scratch generator of ``device``
    accepts (torch checks its size and its MT19937 / Philox fields there)."""
    if not isinstance(value, torch.Tensor):
        raise _malformed_rng(where, field, f"is {type(value).__name__}, not a uint8 tensor")
    if value.dtype != torch.uint8 or value.dim() != 1 or value.device.type != "cpu":
        raise _malformed_rng(where, field, f"is a {value.dtype} tensor of shape {list(value.shape)}, not 1-D uint8")
    try:
        torch.Generator(device=device).set_state(value)
    except (RuntimeError, ValueError, TypeError) as err:
        raise _malformed_rng(where, field, f"is not a state torch accepts ({str(err).splitlines()[0][:200]})") from None
    return value


def check_rng_state(state: Any, where: str = "the checkpoint", field: str = "rng") -> Generators:
    """Check a checkpoint's ``rng`` entry without changing any generator: numpy's MT19937 (its
    name, 624 uint32 words that are not the all-zero state, a position in 0..624, ``has_gauss``
    0 or 1 and a finite cached gaussian), Python's ``random`` (version 3, 625 ints: 624 words
    of 32 bits and a position in 0..624, ``gauss_next`` None or finite), torch's CPU state and
    each CUDA state (uint8 tensors that a scratch generator accepts; CUDA states are checked
    against this machine's devices only when it has them).

    Args:
        state: the stored entry (``{"torch", "numpy", "python"}`` and optionally ``"cuda"``).
        where: the checkpoint, as errors name it.
        field: the entry's path in the checkpoint, as errors name it.

    Returns:
        The states in the form each generator takes (``set_rng_state`` restores them).

    Raises:
        CorruptionError: names the checkpoint and the first malformed field.
    """
    if not isinstance(state, Mapping):
        raise _malformed_rng(where, field, f"is {type(state).__name__}, not a mapping")
    if "torch" not in state:
        raise _malformed_rng(where, f"{field}.torch", "is missing")
    for key in ("numpy", "python"):
        if not isinstance(state.get(key), Mapping):
            raise _malformed_rng(where, f"{field}.{key}", "is missing or not a mapping")
    cpu = _check_torch_state(where, f"{field}.torch", state["torch"])
    n, p = state["numpy"], state["python"]
    missing = [f"numpy.{k}" for k in ("kind", "keys", "pos", "has_gauss", "cached") if k not in n]
    missing += [f"python.{k}" for k in ("version", "internal", "gauss_next") if k not in p]
    if missing:
        raise _malformed_rng(where, f"{field}.{missing[0]}", "is missing")
    if n["kind"] != "MT19937" or type(n["kind"]) is not str:
        raise _malformed_rng(where, f"{field}.numpy.kind", "is not 'MT19937'")
    keys = n["keys"]
    if not isinstance(keys, torch.Tensor) or keys.dtype != torch.uint32:
        kind = keys.dtype if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise _malformed_rng(where, f"{field}.numpy.keys", f"is {kind}, not a uint32 tensor (nothing is cast)")
    words = keys.detach().cpu().numpy()
    if (why := _mt_words(words)) is not None:
        raise _malformed_rng(where, f"{field}.numpy.keys", why)
    if not _integer(n["pos"]) or not 0 <= n["pos"] <= _MT_WORDS:
        raise _malformed_rng(where, f"{field}.numpy.pos", f"is {_shown(n['pos'])}, not an integer in 0..{_MT_WORDS}")
    if not _integer(n["has_gauss"]) or n["has_gauss"] not in (0, 1):
        raise _malformed_rng(where, f"{field}.numpy.has_gauss", f"is {_shown(n['has_gauss'])}, not 0 or 1")
    if not _finite(n["cached"]):
        raise _malformed_rng(where, f"{field}.numpy.cached", f"is {_shown(n['cached'])}, not a finite number")
    if not _integer(p["version"]) or p["version"] != 3:
        raise _malformed_rng(
            where, f"{field}.python.version", f"is {_shown(p['version'])}, not 3 (random.getstate()'s)"
        )
    internal = p["internal"]
    if not isinstance(internal, (list, tuple)) or len(internal) != _MT_WORDS + 1:
        raise _malformed_rng(where, f"{field}.python.internal", f"is not a list of {_MT_WORDS + 1} integers")
    if (why := _mt_words(internal[:_MT_WORDS])) is not None:
        raise _malformed_rng(where, f"{field}.python.internal", why)
    if not _integer(internal[-1]) or not 0 <= internal[-1] <= _MT_WORDS:
        raise _malformed_rng(
            where, f"{field}.python.internal[-1]", f"(the position) is {_shown(internal[-1])}, not in 0..{_MT_WORDS}"
        )
    gauss = p["gauss_next"]
    if gauss is not None and not _finite(gauss):
        raise _malformed_rng(
            where, f"{field}.python.gauss_next", f"is {_shown(gauss)}, neither None nor a finite number"
        )
    return Generators(
        torch=cpu,
        numpy=("MT19937", words.copy(), n["pos"], n["has_gauss"], float(n["cached"])),
        python=(3, tuple(internal), None if gauss is None else float(gauss)),
        cuda=_check_cuda_states(where, f"{field}.cuda", state.get("cuda")),
    )


def _check_cuda_states(where: str, field: str, states: Any) -> tuple[torch.Tensor, ...] | None:
    """The CUDA states to restore: one per device this machine has, up to as many as were kept
    (None without CUDA or without states). Each is checked as a uint8 tensor; on a machine
    with CUDA, by a scratch generator of its device too."""
    if states is None:
        return None
    if not isinstance(states, (list, tuple)):
        raise _malformed_rng(where, field, f"is {type(states).__name__}, not a list of states")
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i, s in enumerate(states):
        if i < devices:
            _check_torch_state(where, f"{field}[{i}]", s, device=f"cuda:{i}")
        elif not isinstance(s, torch.Tensor) or s.dtype != torch.uint8 or s.dim() != 1:
            raise _malformed_rng(where, f"{field}[{i}]", "is not a 1-D uint8 tensor")
    return tuple(states[:devices]) if devices else None


def _get_generators() -> Generators:
    cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None
    return Generators(torch.get_rng_state(), np.random.get_state(), random.getstate(), cuda)


def _put_generators(g: Generators) -> None:
    torch.set_rng_state(g.torch)
    np.random.set_state(g.numpy)
    random.setstate(g.python)
    for i, s in enumerate(g.cuda or ()):
        torch.cuda.set_rng_state(s, i)


def set_rng_state(state: Mapping | Generators, where: str = "the checkpoint") -> None:
    """Restore the random number generators from a checkpoint's ``rng`` entry, all of them or
    none: the entry is checked first (``check_rng_state``; CorruptionError names the checkpoint
    ``where`` and the malformed field), and a failure while setting puts back every generator.

    Args:
        state: a checkpoint's ``rng`` entry, or what ``check_rng_state`` returned for one.
        where: the checkpoint, as errors name it.
    """
    checked = state if isinstance(state, Generators) else check_rng_state(state, where)
    before = _get_generators()
    try:
        _put_generators(checked)
    except BaseException:
        _put_generators(before)
        raise


@dataclass(frozen=True)
class Staged:
    """A checkpoint captured for a write that happens later (an async checkpoint): CPU copies
    of the model's state dict, its weight-free skeleton, and the rest of the checkpoint
    (optimizer, scheduler, RNG, counters) stored in the same Lance version under their own keys."""

    state_dict: Mapping[str, torch.Tensor]
    skeleton: bytes
    extra: Mapping[str, Any]

    def capture(self, compression: str | None = None) -> flavor.Capture:
        """What the flavor saves: the whole tree, checked once, the model's tensors under "model/"
        (``compression``: log_checkpoint's; encoded where the data files are written)."""
        tree_ = writer.prepare({MODEL_KEY: self.state_dict, **self.extra})
        return flavor.Capture(tree_, self.skeleton, tree.subtree_prefix(MODEL_KEY), compression=compression)


def _stage(
    model,
    optimizer,
    scheduler,
    *,
    step: int,
    metrics: Mapping | None,
    extra: Mapping | None,
    clone: bool = True,
) -> Staged:
    """Everything a checkpoint holds, on the CPU (copied when ``clone``: training may go on)."""
    copy = _copier(clone)
    model_state = model.state_dict(keep_vars=True)
    if not tree.is_flat(model_state):
        raise TypeError(
            f"log_checkpoint takes models whose state dict holds dense tensors only; {type(model).__name__}'s "
            f"holds packed, quantized or sparse entries (a torch.ao quantized model?). Log it with "
            f"log_model() or its state dict with log_state_dict()."
        )
    state_dict = {k: copy(v) for k, v in model_state.items()}  # tied: one object
    rest: dict[str, Any] = {
        "step": int(step),
        "metrics": dict(metrics or {}),
        "extra": _deep_copy(dict(extra or {}), copy),
    }
    if optimizer is not None:
        rest["optimizer"] = _deep_copy(_named_optimizer_state(model, optimizer), copy)
    if scheduler is not None:
        rest["scheduler"] = _deep_copy(scheduler.state_dict(), copy)
    rest["rng"] = _rng_state()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the pinned copies are complete before training moves on
    return Staged(state_dict=state_dict, skeleton=dump_skeleton(model), extra=rest)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class Checkpoint:
    """A logged checkpoint: its logged model, step and Lance version."""

    model_id: str
    model_uri: str
    run_id: str
    step: int
    lance_uri: str
    lance_version: int
    deleted: tuple[str, ...] = ()  # logged models retention deleted after this one


class CheckpointHandle:
    """What ``log_checkpoint(blocking=False)`` returns: ``result()`` waits for the write."""

    def __init__(self, future: Future):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Checkpoint:
        try:
            return self._future.result(timeout)
        finally:
            if self._future.done():
                _writer.surfaced(self._future)


class _Writer:
    """One background thread, at most one checkpoint in flight; each error surfaces once
    (at ``handle.result()``, the next ``log_checkpoint`` or ``wait_for_checkpoints``)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None
        self._surfaced: set[int] = set()
        self._lock = threading.Lock()

    def surfaced(self, future: Future) -> None:
        with self._lock:
            self._surfaced.add(id(future))

    def wait(self) -> None:
        """Wait for the checkpoint in flight; raise its error unless it was raised already."""
        with self._lock:
            future = self._inflight
        if future is None:
            return
        error = future.exception()  # waits
        with self._lock:
            if self._inflight is future:
                self._inflight = None  # nothing keeps the staged copy alive any more
            seen = id(future) in self._surfaced
            self._surfaced.discard(id(future))
        if error is not None and not seen:  # its own type, so callers can catch what failed
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note("(raised by an earlier log_checkpoint(blocking=False): that checkpoint was not written)")
            raise error

    def submit(self, fn, *args) -> Future:
        self.wait()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="mlflow-lance-checkpoint")
            self._inflight = self._pool.submit(fn, *args)
            return self._inflight


_writer = _Writer()


def wait_for_checkpoints() -> None:
    """Wait until the checkpoint in flight (``log_checkpoint(..., blocking=False)``) is written.

    Raises:
        Exception: the error of a background write that failed and was not raised yet, of its
            own type.

    Example:
        >>> log_checkpoint(model, optimizer, step=500, blocking=False)
        >>> wait_for_checkpoints()
    """
    _writer.wait()


@atexit.register
def _flush_at_exit() -> None:
    try:
        _writer.wait()
    except Exception as err:  # noqa: BLE001 (any background failure, its own type: nothing to raise to at exit, say it)
        import sys

        print(f"mlflow-lance: an earlier checkpoint failed to write: {type(err).__name__}: {err}", file=sys.stderr)


def _checkpoint_dataset(run: Any, lance_uri: str | None) -> str:
    """One dataset per run: each checkpoint deduplicates against the run's previous one."""
    if lance_uri:
        return lance_uri
    experiment = mlflow.get_experiment(run.info.experiment_id)
    root = lance_root(experiment.artifact_location, run.info.experiment_id)
    return f"{root}/experiments/{run.info.experiment_id}/checkpoints/{run.info.run_id}.lance"


def _write(
    capture: Callable[[], flavor.Capture],
    model: torch.nn.Module,
    run_id: str,
    step: int,
    metrics: Mapping | None,
    name: str,
    lance_uri: str,
    keep_last: int | None,
    keep_best: tuple | None,
) -> Checkpoint:
    client = MlflowClient()
    if metrics:  # logged to the run first: MLflow links a step's metrics to the model logged at it
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
    tags = {_STEP_TAG: str(step), _METRICS_TAG: json.dumps({k: float(v) for k, v in (metrics or {}).items()})}
    info = flavor._log(
        model,
        name,
        capture(),
        step=step,
        run_id=run_id,
        lance_uri=lance_uri,
        pip_requirements=None,
        tags=tags,
    )
    conf = info.flavors[flavor.FLAVOR_NAME]
    deleted = _retain(client, run_id, name, keep_last, keep_best, info.model_id) if keep_last or keep_best else ()
    return Checkpoint(
        info.model_id,
        f"models:/{info.model_id}",
        run_id,
        step,
        conf["lance_uri"],
        int(conf["lance_version"]),
        tuple(deleted),
    )


def log_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int,
    scheduler: Any = None,
    metrics: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    blocking: bool = True,
    keep_last: int | None = None,
    keep_best: tuple[str, str, int] | None = None,
    name: str = CHECKPOINT_NAME,
    lance_uri: str | None = None,
    compression: str | None = None,
) -> Checkpoint | CheckpointHandle:
    """Log a training checkpoint to the active run (started if none).

    The model's weights, the optimizer's and scheduler's state, the RNGs, ``step``,
    ``metrics`` and ``extra`` become one version of the run's dataset (writing only what
    changed since the run's previous checkpoint) and one MLflow logged model.

    Args:
        model: the module being trained.
        optimizer / scheduler: their state is stored (the optimizer's keyed by parameter name).
        step: the training step (the checkpoint's step in MLflow).
        metrics: logged to the run at ``step`` and linked to the checkpoint.
        extra: anything else to keep (numbers, strings, lists, dicts, tensors; never pickled).
        blocking: False returns once the state is copied to CPU memory; one background thread
            writes (at most one in flight; the next call waits), and a background failure is
            raised by the next call, ``wait_for_checkpoints()`` or the handle.
        keep_last / keep_best: delete the run's other checkpoints as logged models afterwards
            (never one registered as a model version); ``mlflow-lance gc`` reclaims their bytes.
        name / lance_uri: the logged model's name; an explicit dataset.
        compression: how the run's dataset stores payloads, chosen by its first checkpoint and
            fixed for the run: None (default) or ``"none"``: raw bytes, the fastest to load;
            ``"auto"``: byte-grouped zstd per tensor (~0.68x the bytes of bf16 weights, ~0.85x
            of fp32), worth it on object storage or through an MLflow artifact proxy;
            ``"zstd"``: one zstd frame per payload. Encoding runs where the data files are
            written: in the background thread when ``blocking=False``, never while training
            waits. A value other than the run's dataset was created with raises ValueError.

    Returns:
        A Checkpoint (model id, URI, Lance version), or a CheckpointHandle when not blocking.

    Raises:
        ValueError: ``keep_last`` < 1, a malformed ``keep_best``, or its metric missing from
            ``metrics``; nothing is written.
        TypeError / ValueError: state that cannot be stored (nothing is ever pickled).
        Exception: the error of an earlier background write, of its own type.

    Example:
        >>> log_checkpoint(model, optimizer, step=500, metrics={"val_loss": 0.3}, blocking=False,
        ...                keep_best=("val_loss", "min", 3))
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if keep_best is not None:
        metric, mode, k = keep_best
        if mode not in ("min", "max") or int(k) < 1:
            raise ValueError(f"keep_best must be (metric, 'min' or 'max', k >= 1), got {keep_best!r}")
        if metrics is None or metric not in metrics:
            raise ValueError(f"keep_best ranks by {metric!r}; pass it in metrics=")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "log_checkpoint takes the nn.Module being trained, not a TorchScript module; "
            "log the scripted program with mlflow_lance.log_model()"
        )
    check_compression(compression)
    _writer.wait()  # an earlier background failure surfaces here, before more work is queued
    if distributed.collective(model):
        return _log_sharded(
            model,
            optimizer,
            scheduler,
            step=int(step),
            metrics=dict(metrics or {}),
            extra=extra,
            blocking=blocking,
            retention=(keep_last, keep_best),
            name=name,
            lance_uri=lance_uri,
            compression=compression,
        )
    run = mlflow.active_run() or mlflow.start_run()
    staged = _stage(model, optimizer, scheduler, step=step, metrics=metrics, extra=extra, clone=not blocking)
    dataset = _checkpoint_dataset(run, lance_uri)
    args = (
        functools.partial(staged.capture, compression),
        model,
        run.info.run_id,
        int(step),
        dict(metrics or {}),
        name,
        dataset,
        keep_last,
        keep_best,
    )
    if blocking:
        return _write(*args)
    return CheckpointHandle(_writer.submit(_write, *args))


# --------------------------------------------------------------------------- under torch.distributed


def _log_sharded(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    *,
    step: int,
    metrics: dict[str, float],
    extra: Mapping[str, Any] | None,
    blocking: bool,
    retention: tuple[int | None, tuple | None],
    name: str,
    lance_uri: str | None,
    compression: str | None = None,
) -> Checkpoint | CheckpointHandle:
    """``log_checkpoint`` of a model sharded over the process group, every rank calling: rank 0
    names the run and its dataset; each rank stages its own shards (``get_state_dict``) and
    writes them; rank 0 logs one logged model whose save commits one version; every rank gets
    the same Checkpoint (or error) back. The RNG states of all ranks are kept ("rng" is rank
    0's, "rng_by_rank" every rank's). Numbers and strings in ``extra`` and the scheduler's
    state are rank 0's; their plain tensors (like any tensor that is not a DTensor) are taken
    to be the same on every rank and written by one of them."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    group = distributed.checkpoint_group()
    rank = dist.get_rank(group)

    def where() -> tuple[str, str, dict | None]:
        run = mlflow.active_run() or mlflow.start_run()
        location, _, _ = flavor._location_for(name, None, _checkpoint_dataset(run, lance_uri), None, run.info.run_id)
        return run.info.run_id, location.uri, location.storage_options

    run_id, uri, uri_options = distributed.from_rank0(where, group, "starting the checkpoint's run")
    rngs = gathered_rng_states(group)
    shards, spec, skeleton, failed = {}, None, None, None
    try:  # a failure here is every rank's, at the first step of the write
        if optimizer is not None:
            model_state, optimizer_state = get_state_dict(model, optimizer)
        else:
            model_state, optimizer_state = get_model_state_dict(model), None
        state: dict[str, Any] = {
            MODEL_KEY: dict(model_state),
            "step": step,
            "metrics": metrics,
            "extra": dict(extra or {}),
        }
        if optimizer_state is not None:
            state["optimizer"] = optimizer_state
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        state.update(rng=rngs[0], rng_by_rank=rngs)
        flat, spec = tree.flatten(state)
        shards = distributed.stage(flat, clone=not blocking)
        skeleton = dump_skeleton(distributed.unwrapped(model)) if rank == 0 else None
    except Exception as err:  # noqa: BLE001 (raised on every rank by distributed.write_and_commit)
        failed = err
    dataset = Dataset(uri, uri_options)
    args = (shards, spec, skeleton, failed, group, model, run_id, step, metrics, name, dataset, *retention, compression)
    if blocking:
        return _write_sharded(*args)
    future = _writer.submit(_write_sharded, *args)
    distributed.track(future)
    return CheckpointHandle(future)


def _write_sharded(
    shards: Mapping[str, distributed.Shard],
    spec: dict | None,
    skeleton: bytes | None,
    failed: BaseException | None,
    group: Any,
    model: torch.nn.Module,
    run_id: str,
    step: int,
    metrics: dict[str, float],
    name: str,
    dataset: Dataset,
    keep_last: int | None,
    keep_best: tuple | None,
    compression: str | None = None,
) -> Checkpoint:
    """Every rank writes its shards; rank 0 logs the checkpoint (committing the version) and
    applies retention; the Checkpoint, or the first error (``failed``: this rank's staging),
    on every rank."""

    def log(written: writer.Written) -> Checkpoint:
        capture = flavor.Capture(None, skeleton, tree.subtree_prefix(MODEL_KEY), written=written)
        plain = distributed.unwrapped(model)
        return _write(lambda: capture, plain, run_id, step, metrics, name, dataset.uri, keep_last, keep_best)

    return distributed.write_and_commit(
        shards,
        dataset,
        log,
        group=group,
        what="logging the checkpoint",
        failed=failed,
        spec=spec,
        compression=compression,
    )


def _load_sharded(
    uri: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    *,
    restore_rng: bool,
    strict: bool,
) -> dict[str, Any]:
    """``load_checkpoint`` into a model sharded over the process group, every rank calling:
    rank 0 resolves the URI to one version; each rank reads only the bytes of its own shards
    (at any world size) and hands them to ``set_state_dict``; its own RNG state when the
    checkpoint has one for its rank, else rank 0's."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    distributed.settle()
    group = distributed.checkpoint_group()
    rank = dist.get_rank(group)

    def where() -> tuple[str, str, int]:
        resolved = _resolve(uri)
        with modelload.model_pointer(resolved) as pointer:
            if pointer is None:
                raise store.WeightsError(f"{uri} is neither an MLflow model URI nor a model directory")
        return (resolved, *pointer)

    resolved, dataset, version = distributed.from_rank0(where, group, "resolving the checkpoint")
    stored, template, error = None, None, None
    generators: Generators | None = None
    undo: list[Callable[[], None]] = []
    try:
        if optimizer is not None:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            template = {MODEL_KEY: dict(model_state), "optimizer": optimizer_state}
        else:
            template = {MODEL_KEY: dict(get_model_state_dict(model))}
    except Exception as err:  # noqa: BLE001 (raised on every rank by agree)
        error = err
    distributed.agree(error, group, "preparing the load", outcome="")  # before load's own collectives
    try:  # every rank reads its own shards; any rank's failure is every rank's, before anything changes
        stored = distributed.load(
            template,
            dataset,
            version,
            storage_options=options(dataset),
            strict=strict,
            skip=() if optimizer is not None else (tree.subtree_prefix("optimizer"),),
        )
        if not isinstance(stored, Mapping) or MODEL_KEY not in stored or "step" not in stored:
            raise store.WeightsError(f"{uri} is not a checkpoint logged by mlflow_lance.log_checkpoint")
        _check_wanted(uri, stored, optimizer, scheduler, restore_rng)
        if why := _malformed(stored):
            raise store.CorruptionError(f"the checkpoint at {uri} is malformed: {why}")
        if optimizer is not None:
            _check_optimizer_state(uri, stored["optimizer"])
        if restore_rng:  # this rank's own generators where the checkpoint kept them, else rank 0's
            checked = check_rng_states(stored, uri)
            generators = checked.get(f"rng_by_rank[{rank}]", checked["rng"])
        if scheduler is not None:  # loaded here, so that any rank's refusal puts it back on all
            undo.append(_load_scheduler(uri, scheduler, stored["scheduler"]))
    except Exception as err:  # noqa: BLE001 (raised on every rank by agree)
        error = err
    try:
        distributed.agree(error, group, "loading the checkpoint", outcome="")
        opts = StateDictOptions(strict=strict)
        if optimizer is not None:
            set_state_dict(
                model, optimizer, model_state_dict=stored[MODEL_KEY], optim_state_dict=stored["optimizer"], options=opts
            )
        else:
            set_model_state_dict(model, stored[MODEL_KEY], options=opts)
    except BaseException:
        for put_back in undo:
            put_back()
        raise
    if generators is not None:
        set_rng_state(generators)
    return {
        "step": stored["step"],
        "metrics": stored.get("metrics", {}),
        "extra": stored.get("extra", {}),
        "model_uri": resolved,
    }


# --------------------------------------------------------------------------- retention


def _checkpoints(client: MlflowClient, run_id: str, name: str) -> list[Any]:
    """The run's checkpoints MLflow still lists (finished writes only)."""
    run = client.get_run(run_id)
    found = bindings.paged(
        client.search_logged_models,
        experiment_ids=[run.info.experiment_id],
        filter_string=f"name = {bindings.quote_filter(name)}",
        max_results=1000,
    )
    return [
        m
        for m in found
        if m.source_run_id == run_id and m.status == LoggedModelStatus.READY and _STEP_TAG in (m.tags or {})
    ]


def _retain(
    client: MlflowClient, run_id: str, name: str, keep_last: int | None, keep_best: tuple | None, newest: str
) -> list[str]:
    """Delete the run's checkpoints outside keep_last / keep_best; the ids deleted.

    The checkpoint just written (``newest``) and registered ones always stay; "last" means
    most recently written (a run that resumed from an earlier step goes on from there); a
    NaN or missing metric ranks worst.
    """
    models = _checkpoints(client, run_id, name)
    keep: set[str] = {newest}
    if keep_last:
        recent = sorted(models, key=lambda m: (m.creation_timestamp, int(m.tags[_STEP_TAG])), reverse=True)
        keep |= {m.model_id for m in recent[:keep_last]}
    if keep_best:
        metric, mode, k = keep_best
        scored = [
            (v if mode == "min" else -v, m.model_id)
            for m in models
            if (v := _metric(m, metric)) is not None and math.isfinite(v)
        ]
        keep |= {mid for _, mid in sorted(scored)[: int(k)]}
    registered = set()
    for mv in client.search_model_versions(f"run_id = {bindings.quote_filter(run_id)}"):
        found = _REGISTERED_SOURCE.search(mv.source or "")
        registered |= {found.group(1)} if found else set()
        registered |= {mv.model_id} if getattr(mv, "model_id", None) else set()
    deleted = []
    for m in models:
        if m.model_id not in keep and m.model_id not in registered:
            client.delete_logged_model(m.model_id)
            deleted.append(m.model_id)
    return deleted


def _metric(model: Any, key: str) -> float | None:
    """The checkpoint's own value of ``key`` (from its tag, not the run's metrics at its step)."""
    try:
        value = json.loads((model.tags or {}).get(_METRICS_TAG) or "{}").get(key)
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


# --------------------------------------------------------------------------- loading


def _resolve(uri: str) -> str:
    """``runs:/<run id>/<name>`` names the run's latest checkpoint (by step); else as is."""
    if not uri.startswith("runs:"):
        return uri
    run_id, name = bindings.runs_uri(uri)
    models = _checkpoints(MlflowClient(), run_id, name or CHECKPOINT_NAME)
    if not models:
        raise store.VersionNotFoundError(f"run {run_id!r} has no finished checkpoint named {name!r}")
    latest = max(models, key=lambda m: (m.creation_timestamp, int(m.tags[_STEP_TAG])))  # the last written
    return f"models:/{latest.model_id}"


def load_checkpoint(
    uri: str,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    restore_rng: bool = True,
    strict: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint in place, so that training goes on as if it had never stopped.

    Restored: the model's weights, the optimizer's and scheduler's state and the RNGs.

    All or nothing: every part asked for is checked before any is restored (the model's keys
    and shapes, the optimizer's state and groups against the live optimizer, the scheduler's
    keys and kinds against its own, every generator state), and a part that torch still
    refuses puts back the parts restored before it. A refusal leaves the model, optimizer,
    scheduler and generators as they were.

    Args:
        uri: ``models:/<model id>``, ``runs:/<run id>/checkpoint`` (the run's latest), or a
            model directory.
        model / optimizer / scheduler: what to restore (the optimizer needs its model: its
            state is stored by parameter name).
        restore_rng: also restore torch's, numpy's and Python's generators.
        strict: refuse missing and unexpected model keys.

    Returns:
        ``{"step", "metrics", "extra", "model_uri"}`` of the checkpoint restored.

    Raises:
        WeightsError: not a checkpoint, it lacks the optimizer / scheduler / RNG state asked for,
            or its model state does not fit the model (nothing is restored).
        CorruptionError: its stored state is malformed, naming the checkpoint and the field
            (nothing is restored).

    Example:
        >>> state = load_checkpoint("runs:/<run id>/checkpoint", model, optimizer, scheduler)
        >>> start = state["step"] + 1
    """
    if optimizer is not None and model is None:
        raise ValueError("pass the model too: optimizer state is stored by parameter name")
    if model is not None and distributed.collective(model):
        return _load_sharded(uri, model, optimizer, scheduler, restore_rng=restore_rng, strict=strict)
    state = read_checkpoint(uri)
    _check_wanted(uri, state, optimizer, scheduler, restore_rng)
    if model is not None:
        _check_model_state(uri, model, state["model"], strict)
    indexed = None
    if optimizer is not None:
        _check_optimizer_state(uri, state["optimizer"])
        indexed = _indexed_optimizer_state(model, optimizer, state["optimizer"])
    generators = check_rng_states(state, uri)["rng"] if restore_rng else None
    undo: list[Callable[[], None]] = []  # puts back each part restored, should a later one fail
    try:
        if scheduler is not None:
            undo.append(_load_scheduler(uri, scheduler, state["scheduler"]))
        if optimizer is not None:
            undo.append(_load_optimizer(uri, optimizer, indexed))
        if generators is not None:
            before = _get_generators()
            undo.append(lambda: _put_generators(before))
            set_rng_state(generators)
        if model is not None:
            model.load_state_dict(state["model"], strict=strict)
    except BaseException:
        for put_back in reversed(undo):
            put_back()
        raise
    return {
        "step": state["step"],
        "metrics": state.get("metrics", {}),
        "extra": state.get("extra", {}),
        "model_uri": state["model_uri"],
    }


def _check_wanted(uri: str, state: Mapping, optimizer: Any, scheduler: Any, restore_rng: bool) -> None:
    """Refuse, before restoring anything, a checkpoint that lacks a state asked for."""
    for wanted, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (restore_rng or None, "rng")):
        if wanted is not None and key not in state:
            raise store.WeightsError(
                f"{uri} holds no {key} state" + (" (pass restore_rng=False)" if key == "rng" else "")
            )


def check_rng_states(state: Mapping, where: str) -> dict[str, Generators]:
    """Every generator state a stored checkpoint keeps, checked (``check_rng_state``): ``rng``,
    and each rank's under ``rng_by_rank``, at the top level (a sharded checkpoint) or in
    ``extra`` (where the Lightning integration keeps them when rank 0 logs for all).

    Args:
        state: the stored checkpoint (``read_checkpoint``'s form).
        where: the checkpoint, as errors name it.

    Returns:
        The checked states by field: ``"rng"``, ``"rng_by_rank[1]"``, ``"extra.rng_by_rank[1]"``.

    Raises:
        CorruptionError: names the checkpoint and the first malformed field.
    """
    out = {"rng": check_rng_state(state.get("rng"), where)}
    extra = state.get("extra")
    for field, by_rank in (
        ("rng_by_rank", state.get("rng_by_rank")),
        ("extra.rng_by_rank", extra.get("rng_by_rank") if isinstance(extra, Mapping) else None),
    ):
        if by_rank is None:
            continue
        if not isinstance(by_rank, (list, tuple)):
            raise _malformed_rng(where, field, f"is {type(by_rank).__name__}, not a list (one entry per rank)")
        for rank, entry in enumerate(by_rank):
            out[f"{field}[{rank}]"] = check_rng_state(entry, where, f"{field}[{rank}]")
    return out


def _check_model_state(where: str, model: torch.nn.Module, stored: Mapping, strict: bool) -> None:
    """Refuse, before the model changes, a stored state dict that ``load_state_dict`` would
    load only in part: missing or unexpected keys (with ``strict``), or a shape that differs
    from the model's (torch copies the tensors that fit before it raises for the rest)."""
    live = model.state_dict()
    missing = [k for k in live if k not in stored]
    unexpected = [k for k in stored if k not in live]
    if strict and (missing or unexpected):
        raise store.WeightsError(
            f"{where} does not fit the model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]} "
            f"(strict=False loads the keys both have); nothing was restored"
        )
    for key, value in stored.items():
        mine = live.get(key)
        if mine is not None and not torch.nn.parameter.is_lazy(mine) and value.shape != mine.shape:
            raise store.WeightsError(
                f"{where} does not fit the model: {key!r} is {list(value.shape)} in the checkpoint and "
                f"{list(mine.shape)} in the model; nothing was restored"
            )


def _malformed_optimizer(where: str, field: str, why: str) -> store.CorruptionError:
    return store.CorruptionError(
        f"{where}: the checkpoint's optimizer state is malformed: {field} {why}; nothing was restored"
    )


def _state_value(value: Any) -> bool:
    """Whether ``value`` can be an optimizer's per-parameter state: tensors, numbers, None, and
    lists, tuples or str-keyed mappings of those (torch's load casts every tensor in them and
    rebuilds every other iterable: a string would come back as another string)."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_state_value(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _state_value(v) for k, v in value.items())
    return False


def _check_optimizer_state(where: str, named: Mapping) -> None:
    """Refuse what torch's ``Optimizer.load_state_dict`` (and the optimizers' ``__setstate__``,
    which turn a ``step`` into a tensor) would fail on or garble: every ``step`` a finite
    number or a one-element real tensor, every other state value tensors or numbers."""
    for name, entry in named["state"].items():
        for key, value in entry.items():
            field = f"optimizer.state[{name!r}][{key!r}]"
            if key == "step":
                if not (
                    _finite(value)
                    or (
                        isinstance(value, torch.Tensor)
                        and value.numel() == 1
                        and not value.dtype.is_complex
                        and value.dtype != torch.bool
                        and bool(torch.isfinite(value).all())
                    )
                ):
                    shown = "a tensor" if isinstance(value, torch.Tensor) else _shown(value)
                    raise _malformed_optimizer(where, field, f"is {shown}, not a finite number or a one-element tensor")
            elif not _state_value(value):
                raise _malformed_optimizer(where, field, f"holds a {type(value).__name__}, not tensors or numbers")


def _load_optimizer(where: str, optimizer: torch.optim.Optimizer, indexed: dict) -> Callable[[], None]:
    """Load the checked state with torch's own ``load_state_dict``; if torch still refuses it,
    put the optimizer back as it was and raise CorruptionError naming the checkpoint. Returns
    what puts it back (should a later part of the checkpoint fail)."""
    before = optimizer.state_dict()  # references the live state: a load replaces, never mutates, it

    def put_back() -> None:
        optimizer.load_state_dict(before)

    try:
        optimizer.load_state_dict(indexed)
    except Exception as err:  # anything torch raises here is about the stored state
        put_back()
        raise store.CorruptionError(
            f"{where}: the optimizer refused the checkpoint's optimizer state ({type(err).__name__}: "
            f"{str(err)[:300]}); nothing was restored"
        ) from err
    return put_back


def _scheduler_value_fits(saved: Any, live: Any) -> bool:
    """Whether a stored scheduler attribute can stand where the scheduler has ``live``."""
    if live is None:
        return True
    if isinstance(live, bool) or isinstance(saved, bool):
        return type(saved) is type(live)
    if isinstance(live, (int, float, torch.Tensor)):
        return isinstance(saved, (int, float, torch.Tensor))
    if isinstance(live, Mapping):
        return isinstance(saved, Mapping)
    if isinstance(live, (list, tuple)):
        return isinstance(saved, (list, tuple))
    return type(saved) is type(live)


def _load_scheduler(where: str, scheduler: Any, saved: Any) -> Callable[[], None]:
    """Load a stored scheduler state whose keys are the scheduler's own (a scheduler loads by
    updating its attributes: another key would shadow a method) and whose values are of the
    kinds its own are; if the scheduler still refuses it (a mode it does not know, a nested
    scheduler's state), put it back as it was and raise CorruptionError naming the checkpoint.
    Returns what puts it back (should a later part of the checkpoint fail)."""
    live = scheduler.state_dict()  # its values are replaced by a load, not mutated
    if not isinstance(saved, Mapping):
        raise store.CorruptionError(f"{where}: the checkpoint's scheduler state is not a mapping; nothing was restored")
    unknown = [k for k in saved if k not in live]
    wrong = [k for k in saved if k in live and not _scheduler_value_fits(saved[k], live[k])]
    if unknown or wrong:
        raise store.CorruptionError(
            f"{where}: the checkpoint's scheduler state does not fit {type(scheduler).__name__}: "
            + (f"keys it does not have {[str(k)[:60] for k in unknown[:5]]}" if unknown else "")
            + ("; " if unknown and wrong else "")
            + (f"values of another kind for {wrong[:5]}" if wrong else "")
            + "; nothing was restored"
        )

    def put_back() -> None:
        scheduler.load_state_dict(live)

    try:
        scheduler.load_state_dict(dict(saved))
    except Exception as err:  # anything the scheduler raises here is about the stored state
        put_back()
        raise store.CorruptionError(
            f"{where}: {type(scheduler).__name__} refused the checkpoint's scheduler state "
            f"({type(err).__name__}: {str(err)[:300]}); nothing was restored"
        ) from err
    return put_back


def read_checkpoint(uri: str) -> dict[str, Any]:
    """A checkpoint as stored, restoring nothing: ``model`` (the state dict), ``optimizer`` (keyed
    by parameter name), ``scheduler``, ``rng``, ``step``, ``metrics``, ``extra``, and the
    ``model_uri`` it was read from (``runs:/<run id>/checkpoint`` resolved to the latest)."""
    resolved = _resolve(uri)
    state = modelload.model_state_dict(resolved)
    if not isinstance(state, Mapping) or "model" not in state or "step" not in state:
        raise store.WeightsError(f"{uri} is not a checkpoint logged by mlflow_lance.log_checkpoint")
    why = _malformed(state)
    if why:
        raise store.CorruptionError(f"the checkpoint at {uri} is malformed: {why}")
    return {**state, "model_uri": resolved}


def _malformed(state: Mapping) -> str | None:
    """What in a stored checkpoint does not have the shape log_checkpoint writes, or None."""
    if not isinstance(state["model"], Mapping) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        return "'model' is not a state dict"
    if type(state["step"]) is not int:
        return "'step' is not an int"
    for key in ("metrics", "extra"):
        if key in state and not isinstance(state[key], Mapping):
            return f"{key!r} is not a mapping"
    optim = state.get("optimizer")
    if optim is not None and not (
        isinstance(optim, Mapping)
        and isinstance(optim.get("state"), Mapping)
        and all(isinstance(k, str) and isinstance(v, Mapping) for k, v in optim["state"].items())
        and isinstance(optim.get("param_groups"), list)
        and all(
            isinstance(g, Mapping)
            and isinstance(g.get("params"), list)
            and all(isinstance(n, str) for n in g["params"])
            for g in optim["param_groups"]
        )
    ):
        return "'optimizer' is not a name-keyed optimizer state"
    return None


def optimizer_state_in_saved_order(named: Mapping) -> dict:
    """A stored (name-keyed) optimizer state in the index form ``optimizer.state_dict()`` had
    when it was saved: for frameworks that build the optimizer after reading the checkpoint."""
    index = {n: i for i, n in enumerate(n for g in named["param_groups"] for n in g["params"])}
    return {
        "state": {index[n]: s for n, s in named["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]],
    }
