"""Evaluate one NanoVLM checkpoint with lmms-eval; write one results JSON with flat `{task}_{metric}` keys.

    python -m nanovlm.evaluation.run --checkpoint outputs/demo/checkpoint-400 \
        --tasks nanovlm_synthetic nanovlm_synthetic_mc --device cpu
    # -> outputs/demo/eval_results/step_400.json:
    #    {"global_step": 400, "results": {"nanovlm_synthetic_exact_match": 0.61, ...}, "failed_tasks": {}, ...}

Tasks run one after the other in this process (the model is loaded once); a failing task is recorded under
"failed_tasks", the others' results are still written, and the exit code is 1. `--partial` writes
`step_{N}_{tasks}.json` instead, for `python -m nanovlm.evaluation.merge_results` to combine (one process per task,
e.g. on SLURM). Tasks come from lmms-eval, from nanovlm's own task folder (`nanovlm.evaluation.tasks`: the offline
synthetic tasks, whose data `--synthetic_data` / `--synthetic_split` choose) and from `--include_path` folders.
Several processes split the documents between them: `torchrun --nproc_per_node 8 -m nanovlm.evaluation.run ...`
(rank 0 writes the file). The repository's `eval/run_evaluation.py` runs this same `main`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

from ..training.checks import is_local_path
from .launcher import result_file, write_json_atomic
from .tasks import TASKS_DIR

logger = logging.getLogger(__name__)


def parse_limit(text: str) -> int | float:
    """`--limit`: an int (documents per task) or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit must be a number of documents or a fraction, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0, got {text!r}")
    return int(value) if value >= 1 else value


