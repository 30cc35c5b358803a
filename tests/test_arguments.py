"""Training arguments and their parser: defaults, YAML + CLI precedence, error texts, run names, every recipe YAML."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import TrainingArguments

from nanovlm.training import (
    ArgumentsError,
    DataArguments,
    ModelArguments,
    NanoVLMArgumentParser,
    NanoVLMTrainingArguments,
    parse_args,
    run_name,
)

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

# Defaults that NanoVLMTrainingArguments changes, as its class docstring lists them.
CHANGED_DEFAULTS = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 8,
    "max_steps": 40000,
    "logging_steps": 10,
    "learning_rate": None,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "warmup_steps": 0.03,
    "bf16": None,
    "remove_unused_columns": False,
    "dataloader_num_workers": 2,
    "save_total_limit": 3,
    "ddp_find_unused_parameters": False,
    "eval_strategy": "steps",
    "save_steps": None,
    "metric_for_best_model": "eval_loss",
    "greater_is_better": False,
}


def write_yaml(tmp_path: Path, data: dict | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def field_default(dtype: type, name: str):
    (f,) = [f for f in dataclasses.fields(dtype) if f.name == name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# ---- the dataclasses themselves


def test_field_names_do_not_collide_and_all_have_help():
    names = [
        f.name for dtype in (ModelArguments, DataArguments, NanoVLMTrainingArguments) for f in dataclasses.fields(dtype)
    ]
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert len(names) == len(set(names)), "a field name appears in two argument dataclasses"
    own = [n for n in ("lr_mp", "eval_interval", "compile", "lora_r") if n in base]
    assert own == [], f"nanoVLM fields shadow TrainingArguments fields: {own}"
    for dtype in (ModelArguments, DataArguments, NanoVLMTrainingArguments):
        for f in dataclasses.fields(dtype):
            if dtype is NanoVLMTrainingArguments and f.name in base and f.name not in CHANGED_DEFAULTS:
                continue  # inherited unchanged
            assert f.metadata.get("help"), f"{dtype.__name__}.{f.name} has no help text"


def test_changed_defaults_really_differ_from_training_arguments():
    for name, value in CHANGED_DEFAULTS.items():
        assert field_default(NanoVLMTrainingArguments, name) == value, name
        assert field_default(TrainingArguments, name) != value, f"{name} is documented as changed but is not"
        assert f"`{name}`" in NanoVLMTrainingArguments.__doc__, f"{name} missing from the class docstring"
    assert field_default(NanoVLMTrainingArguments, "accelerator_config") == {"dispatch_batches": False}


def test_defaults_after_parsing(tmp_path):
    model_args, data_args, args = parse_args(["--output_dir", str(tmp_path)])
    assert model_args.vision_model == "google/siglip2-base-patch16-512"
    assert model_args.text_model == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert (model_args.pixel_shuffle_factor, model_args.max_image_size, model_args.max_grid) == (4, 2048, 8)
    assert data_args.dataset_name_or_path == "HuggingFaceM4/FineVision_concat_shuffled_2"
    assert (data_args.seq_length, data_args.max_sample_length, data_args.max_images_per_knapsack) == (4096, 4096, 18)
    assert data_args.has_validation is False
    assert args.bf16 is bool(CUDA and torch.cuda.is_bf16_supported())  # False on this CPU machine
    assert args.accelerator_config.dispatch_batches is False
    assert args.remove_unused_columns is False
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_steps) == (2, 8, 40000)
    assert (args.lr_mp, args.lr_vision_backbone, args.lr_language_backbone) == (0.00512, 5e-5, 5e-5)
    assert args.learning_rate == args.lr_mp  # mirror for code that reads it
    assert args.warmup_steps == 0.03  # transformers 5: warmup_steps < 1 is a ratio
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert (args.eval_steps, args.save_steps, args.lmms_eval_interval) == (500, 500, 1000)
    assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False
    assert args.report_to == [] and args.ddp_find_unused_parameters is False
    assert args.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert args.compile is False and args.torch_compile is False


# ---- YAML + CLI


def test_yaml_values_and_cli_overrides(tmp_path):
    config = write_yaml(
        tmp_path,
        """
