"""The run builders: the curriculum split read first, and the sin-cos start of the vision position embeddings
(a config option, so the demo model is rebuilt from its config)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers import AutoModel

from nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration, NanoVLMProcessor
from nanovlm.data import synthetic as syn
from nanovlm.modeling_nanovlm import init_vision_positions_sincos, sincos_position_grid
from nanovlm.training import parse_args
from nanovlm.training.build import build_datasets, build_model_and_processor, load_rows, prepare_synthetic_dataset
from nanovlm.training.errors import UsageError
from nanovlm.training.flops import pack_flops

REPO = Path(__file__).resolve().parents[1]

MODEL = [
    "--random_init", "true", "--tokenizer_train_vocab_size", "300", "--max_image_size", "32", "--max_grid", "1",
    "--model_config",
    '{"pixel_shuffle_factor": 2, "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, '
    '"intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}, "text_config": {"hidden_size": 32, '
    '"intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}}',
]


def setup_run(tmp_path, *extra: str):
    argv = [
        "--output_dir", str(tmp_path / "run"), "--dataset_name_or_path", str(tmp_path / "data"),
        "--synthetic_dataset", "true", "--synthetic_num_train", "24", "--synthetic_num_validation", "4",
        "--synthetic_num_test", "0", "--synthetic_image_size", "32", "--eval_split", "validation",
        "--seq_length", "512", "--max_sample_length", "512", "--max_images_per_example", "3",
        "--max_images_per_knapsack", "12", "--pack_buffer_size", "8", *MODEL, *extra,
    ]
    model_args, data_args, args = parse_args(argv)
    prepare_synthetic_dataset(data_args, args)
    rows, eval_rows = load_rows(data_args, args)
    model, processor = build_model_and_processor(model_args, rows)
    return model, processor, data_args, args, rows, eval_rows


def test_curriculum_rows_are_read_first_in_the_first_epoch_only(tmp_path):
    _, processor, data_args, args, rows, eval_rows = setup_run(
        tmp_path, "--synthetic_num_train_simple", "10", "--curriculum_split", syn.SIMPLE_SPLIT
    )
    train, _, _ = build_datasets(data_args, args, processor, rows, eval_rows)
    source = train.source
    assert len(source) == 34 and source.first == 10
    train_config = syn.SyntheticConfig(image_size=32, multi_turn_fraction=0.3, max_turns=3)  # the run's settings
    simple_texts = [
        r["texts"] for r in syn.generate_split(10, syn.SIMPLE_SPLIT, seed=args.seed, config=syn.simple_config(train_config))
    ]
    epoch0 = [source.row_index(i) for i in range(34)]
    assert sorted(epoch0[:10]) == list(range(10)) and sorted(epoch0[10:]) == list(range(10, 34))
    assert [source.read_row(j)["texts"] for j in sorted(epoch0[:10])] == simple_texts
    assert all(source.read_row(j)["texts"] not in simple_texts for j in epoch0[10:])
    source.set_epoch(1)  # later epochs mix both
    epoch1 = [source.row_index(i) for i in range(34)]
    assert sorted(epoch1) == list(range(34)) and set(epoch1[:10]) != set(range(10))
    # the first packs of a run hold only curriculum samples: single-object colour/count/position questions
    train.source.set_epoch(0)
    first_pack = next(iter(train))["samples"]
    decoded = [processor.tokenizer.decode(s["input_ids"]) for s in first_pack]
    questions = {t["user"] for texts in simple_texts for t in texts}
    assert decoded and all(any(q in text for q in questions) for text in decoded)


def test_missing_curriculum_split_names_the_splits(tmp_path):
    _, processor, data_args, args, rows, eval_rows = setup_run(tmp_path, "--curriculum_split", "warmup")
    with pytest.raises(ValueError, match=r"has no split 'warmup'; its splits are \['train', 'validation'\]"):
        build_datasets(data_args, args, processor, rows, eval_rows)


def test_sincos_grid_values_and_model_init(tmp_path):
    grid = sincos_position_grid(4, 8)
    assert grid.shape == (16, 8)
    # token (row 1, col 2): columns in the first half, rows in the second; frequencies 1 and 1/10 (temperature 100)
    col, row = 2.0, 1.0
    expected = [math.sin(col), math.sin(col / 10), math.cos(col), math.cos(col / 10),
                math.sin(row), math.sin(row / 10), math.cos(row), math.cos(row / 10)]
    assert torch.allclose(grid[1 * 4 + 2], torch.tensor(expected), atol=1e-6)
    assert torch.allclose(grid.norm(dim=1), torch.full((16,), 2.0))
    with pytest.raises(ValueError, match=r"dim a positive multiple of 4, got side=4, dim=6"):
        sincos_position_grid(4, 6)

    model, *_ = setup_run(tmp_path, "--vision_sincos_position_scale", "2.0")
    table = model.model.vision_tower.embeddings.position_embedding.weight
    assert table.requires_grad
    assert torch.allclose(table, 2.0 * sincos_position_grid(4, 32))
    plain, *_ = setup_run(tmp_path / "plain")
    assert not torch.allclose(plain.model.vision_tower.embeddings.position_embedding.weight, table)
    plain.model.vision_tower.embeddings.position_embedding = torch.nn.Embedding(15, 32)
    with pytest.raises(ValueError, match=r"needs a square patch grid, got 15 positions"):
        init_vision_positions_sincos(plain.model.vision_tower, 1.0)


def test_demo_model_from_its_config_equals_the_training_paths_model_at_init(tmp_path):
    # the demo recipe's model, built as train_accelerate.py builds it (tokenizer trained on a few generated rows)
    model_args, _, _ = parse_args(["--config", str(REPO / "configs/train/demo.yaml"), "--output_dir", str(tmp_path)])
    rows = syn.generate_split(40, "train", seed=0, config=syn.SyntheticConfig(image_size=64))
    torch.manual_seed(0)
    trained_path, processor = build_model_and_processor(model_args, rows)
    assert trained_path.config.vision_sincos_position_scale == 2.0  # recorded in the config
    image_id = trained_path.config.image_token_id
    assert trained_path.generation_config.suppress_tokens == [image_id]  # generate never emits the placeholder
    # the config also rebuilds the processor's tiling: one 64 px tile (--max_grid 1)
    assert trained_path.config.max_grid == 1
    rebuilt_processor = NanoVLMProcessor.from_config(processor.tokenizer, trained_path.config)
    for key in ("tile_size", "max_grid", "max_image_size"):
        assert getattr(rebuilt_processor.image_processor, key) == getattr(processor.image_processor, key), key
    assert rebuilt_processor.image_seq_len == processor.image_seq_len == 16
    # ... and rebuilt from its config alone, as from_config / AutoModel.from_config do
    for build in (NanoVLMForConditionalGeneration._from_config, AutoModel.from_config):
        torch.manual_seed(0)
        rebuilt = build(NanoVLMConfig.from_dict(trained_path.config.to_dict()))
        table = rebuilt.model.vision_tower.embeddings.position_embedding.weight
        assert torch.equal(table, trained_path.model.vision_tower.embeddings.position_embedding.weight)
        assert torch.allclose(table, 2.0 * sincos_position_grid(8, 128))
        assert rebuilt.generation_config.suppress_tokens == [image_id]
        tower = trained_path.model.vision_tower
        for (name, p), q in zip(rebuilt.model.vision_tower.named_parameters(), tower.parameters()):
            assert torch.equal(p, q), name  # the same seed gives the same tower
    # a saved and reloaded model keeps its trained table: the init does not overwrite loaded weights
    with torch.no_grad():
        trained_path.model.vision_tower.embeddings.position_embedding.weight.add_(1.0)
    trained_path.save_pretrained(tmp_path / "saved")
    loaded = NanoVLMForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert torch.equal(
        loaded.model.vision_tower.embeddings.position_embedding.weight,
        trained_path.model.vision_tower.embeddings.position_embedding.weight,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vision_sincos_position_scale": -1.0}, r"`vision_sincos_position_scale` must be a number > 0 or None, got -1\.0"),
        ({"vision_sincos_position_scale": "2"}, r"`vision_sincos_position_scale` must be a number > 0 or None, got '2'"),
        ({"max_grid": 0}, r"`max_grid` must be a positive int, got 0"),
    ],
)
def test_init_and_tiling_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NanoVLMConfig(**kwargs)


def test_existing_synthetic_dataset_built_with_other_settings_is_an_error(tmp_path):
    setup_run(tmp_path)  # builds 24/4/0 rows at 32 px
    model_args, data_args, args = parse_args([
        "--output_dir", str(tmp_path / "run"), "--dataset_name_or_path", str(tmp_path / "data"),
        "--synthetic_dataset", "true", "--synthetic_num_train", "30", "--synthetic_num_validation", "4",
        "--synthetic_num_test", "0", "--synthetic_image_size", "32", "--synthetic_num_train_simple", "5", *MODEL,
    ])
    message = (
        r"The synthetic dataset in .*data was built with other settings \(--synthetic_num_train: requested 30, built "
        r"24; --synthetic_num_train_simple: requested 5, built 0\)\. Delete the folder to rebuild it"
    )
    with pytest.raises(ValueError, match=message):
        prepare_synthetic_dataset(data_args, args)
    # the same settings reuse the folder as it is
    _, same_data, same_args = parse_args([
        "--output_dir", str(tmp_path / "run"), "--dataset_name_or_path", str(tmp_path / "data"),
        "--synthetic_dataset", "true", "--synthetic_num_train", "24", "--synthetic_num_validation", "4",
        "--synthetic_num_test", "0", "--synthetic_image_size", "32", *MODEL,
    ])
    before = (tmp_path / "data" / "synthetic_config.json").stat().st_mtime_ns
    prepare_synthetic_dataset(same_data, same_args)
    assert (tmp_path / "data" / "synthetic_config.json").stat().st_mtime_ns == before


def test_a_process_reads_the_synthetic_dataset_only_after_the_main_process_wrote_it(tmp_path):
    """Rank 1 arrives while rank 0 is writing the folder (it exists, without its settings record yet): rank 1 waits
    at main_process_first's barrier, here played by finishing the write, then checks the finished folder."""
    import contextlib
    import dataclasses

    from nanovlm.data.synthetic import build_synthetic_dataset

    _, data_args, args = parse_args([
        "--output_dir", str(tmp_path / "run"), "--dataset_name_or_path", str(tmp_path / "data"),
        "--synthetic_dataset", "true", "--synthetic_num_train", "6", "--synthetic_num_validation", "2",
        "--synthetic_num_test", "0", "--synthetic_num_train_simple", "0", "--synthetic_image_size", "32", *MODEL,
    ])
    (tmp_path / "data" / "train").mkdir(parents=True)  # rank 0's save_to_disk has begun
    waited = []

    @contextlib.contextmanager
    def barrier_then(desc):  # a non-main process: the barrier returns once rank 0 is done
        build_synthetic_dataset(tmp_path / "data", data_args.synthetic_settings(args.seed))
        waited.append(desc)
        yield

    rank1 = dataclasses.replace(args)
    object.__setattr__(rank1, "main_process_first", barrier_then)
    prepare_synthetic_dataset(data_args, rank1)
    assert waited == ["building the synthetic dataset"]  # it used to return at once, before rank 0 finished
    # the finished folder is checked: built with other settings, it is refused
    other = dataclasses.replace(data_args, synthetic_num_train=7)
    with pytest.raises(UsageError, match="--synthetic_num_train: requested 7, built 6"):
        prepare_synthetic_dataset(other, rank1)


