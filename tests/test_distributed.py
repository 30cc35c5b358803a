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
from training_helpers import make_trainer, packed_dataset, synthetic_rows, tiny_setup, training_args, without_images

SCRIPT = Path(__file__).parent / "dist_train_script.py"


def torchrun(out: Path, *args: float, timeout: int = 240) -> None:
    """Run the script on 2 processes; a hang (a collective one rank never joins) fails after `timeout` s, and the
    whole process group (torchrun and its workers) is killed, not only torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
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
    # 7 training rows and 5 eval rows over 2 ranks: shards of different sizes, different eval batch counts.
    torchrun(tmp_path, 4, 2, 7, 5, timeout=240)
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["global_step"] for i in info] == [4, 4]
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses["loss"]) == 4 and len(losses["eval_loss"]) == 2


@pytest.mark.parametrize("lr_vision", [5e-4, 0.0], ids=["trainable_vision", "frozen_vision"])
def test_a_rank_with_only_text_packs_does_not_hang_and_matches_one_process(tmp_path, lr_vision):
    """Rank 1 never sees an image: its vision tower (or, frozen, its projector) would get no gradient and DDP's
    all-reduce would wait forever; the model runs them on a blank tile whose contribution is exactly 0."""
    steps, batch, n_rows = 3, 2, 48
    torchrun(tmp_path / "ddp", steps, batch, n_rows, 0, 1, lr_vision, timeout=180)
    ddp = json.loads((tmp_path / "ddp" / "losses.json").read_text())["loss"]
    seen = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text())["seen"] for r in range(2)]
    assert all(batch["tiles"] > 0 for batch in seen[0]) and all(batch["tiles"] == 0 for batch in seen[1])
    single = single_process_losses(tmp_path, steps, batch, n_rows, text_only_rank=1, lr_vision_backbone=lr_vision)
    assert len(ddp) == len(single) == steps
    assert ddp == pytest.approx(single, abs=1e-5)


def test_an_imageless_training_batch_gives_every_trainable_parameter_a_zero_gradient(tmp_path):
    """What keeps DDP/FSDP from hanging, in one process: vision tower and projector get gradients (exactly 0) from
    a batch without images, the loss is unchanged, and evaluation does not run the blank tile."""
    model, processor = tiny_setup()
    ids = processor.tokenizer("What color is the circle? red", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).loss
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert loss.item() == reference.item()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        if "vision_tower" in name or "multi_modal_projector" in name:
            assert not param.grad.any(), name
    assert model.model.language_model.layers[0].mlp.up_proj.weight.grad.any()


def test_fsdp2_wrapped_as_the_config_trains_like_ddp_and_saves_a_loadable_checkpoint(tmp_path):
    """fsdp_train_script.py: `fully_shard` on the decoder and SigLIP layers (configs/accelerate/fsdp.yaml) and the
    root, 2 gloo processes, rank 1 without images. Its per-step losses equal the one-process run on the same global
    batches, which DDP equals (the tests above); the checkpoint it saves loads with from_pretrained and gives the
    sharded model's logits."""
    from fsdp_train_script import fixed_batch

    from nanovlm import NanoVLMForConditionalGeneration

    steps, batch, n_rows = 3, 2, 48
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "fsdp_train_script.py"), str(tmp_path / "fsdp"), str(steps), str(batch),
           str(n_rows), "1"]
    run_group(cmd, env, timeout=180)
    result = json.loads((tmp_path / "fsdp" / "losses.json").read_text())
    assert result["parameter_type"] == "DTensor" and result["wrapped_layers"] == 2 + 2  # text + vision layers
    single = single_process_losses(tmp_path, steps, batch, n_rows, text_only_rank=1)
    assert result["loss"] == pytest.approx(single, abs=1e-5)

    loaded = NanoVLMForConditionalGeneration.from_pretrained(tmp_path / "fsdp" / "model").eval()
    _, processor = tiny_setup()
    with torch.no_grad():
        logits = loaded(**fixed_batch(processor)).logits
    sharded = torch.load(tmp_path / "fsdp" / "logits.pt")
    assert torch.allclose(logits, sharded, atol=1e-5, rtol=0)
