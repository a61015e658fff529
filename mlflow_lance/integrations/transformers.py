"""Hugging Face ``Trainer``: checkpoints logged through ``mlflow_lance.log_checkpoint`` instead
of ``output_dir/checkpoint-*`` folders, and training resumed from one.

    from mlflow_lance.integrations.transformers import MLflowLanceTrainerCallback, resume_training

    trainer = Trainer(model, args, train_dataset=..., callbacks=[MLflowLanceTrainerCallback()])
    trainer.train()                                                 # logs checkpoints to the active run
    resume_training(trainer, "runs:/<run id>/checkpoint")           # or "models:/<model id>"

The Trainer decides when to save (``save_strategy``, ``save_steps``); the callback logs the
checkpoint at that point (after the evaluation of the same step, when there is one) and tells
the Trainer not to write its own folder. ``save_total_limit`` keeps the latest N logged models
and ``metric_for_best_model``/``greater_is_better`` keep the best one besides, as the Trainer
would. A checkpoint holds the model's state dict, the optimizer's and scheduler's state, the
random number generators and the ``TrainerState`` (global step, epoch, log history).

``resume_training`` writes the checkpoint as the folder ``Trainer.train(resume_from_checkpoint=)``
reads, in a temporary directory, and lets the Trainer's own resume logic (epochs and batches to
skip, generators restored where the data order needs them) take it from there. One process
(no multi-process RNG files); ``load_best_model_at_end`` needs the Trainer's own folders.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import IntervalStrategy
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mlflow_lance.integrations.transformers needs transformers and accelerate: "
        "pip install 'mlflow-lance[transformers]'"
    ) from err

from .. import checkpoint as ckpt
from ..format import check_compression

__all__ = ["MLflowLanceTrainerCallback", "resume_training"]

_STATE_KEY = "trainer_state"  # extra["trainer_state"]: TrainerState as the JSON the Trainer writes


class MLflowLanceTrainerCallback(TrainerCallback):
    """Log the Trainer's checkpoints to the active MLflow run (started if none) as mlflow-lance
    checkpoints, in place of its checkpoint folders. Writes run in the background
    (``blocking=False``) and are flushed when training ends.

    Args:
        blocking: write in the training loop's thread (default: in the background).
        name / lance_uri: the logged models' name; an explicit dataset.
        compression: ``log_checkpoint``'s: None (default) or ``"none"`` (raw bytes),
            ``"auto"`` (byte-grouped zstd per tensor, for object storage or an MLflow
            artifact proxy) or ``"zstd"``; encoded in the background thread.
    """

    def __init__(
        self,
        blocking: bool = False,
        name: str = ckpt.CHECKPOINT_NAME,
        lance_uri: str | None = None,
        compression: str | None = None,
    ) -> None:
        check_compression(compression)
        self.blocking, self.name, self.lance_uri = blocking, name, lance_uri
        self.compression = compression
        self._after_evaluation: dict[str, Any] | None = None  # a save waiting for this step's evaluation

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        model = kwargs.get("model")
        sharded = isinstance(model, torch.nn.Module) and any(
            type(t).__name__ == "DTensor" for t in model.state_dict().values()
        )
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None) or sharded:
            raise ValueError(
                "MLflowLanceTrainerCallback logs from the main process alone, and this model is sharded over every "
                "process (FSDP, DeepSpeed or tensor parallel); call mlflow_lance.log_checkpoint on every rank from a "
                "loop of your own (docs/checkpoints.md, distributed training), or train with DDP"
            )
        if args.save_strategy == "best":
            raise ValueError(
                "save_strategy='best' is decided after the callbacks have run, so MLflowLanceTrainerCallback cannot "
                "log those saves; use save_strategy='steps' or 'epoch' with metric_for_best_model (the best is kept "
                "besides the latest save_total_limit)"
            )
        if args.load_best_model_at_end:
            raise ValueError(
                "load_best_model_at_end=True reloads a checkpoint folder, which MLflowLanceTrainerCallback does not "
                "write; set it False and load the best checkpoint with mlflow_lance.load_checkpoint(uri, model)"
            )
        if args.metric_for_best_model and not _evaluates_at_every_save(args):
            raise ValueError(
                f"metric_for_best_model={args.metric_for_best_model!r} ranks checkpoints by an evaluation at each "
                f"save: set eval_strategy to save_strategy ({args.save_strategy}) and save_steps to a multiple of "
                f"eval_steps"
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self._take_save(args, state, control, kwargs)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self._take_save(args, state, control, kwargs)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        if self._after_evaluation is not None:
            objects, self._after_evaluation = self._after_evaluation, None
            self._log(args, state, control, objects, metrics or {})
            control.should_save = False

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        ckpt.wait_for_checkpoints()

    def _take_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, objects: dict) -> None:
        """Log the save the Trainer is about to do (now, or after this step's evaluation); it writes no folder."""
        if not control.should_save:
            return
        if control.should_evaluate:
            self._after_evaluation = objects
        else:
            self._log(args, state, control, objects, {})
        control.should_save = False

    def _log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        objects: dict,
        metrics: dict[str, float],
    ) -> None:
        keep_last, keep_best, scored = args.save_total_limit, None, None
        if args.metric_for_best_model:
            key = args.metric_for_best_model
            key = key if key.startswith("eval_") else f"eval_{key}"
            if key in metrics:
                scored = {key: float(metrics[key])}
                keep_best = (key, "max" if args.greater_is_better else "min", 1)
            else:  # a save without an evaluation (the last step's): unranked, so it deletes nothing
                keep_last = None
        state.stateful_callbacks["TrainerControl"] = control.state()  # as the Trainer stores it with a checkpoint
        if not args.should_save:  # not the main process
            return
        ckpt.log_checkpoint(
            objects["model"],
            objects["optimizer"],
            step=state.global_step,
            scheduler=objects.get("lr_scheduler"),
            metrics=scored,
            extra={_STATE_KEY: json.dumps(dataclasses.asdict(state), sort_keys=True)},
            blocking=self.blocking,
            keep_last=keep_last,
            keep_best=keep_best,
            name=self.name,
            lance_uri=self.lance_uri,
            compression=self.compression,
        )


