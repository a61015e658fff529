"""A Hugging Face Trainer job on 2 CPU processes as users launch one (``torchrun
--nproc-per-node 2 hf_worker.py OUT``; DDP over gloo), ``MLflowLanceTrainerCallback`` logging
to ``MLFLOW_TRACKING_URI``: 8 steps, a checkpoint every 2. Rank 0 writes ``OUT/hf.json`` (the
checkpoints' run ids and steps, as the ranks' callbacks saw them)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import transformers

from mlflow_lance.integrations.transformers import MLflowLanceTrainerCallback


def main() -> None:
    warnings.filterwarnings("ignore")
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    args = transformers.TrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=4,
        max_steps=8,
        save_strategy="steps",
        save_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": r, "labels": r} for r in ids],
        callbacks=[MLflowLanceTrainerCallback(blocking=True)],
    )
    trainer.train()
    if int(os.environ["RANK"]) == 0:
        (out / "hf.json").write_text(json.dumps({"world": trainer.args.world_size, "steps": trainer.state.global_step}))


if __name__ == "__main__":
    main()
