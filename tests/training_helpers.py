"""Shared pieces of the training tests (also imported by the 2-process script, so no pytest fixtures here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from nanovlm import NanoVLMForConditionalGeneration, NanoVLMProcessor, train_tokenizer
from nanovlm.data import PackedCollator, PackedDataset, SampleBuilder, SampleDataset, shard_for_rank
from nanovlm.data.synthetic import SyntheticConfig, generate_split
from nanovlm.training.arguments import NanoVLMTrainingArguments
from nanovlm.training.trainer import NanoVLMTrainer

ROOT = Path(__file__).resolve().parents[1]
# A few minutes of the demo recipe shrunk to seconds: small synthetic splits, no periodic evaluation.
ENTRY_SHORT = [
    "--synthetic_num_train", "240", "--synthetic_num_validation", "16", "--synthetic_num_test", "24",
    "--synthetic_num_train_simple", "40", "--logging_steps", "1", "--dataloader_num_workers", "0",
    "--per_device_eval_batch_size", "8", "--eval_strategy", "no", "--load_best_model_at_end", "false",
]


def run_train_entry(config: str, args: list, nproc: int = 1, timeout: int = 600, threads: int = 2,
                    accelerate_config: str | None = None):
    """Run train_accelerate.py with configs/train/<config>.yaml as a user would: torchrun when nproc > 1, or
    `accelerate launch --config_file configs/accelerate/<accelerate_config>.yaml`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    launcher = [sys.executable]
    if accelerate_config:
        launcher += ["-m", "accelerate.commands.launch", "--config_file",
                     str(ROOT / f"configs/accelerate/{accelerate_config}.yaml")]
    elif nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*launcher, str(ROOT / "train_accelerate.py"), "--config", str(ROOT / f"configs/train/{config}.yaml"),
           *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


TINY_CORPUS = ["What color is the circle? red blue green yellow How many shapes left right image word"] * 20


def tiny_setup(seed: int = 0):
    """(model, processor) with 32 px tiles, 4 image tokens per tile; identical for a given seed."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny_config

    tokenizer = train_tokenizer(TINY_CORPUS, vocab_size=300, max_grid=2)
    config = make_tiny_config(tokenizer)
    torch.manual_seed(seed)
    model = NanoVLMForConditionalGeneration(config)
    return model, NanoVLMProcessor.from_config(tokenizer, config, max_grid=2)


def synthetic_rows(n: int, seed: int = 0):
    return generate_split(n, "train", seed=seed, config=SyntheticConfig(image_size=32))


def without_images(rows):
    """The same rows with `images: []` (text-only; the questions still mention images, which the pipeline accepts)."""
    return rows.map(lambda row: {"images": []})


def packed_dataset(rows, processor, *, seq_length: int = 160, infinite: bool = True, rank: int = 0, world: int = 1,
                   max_images_per_example: int = 3, buffer_size: int = 32):
    builder = SampleBuilder(processor, max_sample_length=seq_length, max_images_per_example=max_images_per_example)
    source = SampleDataset(shard_for_rank(rows, rank, world), builder, seed=0)
    return PackedDataset(source, seq_length=seq_length, max_images_per_pack=12, buffer_size=buffer_size, seed=0,
                         infinite=infinite)


def training_args(output_dir, **overrides) -> NanoVLMTrainingArguments:
    kw = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        lr_mp=1e-3,
        lr_vision_backbone=5e-4,
        lr_language_backbone=5e-4,
        weight_decay=0.01,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    kw.update(overrides)
    return NanoVLMTrainingArguments(**kw)


def make_trainer(model, processor, args, train_dataset, eval_dataset=None, callbacks=None) -> NanoVLMTrainer:
    return NanoVLMTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PackedCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        callbacks=callbacks,
    )


def train_losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]