def test_the_synthetic_dataset_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """It is built in a private folder and renamed into place: a build killed half-way leaves no folder (a partial one
    has no settings record and would be read as given), and when another node's process renamed its copy in first (a
    shared filesystem; main_process_first orders one node's processes only), that copy is used and ours removed."""
    real_build = syn.build_synthetic_dataset
    _, data_args, args = parse_args([
        "--output_dir", str(tmp_path / "run"), "--dataset_name_or_path", str(tmp_path / "out" / "data"),
        "--synthetic_dataset", "true", "--synthetic_num_train", "6", "--synthetic_num_validation", "2",
        "--synthetic_num_test", "0", "--synthetic_num_train_simple", "0", "--synthetic_image_size", "32", *MODEL,
    ])

    def killed(out, settings):
        (Path(out) / "train").mkdir(parents=True)  # save_to_disk had begun
        raise KeyboardInterrupt

    monkeypatch.setattr(syn, "build_synthetic_dataset", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_synthetic_dataset(data_args, args)
    assert list((tmp_path / "out").iterdir()) == []  # neither the dataset folder nor the private one

    built_by = []

    def another_node_first(out, settings):
        real_build(tmp_path / "out" / "data", settings)  # the other node renames its copy in while we build
        built_by.append(Path(out).name)
        return real_build(out, settings)

    monkeypatch.setattr(syn, "build_synthetic_dataset", another_node_first)
    prepare_synthetic_dataset(data_args, args)
    assert built_by[0].startswith(".data.partial-") and [p.name for p in (tmp_path / "out").iterdir()] == ["data"]
    assert datasets.load_from_disk(str(tmp_path / "out" / "data"))["train"].num_rows == 6
    with pytest.raises(UsageError, match="--synthetic_num_train: requested 7, built 6"):  # the copy used is checked
        prepare_synthetic_dataset(dataclasses.replace(data_args, synthetic_num_train=7), args)


def test_balance_batches_prices_training_packs_with_the_models_flop_estimate(tmp_path):
    model, processor, data_args, args, rows, eval_rows = setup_run(tmp_path, "--balance_batches", "true")
    with pytest.raises(UsageError, match="--balance_batches true needs the model config"):
        build_datasets(data_args, args, processor, rows, eval_rows)
    train, evaluation, _ = build_datasets(data_args, args, processor, rows, eval_rows, model_config=model.config)
    assert train.balance_group == args.per_device_train_batch_size and evaluation.pack_cost is None
    assert train.pack_cost(100, 2) == pack_flops(model.config, 100, 2)
    packs = list(itertools.islice(iter(train), 6))
    assert all(p["samples"] for p in packs)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"tile_size": 16}, "--tile_size 16: the vision tower takes 32 px tiles (vision_config.image_size); drop "
                            "--tile_size or set it to 32"),
        ({"max_image_size": 48}, "--max_image_size 48: must be a multiple of the tile size, as the vision tower takes "
                                 "32 px tiles (vision_config.image_size); use 32"),
        ({"max_image_size": 96, "max_grid": 2}, "--max_image_size 96: 3 tiles per side, over --max_grid 2 (the vision "
                                                "tower takes 32 px tiles (vision_config.image_size)); set "
                                                "--max_image_size 64 or raise --max_grid"),
    ],
)
def test_tiling_flags_are_checked_against_the_models_tile(tiny_config, flags, message):
    """`--tile_size` other than the tower's was silently ignored (the processor tiles at the tower's size); the
    others ended in the image processor's traceback."""
    from nanovlm.training.build import check_tiling
    from nanovlm.training.errors import UsageError

    args = SimpleNamespace(**{"tile_size": None, "max_image_size": 32, "max_grid": 1, **flags})
    with pytest.raises(UsageError) as info:
        check_tiling(tiny_config, args)
    assert str(info.value) == message
    check_tiling(tiny_config, SimpleNamespace(tile_size=32, max_image_size=64, max_grid=2))  # fits: no error


