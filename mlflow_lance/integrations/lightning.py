"""PyTorch Lightning: checkpoints logged through ``mlflow_lance.log_checkpoint``, and
``Trainer.fit`` resumed from one.

    from mlflow_lance.integrations.lightning import MLflowLanceCheckpoint

    trainer = L.Trainer(callbacks=[MLflowLanceCheckpoint(monitor="val_loss", save_top_k=2)])
    trainer.fit(model)                                             # logs checkpoints to the active run
    trainer.fit(model, ckpt_path="runs:/<run id>/checkpoint")      # or "models:/<model id>": resumes

The callback decides when to save as ``ModelCheckpoint`` does and asks the Trainer to save
(``trainer.save_checkpoint``), so every hook that shapes a Lightning checkpoint runs; a small
``CheckpointIO`` it installs around the strategy's own then logs the checkpoint to MLflow: the
module's weights and the optimizer's state as the checkpoint's tensors (deduplicated against
the run's previous checkpoint), and the rest of Lightning's checkpoint (loop counters, epoch,
global step, callback and scheduler states) under ``extra["lightning"]``. Loading a
``models:/`` or ``runs:/`` path rebuilds Lightning's checkpoint dict, so Lightning's own resume
restores everything; the random number generators are restored as ``fit`` starts.
Any other path goes to the strategy's own ``CheckpointIO`` unchanged.

Under ``ModelParallelStrategy`` (FSDP2 or tensor parallel applied in ``configure_model``) the
strategy reads and writes checkpoints without a ``CheckpointIO``: there the callback builds
Lightning's checkpoint dict itself (the same hooks run, but the strategy's own copy of the
weights is skipped) and every rank calls ``log_checkpoint`` with its shards; a resume from a
``models:/`` or ``runs:/`` path has every rank read its own shards (``load_checkpoint``),
at the world size of the resumed job, whatever the saving job's was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Checkpoint
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mlflow_lance.integrations.lightning needs Lightning 2.3 or later: pip install 'mlflow-lance[lightning]'"
    ) from err

from .. import checkpoint as ckpt
from .. import distributed
from ..format import check_compression

__all__ = ["MLflowLanceCheckpoint"]

_URI_PREFIXES = ("models:/", "runs:/")
_RNG_KEY = "mlflow_lance_rng"  # rides in the rebuilt Lightning dict from the IO to the callback
_RNG_BY_RANK = "rng_by_rank"  # extra[...]: every rank's generators, when rank 0 logs for all
# Not needed to resume fit (the module already exists) and often not storable without pickling.
_NOT_STORED = (
    "state_dict",
    "hyper_parameters",
    "hparams_name",
    "hparams_type",
    "datamodule_hyper_parameters",
)


@dataclass(frozen=True)
class _LogRequest:
    """What the callback asks the IO to log; passed as Lightning's ``storage_options``."""

    model: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]
    step: int
    metrics: dict[str, float] | None
    keep_last: int | None
    keep_best: tuple[str, str, int] | None
    blocking: bool
    name: str
    lance_uri: str | None
    compression: str | None = None
    rng_by_rank: list[dict] | None = None  # every rank's generators (DDP: rank 0 logs for all)


