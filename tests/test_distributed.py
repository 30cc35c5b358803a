"""Two gloo processes on CPU: the loss equals a 1-process run on the same global batch; ranks end together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.data import IterableDataset
from training_helpers import (
    ENTRY_SHORT,
    make_trainer,
    packed_dataset,
    run_train_entry,
    synthetic_rows,
    tiny_setup,
    training_args,
)

SCRIPT = Path(__file__).parent / "dist_train_script.py"


def torchrun(out: Path, *args: int, timeout: int = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), str(out), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


class ListDataset(IterableDataset):
    def __init__(self, packs):
        self.packs = packs

    def __iter__(self):
        return iter(self.packs)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    steps, batch, n_rows = 3, 2, 96
    torchrun(tmp_path / "ddp", steps, batch, n_rows)
    ddp = json.loads((tmp_path / "ddp" / "losses.json").read_text())["loss"]

    # The same global batches in one process: per step, rank 0's packs then rank 1's.
    _, processor = tiny_setup()
    rows = synthetic_rows(n_rows)
    per_rank = []
    for rank in range(2):
        it = iter(packed_dataset(rows, processor, rank=rank, world=2))
        per_rank.append([next(it) for _ in range(steps * batch)])
    packs = []
    for step in range(steps):
        for rank in range(2):
            packs += per_rank[rank][step * batch : (step + 1) * batch]
    model, processor = tiny_setup()
    trainer = make_trainer(model, processor, training_args(tmp_path / "single", max_steps=steps,
                                                           per_device_train_batch_size=2 * batch),
                           ListDataset(packs))
    trainer.train()
    single = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(ddp) == len(single) == steps
    assert ddp == pytest.approx(single, abs=1e-5)
    # the ranks really saw different data
    seen = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text())["seen"] for r in range(2)]
    assert seen[0] != seen[1]


def test_ranks_with_unequal_data_end_together(tmp_path):
    # 7 training rows and 5 eval rows over 2 ranks: shards of different sizes, different eval batch counts.
    torchrun(tmp_path, 4, 2, 7, 5, timeout=240)
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["global_step"] for i in info] == [4, 4]
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses["loss"]) == 4 and len(losses["eval_loss"]) == 2


def test_torchrun_without_gpu_trains_as_ddp_through_the_entry_point(tmp_path):
    """The README's torchrun and accelerate commands, no --use_cpu: one DDP job on gloo (not two independent
    trainings), whose per-step losses equal one process on the same global batches (rank 0's packs, then rank
    1's)."""
    import dataclasses
    from types import SimpleNamespace

    import torch
    from transformers import set_seed

    from nanovlm.training.build import build_datasets, build_model_and_processor, load_rows
    from nanovlm.training.parser import parse_args

    steps, batch = 3, 2
    out, data = tmp_path / "ddp", tmp_path / "data"
    argv = ["--output_dir", out, "--dataset_name_or_path", data, "--max_steps", steps, *ENTRY_SHORT,
            "--per_device_train_batch_size", batch]
    proc = run_train_entry("demo", argv, nproc=2, threads=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 processes and no GPU: training them as one DDP job on CPU (gloo)" in proc.stderr
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in proc.stderr
    data_state = json.loads((out / f"checkpoint-{steps}" / "data_state.json").read_text())
    assert data_state["world_size"] == 2 and len(data_state["ranks"]) == 2
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    logs = [e for e in state["log_history"] if "loss" in e]
    assert "perf/tokens_per_s_min" in logs[-1]  # gathered over the 2 ranks
    ddp = [e["loss"] for e in logs]

    # One process, the same model and data pieces the entry point builds, each rank's packs in turn.
    model_args, data_args, args = parse_args([str(a) for a in ["--config", "configs/train/demo.yaml", *argv]])
    set_seed(args.seed)
    train_rows, _ = load_rows(data_args, args)
    model, processor = build_model_and_processor(model_args, train_rows)
    per_rank = []
    for rank in range(2):
        where = SimpleNamespace(process_index=rank, world_size=2, seed=args.seed)
        packs = iter(build_datasets(data_args, where, processor, train_rows, None)[0])
        per_rank.append([next(packs) for _ in range(steps * batch)])
    packs = [p for step in range(steps) for rank in range(2) for p in per_rank[rank][step * batch:(step + 1) * batch]]
    single_args = dataclasses.replace(args, output_dir=str(tmp_path / "single"), per_device_train_batch_size=2 * batch,
                                      save_strategy="no", dataloader_num_workers=0)
    torch.set_num_threads(1)
    trainer = make_trainer(model, processor, single_args, ListDataset(packs))
    trainer.train()
    single = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(ddp) == len(single) == steps
    assert ddp == pytest.approx(single, abs=1e-5)

    # `accelerate launch` with the 2-process CPU config, no --use_cpu: the same DDP job
    argv[1] = out = tmp_path / "accelerate"
    proc = run_train_entry("demo", argv, threads=1, accelerate_config="cpu_2proc")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / f"checkpoint-{steps}" / "data_state.json").read_text())["world_size"] == 2
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert [e["loss"] for e in state["log_history"] if "loss" in e] == pytest.approx(single, abs=1e-5)
