"""bench/gpu_suite.py --smoke on CPU: one JSON per item, correctness values, a failing item does not stop the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ITEMS = ["train_sdpa_b2", "train_unisolated_b2", "train_flex_b2", "packed_equivalence", "generation_cache", "fsdp_step"]


def test_gpu_suite_smoke_records_every_item_and_survives_a_failure(tmp_path):
    out, copy = tmp_path / "suite", tmp_path / "device_out"
    cmd = [sys.executable, str(ROOT / "bench/gpu_suite.py"), "--smoke", "--out", str(out), "--copy_to", str(copy),
           "--items", ",".join(ITEMS), "--inject_failure", "train_unisolated_b2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in (out / "items").glob("*.json")}
    assert sorted(records) == sorted(ITEMS)
    for record in records.values():
        assert {"item", "kind", "params", "status", "wall_s", "budget_s"} <= set(record) or record["status"] == "skipped"

    # the injected failure is recorded with its error, and the items after it still ran
    failed = records["train_unisolated_b2"]
    assert failed["status"] == "failed" and "injected failure in train_unisolated_b2" in failed["error"]
    for name in ("train_flex_b2", "fsdp_step"):  # CUDA-only
        assert records[name]["status"] == "skipped" and records[name]["reason"] == "skipped: no CUDA"

    train = records["train_sdpa_b2"]
    assert train["status"] == "ok", train.get("error")
    r = train["result"]
    assert {"tokens_per_s", "real_tokens_per_s", "mfu", "data_wait_fraction", "compute_fraction", "time_split",
            "loss_first", "params"} <= set(r)
    assert r["measured_steps"] == 3 and r["losses_finite"] and 0 < r["real_tokens_per_s"] <= r["tokens_per_s"]
    assert r["variant"] == {"profile": 2} and r["mfu"] is None  # no GPU peak on CPU
    # 4 timed steps, then 2 profiled ones (left out of the figures); the profile's shares cover its time
    assert r["steps"] == 4 and r["profile"]["steps"] == 2 and r["profile"]["source"] == "cpu_operator_self_time"
    assert sum(v["share"] for v in r["profile"]["categories"].values()) == pytest.approx(1.0)
    assert r["profile"]["modules_forward"]["language_model"]["calls"] == 2

    packed = records["packed_equivalence"]["result"]
    assert packed["tolerance_mean_loss_abs"] == 1e-4 and packed["all_equal"] is True
    for impl in ("sdpa", "eager"):
        v = packed["variants"][impl]
        assert v["samples"] >= 2 and v["max_abs_diff_mean_loss"] <= 1e-4
        assert v["control_unisolated_max_abs_diff"] > 10 * max(v["max_abs_diff_mean_loss"], 1e-6)  # the check has power

    cache = records["generation_cache"]["result"]
    assert cache["equal"] is True and cache["first_mismatch"] is None and cache["new_tokens"] == 16

    # results.json holds every item in suite order, and it and the log were copied for the device's $OUT
    results = json.loads((copy / "results.json").read_text())
    assert [i["item"] for i in results["items"]] == ITEMS and results["smoke"] is True
    log = (copy / "log.txt").read_text()
    assert "===== packed_equivalence" in log and "injected failure" in log
    assert "train_unisolated_b2" in proc.stdout.split("summary")[-1]  # the closing table

    # bench/gpu_report.py turns the results into BENCHMARKS.md's tables, failures listed with their reasons
    report = subprocess.run([sys.executable, str(ROOT / "bench/gpu_report.py"), str(copy / "results.json")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert report.returncode == 0, report.stderr[-2000:]
    text = report.stdout
    row = next(line for line in text.splitlines() if line.startswith("| train_sdpa_b2 |"))
    assert f"| {r['step_time_s']:.3f} |" in row and "| - |" in row  # no MFU on CPU
    assert "**train_sdpa_b2** profile (2 steps, cpu_operator_self_time)" in text
    assert "| packed == one by one, sdpa, float32 | 1e-04 | True |" in text
    assert "| greedy generation with vs without KV cache | exact | True |" in text
    assert "- train_unisolated_b2: failed after" in text and "- fsdp_step: skipped after 0 s: skipped: no CUDA" in text


def test_unisolated_control_gives_each_row_one_position_sequence():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_suite

    def collator(packs):
        return {"input_ids": torch.zeros(2, 6, dtype=torch.long),
                "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])}

    batch = gpu_suite.Unisolated(collator)([None, None])
    assert batch["position_ids"].tolist() == [list(range(6))] * 2  # packed samples now see each other


def test_gpu_report_names_a_missing_results_file():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_report.py"), "/nonexistent/results.json"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "gpu_report.py: error: /nonexistent/results.json: no such file (give the results.json that "
        "bench/gpu_suite.py wrote)")
