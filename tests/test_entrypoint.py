"""The real entry point: a shortened demo run, and a run killed with SIGKILL that resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "--synthetic_num_train", "240", "--synthetic_num_validation", "16", "--synthetic_num_test", "24",
    "--synthetic_num_train_simple", "40",
    "--eval_interval", "3", "--logging_steps", "1", "--dataloader_num_workers", "0",
    "--per_device_eval_batch_size", "8",
]


def run_entry(args: list[str], timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(ROOT / "train_accelerate.py"), "--config", str(ROOT / "configs/train/demo.yaml"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **popen)


def test_shortened_demo_run(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    proc = run_entry(["--output_dir", str(out), "--dataset_name_or_path", str(data), "--max_steps", "6", *SHORT])
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the accuracy table is printed beside the blind guess
    assert "Held-out accuracy on 24 synthetic test samples" in proc.stdout
    assert "Curriculum: the first epoch reads 40 train_simple rows before the 240 train rows" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    accuracy, blind = results["test_accuracy"], results["blind_guess_accuracy"]
    assert set(accuracy) == set(blind) and "overall" in accuracy
    # the blind guess takes its majority answers from every split trained on: train and the curriculum split
    import datasets

    from nanovlm.evaluation.scoring import blind_guess_accuracy

    splits = datasets.load_from_disk(str(data))
    # the accuracies are over questions (every turn of a test row), and the heading says how many
    questions = sum(len(texts) for texts in splits["test"]["texts"])
    assert questions > 24 and f"Held-out accuracy on 24 synthetic test samples ({questions} questions;" in proc.stdout
    seen = datasets.concatenate_datasets(
        [splits[name].select_columns(["texts", "question_type"]) for name in ("train", "train_simple")]
    )
    assert blind == pytest.approx(blind_guess_accuracy(splits["test"], seen))
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    # plots are real PNGs
    for name in ("loss.png", "learning_rate.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the final model is the best checkpoint, saved with its code and processor
    final = out / "final"
    for name in ("model.safetensors", "modeling_nanovlm.py", "processor_config.json", "tokenizer.json"):
        assert (final / name).is_file(), name
    # the results reach the model card in memory: the accuracy tables in training_info.json and on the card
    info = json.loads((final / "training_info.json").read_text())
    assert info["evaluation"] == {"test_accuracy": accuracy, "blind_guess_accuracy": blind}
    assert f"| overall | {accuracy['overall']:.3f} | {blind['overall']:.3f} |" in (final / "README.md").read_text()
    # the demo's own pixel statistics travel with the checkpoint's processor
    demo = yaml.safe_load((ROOT / "configs/train/demo.yaml").read_text())
    saved = json.loads((final / "processor_config.json").read_text())
    saved = saved.get("image_processor", saved)
    assert (saved["image_mean"], saved["image_std"]) == (demo["image_mean"], demo["image_std"])
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] is not None and state["global_step"] == 6
    # final/ holds the best checkpoint: its step is recorded beside the last one, and named on the card
    best_step = int(state["best_model_checkpoint"].rsplit("-", 1)[1])
    assert info["steps"] == 6 and info["best_step"] == best_step
    assert f"- best validation loss at step {best_step} (the checkpoint kept): {state['best_metric']:.4f}" in (
        final / "README.md").read_text()
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [3, 6]
    # a fresh process without nanovlm loads it with trust_remote_code
    check = (
        "import sys; sys.modules['nanovlm'] = None\n"
        "from transformers import AutoModel, AutoProcessor\n"
        f"m = AutoModel.from_pretrained({str(final)!r}, trust_remote_code=True)\n"
        f"p = AutoProcessor.from_pretrained({str(final)!r}, trust_remote_code=True)\n"
        "print(type(m).__name__, type(p).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env=env)
    assert loaded.stdout.strip() == "NanoVLMForConditionalGeneration NanoVLMProcessor", loaded.stderr[-2000:]


def test_failed_held_out_evaluation_saves_the_model_then_fails_the_run(tmp_path):
    # A real failure: the data has no test split to report on (built with --synthetic_num_test 0).
    out, data = tmp_path / "run", tmp_path / "data"
    short = [a if prev != "--synthetic_num_test" else "0" for prev, a in zip(["", *SHORT], SHORT)]
    proc = run_entry(["--output_dir", str(out), "--dataset_name_or_path", str(data), "--max_steps", "2", *short,
                      "--eval_strategy", "no", "--load_best_model_at_end", "false"])
    assert proc.returncode == 1
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "training_info.json").is_file()
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"train_accelerate.py: error: the held-out evaluation failed: {data} has no test split (splits: "
        f"['train', 'train_simple', 'validation']); build the data with --synthetic_num_test > 0 "
        f"(the trained model is saved in {out / 'final'})"
    )
    assert "Traceback" not in proc.stderr and "Held-out accuracy" not in proc.stdout
    assert json.loads((out / "results.json").read_text())["test_accuracy_error"].startswith(f"{data} has no test")


def test_sigkill_then_resume_from_last_complete_checkpoint(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    args = ["--output_dir", str(out), "--dataset_name_or_path", str(data), *SHORT,
            "--eval_strategy", "no", "--load_best_model_at_end", "false", "--save_steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(ROOT / "train_accelerate.py"), "--config", str(ROOT / "configs/train/demo.yaml"),
           *args, "--max_steps", "400"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not (out / "checkpoint-4" / "trainer_state.json").is_file():
            assert proc.poll() is None and time.time() < deadline, "training died or never wrote checkpoint-4"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    complete = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
                      if (p / "trainer_state.json").is_file())
    last = complete[-1]
    assert last >= 4
    resumed = run_entry(args + ["--max_steps", str(last + 2), "--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"Restored the data position from {out / f'checkpoint-{last}'}" in resumed.stderr
    state = json.loads((out / f"checkpoint-{last + 2}" / "trainer_state.json").read_text())
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps[-2:] == [last + 1, last + 2]


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under `folder`."""
    import hashlib

    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_after_a_finished_run_changes_nothing_and_more_steps_continue(tmp_path):
    from training_helpers import ENTRY_SHORT, run_train_entry

    out, data = tmp_path / "run", tmp_path / "data"
    args = ["--output_dir", out, "--dataset_name_or_path", data, *ENTRY_SHORT]
    first = run_train_entry("demo", [*args, "--max_steps", 2])
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(out)
    assert "final/model.safetensors" in before and "checkpoint-2/trainer_state.json" in before

    again = run_train_entry("demo", [*args, "--max_steps", 2, "--resume_from_checkpoint", "true"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == (
        f"train_accelerate.py: the run in {out} is already complete at step 2 (--max_steps 2); nothing changed. "
        "Raise --max_steps to train further."
    )
    assert _snapshot(out) == before  # no extra step, final/ and results untouched

    # a higher --max_steps continues from step 2; the tied lm_head is not reported missing (it is the embeddings)
    more = run_train_entry("demo", [*args, "--max_steps", 3, "--resume_from_checkpoint", "true"])
    assert more.returncode == 0, more.stderr[-3000:]
    assert "missing keys" not in more.stderr
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]


@pytest.mark.parametrize("bad", [["--lr_mp", "-1"], ["--no_such_option", "1"]])
def test_entry_point_rejects_bad_arguments_clearly(tmp_path, bad):
    proc = run_entry(["--output_dir", str(tmp_path), *bad], timeout=120)
    assert proc.returncode != 0
    assert ("--lr_mp must be a finite number >= 0" in proc.stderr) or ("unknown option --no_such_option" in proc.stderr)


def test_two_process_demo_run_through_the_entry_point(tmp_path):
    """torchrun, 2 gloo processes: every process must build the same tokenizer and model (DDP checks the shapes)."""
    out, data = tmp_path / "run", tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_accelerate.py"), "--config", str(ROOT / "configs/train/demo.yaml"),
           "--output_dir", str(out), "--dataset_name_or_path", str(data), "--max_steps", "2", *SHORT,
           "--eval_interval", "2", "--use_cpu", "true"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [e for e in state["log_history"] if "loss" in e]
    assert "perf/tokens_per_s_min" in logs[-1] and "perf/tokens_per_s_max" in logs[-1]  # gathered over 2 ranks
    data_state = json.loads((out / "checkpoint-2" / "data_state.json").read_text())
    assert data_state["world_size"] == 2 and len(data_state["ranks"]) == 2