class _MLflowLanceIO(CheckpointIO):
    """Logs the checkpoints the callback asks for; reads ``models:/`` and ``runs:/`` paths;
    passes everything else to the strategy's own CheckpointIO."""

    def __init__(self, base: CheckpointIO) -> None:
        self.base = base

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if not isinstance(storage_options, _LogRequest):
            return self.base.save_checkpoint(checkpoint, path, storage_options=storage_options)
        _log(checkpoint, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not str(path).startswith(_URI_PREFIXES):
            return self.base.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        state = ckpt.read_checkpoint(str(path))
        ckpt.check_rng_states(state, str(path))  # every rank's, before Lightning restores anything
        lightning = state.get("extra", {}).get("lightning")
        if lightning is None:
            raise ValueError(
                f"{path} was not logged from Lightning (no extra['lightning']); restore it with "
                f"mlflow_lance.load_checkpoint(uri, model, optimizer) instead of Trainer.fit(ckpt_path=...)"
            )
        out = {**lightning, "state_dict": state["model"], _RNG_KEY: _own_rng(state["rng"], state)}
        if "optimizer" in state:
            out["optimizer_states"] = [ckpt.optimizer_state_in_saved_order(state["optimizer"])]
        return out

    def remove_checkpoint(self, path: Any) -> None:
        self.base.remove_checkpoint(path)

    def teardown(self) -> None:
        self.base.teardown()


def _log(checkpoint: dict[str, Any], req: _LogRequest) -> None:
    """Log Lightning's checkpoint dict: the module and optimizer as tensors, the rest as extra."""
    single = len(req.optimizers) == 1  # one optimizer: stored by parameter name with the weights
    rest = {k: v for k, v in checkpoint.items() if k not in _NOT_STORED and not (single and k == "optimizer_states")}
    extra: dict[str, Any] = {"lightning": rest}
    if req.rng_by_rank is not None:
        extra[_RNG_BY_RANK] = req.rng_by_rank
    ckpt.log_checkpoint(
        req.model,
        req.optimizers[0] if single else None,
        step=req.step,
        metrics=req.metrics,
        extra=extra,
        blocking=req.blocking,
        keep_last=req.keep_last,
        keep_best=req.keep_best,
        name=req.name,
        lance_uri=req.lance_uri,
        compression=req.compression,
    )


def _own_rng(rank0: dict, state: dict) -> dict:
    """This rank's generators from a checkpoint that kept every rank's (a sharded one at its top
    level, one rank 0 logged in ``extra``); rank 0's for a rank it did not have. Every entry was
    checked by ``check_rng_states`` (``load_checkpoint`` checks them too) before anything was
    restored."""
    import torch.distributed as dist

    by_rank = state.get(_RNG_BY_RANK) or state.get("extra", {}).get(_RNG_BY_RANK) or []
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return by_rank[rank] if rank < len(by_rank) else rank0


@contextmanager
def _weights_left_out(strategy: Strategy) -> Iterator[None]:
    """Lightning's checkpoint dict without the model's and optimizers' state dicts: under
    ``ModelParallelStrategy`` ``log_checkpoint`` takes them itself, from each rank's shards
    (the strategy's own would copy them once more, to the CPU)."""
    strategy.lightning_module_state_dict = dict  # instance attributes shadow the methods ...
    strategy.optimizer_state = lambda optimizer: {}
    try:
        yield
    finally:  # ... until they are deleted
        del strategy.lightning_module_state_dict, strategy.optimizer_state


def _install_sharded_resume(strategy: Strategy) -> None:
    """Make ``ModelParallelStrategy`` (which reads checkpoints without a ``CheckpointIO``) resume
    from ``models:/`` and ``runs:/`` paths: every rank reads its own shards of the checkpoint,
    at whatever world size it was saved; other paths go to the strategy's own loader."""
    if "load_checkpoint" in vars(strategy):  # installed by an earlier fit with this strategy
        return
    own = type(strategy).load_checkpoint

    def load_checkpoint(path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if not str(path).startswith(_URI_PREFIXES):
            return own(strategy, path, weights_only=weights_only)
        optimizers = list(strategy.optimizers)  # more than one: refused at on_fit_start, which runs first
        module = strategy.lightning_module
        before = ckpt._rng_state()
        try:  # load_checkpoint restores each rank's own generators: taken, then put back as they were
            state = ckpt.load_checkpoint(
                str(path), module, optimizers[0] if optimizers else None, strict=module.strict_loading
            )
            restored = ckpt._rng_state()
        finally:
            ckpt.set_rng_state(before)
        lightning = state["extra"].get("lightning")
        if lightning is None:
            raise ValueError(
                f"{path} was not logged from Lightning (no extra['lightning']); restore it with "
                f"mlflow_lance.load_checkpoint(uri, model, optimizer) instead of Trainer.fit(ckpt_path=...)"
            )
        return {**lightning, _RNG_KEY: _own_rng(restored, state)}  # set where the fit loop starts

    strategy.load_checkpoint = load_checkpoint


class MLflowLanceCheckpoint(Checkpoint):
    """Log Lightning checkpoints to the active MLflow run (started if none) as mlflow-lance
    checkpoints, when and which ``ModelCheckpoint`` would keep, and resume ``Trainer.fit``
    from ``ckpt_path="models:/<id>"`` or ``"runs:/<run id>/checkpoint"`` (the run's latest).

    ``monitor``/``mode``/``save_top_k`` keep the k best logged models (``keep_best``; without
    ``monitor``, ``save_top_k`` keeps the k latest; -1 keeps all, 0 logs none);
    ``save_last=True`` also keeps the latest, so that ``runs:/<run id>/checkpoint`` resumes
    from where training stopped. ``every_n_train_steps`` or ``every_n_epochs`` (default 1)
    say when. Writes run in the background (``blocking=False``) and are flushed when
    training ends. Single-device and DDP strategies (rank 0 logs the whole module), and
    ``ModelParallelStrategy`` (FSDP2 / tensor parallel: every rank logs its own shards into one
    checkpoint, which resumes at any world size, or in one process). ``FSDPStrategy`` (FSDP1)
    and DeepSpeed are refused. It takes the place of Lightning's default ``ModelCheckpoint``:
    leave ``enable_checkpointing`` on.

    Args:
        monitor / mode / save_top_k / save_last / every_n_train_steps / every_n_epochs: as
            ``ModelCheckpoint``'s.
        blocking: write in the training thread (default: in the background).
        name / lance_uri: the logged models' name; an explicit dataset.
        compression: ``log_checkpoint``'s: None (default) or ``"none"`` (raw bytes),
            ``"auto"`` (byte-grouped zstd per tensor, for object storage or an MLflow
            artifact proxy) or ``"zstd"``; encoded in the background thread.
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool = False,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        blocking: bool = False,
        name: str = ckpt.CHECKPOINT_NAME,
        lance_uri: str | None = None,
        compression: str | None = None,
    ) -> None:
        check_compression(compression)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if save_top_k < -1:
            raise ValueError(f"save_top_k must be >= -1 (-1 keeps all), got {save_top_k}")
        if (every_n_train_steps or 0) < 0 or (every_n_epochs or 0) < 0:
            raise ValueError("every_n_train_steps and every_n_epochs must be >= 0")
        if every_n_train_steps and every_n_epochs:
            raise ValueError("pass every_n_train_steps or every_n_epochs, not both (as with ModelCheckpoint)")
        self.monitor, self.mode, self.save_top_k, self.save_last = monitor, mode, save_top_k, save_last
        self.every_n_train_steps = every_n_train_steps or 0
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None else (0 if every_n_train_steps else 1)
        self.blocking, self.name, self.lance_uri = blocking, name, lance_uri
        self.compression = compression
        self._last_step_saved = -1
        self._rng: dict | None = None
        self._sharded = False  # ModelParallelStrategy: every rank logs its shards

    # ------------------------------------------------------------------ set-up and resume

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Install the IO around the strategy's own (before Lightning loads ``ckpt_path``)."""
        strategy = trainer.strategy
        self._sharded = isinstance(strategy, ModelParallelStrategy)
        if self._sharded:
            _install_sharded_resume(strategy)
        elif type(strategy).save_checkpoint is not Strategy.save_checkpoint:
            raise ValueError(
                f"{type(strategy).__name__} writes its own checkpoints (FSDP1's flat parameters or DeepSpeed's "
                f"partitions), which MLflowLanceCheckpoint cannot log; shard with FSDP2 (fully_shard) or tensor "
                f"parallelism under ModelParallelStrategy, train with DDP, or use Lightning's ModelCheckpoint"
            )
        elif not isinstance(strategy.checkpoint_io, _MLflowLanceIO):
            strategy.checkpoint_io = _MLflowLanceIO(strategy.checkpoint_io)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        rng = checkpoint.pop(_RNG_KEY, None)
        self._rng = rng if trainer.state.fn == TrainerFn.FITTING else None  # validate/test: left as they are
        if trainer.strategy.restore_checkpoint_after_setup:
            self._restore_rng()  # a strategy that restores after on_fit_start (ModelParallelStrategy)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The generators as they were when the checkpoint was taken: restored before the fit
        loop draws from them (it makes the first epoch's data iterator before ``on_train_start``)."""
        if self._sharded and len(trainer.optimizers) > 1:
            raise ValueError(
                f"MLflowLanceCheckpoint under {type(trainer.strategy).__name__} stores one optimizer's state, shard by "
                f"shard (by parameter name); this module has {len(trainer.optimizers)}: use one optimizer "
                f"(parameter groups for different settings)"
            )
        self._restore_rng()

    def _restore_rng(self) -> None:
        if self._rng is not None:
            ckpt.set_rng_state(self._rng)
            self._rng = None

    # ------------------------------------------------------------------ when to save

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saves_on_train_epoch_end(trainer):
            self._save_epoch(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._saves_on_train_epoch_end(trainer):
            self._save_epoch(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ckpt.wait_for_checkpoints()  # raises a background write's error here, with the Trainer's state intact

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ckpt.wait_for_checkpoints()

    def _saves_on_train_epoch_end(self, trainer: pl.Trainer) -> bool:
        """Where ModelCheckpoint saves by epoch: at train epoch end, unless validation runs elsewhere."""
        if trainer.check_val_every_n_epoch != 1 or getattr(trainer, "_val_check_time_interval", None) is not None:
            return False
        val = trainer.num_val_batches
        return (sum(val) if isinstance(val, list) else val) == 0 or trainer.val_check_interval == 1.0

    def _save_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer, pl_module)

    # ------------------------------------------------------------------ saving

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.save_top_k == 0
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self._last_step_saved == trainer.global_step
        ):
            return
        metrics = None
        if self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                raise KeyError(
                    f"MLflowLanceCheckpoint(monitor={self.monitor!r}) found no such metric at step "
                    f"{trainer.global_step}; logged: {sorted(trainer.callback_metrics)}. Log it with "
                    f"self.log({self.monitor!r}, value) before checkpoints are saved, or change monitor="
                )
            metrics = {self.monitor: float(value)}
        keep = self.save_top_k if self.save_top_k > 0 else None
        keep_best = (self.monitor, self.mode, keep) if keep and self.monitor else None
        keep_last = 1 if keep_best and self.save_last else (keep if keep and not self.monitor else None)
        request = _LogRequest(
            pl_module,
            list(trainer.optimizers),
            trainer.global_step,
            metrics,
            keep_last,
            keep_best,
            self.blocking,
            self.name,
            self.lance_uri,
            self.compression,
        )
        self._last_step_saved = trainer.global_step
        if self._sharded:  # no CheckpointIO: the callback builds Lightning's dict on every rank, as
            with _weights_left_out(trainer.strategy):  # save_checkpoint would (log_checkpoint takes the weights)
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            if distributed.collective(pl_module):  # every rank logs its own shards
                _log(checkpoint, request)
                return
        if trainer.world_size > 1:  # rank 0 logs the whole module, with every rank's generators
            request = replace(request, rng_by_rank=ckpt.gathered_rng_states(distributed.checkpoint_group()))
        if not self._sharded:  # through the IO installed around the strategy's own
            trainer.save_checkpoint(f"{self.name}@step={trainer.global_step}", storage_options=request)
        elif trainer.is_global_zero:  # a module configure_model left unsharded
            _log(checkpoint, request)
