"""Two gloo processes on CPU: the loss equals a 1-process run on the same global batch; ranks end together; a rank
that sees no image neither hangs nor changes the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset
from training_helpers import (
    ENTRY_SHORT,
    make_trainer,
    packed_dataset,
    run_train_entry,
    synthetic_rows,
    tiny_setup,
    training_args,
    without_images,
)

SCRIPT = Path(__file__).parent / "dist_train_script.py"


def torchrun(out: Path, *args: float, timeout: int = 240, **env_vars: str) -> None:
    """Run the script on 2 processes (`env_vars` added to their environment); a hang (a collective one rank never
    joins) fails after `timeout` s, and the whole process group (torchrun and its workers) is killed, not only
    torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]), **env_vars}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), str(out), *map(str, args)]
    run_group(cmd, env, timeout)


def run_group(cmd: list[str], env: dict, timeout: int) -> None:
    """Run `cmd` in its own process group; kill the whole group (torchrun and its workers) after `timeout` s."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"2-process training did not finish in {timeout} s (hung)")
    assert proc.returncode == 0, stderr[-4000:]


def single_process_losses(tmp_path: Path, steps: int, batch: int, n_rows: int, text_only_rank: int = -1,
                          **overrides) -> list[float]:
    """Per-step losses of one process training on the same global batches as the 2-process run: per step, rank
    0's packs then rank 1's (rank `text_only_rank`'s rows without images)."""
    _, processor = tiny_setup()
    rows = synthetic_rows(n_rows)
    per_rank = []
    for rank in range(2):
        it = iter(packed_dataset(without_images(rows) if rank == text_only_rank else rows, processor, rank=rank,
                                 world=2))
        per_rank.append([next(it) for _ in range(steps * batch)])
    packs = []
    for step in range(steps):
        for rank in range(2):
            packs += per_rank[rank][step * batch : (step + 1) * batch]
    model, processor = tiny_setup()
    args = training_args(tmp_path / "single", max_steps=steps, per_device_train_batch_size=2 * batch, **overrides)
    trainer = make_trainer(model, processor, args, ListDataset(packs))
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


class ListDataset(IterableDataset):
    def __init__(self, packs):
        self.packs = packs

    def __iter__(self):
        return iter(self.packs)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    steps, batch, n_rows = 3, 2, 96
    torchrun(tmp_path / "ddp", steps, batch, n_rows)
    ddp = json.loads((tmp_path / "ddp" / "losses.json").read_text())["loss"]
    single = single_process_losses(tmp_path, steps, batch, n_rows)
    assert len(ddp) == len(single) == steps
    assert ddp == pytest.approx(single, abs=1e-5)
    # the ranks really saw different data
    seen = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text())["seen"] for r in range(2)]
    assert seen[0] != seen[1]


def test_ranks_with_unequal_data_end_together(tmp_path):
    # 7 training rows and 1 eval row over 2 ranks: shards of different sizes, rank 1 has no eval batch (an eval set
    # smaller than the number of ranks used to crash in `datasets`' shard).
    torchrun(tmp_path, 4, 2, 7, 1, timeout=240)
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["global_step"] for i in info] == [4, 4]
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses["loss"]) == 4 and len(losses["eval_loss"]) == 2


def test_a_checkpoint_is_marked_complete_only_after_every_process_wrote_its_files(tmp_path):
    """trainer_state.json (written by rank 0) marks a checkpoint complete: with rank 1's RNG save 2 s late, it must
    still come after rank 1's rng_state_1.pth (it came 2 s before: a kill in between left a "complete" checkpoint
    whose resume silently went on with fresh RNG on rank 1)."""
    torchrun(tmp_path, 2, 1, 24, SAVE_STEPS="2", SLOW_RNG_SAVE_RANK="1")
    checkpoint = tmp_path / "checkpoint-2"
    rng = [checkpoint / f"rng_state_{rank}.pth" for rank in range(2)]
    mark = checkpoint / "trainer_state.json"
    assert [path.stat().st_mtime_ns <= mark.stat().st_mtime_ns for path in rng] == [True, True]


def test_torchrun_without_gpu_trains_as_ddp_through_the_entry_point(tmp_path):
    """The README's torchrun and accelerate commands, no --use_cpu: one DDP job on gloo (not two independent
    trainings), whose per-step losses equal one process on the same global batches (rank 0's packs, then rank
    1's)."""
    import dataclasses
    from types import SimpleNamespace

    from transformers import set_seed

    from nanovlm.training.build import build_datasets, build_model_and_processor, load_rows
    from nanovlm.training.parser import parse_args

    steps, batch = 3, 2
    out, data = tmp_path / "ddp", tmp_path / "data"
    argv = ["--output_dir", out, "--dataset_name_or_path", data, "--max_steps", steps, *ENTRY_SHORT,
            "--per_device_train_batch_size", batch, "--max_images_per_example", 1]  # multi-image rows: skipped
    proc = run_train_entry("demo", argv, nproc=2, threads=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 processes and no GPU: training them as one DDP job on CPU (gloo)" in proc.stderr
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in proc.stderr
    # INFO from rank 0 only (each rank used to log its setup): one line per optimizer group, one curriculum line
    assert [line.split(": ", 1)[1].split()[0] for line in proc.stderr.splitlines()
            if "nanovlm.training.optim: " in line and "trainable params=" in line] == ["projector", "vision", "language"]
    assert proc.stderr.count("Curriculum: the first epoch reads 20 train_simple rows before the 120 train rows (this "
                             "process's share, 1 of 2)") == 1
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
    per_rank, skipped = [], []
    for rank in range(2):
        where = SimpleNamespace(process_index=rank, world_size=2, seed=args.seed)
        train = build_datasets(data_args, where, processor, train_rows, None)[0]
        packs = iter(train)
        per_rank.append([next(packs) for _ in range(steps * batch)])
        skipped.append(train.source.counter.reasons["too_many_images"])  # this rank's skips so far
    # the skip report counts every rank's skips (it used to log rank 0's only)
    assert min(skipped) > 0
    assert [e["data/skipped/too_many_images"] for e in logs][-1] == logs[-1]["data/skipped_total"] == sum(skipped)
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
