"""Markdown tables for BENCHMARKS.md from bench/gpu_suite.py's results.json (one or more calls' files).

A lent GPU comes for 15 minutes; writing its figures up by hand took a good part of the next session. This prints
the tables BENCHMARKS.md keeps, from the JSON the suite wrote: the machine, training variants, each profiled
step's kernel-time split and top kernels, correctness checks, generation speed, and every item that did not end
"ok" with its reason. An item that appears in several files is taken from the last file that has it "ok".

    python bench/gpu_report.py /tmp/device-1/results.json /tmp/device-2/results.json > /tmp/report.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load(paths: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(machine of the first file, items in first-seen order: the last "ok" record of each, else its last one)."""
    machine: dict[str, Any] = {}
    chosen: dict[str, dict[str, Any]] = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        machine = machine or report.get("machine", {})
        for record in report.get("items", []):
            name = record["item"]
            if name not in chosen or record.get("status") == "ok" or chosen[name].get("status") != "ok":
                chosen[name] = record
    return machine, list(chosen.values())


def _fmt(value: Any, spec: str = "", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def training_table(items: list[dict[str, Any]]) -> list[str]:
    rows = []
    for record in items:
        r = record.get("result") or {}
        if record["kind"] not in ("train", "dataloader") or record.get("status") != "ok":
            continue
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        rows.append([
            record["item"], _fmt(r.get("attn_implementation")), _fmt(r.get("batch_size"), "d"),
            _fmt(r.get("step_time_s"), ".3f"), _fmt(r.get("tokens_per_s"), ",.0f"),
            _fmt(r.get("real_tokens_per_s"), ",.0f"), _fmt(mfu, ".1f", "%"),
            _fmt(r.get("peak_memory_gib"), ".1f", " GiB"), _fmt(100 * r.get("data_wait_fraction", 0), ".2f", "%"),
            f"{_fmt(r.get('loss_first'), '.3f')} → {_fmt(r.get('loss_last'), '.3f')}",
        ])
    header = ["item", "attention", "B", "step s", "tokens/s", "real tokens/s", "MFU", "peak memory", "data wait",
              "loss first → last"]
    return _table(header, rows) if rows else []


def profile_tables(items: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for record in items:
        prof = (record.get("result") or {}).get("profile")
        if not prof:
            continue
        if "error" in prof:
            lines += [f"**{record['item']}** profile: {prof['error']}", ""]
            continue
        busy = prof.get("device_busy_fraction")
        lines.append(f"**{record['item']}** profile ({prof['steps']} steps, {prof['source']}): "
                     f"{prof['wall_ms_per_step']:.1f} ms/step wall, {prof['work_ms_per_step']:.1f} ms/step of kernels, "
                     f"device busy {_fmt(None if busy is None else 100 * busy, '.1f', '%')}, "
                     f"{prof['launches_per_step']:.0f} launches/step")
        lines.append("")
        cats = [[k, f"{v['ms_per_step']:.2f}", f"{100 * v['share']:.1f}%"] for k, v in prof["categories"].items()]
        lines += _table(["kind", "ms/step", "share"], cats) + [""]
        mods = [[k, f"{v['device_ms'] / prof['steps']:.2f}", f"{v.get('device_span_ms', 0) / prof['steps']:.2f}",
                 f"{v['host_ms'] / prof['steps']:.2f}"] for k, v in prof.get("modules_forward", {}).items()]
        if mods:
            lines += _table(["forward of", "kernels ms/step", "GPU span ms/step", "host ms/step"], mods) + [""]
        top = [[f"{k['ms_per_step']:.2f}", f"{100 * k['share']:.1f}%", f"{k['calls_per_step']:.0f}", k["kind"],
                "`" + k["name"][:100].replace("|", "\\|") + "`"] for k in prof["top_kernels"][:10]]
        lines += _table(["ms/step", "share", "calls/step", "kind", "kernel"], top) + [""]
    return lines


def correctness_table(items: list[dict[str, Any]]) -> list[str]:
    rows = []
    for record in items:
        r = record.get("result") or {}
        if record.get("status") != "ok":
            continue
        if record["kind"] == "packed":
            for impl, v in r["variants"].items():
                result = v.get("error") or (f"max diff {v['max_abs_diff_mean_loss']:.1e} (mean "
                                            f"{v['mean_abs_diff_mean_loss']:.1e}) over {v['samples']} samples; "
                                            f"unisolated control {v['control_unisolated_max_abs_diff']:.1e}")
                rows.append([f"packed == one by one, {impl}, {r['dtype']}", f"{r['tolerance_mean_loss_abs']:.0e}",
                             str(v.get("equal")), result])
        elif record["kind"] == "gen_cache":
            rows.append(["greedy generation with vs without KV cache", "exact", str(r["equal"]),
                         f"{r['new_tokens']} tokens x batch {r['batch']}, {r['dtype']}"])
        elif record["kind"] == "fsdp":
            rows.append(["FSDP step, then from_pretrained vs raw weights", "exact", str(r["equal"]),
                         f"max logit diff {r['max_abs_logit_diff']:.1e}, losses {r['losses']}"])
    return _table(["check", "tolerance", "passed", "figures"], rows) if rows else []


def generation_table(items: list[dict[str, Any]]) -> list[str]:
    rows = []
    for record in items:
        if record["kind"] != "gen_speed" or record.get("status") != "ok":
            continue
        for run in record["result"]["runs"]:
            if "error" in run:
                rows.append([record["item"], _fmt(run.get("mode")), str(run["batch"]), run["error"][:80], "-", "-",
                             "-", "-"])
                continue
            ttft = run.get("ttft_s")
            rows.append([record["item"], _fmt(run.get("mode")), str(run["batch"]),
                         _fmt(None if ttft is None else 1e3 * ttft, ".0f", " ms"), _fmt(run.get("tokens_per_s"), ",.1f"),
                         _fmt(run.get("decode_tokens_per_s"), ",.1f"), _fmt(run.get("prompt_tokens"), "d"),
                         _fmt(run.get("new_tokens"), "d")])
    header = ["item", "mode", "batch", "time to first token", "tokens/s", "decode tokens/s", "prompt tokens",
              "new tokens"]
    return _table(header, rows) if rows else []


def report(paths: list[Path]) -> str:
    machine, items = load(paths)
    lines = [f"Machine: {machine.get('gpu', 'no GPU')}, torch {machine.get('torch')}, transformers "
             f"{machine.get('transformers')}, accelerate {machine.get('accelerate')}, datasets {machine.get('datasets')}, "
             f"liger-kernel {machine.get('liger-kernel')}; {machine.get('date')}", ""]
    for title, part in (("Training", training_table(items)), ("Where the step's time goes", profile_tables(items)),
                        ("Correctness", correctness_table(items)), ("Generation speed", generation_table(items))):
        if part:
            lines += [f"**{title}**", "", *part, ""]
    missing = [f"- {r['item']}: {r.get('status')} after {r.get('wall_s', 0):.0f} s: "
               f"{(r.get('error') or r.get('reason') or '').splitlines()[0][:160] if (r.get('error') or r.get('reason')) else ''}"
               for r in items if r.get("status") != "ok"]
    if missing:
        lines += ["**Not measured**", "", *missing, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of bench/gpu_suite.py, in order")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    for path in args.results:
        if not path.is_file():
            parser.error(f"{path}: no such file (give the results.json that bench/gpu_suite.py wrote)")
    text = report(args.results)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
