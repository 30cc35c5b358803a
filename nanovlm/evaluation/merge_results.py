"""Merge the per-task partial result files of one step into one file.

    python -m nanovlm.evaluation.merge_results --results_dir outputs/run/eval_results --global_step 400
    # step_400_mmstar.json + step_400_mme.json (+ an existing step_400.json) -> step_400.json

`python -m nanovlm.evaluation.run --partial` writes the partial files (`step_{N}_{tasks}.json`); the training job's
lmms-eval callback waits for `step_{N}.json`. Results of all files are combined; a task that failed in one file and
succeeded in another counts as succeeded. The partial files are deleted unless `--keep_partials`.

Imports only the standard library, so it also runs as a file (`python .../nanovlm/evaluation/merge_results.py`),
which the SLURM job script does: it starts in milliseconds instead of the seconds `import nanovlm` takes. The
repository's `eval/merge_eval_results.py` runs this same `main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("nanovlm.evaluation.merge_results")  # also right when run as a file


def merge_step_results(results_dir: str | os.PathLike, step: int, keep_partials: bool = False) -> Path:
    """Combine `step_{step}_*.json` (and `step_{step}.json` if present) into `step_{step}.json`; returns its path.

    Raises FileNotFoundError when there is no partial file for the step.
    """
    results_dir = Path(results_dir)
    partials = sorted(results_dir.glob(f"step_{step}_*.json"))
    if not partials:
        raise FileNotFoundError(
            f"No partial result files step_{step}_*.json in {results_dir}; write them with "
            "`python -m nanovlm.evaluation.run --partial`, or check --results_dir and --global_step."
        )
    target = results_dir / f"step_{step}.json"
    merged = {"global_step": step, "checkpoint": None, "tasks": [], "results": {}, "failed_tasks": {}}
    unreadable: list[Path] = []
    for path in ([target] if target.is_file() else []) + partials:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"holds a JSON {type(data).__name__}, not an object")
        except (OSError, ValueError) as error:
            logger.warning("skipping unreadable %s (kept for inspection): %s", path, " ".join(str(error).split()))
            unreadable.append(path)
            continue
        merged["checkpoint"] = merged["checkpoint"] or data.get("checkpoint")
        merged["tasks"] += [t for t in data.get("tasks", []) if t not in merged["tasks"]]
        merged["results"].update(data.get("results") or {})
        merged["failed_tasks"].update(data.get("failed_tasks") or {})
    ran = {t for t in merged["tasks"] if any(k.startswith(f"{t}_") for k in merged["results"])}
    merged["failed_tasks"] = {t: e for t, e in merged["failed_tasks"].items() if t not in ran}
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")  # os.replace: the training job never reads half a file
    if unreadable:  # recorded with the results: a reader must not take the merge for complete
        merged["unreadable_files"] = sorted(str(p) for p in unreadable)
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)
    if not keep_partials:  # an unreadable one stays: deleting it would lose its results without a trace
        for path in partials:
            if path not in unreadable:
                path.unlink(missing_ok=True)
    logger.info("merged %d of %d files into %s", len(partials) - len(unreadable), len(partials), target)
    return target


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m nanovlm.evaluation.merge_results",
        description="Merge step_{N}_*.json partial lmms-eval result files into step_{N}.json.",
    )
    parser.add_argument("--results_dir", required=True, help="folder holding the step_{N}_*.json files")
    parser.add_argument("--global_step", type=int, required=True, help="the step N whose files to merge")
    parser.add_argument("--keep_partials", action="store_true", help="keep the partial files after merging")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        target = merge_step_results(args.results_dir, args.global_step, args.keep_partials)
    except FileNotFoundError as error:
        logger.error("%s", error)
        return 1
    unreadable = json.loads(target.read_text()).get("unreadable_files")
    if unreadable:
        logger.error("%d partial file(s) could not be read and were left out of %s: %s", len(unreadable), target,
                     ", ".join(unreadable))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