def build_arg_parser() -> argparse.ArgumentParser:
    """The script's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m nanovlm.evaluation.run",
        description="Evaluate a NanoVLM checkpoint with lmms-eval and write {output_dir}/step_{N}.json with flat "
        "{task}_{metric} keys.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (or hub id) with model and processor")
    parser.add_argument("--tasks", nargs="+", required=True, help="lmms-eval tasks, space- or comma-separated")
    parser.add_argument(
        "--limit", type=parse_limit, default=None, help="documents per task (or a fraction); testing only"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="requests per forward/generate call")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu; default: cuda when available")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on capable GPUs, float32 elsewhere",
    )
    parser.add_argument("--max_new_tokens", type=int, default=64, help="generation length when a task sets none")
    parser.add_argument(
        "--gen_kwargs", default=None, help="override every task's generation kwargs, e.g. max_new_tokens=32"
    )
    parser.add_argument("--global_step", type=int, default=None, help="training step (default: from checkpoint-N)")
    parser.add_argument("--output_dir", default=None, help="default: eval_results/ next to the checkpoint")
    parser.add_argument("--partial", action="store_true", help="write step_{N}_{tasks}.json for merge_results")
    parser.add_argument(
        "--include_path",
        action="append",
        default=[],
        help=f"extra lmms-eval task folder (repeatable; {TASKS_DIR} is always included)",
    )
    parser.add_argument(
        "--synthetic_data",
        default=None,
        help="data of the nanovlm_synthetic tasks: a save_to_disk folder or a .parquet file "
        "(default: their YAML's dataset_path, outputs/synthetic_data in the working directory)",
    )
    parser.add_argument("--synthetic_split", default="test", help="split of --synthetic_data to evaluate")
    parser.add_argument(
        "--source_checkpoint", default=None, help="checkpoint recorded in the results file (default --checkpoint)"
    )
    parser.add_argument("--verbosity", default="WARNING", help="lmms-eval log level")
    return parser


def default_step(checkpoint: str) -> int:
    """N from a `.../checkpoint-N` folder name, else 0."""
    match = re.search(r"checkpoint-(\d+)$", str(checkpoint).rstrip("/"))
    return int(match.group(1)) if match else 0


def load_model(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The lmms-eval adapter around `--checkpoint`; a folder without weights, a corrupt weights file or a bad adapter
    setting exits through `parser.error` (one line, status 2) instead of a traceback."""
    from safetensors import SafetensorError

    from .lmms import NanoVLMLmms

    try:
        return NanoVLMLmms(pretrained=args.checkpoint, device=args.device, batch_size=args.batch_size,
                           dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    except (OSError, ValueError, SafetensorError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        parser.error(f"--checkpoint {args.checkpoint}: cannot load the model ({type(err).__name__}: {first})")


def configure_logging(verbosity: str) -> None:
    """INFO for this script's own log; `verbosity` for lmms-eval's loguru logger, which only lmms-eval's own CLI
    configures (in this process it printed its task-indexing DEBUG lines whatever `--verbosity` said)."""
    from loguru import logger as lmms_eval_logger

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    lmms_eval_logger.remove()
    lmms_eval_logger.add(lambda message: sys.stderr.write(message), level=verbosity.upper())  # the current stderr


def check_before_loading(parser: argparse.ArgumentParser, tasks: list[str], include_path: list[str],
                         output_dir: Path, verbosity: str):
    """The lmms-eval TaskManager for `tasks`; an unknown task or a results folder that cannot be written exits
    through `parser.error` (one line, status 2) before the model is loaded, not after the evaluation ran."""
    from .lmms import checked_task_manager

    try:
        manager = checked_task_manager(tasks, include_path, verbosity=verbosity)
    except ValueError as err:
        parser.error(str(err))
    try:  # a probe file: a folder that exists may still refuse writes
        output_dir.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=output_dir).close()
    except OSError as err:
        parser.error(f"--output_dir {output_dir}: cannot write the results there ({type(err).__name__}: "
                     f"{err.strerror or err}); pass a writable --output_dir")
    return manager


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; returns the exit code (0: every task ran, 1: some failed)."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbosity)
    tasks = [t.strip() for name in args.tasks for t in name.split(",") if t.strip()]
    if not tasks:
        parser.error(f"--tasks names no task: got {args.tasks!r}")
    for flag in ("batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    checkpoint = args.checkpoint
    step = args.global_step if args.global_step is not None else default_step(checkpoint)
    is_local = Path(checkpoint).exists()
    if not is_local and is_local_path(checkpoint):
        parser.error(f"--checkpoint {checkpoint} does not exist; pass a checkpoint folder or a hub id (org/name)")
    output_dir = (
        Path(args.output_dir)
        if args.output_dir
        else (Path(checkpoint).resolve().parent / "eval_results" if is_local else Path("eval_results"))
    )

    from .lmms import distributed_context, evaluate_tasks
    from .synthetic_task import DEFAULT_DATA, data_overrides

    include_path = [str(TASKS_DIR), *args.include_path]
    manager = check_before_loading(parser, tasks, include_path, output_dir, args.verbosity)
    start = time.perf_counter()
    model = load_model(parser, args)
    report = evaluate_tasks(
        model,
        tasks,
        limit=args.limit,
        include_path=include_path,
        task_manager=manager,
        gen_kwargs=args.gen_kwargs,
        verbosity=args.verbosity,
        task_configs=data_overrides(args.synthetic_data or DEFAULT_DATA, args.synthetic_split),
    )
    if distributed_context()[0] != 0:
        return 1 if report.failed_tasks else 0
    path = result_file(output_dir, step, ",".join(tasks) if args.partial else None)
    write_json_atomic(path, {
        "global_step": step,
        "checkpoint": str(args.source_checkpoint or checkpoint),
        "tasks": tasks,
        "limit": args.limit,
        "results": report.results,
        "failed_tasks": report.failed_tasks,
        "elapsed_s": round(time.perf_counter() - start, 2),
    })  # fmt: skip
    for key, value in sorted(report.results.items()):
        logger.info("%-50s %.4f", key, value)
    for task, error in report.failed_tasks.items():
        logger.error("task %s failed: %s", task, error)
    logger.info("wrote %s", path)
    return 1 if report.failed_tasks else 0


if __name__ == "__main__":
    sys.exit(main())
