"""Run by test_distributed.py under `torchrun --nproc_per_node 2`: the tiny NanoVLM trained under FSDP2 on gloo/CPU.

Accelerate has no FSDP on CPU (train_accelerate.py refuses it there), so this does by hand what Trainer + Accelerate
do with configs/accelerate/fsdp.yaml on GPUs, with the recipe's own pieces:
- wrapping: torch's `fully_shard` on every module whose class the config lists in `fsdp_transformer_layer_cls_to_wrap`
  (the decoder and SigLIP layers), then on the whole model, as Accelerate's FSDP2 TRANSFORMER_BASED_WRAP does;
- `apply_freezing`, `build_param_groups`, `GuardedAdamW`, Trainer's scheduler (NanoVLMTrainer's optimizer), the
  training arguments of the DDP test, gradient clipping at `max_grad_norm`;
- the loss as Trainer computes it: summed over label tokens, divided by the label tokens of all processes, times
  the number of processes (FSDP averages gradients over processes, as DDP does).

argv: output_dir steps per_device_batch n_rows text_only_rank
Rank 0 writes {output_dir}/losses.json (per-step losses, the mean over processes as Trainer logs them), saves the
trained model's full state dict with `save_pretrained` to {output_dir}/model, and the sharded model's logits on a
fixed batch to {output_dir}/logits.pt.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader
from transformers import get_scheduler

sys.path.insert(0, os.path.dirname(__file__))
from training_helpers import packed_dataset, synthetic_rows, tiny_setup, training_args, without_images  # noqa: E402

from nanovlm.data.collator import BOOKKEEPING_KEY, PackedCollator  # noqa: E402
from nanovlm.training.optim import GuardedAdamW, apply_freezing, build_param_groups  # noqa: E402

FSDP_CONFIG = Path(__file__).resolve().parents[1] / "configs/accelerate/fsdp.yaml"


def shard_like_the_config(model: torch.nn.Module) -> int:
    """fully_shard each layer class named in fsdp.yaml, then the root; returns how many layers were wrapped."""
    names = yaml.safe_load(FSDP_CONFIG.read_text())["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
    layers = [m for m in model.modules() if type(m).__name__ in {n.strip() for n in names}]
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model)
    return len(layers)


def fixed_batch(processor) -> dict:
    """The first two packs of 8 rows with images, collated: the same on every rank and in the test."""
    packs = iter(packed_dataset(synthetic_rows(8, seed=3), processor, infinite=False))
    batch = PackedCollator(processor.tokenizer.pad_token_id)([next(packs), next(packs)])
    return {k: batch[k] for k in ("input_ids", "position_ids", "pixel_values")}


def main() -> None:
    out, steps, batch, n_rows, text_only_rank = sys.argv[1], *map(int, sys.argv[2:6])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    args = training_args(out, max_steps=steps, per_device_train_batch_size=batch)
    model, processor = tiny_setup()
    rows = synthetic_rows(n_rows)
    data = packed_dataset(without_images(rows) if rank == text_only_rank else rows, processor, rank=rank, world=world)
    loader = iter(DataLoader(data, batch_size=batch, collate_fn=PackedCollator(processor.tokenizer.pad_token_id)))

    lrs = {"projector": args.lr_mp, "vision": args.lr_vision_backbone, "language": args.lr_language_backbone}
    apply_freezing(model, lrs)
    wrapped = shard_like_the_config(model)
    optimizer = GuardedAdamW(build_param_groups(model.named_parameters(), lrs, args.weight_decay),
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                              num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    model.train()
    losses = []
    for _ in range(steps):
        inputs = next(loader)
        inputs.pop(BOOKKEEPING_KEY)
        n_items = (inputs["labels"][..., 1:] != -100).sum()
        dist.all_reduce(n_items)
        loss = model(**inputs, num_items_in_batch=n_items).loss * world
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        logged = loss.detach().clone()
        dist.all_reduce(logged)
        losses.append(logged.item() / world)

    model.eval()
    with torch.no_grad():
        logits = model(**fixed_batch(processor)).logits
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        sharded = type(next(p for p in model.parameters())).__name__
        fresh, _ = tiny_setup()
        fresh.load_state_dict(state)
        fresh.save_pretrained(os.path.join(out, "model"))
        torch.save(logits, os.path.join(out, "logits.pt"))
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump({"loss": losses, "wrapped_layers": wrapped, "parameter_type": sharded}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