output_dir: {out}
lr_mp: 1e-3            # YAML 1.1 reads this as a string; it must still become a float
max_steps: 100
compile: true
random_init: true
model_config:
  text_config: {{hidden_size: 64, num_hidden_layers: 2}}
  pixel_shuffle_factor: 2
tokenizer_train_vocab_size: 512
dataset_configs: all
lora_target_modules: [q_proj, v_proj]
eval_max_batches: null
accelerator_config: {{split_batches: true}}
""".format(out=tmp_path / "from_yaml"),
    )
    model_args, data_args, args = parse_args(["--config", str(config), "--max_steps", "50", "--compile", "false"])
    assert args.output_dir == str(tmp_path / "from_yaml")
    assert args.lr_mp == pytest.approx(1e-3) and args.learning_rate == pytest.approx(1e-3)
    assert args.max_steps == 50  # the CLI wins
    assert args.compile is False and args.torch_compile is False
    assert model_args.random_init is True and model_args.tokenizer_train_vocab_size == 512
    assert model_args.model_config == {
        "text_config": {"hidden_size": 64, "num_hidden_layers": 2},
        "pixel_shuffle_factor": 2,
    }
    assert data_args.dataset_configs == ["all"]
    assert args.lora_target_modules == ["q_proj", "v_proj"]
    assert args.eval_max_batches is None
    assert args.accelerator_config.split_batches is True and args.accelerator_config.dispatch_batches is False

    _, _, args = parse_args([f"--config={config}", "--output_dir", str(tmp_path / "cli")])
    assert args.output_dir == str(tmp_path / "cli") and args.max_steps == 100 and args.compile is True


def test_yaml_unknown_key_names_key_file_and_suggestion(tmp_path):
    config = write_yaml(tmp_path, {"output_dir": str(tmp_path), "lr_mpp": 0.1, "seq_lenght": 128})
    with pytest.raises(ValueError, match=r"unknown key `lr_mpp` in .*recipe\.yaml \(did you mean lr_mp\?\)") as info:
        parse_args(["--config", str(config)])
    assert re.search(r"unknown key `seq_lenght` in .*recipe\.yaml \(did you mean seq_length\?\)", str(info.value))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr_mp", "abc", r"`lr_mp` in .*recipe\.yaml: invalid float value: 'abc'"),
        ("max_steps", 1.5, r"`max_steps` in .*recipe\.yaml: must be an integer: got 1\.5"),
        ("compile", 3, r"`compile` in .*recipe\.yaml: must be true or false: got 3"),
        ("max_grid", True, r"`max_grid` in .*recipe\.yaml: must be a number, not a boolean"),
        ("attn_implementation", "fast", r"`attn_implementation` in .*recipe\.yaml: must be one of \['eager'"),
        ("lr_mp", [1, 2], r"`lr_mp` in .*recipe\.yaml: must be a single value, not a list"),
        ("seq_length", None, r"`seq_length` in .*recipe\.yaml: must not be null"),
    ],
)
def test_yaml_bad_values_name_the_key(tmp_path, key, value, message):
    config = write_yaml(tmp_path, {"output_dir": str(tmp_path), key: value})
    with pytest.raises(ValueError, match=message):
        parse_args(["--config", str(config)])


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--config .*nope\.yaml: no such file"):
        parse_args(["--config", str(tmp_path / "nope.yaml"), "--output_dir", str(tmp_path)])
    config = write_yaml(tmp_path, "- a\n- b\n")
    with pytest.raises(ValueError, match=r"must be a mapping of argument names to values, got list"):
        parse_args(["--config", str(config), "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("text", ["", "# a recipe whose settings were lost\n"])
def test_empty_config_file_is_an_error_not_all_defaults(tmp_path, text):
    config = write_yaml(tmp_path, text)
    with pytest.raises(ValueError) as info:
        parse_args(["--config", str(config), "--output_dir", str(tmp_path)])
    assert str(info.value) == (
        f"--config {config}: the file holds no settings (empty or only comments); pass a recipe such as "
        "configs/train/demo.yaml, or drop --config and give the flags on the command line"
    )


def test_config_folder_and_invalid_yaml_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        parse_args(["--config", str(tmp_path), "--output_dir", str(tmp_path)])
    assert str(info.value) == f"--config {tmp_path}: a folder, not a file; pass the path of a YAML recipe (configs/train/)"
    config = write_yaml(tmp_path, "max_steps: [1,\n")
    with pytest.raises(ValueError, match=r"--config .*recipe\.yaml: not valid YAML: .*line 2") as info:
        parse_args(["--config", str(config), "--output_dir", str(tmp_path)])
    assert "\n" not in str(info.value)  # PyYAML's message spans lines with a caret


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be an integer >= 1: got 0"),
        (["--per_device_eval_batch_size", "-2"], "--per_device_eval_batch_size must be an integer >= 1: got -2"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be an integer >= 1: got 0"),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be an integer >= 0: got -1"),
        (
            ["--max_steps", "0"],
            "--max_steps must be an integer >= 1 (the packed training data is a stream without a length, so the run "
            "is counted in optimizer steps): got 0",
        ),
        (
            ["--max_steps", "100", "--warmup_steps", "500"],
            "--warmup_steps must be at most --max_steps (100) or a fraction < 1 of it (nanoVLM: 0.03), else the LR "
            "never reaches its peak: got 500.0",
        ),
        (["--seed", "-1"], "--seed must be an integer in [0, 2**32 - 1]: got -1"),
        (["--max_grad_norm", "-1"], "--max_grad_norm must be a number >= 0 (0 turns clipping off): got -1.0"),
        (
            ["--save_strategy", "steps", "--save_steps", "0"],
            "--save_steps must be > 0 with --save_strategy steps (a step count, or below 1 a fraction of --max_steps): "
            "got 0.0; or set --save_strategy no",
        ),
    ],
)
def test_training_loop_values_fail_at_parse_time(tmp_path, flags, message):
    """Before, these parsed and failed after the data and model were built (a DataLoader or numpy traceback, a
    modulo by zero, Trainer's epoch-mode error), or were silently ignored (no clipping, no mid-run checkpoint)."""
    with pytest.raises(ArgumentsError) as info:
        parse_args(["--config", str(REPO / "configs/train/demo.yaml"), "--output_dir", str(tmp_path), *flags])
    assert str(info.value) == message


def test_model_config_is_checked_at_parse_time(tmp_path):
    base = ["--config", str(REPO / "configs/train/demo.yaml"), "--output_dir", str(tmp_path), "--model_config"]
    with pytest.raises(ArgumentsError) as info:
        parse_args([*base, '{"pixel_shufle_factor": 2, "text_config": {"hidden_size": 64, "num_atention_heads": 4}}'])
    assert info.value.errors == [
        "--model_config has the unknown key `pixel_shufle_factor` (did you mean pixel_shuffle_factor?); NanoVLMConfig "
        "would silently ignore it",
        "--model_config text_config has the unknown key `num_atention_heads` (did you mean num_attention_heads?); "
        "LlamaConfig would silently ignore it",
    ]
    with pytest.raises(ArgumentsError) as info:
        parse_args([*base, '{"text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3}}'])
    assert str(info.value) == (
        "--model_config is not a valid NanoVLMConfig: text_config.num_attention_heads (4) must be a multiple of "
        "text_config.num_key_value_heads (3) (each key/value head serves a whole group of query heads); choose a "
        "key/value head count that divides 4."
    )


def test_unknown_cli_flag_and_prefixes_fail(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option --lr_mpp \(did you mean --lr_mp\?\)") as info:
        parse_args(["--output_dir", str(tmp_path), "--lr_mpp", "0.1"])
    assert "unexpected value" not in str(info.value)  # 0.1 is the unknown option's value
    with pytest.raises(ValueError, match=r"unknown option --lr_m\b"):  # no silent prefix matching
        parse_args(["--output_dir", str(tmp_path), "--lr_m", "0.1"])
    with pytest.raises(ValueError, match=r"unexpected value 'stray'"):
        parse_args(["stray", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"argument --lr_mp/--lr-mp: invalid float value: 'abc'"):
        parse_args(["--output_dir", str(tmp_path), "--lr_mp", "abc"])


def test_output_dir_required(tmp_path):
    with pytest.raises(ValueError, match=r"--output_dir is required: pass --output_dir DIR"):
        parse_args([])
    config = write_yaml(tmp_path, {"max_steps": 10})
    with pytest.raises(ValueError, match=r"--output_dir is required: set output_dir in .*recipe\.yaml or pass"):
        parse_args(["--config", str(config)])


def test_invalid_values_are_collected_across_dataclasses(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--lr_mp", "-1", "--min_relevance_rating", "7"]
    argv += ["--seq_length", "100", "--max_sample_length", "200", "--pixel_shuffle_factor", "0"]
    with pytest.raises(ArgumentsError, match=r"^4 invalid arguments:") as info:
        parse_args(argv)
    text = str(info.value)
    for pattern in (
        r"--lr_mp must be a finite number >= 0 \(0 freezes that module\): got -1\.0",
        r"--min_relevance_rating must be an integer in 1\.\.5 \(1 keeps every turn\): got 7",
        r"--seq_length must be >= --max_sample_length \(200\) so every kept sample fits in a pack: got 100",
        r"--pixel_shuffle_factor must be an integer >= 1: got 0",
    ):
        assert re.search(pattern, text), pattern
    assert len(info.value.errors) == 4


def test_synthetic_train_turn_options(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--synthetic_train_multi_turn_fraction", "1.5"]
    with pytest.raises(ArgumentsError, match=r"--synthetic_train_multi_turn_fraction must be a number in \[0, 1\]: got 1\.5"):
        parse_args(argv + ["--synthetic_train_max_turns", "2"])
    with pytest.raises(ArgumentsError, match=r"--synthetic_train_max_turns must be an integer >= 1: got 0"):
        parse_args(["--output_dir", str(tmp_path), "--synthetic_train_max_turns", "0"])
    _, data_args, _ = parse_args(["--output_dir", str(tmp_path), "--synthetic_train_multi_turn_fraction", "1",
                                  "--synthetic_train_max_turns", "4"])
    assert (data_args.synthetic_train_multi_turn_fraction, data_args.synthetic_train_max_turns) == (1.0, 4)


@pytest.mark.parametrize(
    "flags, expected",
    [([], False), (["--compile"], True), (["--compile", "true"], True), (["--compile", "False"], False)],
)
def test_cli_booleans(tmp_path, flags, expected):
    _, _, args = parse_args(["--output_dir", str(tmp_path), *flags])
    assert args.compile is expected and args.torch_compile is expected


def test_cli_booleans_with_true_default_and_optional(tmp_path):
    model_args, _, _ = parse_args(["--output_dir", str(tmp_path), "--no_normalize_images"])
    assert model_args.normalize_images is False
    model_args, _, args = parse_args(["--output_dir", str(tmp_path), "--normalize_images", "no", "--bf16", "false"])
    assert model_args.normalize_images is False and args.bf16 is False
    parser = NanoVLMArgumentParser()
    namespace, _ = parser.parse_known_args(["--bf16"])  # a bare optional boolean means True
    assert namespace.bf16 is True
    # also as the last flag: its missing value was read as "none" and unset the field (None: the default, silently)
    model_args, _, _ = parse_args(["--output_dir", str(tmp_path), "--normalize_images", "false", "--normalize_images"])
    assert model_args.normalize_images is True
    model_args, _, _ = parse_args(["--output_dir", str(tmp_path), "--upscale_images"])
    assert model_args.upscale_images is True


def test_json_dict_fields_on_the_cli(tmp_path):
    config = '{"text_config": {"hidden_size": 32}}'
    model_args, _, args = parse_args(
        ["--output_dir", str(tmp_path), "--random_init", "--model_config", config, "--accelerator_config", "{}"]
    )
    assert model_args.model_config == {"text_config": {"hidden_size": 32}}
    assert args.accelerator_config.dispatch_batches is False
    with pytest.raises(ValueError, match=r"--model_config must be a JSON object .*: got '\{bad'"):
        parse_args(["--output_dir", str(tmp_path), "--random_init", "--model_config", "{bad"])


def test_help_lists_the_options():
    text = NanoVLMArgumentParser().format_help()
    for flag in ("--config", "--lr_mp", "--max_images_per_knapsack", "--tokenizer_train_vocab_size", "--output_dir"):
        assert flag in text


def test_evaluation_follows_validation_data(tmp_path):
    out = ["--output_dir", str(tmp_path)]
    assert parse_args(out)[2].eval_strategy == "no"  # no val_size, no eval_split: nothing to evaluate
    assert parse_args([*out, "--val_size", "16"])[2].eval_strategy == "steps"
    assert parse_args([*out, "--eval_split", "validation"])[2].eval_strategy == "steps"
    with pytest.raises(ArgumentsError, match=r"--eval_strategy steps needs validation data: .*set --val_size N"):
        parse_args([*out, "--eval_strategy", "steps"])
    config = write_yaml(tmp_path, {"load_best_model_at_end": True})
    with pytest.raises(ArgumentsError, match=r"--load_best_model_at_end needs validation data"):
        parse_args([*out, "--config", str(config)])
    _, _, args = parse_args([*out, "--config", str(config), "--val_size", "8", "--eval_interval", "50"])
    assert args.load_best_model_at_end is True and (args.eval_steps, args.save_steps) == (50, 50)


# ---- validation in the dataclasses


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"tile_size": 512, "max_image_size": 1000},
            r"--max_image_size must be a multiple of --tile_size \(512\): got 1000",
        ),
        ({"tile_size": 256, "max_image_size": 4096}, r"--max_image_size must be at most --max_grid x --tile_size"),
        ({"random_init": True, "model_name_or_path": "ckpt"}, r"--model_name_or_path must be unset with --random_init"),
        ({"model_config": {"a": 1}}, r"--model_config only applies with --random_init true"),
        ({"tokenizer_train_vocab_size": 512}, r"--tokenizer_train_vocab_size needs --random_init true"),
        (
            {"random_init": True, "tokenizer_train_vocab_size": 100},
            r"--tokenizer_train_vocab_size must be an integer >= 259",
        ),
        ({"random_init": True, "vision_model": None}, r"--random_init needs --model_config or both"),
        ({"attn_implementation": "fast"}, r"--attn_implementation must be one of \['eager', 'sdpa'"),
        (
            {"random_init": True, "vision_sincos_position_scale": -1.0},
            r"--vision_sincos_position_scale must be a number > 0 or None: got -1\.0",
        ),
        ({"vision_sincos_position_scale": 2.0}, r"--vision_sincos_position_scale needs --random_init true"),
        ({"image_mean": [0.5, 0.5]}, r"--image_mean must be three finite numbers \(R G B\): got \[0\.5, 0\.5\]"),
        ({"image_std": [0.2, 0.0, 0.2]}, r"--image_std must be three finite numbers > 0 \(R G B\): got \[0\.2, 0\.0"),
        (
            {"image_std": [0.2] * 3, "normalize_images": False},
            r"--image_std has no effect with --normalize_images false",
        ),
        (
            {"image_mean": [0.9] * 3, "model_name_or_path": "ckpt"},
            r"--image_mean must be unset when starting from --model_name_or_path \(its saved processor keeps",
        ),
    ],
)
def test_model_arguments_validation(kwargs, message):
    with pytest.raises(ArgumentsError, match=message):
        ModelArguments(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"max_images_per_example": 5, "max_images_per_knapsack": 4},
            r"--max_images_per_knapsack must be >= --max_images_per_example \(5\)",
        ),
        ({"dataset_configs": ["all", "ai2d"]}, r"--dataset_configs must be 'all' alone"),
        ({"min_formatting_rating": 0}, r"--min_formatting_rating must be an integer in 1\.\.5"),
        ({"val_size": -1}, r"--val_size must be an integer >= 0: got -1"),
        ({"pad_to_multiple_of": 0}, r"--pad_to_multiple_of must be an integer >= 1 or None: got 0"),
        (
            {"synthetic_dataset": True, "synthetic_num_train": 0},
            r"--synthetic_num_train must be >= 1 with --synthetic_dataset",
        ),
        ({"synthetic_num_train_simple": -1}, r"--synthetic_num_train_simple must be an integer >= 0: got -1"),
        ({"curriculum_split": "train"}, r"--curriculum_split must differ from --train_split and --eval_split: got 'train'"),
        (
            {"curriculum_split": "simple", "eval_split": "simple"},
            r"--curriculum_split must differ from --train_split and --eval_split: got 'simple'",
        ),
        (
            {"curriculum_split": "simple", "streaming": True},
            r"--curriculum_split needs a map-style dataset, not --streaming true: got 'simple'",
        ),
    ],
)
def test_data_arguments_validation(kwargs, message):
    with pytest.raises(ArgumentsError, match=message):
        DataArguments(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"lr_mp": 0, "lr_vision_backbone": 0, "lr_language_backbone": 0},
            r"must not all be 0 \(nothing would train\)",
        ),
        (
            {"lr_scheduler_kwargs": {"min_lr_rate": 1.5}},
            r"--lr_scheduler_kwargs min_lr_rate must be a number in \[0, 1\]: got 1\.5",
        ),
        ({"lr_scheduler_kwargs": '{"min_lr_rate": -1}'}, r"min_lr_rate must be a number in \[0, 1\]: got -1"),
        ({"eval_interval": 0}, r"--eval_interval must be an integer >= 1: got 0"),
        ({"lora_dropout": 1}, r"--lora_dropout must be a number in \[0, 1\): got 1"),
        ({"use_lora": True, "lora_target_modules": []}, r"--lora_target_modules must name at least one module"),
        (
            {"weight_decay_exempt_biases_norms_embeddings": False},
            r"--weight_decay_exempt_biases_norms_embeddings false has no effect with --weight_decay 0",
        ),
        (
            {"weight_decay_exempt_biases_norms_embeddings": "no"},
            r"--weight_decay_exempt_biases_norms_embeddings must be true or false: got 'no'",
        ),
        (
            {"loss_normalization": "mean"},
            r"--loss_normalization must be one of \['global_tokens', 'micro_batch_mean'\]: got 'mean'",
        ),
    ],
)
def test_training_arguments_validation(tmp_path, kwargs, message):
    with pytest.raises(ArgumentsError, match=message):
        NanoVLMTrainingArguments(output_dir=str(tmp_path), **kwargs)