def test_model_name_or_path_that_does_not_load_is_one_line(tmp_path, tiny_model, tiny_processor):
    """Before: transformers' traceback ("Repo id must be in the form ...", "no file named model.safetensors", the
    safetensors header error), after the data had been loaded."""
    from nanovlm.training.arguments import ModelArguments
    from nanovlm.training.build import build_model_and_processor
    from nanovlm.training.errors import UsageError

    tiny_model.save_pretrained(tmp_path / "corrupt")
    tiny_processor.save_pretrained(tmp_path / "corrupt")
    weights = tmp_path / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (tmp_path / "empty").mkdir()
    fix = "pass a folder saved by this trainer (OUTPUT_DIR/final) or a hub id"
    for folder, message in (
        ("missing", f"--model_name_or_path {tmp_path / 'missing'}: no such folder; {fix} (org/name)"),
        ("empty", f"--model_name_or_path {tmp_path / 'empty'}: cannot load it (OSError: "),
        ("corrupt", f"--model_name_or_path {tmp_path / 'corrupt'}: cannot load it (SafetensorError: "),
    ):
        with pytest.raises(UsageError) as info:
            build_model_and_processor(ModelArguments(model_name_or_path=str(tmp_path / folder)))
        assert str(info.value).startswith(message) and str(info.value).endswith(fix if folder != "missing" else ")")
        assert "\n" not in str(info.value)


