"""The bench scripts run end to end on the tiny shape and write the JSON they document (nothing is timed here)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from nanovlm.data.collator import BOOKKEEPING_KEY

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_script(name: str):
    """Import bench/<name>.py (which imports its sibling `common` by name) under a unique module name."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name == "common":
        return importlib.import_module("common")  # the very module the scripts import
    module_name = f"bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def read(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


TRAIN_ARGS = ["--shape", "tiny", "--steps", "4", "--warmup_steps", "1", "--batch_size", "2", "--num_workers", "0",
              "--rows", "48", "--pipeline_batches", "2", "--threads", "1"]


def test_train_throughput_counts_what_the_collator_produced(tmp_path):
    bench = load_script("train_throughput")
    out = tmp_path / "train.json"
    report = bench.main(TRAIN_ARGS + ["--out", str(out)])
    saved = read(out)
    assert saved["config"]["steps"] == 4 and saved["machine"]["cpu"]
    (run,) = saved["runs"]
    assert run == json.loads(json.dumps(report["runs"][0], default=str))
    for key in ("tokens_per_s", "real_tokens_per_s", "real_token_fraction", "time_split", "peak_memory_bytes",
                "model_tflops_per_s", "mfu", "pipeline", "totals", "params"):
        assert key in run, key
    assert run["steps"] == 4 and run["measured_steps"] == 3
    assert 0 < run["real_token_fraction"] <= 1
    assert run["tokens_per_s"] >= run["real_tokens_per_s"] > 0
    assert run["mfu"] is None and run["peak_memory_kind"] == "cpu_max_rss" and run["peak_memory_bytes"] > 0
    assert all(v >= 0 for v in run["time_split"].values())
    assert sum(run["time_split"].values()) == pytest.approx(1.0)
    assert math.isfinite(run["loss_first"]) and run["losses_finite"]
    assert run["pipeline"]["batches_per_s"] > 0 and run["pipeline"]["ratio"] > 0

    # The same batches again (num_workers=0, same seed): the totals are exactly what the collator produced.
    args = bench.build_parser().parse_args(TRAIN_ARGS)
    trainer = bench.build_run(args, "tiny", str(tmp_path / "again"))["trainer"]
    batches = [b[BOOKKEEPING_KEY]["stats"] for _, b in zip(range(4), trainer.get_train_dataloader())]
    totals = run["totals"]
    assert totals["real_tokens"] == sum(s["num_real_tokens"] for s in batches)
    assert totals["pad_tokens"] == sum(s["num_pad_tokens"] for s in batches)
    assert totals["samples"] == sum(s["num_samples"] for s in batches)
    assert totals["tiles"] == sum(s["num_tiles"] for s in batches)
    # ... and the trainer's own logged statistics saw the same batches.
    fraction = totals["real_tokens"] / (totals["real_tokens"] + totals["pad_tokens"])
    assert run["trainer_logged"]["perf/real_token_fraction"] == pytest.approx(fraction)


def test_train_throughput_unpacked_baseline_pads_every_sample_to_the_sequence_length(tmp_path):
    bench = load_script("train_throughput")
    args = ["--shape", "tiny", "--steps", "2", "--warmup_steps", "1", "--batch_size", "2", "--num_workers", "0",
            "--rows", "32", "--pipeline_batches", "1", "--seq_length", "128", "--no-packing", "--data", "random",
            "--threads", "1", "--out", str(tmp_path / "unpacked.json")]
    (run,) = bench.main(args)["runs"]
    totals = run["totals"]
    assert run["packing"] is False and run["data"] == "random"
    assert totals["samples"] == 2 * 2  # one sample per row
    assert totals["real_tokens"] + totals["pad_tokens"] == 2 * 2 * 128
    assert 0 < run["real_token_fraction"] < 1


def test_random_samples_match_the_processor_image_tokens():
    common = load_script("common")
    spec = common.get_shape("tiny")
    tokenizer = common.build_tokenizer(spec)
    config = common.build_config(spec, tokenizer)
    processor = common.build_processor_for_shape(spec, tokenizer, config)
    source = common.RandomSamples(processor, n=40, max_sample_length=spec.max_sample_length)
    samples = [source[i] for i in range(len(source))]
    assert any(s is None for s in samples) and any(s is not None for s in samples)  # long ones are skipped
    for sample in filter(None, samples):
        tiles = 0 if sample["pixel_values"] is None else sample["pixel_values"].shape[0]
        assert int((sample["input_ids"] == config.image_token_id).sum()) == tiles * config.image_seq_len
        assert len(sample["input_ids"]) == len(sample["labels"]) <= spec.max_sample_length
        assert (sample["labels"] != -100).any()
    i = next(i for i, s in enumerate(samples) if s is not None)
    assert source[i]["input_ids"].tolist() == samples[i]["input_ids"].tolist()  # drawn from a per-index seed