def _evaluates_at_every_save(args: TrainingArguments) -> bool:
    if args.eval_strategy != args.save_strategy:
        return False
    return (
        args.save_strategy != IntervalStrategy.STEPS or args.save_steps % (args.eval_steps or args.logging_steps) == 0
    )


def resume_training(trainer: Trainer, uri: str, **train_kwargs: Any) -> Any:
    """``trainer.train()`` resumed from ``uri`` (``models:/<model id>`` or ``runs:/<run id>/checkpoint``,
    the run's latest), a checkpoint logged by ``MLflowLanceTrainerCallback``; returns what ``train`` returns."""
    if trainer.args.world_size > 1:
        raise ValueError("resume_training runs in one process; multi-process resume is not supported yet")
    state = ckpt.read_checkpoint(uri)
    trainer_state = state["extra"].get(_STATE_KEY)
    if trainer_state is None or "optimizer" not in state or "scheduler" not in state:
        raise ValueError(
            f"{uri} was not logged by MLflowLanceTrainerCallback (it lacks the TrainerState, optimizer or "
            f"scheduler); restore it with mlflow_lance.load_checkpoint(uri, model, optimizer) instead"
        )
    with tempfile.TemporaryDirectory(prefix="mlflow-lance-resume-") as folder:
        torch.save(state["model"], os.path.join(folder, "pytorch_model.bin"))
        torch.save(ckpt.optimizer_state_in_saved_order(state["optimizer"]), os.path.join(folder, "optimizer.pt"))
        torch.save(state["scheduler"], os.path.join(folder, "scheduler.pt"))
        torch.save(_trainer_rng_state(state["rng"], uri), os.path.join(folder, "rng_state.pth"))
        with open(os.path.join(folder, "trainer_state.json"), "w") as f:
            f.write(trainer_state)
        return trainer.train(resume_from_checkpoint=folder, **train_kwargs)


def _trainer_rng_state(stored: dict, uri: str) -> dict:
    """The generators in the form the Trainer's ``rng_state.pth`` has (one process)."""
    ckpt.set_rng_state(stored, uri)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.random.get_rng_state()
    return rng
