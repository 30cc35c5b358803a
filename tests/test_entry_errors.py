"""train_accelerate.py's failures: each is one line on stderr (no traceback) and a non-zero exit status.

The runs share one small synthetic dataset (built once, in-process, with the settings of test_entrypoint.SHORT).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--synthetic_num_train", "48", "--synthetic_num_validation", "8", "--synthetic_num_test", "8",
    "--synthetic_num_train_simple", "8", "--logging_steps", "1", "--dataloader_num_workers", "0",
    "--eval_strategy", "no", "--load_best_model_at_end", "false",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The demo's synthetic dataset at SMALL's sizes, as the entry point itself would build it."""
    from nanovlm.training.build import prepare_synthetic_dataset
    from nanovlm.training.parser import parse_args

    path = tmp_path_factory.mktemp("entry") / "data"
    _, data_args, training_args = parse_args(
        ["--config", str(ROOT / "configs/train/demo.yaml"), "--output_dir", str(path.parent / "unused"),
         "--dataset_name_or_path", str(path), *SMALL]
    )
    prepare_synthetic_dataset(data_args, training_args)
    return path


def run_entry(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train_accelerate.py"), "--config", str(ROOT / "configs/train/demo.yaml"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The stderr lines that are not logging records or progress bars (a traceback would show up here)."""
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    return [line for line in lines if " WARNING " not in line and " INFO " not in line and "it/s]" not in line
            and "s/it]" not in line and not line.lstrip().startswith(("0%", "%"))]


def test_nonfinite_stop_is_one_line_and_a_nonzero_exit(data, tmp_path):
    # no warmup: the default one's first step has LR 0, which would not blow up yet
    lrs = ["--lr_mp", "1e30", "--lr_vision_backbone", "1e30", "--lr_language_backbone", "1e30", "--warmup_steps", "0"]
    proc = run_entry(["--output_dir", str(tmp_path), "--dataset_name_or_path", str(data), *SMALL, *lrs,
                      "--save_strategy", "no", "--max_steps", "4", "--max_consecutive_nonfinite_losses", "2"])
    assert proc.returncode == 1
    assert error_lines(proc)[-1] == (
        "train_accelerate.py: error: Training stopped at step 3: the loss was NaN/inf for 2 consecutive steps "
        "(--max_consecutive_nonfinite_losses 2). Lower the learning rates, check the data of these steps, or use bf16 "
        "instead of fp16."
    )
    assert "Traceback" not in proc.stderr


def test_missing_dataset_path_is_one_line(tmp_path):
    missing = tmp_path / "no_such_folder"
    proc = run_entry(["--output_dir", str(tmp_path / "out"), "--dataset_name_or_path", str(missing),
                      "--synthetic_dataset", "false"], timeout=120)
    assert proc.returncode == 1
    assert error_lines(proc) == [
        f"train_accelerate.py: error: --dataset_name_or_path {missing}: no such file or folder; pass a `save_to_disk` "
        "folder, a parquet/json file glob such as 'data/*.parquet', or a hub dataset id (org/name), or add "
        "--synthetic_dataset true to build the synthetic dataset there"
    ]


def test_seq_length_below_one_image_names_seq_length_and_the_image_tokens(data, tmp_path):
    proc = run_entry(["--output_dir", str(tmp_path), "--dataset_name_or_path", str(data), *SMALL,
                      "--seq_length", "12", "--max_sample_length", "12"])
    assert proc.returncode == 1
    # the demo: 16 image tokens per 64 px tile, plus the chat template around a one-letter question and answer
    assert error_lines(proc) == [
        "train_accelerate.py: error: --seq_length 12 and --max_sample_length 12: below the smallest sample with an "
        "image, 29 tokens (16 image tokens per tile plus the chat template); set --seq_length and "
        "--max_sample_length to at least 29"
    ]


def test_smallest_image_sample_fits_exactly(tiny_processor):
    from nanovlm.data import SampleBuilder
    from nanovlm.training.build import smallest_image_sample_length

    need = smallest_image_sample_length(tiny_processor)
    assert need > tiny_processor.image_seq_len
    from PIL import Image

    row = {"images": [Image.new("RGB", (32, 32))], "texts": [{"user": "a", "assistant": "a"}]}
    assert SampleBuilder(tiny_processor, max_sample_length=need).build(row)[1] is None
    assert SampleBuilder(tiny_processor, max_sample_length=need - 1).build(row)[1] == "too_long"


@pytest.mark.parametrize("word", ["None", "null", "NONE"])
def test_none_or_null_unsets_an_optional_yaml_value(word, tmp_path):
    from nanovlm.training.parser import parse_args

    config = ROOT / "configs/train/demo.yaml"
    _, data_args, training_args = parse_args(
        ["--config", str(config), "--output_dir", str(tmp_path), "--curriculum_split", word,
         f"--eval_split={word}", "--val_size", "0", "--bf16", word, "--save_total_limit", word, "--report_to", "none"]
    )
    assert data_args.curriculum_split is None and data_args.eval_split is None
    assert training_args.save_total_limit is None and training_args.bf16 is False  # None resolves to auto (no GPU)
    assert training_args.report_to == []  # `report_to none` keeps its own meaning: no logger
    yaml_file = tmp_path / "recipe.yaml"
    yaml_file.write_text(config.read_text() + f"\ncurriculum_split: {word}\n")
    assert parse_args(["--config", str(yaml_file)])[1].curriculum_split is None
    # the last occurrence of a flag wins, as in argparse (a `none` used to win wherever it stood)
    base = ["--config", str(config), "--output_dir", str(tmp_path)]
    assert parse_args([*base, "--curriculum_split", word, "--curriculum_split", "x"])[1].curriculum_split == "x"
    assert parse_args([*base, "--curriculum_split", "x", f"--curriculum_split={word}"])[1].curriculum_split is None


def test_resume_with_changed_settings_is_refused_naming_each_unless_the_data_restarts(data, tmp_path):
    import json

    out = tmp_path / "run"
    base = ["--output_dir", str(out), "--dataset_name_or_path", str(data), *SMALL, "--synthetic_dataset", "false",
            "--save_steps", "2"]
    first = run_entry([*base, "--max_steps", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    saved = json.loads((out / "checkpoint-2" / "run_settings.json").read_text())
    assert saved["data"]["seq_length"] == 416 and saved["model"]["text_config.hidden_size"] == 128

    demo_model = yaml.safe_load((ROOT / "configs/train/demo.yaml").read_text())["model_config"]
    narrower = {**demo_model, "text_config": {**demo_model["text_config"], "hidden_size": 96}}
    changed = run_entry([*base, "--max_steps", "4", "--resume_from_checkpoint", "true", "--seq_length", "256",
                         "--max_sample_length", "256", "--model_config", json.dumps(narrower)])
    assert changed.returncode == 1
    assert error_lines(changed) == [
        f"train_accelerate.py: error: --resume_from_checkpoint {out / 'checkpoint-2'}: saved with other settings "
        "(--max_sample_length 416 -> 256, --seq_length 416 -> 256, model config text_config.head_dim 32 -> 24, "
        "model config text_config.hidden_size 128 -> 96); its weights only load into the same model: resume with "
        "the checkpoint's model settings, or start a new --output_dir (--model_name_or_path CHECKPOINT fine-tunes it "
        "with fresh optimizer and data)"
    ]

    # --resume_restart_data: the changed data settings are accepted; weights, optimizer and step are resumed
    restarted = run_entry([*base, "--max_steps", "3", "--resume_from_checkpoint", "true", "--seq_length", "256",
                           "--max_sample_length", "256", "--resume_restart_data", "true"])
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "the data restarts from its beginning (--resume_restart_data)" in restarted.stderr
    assert "Restored the data position" not in restarted.stderr
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]
    assert json.loads((out / "checkpoint-3" / "run_settings.json").read_text())["data"]["seq_length"] == 256


def test_resume_with_changed_data_settings_names_the_way_out(tmp_path):
    from training_helpers import make_trainer, packed_dataset, synthetic_rows, tiny_setup, training_args

    from nanovlm.training.errors import UsageError

    rows = synthetic_rows(24)

    def trainer(seq_length: int, **overrides):
        model, processor = tiny_setup()
        args = training_args(tmp_path, **{"max_steps": 2, "save_strategy": "steps", "save_steps": 1, **overrides})
        result = make_trainer(model, processor, args, packed_dataset(rows, processor, seq_length=seq_length))
        result.run_settings = {"seq_length": seq_length}
        return result

    trainer(160, max_steps=1).train()
    with pytest.raises(UsageError) as refused:
        trainer(200).train(resume_from_checkpoint=True)
    assert str(refused.value) == (
        f"--resume_from_checkpoint {tmp_path / 'checkpoint-1'}: saved with other settings (--seq_length 160 -> 200); "
        "resume with the checkpoint's settings, or pass --resume_restart_data true to keep its weights, optimizer, LR "
        "schedule and step but restart the data from its beginning with the new settings"
    )
    restarted = trainer(200, resume_restart_data=True, resume_from_checkpoint="true")
    restarted.train(resume_from_checkpoint=True)
    assert restarted.state.global_step == 2


def test_fsdp_config_without_a_gpu_stops_at_start_instead_of_becoming_ddp(tmp_path):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` here (no GPU): Accelerate has no FSDP on CPU
    and would train with DDP without a word; the entry point stops with one line (accelerate's launcher then
    reports the failed child in its own words)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/fsdp.yaml"), "--num_processes", "1", str(ROOT / "train_accelerate.py"),
           "--config", str(ROOT / "configs/train/demo.yaml"), "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("train_accelerate.py")]
    assert ours == [
        "train_accelerate.py: error: FSDP (configs/accelerate/fsdp.yaml or --fsdp) needs GPUs: this run is on CPU, "
        "where Accelerate has no FSDP and would silently train with DDP; on CPU launch with "
        "configs/accelerate/cpu_2proc.yaml (DDP), or run FSDP on a machine with GPUs"
    ]
    assert not (tmp_path / "checkpoint-1").exists()


def test_one_invalid_argument_is_one_line(tmp_path):
    from nanovlm.training.parser import parse_args

    with pytest.raises(ValueError) as info:
        parse_args(["--config", str(ROOT / "configs/train/demo.yaml"), "--output_dir", str(tmp_path), "--lr_mp", "-1"])
    assert str(info.value) == "--lr_mp must be a finite number >= 0 (0 freezes that module): got -1.0"


def test_torch_varlen_attention_on_cpu_stops_at_start(tmp_path):
    proc = run_entry(["--output_dir", str(tmp_path), "--attn_implementation", "torch_varlen", "--max_steps", "1"])
    assert proc.returncode == 1
    assert error_lines(proc) == [
        "train_accelerate.py: error: --attn_implementation torch_varlen runs PyTorch's flash-attention varlen kernel, "
        "which needs a CUDA GPU; this run is on CPU: use --attn_implementation sdpa (packed samples stay isolated)"
    ]
    assert not (tmp_path / "synthetic_data").exists()  # stopped before building data or a model


def test_resume_from_a_folder_that_is_not_a_checkpoint_stops_before_any_data(tmp_path):
    not_a_checkpoint = tmp_path / "final"  # e.g. a saved model: no trainer_state.json
    not_a_checkpoint.mkdir()
    for path, what in ((tmp_path / "missing", "no such folder"),
                       (not_a_checkpoint, "not a complete checkpoint (no readable trainer_state.json)")):
        proc = run_entry(["--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", str(path)], timeout=120)
        assert proc.returncode == 1
        assert error_lines(proc) == [
            f"train_accelerate.py: error: --resume_from_checkpoint {path}: {what}; pass a checkpoint-N folder this "
            "trainer saved, or true for the last complete one in --output_dir (--model_name_or_path DIR fine-tunes a "
            "saved model instead)"
        ]
    assert not (tmp_path / "out").exists()  # before building data, a model or the output folder


def test_max_image_size_off_the_models_tile_is_one_line(data, tmp_path):
    """The tile comes from the model config (the demo's 64 px); before, the image processor raised a traceback."""
    proc = run_entry(["--output_dir", str(tmp_path), "--dataset_name_or_path", str(data), *SMALL,
                      "--max_image_size", "96"])
    assert proc.returncode == 1
    assert error_lines(proc) == [
        "train_accelerate.py: error: --max_image_size 96: must be a multiple of the tile size, as the vision tower "
        "takes 64 px tiles (vision_config.image_size); use 64"
    ]


def test_balanced_batches_resume_with_another_batch_size_is_refused(tmp_path):
    """--balance_batches cuts and orders each round's packs in batches of --per_device_train_batch_size, so a saved
    position points at other packs under another size (a resume from 2 to 3 lost 3 of 40 rows of its epoch): refused,
    naming the flag. Without --balance_batches the position is per pack and another batch size resumes exactly."""
    from training_helpers import make_trainer, packed_dataset, synthetic_rows, tiny_setup

    from nanovlm.training.build import data_position_settings
    from nanovlm.training.errors import UsageError
    from nanovlm.training.parser import parse_args

    rows = synthetic_rows(24)

    def trainer(batch: int, balance: bool, **overrides):
        model_args, data_args, args = parse_args(
            ["--config", str(ROOT / "configs/train/demo.yaml"), "--output_dir", str(tmp_path / str(balance)),
             "--per_device_train_batch_size", str(batch), "--balance_batches", str(balance).lower(), "--max_steps",
             "2", "--save_steps", "1", "--eval_strategy", "no", "--load_best_model_at_end", "false",
             "--dataloader_num_workers", "0", "--report_to", "none"]
        )
        for key, value in overrides.items():
            setattr(args, key, value)
        model, processor = tiny_setup()
        result = make_trainer(model, processor, args, packed_dataset(rows, processor))
        result.run_settings = data_position_settings(model_args, data_args, args)
        return result

    for balance in (True, False):
        trainer(2, balance, max_steps=1).train()
    with pytest.raises(UsageError) as refused:
        trainer(3, True).train(resume_from_checkpoint=True)
    assert str(refused.value).startswith(
        f"--resume_from_checkpoint {tmp_path / 'True' / 'checkpoint-1'}: saved with other settings "
        "(--per_device_train_batch_size 2 -> 3); resume with the checkpoint's settings, or pass --resume_restart_data"
    )
    unbalanced = trainer(3, False)
    unbalanced.train(resume_from_checkpoint=True)
    assert unbalanced.state.global_step == 2


def test_unknown_lmms_eval_task_stops_at_start(tmp_path):
    """Before, each checkpoint's background evaluation failed with lmms-eval's KeyError in its log while training
    went on; now the run stops at start, before any data or model, naming the task and close matches."""
    proc = run_entry(["--output_dir", str(tmp_path), "--max_steps", "1", "--lmms_eval_tasks", "nanovlm_synthetic",
                      "nanovlm_synthetic_mcq"])
    assert proc.returncode == 1
    assert [line for line in error_lines(proc) if "| DEBUG" not in line] == [
        "train_accelerate.py: error: --lmms_eval_tasks: unknown lmms-eval task 'nanovlm_synthetic_mcq' (did you mean "
        "nanovlm_synthetic_mc, nanovlm_synthetic?); list the tasks with: python -m lmms_eval --tasks list "
        '--include_path "$(python -m nanovlm.evaluation.tasks)"'
    ]
    assert not (tmp_path / "synthetic_data").exists()