def test_generation_generates_exactly_the_requested_tokens_in_every_mode(tmp_path):
    bench = load_script("generation")
    out = tmp_path / "generation.json"
    bench.main(["--shape", "tiny", "--batch_sizes", "1", "2", "--max_new_tokens", "5", "--repeats", "1",
                "--image_size", "80x60", "--threads", "1", "--out", str(out)])
    runs = read(out)["runs"]
    assert {(r["batch"], r["mode"]) for r in runs} == {(b, m) for b in (1, 2) for m in ("no_cache", "dynamic", "static")}
    for r in runs:
        assert "error" not in r, r
        assert r["new_tokens"] == 5 and r["image_tiles"] == 5  # 80x60 -> 2x2 tiles + a global view
        # timings are measured, never compared (they are separate runs, reordered by load): present, finite, > 0
        for key in ("ttft_s", "total_s", "tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["same_as_no_cache"] is True  # KV-cache and cache-less greedy decoding agree
    assert all(r["speedup_vs_no_cache"] == 1.0 for r in runs if r["mode"] == "no_cache")


def test_preprocess_reports_images_and_samples(tmp_path):
    bench = load_script("preprocess")
    out = tmp_path / "preprocess.json"
    bench.main(["--settings", "demo", "460m", "--sizes", "photo=1024x768", "document=90x120", "--rows", "3",
                "--min_time", "0", "--out", str(out)])
    report = read(out)
    grids = {(r["setting"], r["kind"]): (r["grid"], r["tiles"], r["image_tokens"]) for r in report["images"]}
    assert grids[("demo", "photo")] == ("1x1", 1, 17)  # one 64 px tile of 16 image tokens + the global token
    assert grids[("460m", "photo")] == ("2x2", 5, 325)  # 1024x768 -> 2x2 tiles of 64 tokens + a global view
    assert all(r["process_images_per_s"] > 0 and r["decode_process_images_per_s"] > 0 for r in report["images"])
    rows = {(r["setting"], r["rows"]) for r in report["samples"]}
    assert rows == {("demo", "finevision-like"), ("demo", "synthetic"), ("460m", "finevision-like")}
    assert all(r["samples_per_s"] > 0 and r["tokens_per_sample"] > 0 and r["skipped"] == 0 for r in report["samples"])


def test_original_differences_compares_every_run_with_the_original(tmp_path):
    script = load_script("original_differences")
    report = script.main(["--steps", "3", "--warmup_fraction", "0.34", "--rows", "48", "--out", str(tmp_path / "d.json")])
    assert read(tmp_path / "d.json")["comparisons"] == report["comparisons"]
    runs = report["runs"]
    assert set(runs) == {"original", "global_tokens", "exempt", "nanovlm"}
    assert all(len(r["step_loss"]) == len(r["grad_norm"]) == 3 and len(r["label_tokens"]) == 6 for r in runs.values())
    # the first step's loss comes before any update: it differs only by the loss normalisation
    assert runs["exempt"]["step_loss"][0] == runs["original"]["step_loss"][0]
    original = runs["original"]
    counts, losses = original["label_tokens"][:2], [r["step_loss"][0] for r in (runs["original"], runs["global_tokens"])]
    assert (counts[0] == counts[1]) == (abs(losses[0] - losses[1]) < 1e-6)
    assert original["last_micro_batch_vs_step_mean"] >= 0
    assert {row["run"] for row in report["comparisons"]} == {"global_tokens", "exempt", "nanovlm"}


def test_pipeline_memory_reports_every_buffer_and_its_fill(tmp_path):
    bench = load_script("pipeline_memory")
    out = tmp_path / "pipeline_memory.json"
    bench.main(["--buffers", "4", "8", "--packs", "2", "--shuffle_buffer", "10", "--fraction_samples", "200",
                "--speed_rows", "4", "--out", str(out)])
    report = read(out)
    runs = {r["buffer"]: r for r in report["runs"]}
    assert set(runs) == {4, 8}
    assert all(r["rows_measured"] + sum(r["skipped"].values()) >= r["buffer"] for r in runs.values())
    assert all(r["samples_built"] >= 2 and r["peak_rss_mib"] >= r["start_rss_mib"] for r in runs.values())
    assert all(0 < r["real_token_fraction"] <= 1 for r in runs.values())
    assert report["summary"]["h100_40pct_mfu_tokens_per_s"] > 0
    assert all(r["spilled_mib"] > 0 for r in runs.values())  # the stream's buffered rows went to its spill file
    speed = report["speed"]
    assert speed["rows"] == 4 and speed["new_built"] == speed["old_built"] >= 1  # the same rows, the same samples
    assert report["summary"]["pipeline_over_old_builder"] == pytest.approx(
        speed["new_samples_per_s"] / speed["old_samples_per_s"])


def test_rank_balance_reports_the_max_over_mean_of_every_variant(tmp_path, monkeypatch):
    out = tmp_path / "rank_balance.json"
    argv = ["rank_balance.py", "--ranks", "2", "--steps", "3", "--accumulation", "2", "--buffer-size", "256",
            "--tile-caps", "32", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    load_script("rank_balance").main()
    report = read(out)
    names = [v["variant"] for v in report["variants"]]
    assert names == ["images<=18", "tiles<=32", "images<=18, balanced", "tiles<=32, balanced"]
    for v in report["variants"]:
        assert v["step_max_over_mean"] >= 1.0 and v["micro_max_over_mean"] >= 1.0
        assert 0.5 < v["real_token_fraction"] <= 1.0
    by_name = {v["variant"]: v for v in report["variants"]}
    # pairing reorders the same packs: the work moves between micro-batches but only row padding changes
    assert by_name["images<=18, balanced"]["tflops_per_step_mean"] == pytest.approx(
        by_name["images<=18"]["tflops_per_step_mean"], rel=0.05)


def test_train_throughput_profiles_steps_after_the_timed_ones(tmp_path, capsys):
    bench = load_script("train_throughput")
    args = TRAIN_ARGS + ["--profile_steps", "2", "--pipeline_batches", "0", "--out", str(tmp_path / "p.json")]
    bench.main(args)
    (run,) = read(tmp_path / "p.json")["runs"]
    assert run["steps"] == 4 and run["measured_steps"] == 3  # the 2 profiled steps are not in the figures
    profile = run["profile"]
    assert profile["steps"] == 2 and profile["source"] == "cpu_operator_self_time"  # no CUDA kernels on CPU
    assert profile["device_busy_fraction"] is None and profile["launches_per_step"] > 0
    assert sum(v["share"] for v in profile["categories"].values()) == pytest.approx(1.0)
    assert {"gemm", "attention"} <= set(profile["categories"])
    assert set(profile["modules_forward"]) == {"vision_tower", "projector", "language_model", "lm_head"}
    assert profile["modules_forward"]["language_model"]["calls"] == 2  # one forward per profiled step
    assert profile["top_kernels"][0]["ms_per_step"] >= profile["top_kernels"][-1]["ms_per_step"]
    assert "profile (cpu_operator_self_time, 2 steps)" in capsys.readouterr().out


def test_step_profile_names_kernel_kinds_and_merges_overlapping_kernels():
    profile = load_script("step_profile")
    kinds = {
        "nvjet_tst_192x192_64x3_1x2_h_bz_coopB_TNT": "gemm",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "gemm",
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>": "norm",
        "void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>": "optimizer",
        "triton_poi_fused_add_mul_0": "compiled_fusion",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "elementwise",
        "aten::mm": "gemm",
        "something_unknown": "other",
    }
    assert {name: profile.kind_of(name) for name in kinds} == kinds
    assert profile._merged_length([(0, 10), (5, 12), (20, 25), (24, 30)]) == 22  # [0, 12) and [20, 30)
    assert profile._merged_length([]) == 0


def test_a_failing_profile_keeps_the_timed_figures(tmp_path, monkeypatch):
    bench = load_script("train_throughput")
    profile = sys.modules["step_profile"]  # the module train_throughput imported by name

    def broken(prof, wall_s, steps, top=20):
        raise RuntimeError("no kernels")

    monkeypatch.setattr(profile, "summarize_profile", broken)
    args = TRAIN_ARGS + ["--profile_steps", "1", "--pipeline_batches", "0", "--out", str(tmp_path / "p.json")]
    (run,) = bench.main(args)["runs"]
    assert run["profile"] == {"error": "profiler summary: RuntimeError: no kernels"}
    assert run["measured_steps"] == 3 and run["tokens_per_s"] > 0
