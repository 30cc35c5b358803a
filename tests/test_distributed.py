"""Two gloo processes on CPU: the loss equals a 1-process run on the same global batch; ranks end together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.data import IterableDataset
from training_helpers import make_trainer, packed_dataset, synthetic_rows, tiny_setup, training_args

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