def test_training_arguments_resolution(tmp_path, caplog):
    args = NanoVLMTrainingArguments(output_dir=str(tmp_path), eval_interval=40, eval_steps=20, compile=True)
    assert (args.eval_steps, args.save_steps, args.lmms_eval_interval) == (20, 20, 80)
    assert args.torch_compile is True
    with caplog.at_level("WARNING", logger="nanovlm.training.training_arguments"):
        args = NanoVLMTrainingArguments(
            output_dir=str(tmp_path), learning_rate=1.0, warmup_steps=0.1, lr_scheduler_kwargs='{"min_lr_rate": 0}'
        )
    assert "--learning_rate=1.0 is unused" in caplog.text
    assert (
        args.learning_rate == args.lr_mp and args.warmup_steps == 0.1 and args.lr_scheduler_kwargs == {"min_lr_rate": 0}
    )
    again = dataclasses.replace(args)  # re-running __post_init__ on its own resolved values is fine
    assert again.warmup_steps == 0.1 and again.lr_scheduler_kwargs == {"min_lr_rate": 0}


# ---- run names


def test_run_name_matches_nanovlm_format(tmp_path):
    model_args, data_args, _ = ModelArguments(), DataArguments(), None
    gpu_args = SimpleNamespace(
        device=torch.device("cuda", 0), world_size=8, per_device_train_batch_size=2, gradient_accumulation_steps=8,
        max_steps=40000, lr_mp=0.00512, lr_vision_backbone=5e-5, lr_language_backbone=5e-5,
    )  # fmt: skip
    assert run_name(model_args, data_args, gpu_args, world_size=8, date="20261122") == (
        "nanoVLM_siglip2-base-patch16-512_SmolLM2-360M-Instruct_8xGPU_bs128_40000steps_"
        "lr-mp5.1e-03-vis5e-05-lang5e-05_20261122"
    )

    args = NanoVLMTrainingArguments(output_dir=str(tmp_path), lr_vision_backbone=0, max_steps=300)
    demo_model = ModelArguments(random_init=True, model_config={"text_config": {}}, tokenizer_train_vocab_size=300)
    name = run_name(demo_model, DataArguments(synthetic_dataset=True), args)
    device = "GPU" if CUDA else "CPU"
    today = time.strftime("%Y%m%d")
    assert name == f"nanoVLM_random-init_synthetic_1x{device}_bs16_300steps_lr-mp5.1e-03-vis0-lang5e-05_{today}"
    ckpt = ModelArguments(model_name_or_path="runs/my-ckpt/")
    assert run_name(ckpt, DataArguments(), args, world_size=2).startswith(f"nanoVLM_my-ckpt_2x{device}_bs32_")


