"""Run by test_distributed.py under `torchrun --nproc_per_node N`: a few steps of NanoVLMTrainer on gloo/CPU.

argv: output_dir steps per_device_batch n_rows [eval_rows [text_only_rank [lr_vision_backbone]]]
text_only_rank: the rank whose rows have no images (-1: none); lr_vision_backbone 0 freezes the vision tower.
Rank 0 writes {output_dir}/losses.json (the micro-step losses as Trainer logs them) and each rank writes
{output_dir}/rank{r}.json with what it saw.
Environment: SAVE_STEPS=N saves a checkpoint every N steps; SLOW_RNG_SAVE_RANK=r makes rank r's RNG save start
2 s late (a slow process or filesystem), to show when the others write the checkpoint's completion mark.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from training_helpers import (  # noqa: E402
    make_trainer,
    packed_dataset,
    synthetic_rows,
    tiny_setup,
    training_args,
    without_images,
)


def main() -> None:
    out, steps, batch, n_rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    n_eval = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    text_only_rank = int(sys.argv[6]) if len(sys.argv) > 6 else -1
    lrs = {"lr_vision_backbone": float(sys.argv[7])} if len(sys.argv) > 7 else {}
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model, processor = tiny_setup()
    rows = synthetic_rows(n_rows)
    if rank == text_only_rank:
        rows = without_images(rows)
    train = packed_dataset(rows, processor, rank=rank, world=world)
    evaluation = None
    if n_eval:
        evaluation = packed_dataset(synthetic_rows(n_eval, seed=1), processor, infinite=False, rank=rank, world=world)
    args = training_args(
        out, max_steps=steps, per_device_train_batch_size=batch, per_device_eval_batch_size=1,
        ddp_backend="gloo", eval_strategy="steps" if n_eval else "no", eval_steps=2, **lrs,
        **({"save_strategy": "steps", "save_steps": int(os.environ["SAVE_STEPS"])} if "SAVE_STEPS" in os.environ else {}),
    )
    trainer = make_trainer(model, processor, args, train, eval_dataset=evaluation)
    if os.environ.get("SLOW_RNG_SAVE_RANK") == str(rank):
        save_rng = trainer._save_rng_state

        def slow_rng_save(output_dir):
            time.sleep(2)
            save_rng(output_dir)

        trainer._save_rng_state = slow_rng_save
    seen = []
    original = trainer.training_step

    def record(model, inputs, num_items_in_batch=None):
        seen.append({"input_ids": inputs["input_ids"].tolist(), "tiles": int(inputs["pixel_values"].shape[0])
                     if inputs.get("pixel_values") is not None else 0})
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = record
    trainer.train()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"seen": seen, "global_step": trainer.state.global_step}, f)
    if rank == 0:
        log = trainer.state.log_history
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump({"loss": [e["loss"] for e in log if "loss" in e],
                       "eval_loss": [e["eval_loss"] for e in log if "eval_loss" in e]}, f)


if __name__ == "__main__":
    main()