def test_image_flags_with_a_checkpoint_apply_or_are_one_line(tmp_path, tiny_model, tiny_processor):
    """With --model_name_or_path, --max_grid, --upscale_images and --normalize_images were silently ignored (their
    defaults could not be told from a value given). Now each given one replaces the checkpoint processor's value as
    AutoProcessor.from_pretrained(path, **kwargs) does, and is saved with the run; or is one line naming it when the
    checkpoint cannot take it. Unset, every one keeps the checkpoint's."""
    from nanovlm.training.arguments import ModelArguments

    path = str(tmp_path / "base")
    tiny_model.save_pretrained(path)
    tiny_processor.save_pretrained(path)
    saved = tiny_processor.image_processor  # 32 px tiles, up to 4 per side, max_image_size 128, normalized
    assert (saved.tile_size, saved.max_grid, saved.max_image_size, saved.upscale, saved.do_normalize) == (
        32, 4, 128, False, True)

    def built(*flags: str):
        model_args = parse_args(["--output_dir", str(tmp_path / "run"), "--model_name_or_path", path, *flags])[0]
        processor = build_model_and_processor(model_args)[1].image_processor
        settings = (model_args.max_grid, model_args.max_image_size, model_args.upscale_images,
                    model_args.normalize_images)
        assert settings == (processor.max_grid, processor.max_image_size, processor.upscale, processor.do_normalize)
        return settings  # what the run builds its data with is what its settings (checked on resume) record

    assert built() == (4, 128, False, True)
    assert built("--upscale_images", "true") == (4, 128, True, True)
    assert built("--max_grid", "2", "--max_image_size", "64") == (2, 64, False, True)
    assert ModelArguments().max_grid == 8 and ModelArguments().normalize_images is True  # no checkpoint: defaults
    where = f"with --model_name_or_path {path}"
    for flags, message in (
        (["--max_grid", "5"], f"--max_grid 5 {where}: its tokenizer has tile tokens for up to 4 tiles per side; use "
                              "at most 4"),
        (["--max_grid", "2"], f"--max_grid 2 {where}: its max_image_size 128 makes 4 tiles per side; add "
                              "--max_image_size 64"),
        (["--max_grid", "2", "--max_image_size", "96"], f"--max_image_size 96 {where} (its 32 px tiles): 3 tiles per "
                                                        "side, over --max_grid 2; use at most 64"),
        (["--max_image_size", "160"], f"--max_image_size 160 {where} (its 32 px tiles): 5 tiles per side, over the "
                                      "checkpoint's max_grid 4; use at most 128"),
        (["--normalize_images", "false"], f"--normalize_images false {where}: its model was trained on normalized "
                                          "pixels; drop --normalize_images"),
    ):
        with pytest.raises(UsageError) as info:
            built(*flags)
        assert str(info.value) == message