# ---- every YAML recipe in configs/ parses

CONFIG_FILES = sorted((REPO / "configs").glob("**/*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[str(p.relative_to(REPO)) for p in CONFIG_FILES])
def test_every_config_yaml_loads(path, tmp_path):
    relative = path.relative_to(REPO / "configs")
    if relative.parts[0] == "train":
        argv = ["--config", str(path), "--output_dir", str(tmp_path / "out")]
        if not CUDA:  # GPU recipes may ask for bf16/fp16, which TrainingArguments rejects on a CPU
            argv += ["--bf16", "false", "--fp16", "false"]
        model_args, data_args, args = parse_args(argv)
        assert args.output_dir == str(tmp_path / "out")
        if relative.name == "nanovlm_460m.yaml":  # the original's optimizer: AdamW, decay 0.01 on every parameter
            assert (args.weight_decay, args.weight_decay_exempt_biases_norms_embeddings) == (0.01, False)
            assert (args.max_grad_norm, args.warmup_steps, args.lr_scheduler_kwargs) == (1.0, 0.03, {"min_lr_rate": 0.1})
            # the best measured variant on an H200 (BENCHMARKS.md): each repeated layer compiled once
            assert (args.compile_regions, args.torch_compile) == (True, True)
    else:
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict), f"{relative} is not a mapping"
        if relative.parts[0] == "accelerate":
            assert "distributed_type" in data, f"{relative} has no distributed_type"


def test_image_normalization_flags_reach_the_processor(tmp_path, tiny_tokenizer, tiny_config):
    from PIL import Image

    from nanovlm.training.build import build_processor_for

    argv = ["--output_dir", str(tmp_path), "--max_image_size", "32", "--tile_size", "32", "--max_grid", "1"]
    model_args, _, _ = parse_args(argv + ["--image_mean", "0.9", "0.8", "0.7", "--image_std", "0.1", "0.2", "0.4"])
    assert model_args.image_mean == [0.9, 0.8, 0.7] and model_args.image_std == [0.1, 0.2, 0.4]
    processor = build_processor_for(tiny_config, tiny_tokenizer, model_args)
    pixels = processor.image_processor(images=[Image.new("RGB", (32, 32), (255, 102, 0))])["pixel_values"]
    expected = torch.tensor([(1.0 - 0.9) / 0.1, (0.4 - 0.8) / 0.2, (0.0 - 0.7) / 0.4])
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.allclose(pixels[0, :, 0, 0], expected, atol=1e-5)
    assert torch.allclose(pixels[0], expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-5)

    default_args, _, _ = parse_args(argv)  # unset: SigLIP's 0.5 / 0.5
    default = build_processor_for(tiny_config, tiny_tokenizer, default_args).image_processor
    assert default.image_mean == [0.5, 0.5, 0.5] and default.image_std == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"image_mean and image_std must be three numbers each \(R, G, B\), every std > 0"):
        type(default)(tile_size=32, max_image_size=32, max_grid=1, image_std=[0.5, 0.5, 0.0])
