"""Evaluate saved checkpoints with lmms-eval without blocking training: an `sbatch` job when SLURM is configured,
else a local background process running `python -m nanovlm.evaluation.run`.

Every job writes one results file, `{results_dir}/step_{step}.json`:

    {"global_step": 400, "checkpoint": "...", "tasks": ["mmstar", "mme"],
     "results": {"mmstar_average": 0.41, ...}, "failed_tasks": {"mme": "FileNotFoundError: ..."}}

A launcher's `poll()` returns the jobs that finished since the last call (`EvalJob.results` / `EvalJob.error`), and
`wait(timeout)` blocks until the pending ones finish or the time is up.

Not standard:
- The checkpoint is snapshotted first (hard links, falling back to copies, of everything but the optimizer, scheduler
  and RNG states) into `{results_dir}/checkpoints/step_{step}`: Trainer's `save_total_limit` may delete the
  checkpoint before a queued job reads it. The snapshot is removed once the job's result has been read.
- Local processes run with the torchrun/accelerate variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) removed, so an
  evaluation started from rank 0 of a distributed run does not try to join the training's process group; at most
  `max_concurrent` run at a time, the others wait in a queue.
- SLURM job scripts are rendered from a template with `{{placeholder}}` fields (bash keeps its own `$VAR` and
  `${VAR}`); an unknown placeholder is an error naming the known ones. See `DEFAULT_SLURM_TEMPLATE`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_MODULE = "nanovlm.evaluation.run"
# run as a file, not with -m: it imports only the standard library, so the job's last step skips `import nanovlm`
MERGE_RESULTS_FILE = Path(__file__).resolve().with_name("merge_results.py")
SNAPSHOT_SKIP = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state", "training_args.bin", "data_state.json")
DISTRIBUTED_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE",
)  # fmt: skip

DEFAULT_SLURM_TEMPLATE = """#!/bin/bash
#SBATCH --job-name={{job_name}}
#SBATCH --output={{log_file}}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
# nanovlm lmms-eval job for step {{step}}: one process per task (the allocation's GPUs taken in turn), each writing a
# partial results file, then merged into {{results_dir}}/step_{{step}}.json, which the training job picks up.
set -uo pipefail
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
export TOKENIZERS_PARALLELISM=false
cd {{work_dir}}
IFS=, read -r -a GPUS <<< "${CUDA_VISIBLE_DEVICES:-0}"
i=0
for task in {{tasks_space}}; do
  CUDA_VISIBLE_DEVICES=${GPUS[$(( i % ${#GPUS[@]} ))]} {{python}} {{run_evaluation}} --checkpoint {{checkpoint}} \\
      --source_checkpoint {{source_checkpoint}} --tasks "$task" --global_step {{step}} \\
      --output_dir {{results_dir}} --partial {{eval_args}} &
  i=$(( i + 1 ))
  if (( i % ${#GPUS[@]} == 0 )); then wait; fi
done
wait
{{python}} {{merge_results}} --results_dir {{results_dir}} --global_step {{step}}
"""
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def result_file(results_dir: str | os.PathLike, step: int, tag: str | None = None) -> Path:
    """`step_{step}.json`, or the partial file `step_{step}_{tag}.json` (merged by nanovlm.evaluation.merge_results)."""
    name = f"step_{step}.json" if tag is None else f"step_{step}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', tag)}.json"
    return Path(results_dir) / name


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file and rename it, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def snapshot_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Hard-link (or copy, across filesystems) the files a model needs from `src` into `dst`, skipping optimizer,
    scheduler, RNG and data states. Returns `dst`."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file() and not (src / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{src} is not a saved model (no config.json or adapter_config.json); pass a checkpoint folder."
        )
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if not item.is_file() or item.name.startswith(SNAPSHOT_SKIP):
            continue
        try:
            os.link(item, dst / item.name)
        except OSError:
            shutil.copy2(item, dst / item.name)
    return dst


def render_template(template: str, values: dict[str, Any]) -> str:
    """Replace every `{{name}}` with `values[name]`; an unknown name raises ValueError naming the known ones."""
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if unknown:
        raise ValueError(
            f"The SLURM job template uses unknown placeholders {unknown}; the known ones are {sorted(values)}."
        )
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def log_tail(path: str | os.PathLike | None, lines: int = 20) -> str:
    """The last lines of a log file ('' when there is none)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:]) if path else ""
    except OSError:
        return ""


@dataclass
class EvalJob:
    """One evaluation of one checkpoint. `status`: queued, running, done (results read; `error` may still name
    failed tasks) or failed (no results; `error` says why)."""

    step: int
    checkpoint: Path
    tasks: list[str]
    results_path: Path
    log_path: Path
    snapshot: Path | None = None
    status: str = "queued"
    submitted_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    job_id: str | None = None
    results: dict[str, float] | None = None
    failed_tasks: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")

    def describe(self) -> str:
        """Where the job runs, for messages: the pid or SLURM job id and its log."""
        where = f"pid {self.process.pid}" if self.process else f"SLURM job {self.job_id}" if self.job_id else "queued"
        return f"step {self.step} ({where}, log {self.log_path})"


def read_results(job: EvalJob) -> bool:
    """Read the job's results file into `job.results` / `job.failed_tasks`; False when it is absent or unreadable."""
    try:
        data = json.loads(job.results_path.read_text())
    except (OSError, ValueError):
        return False
    job.results = {k: float(v) for k, v in (data.get("results") or {}).items()}
    job.failed_tasks = dict(data.get("failed_tasks") or {})
    missing = [
        t for t in job.tasks if t not in job.failed_tasks and not any(k.startswith(f"{t}_") for k in job.results)
    ]
    for task in missing:
        job.failed_tasks[task] = "no results in the results file (the task's process may have crashed)"
    return True


class EvalLauncher(ABC):
    """Submits evaluations of checkpoints and reports them when they finish.

    Jobs run `python -m nanovlm.evaluation.run` (or `script`, a file taking the same arguments) with `python`, in
    `work_dir` (default: the current directory), where relative paths such as the synthetic tasks' default data
    `outputs/synthetic_data` resolve. `extra_args` are appended to every job's command line (e.g.
    `["--synthetic_data", "/data/synthetic"]`).
    """

    def __init__(
        self,
        results_dir: str | os.PathLike,
        tasks: Sequence[str],
        *,
        batch_size: int = 8,
        limit: int | float | None = None,
        device: str | None = None,
        python: str = sys.executable,
        script: str | os.PathLike | None = None,
        include_path: Sequence[str | os.PathLike] = (),
        extra_args: Sequence[str] = (),
        snapshot: bool = True,
        work_dir: str | os.PathLike | None = None,
    ) -> None:
        tasks = [t.strip() for name in tasks for t in str(name).split(",") if t.strip()]
        if not tasks:
            raise ValueError("No lmms-eval tasks given: set --lmms_eval_tasks, e.g. mmstar mme.")
        if script is not None and not Path(script).is_file():
            raise FileNotFoundError(
                f"The evaluation script {script} does not exist; pass script=None to run {RUN_MODULE}."
            )
        self.results_dir = Path(results_dir).resolve()  # jobs run in work_dir, which may differ from ours later
        self.work_dir = Path(work_dir or os.getcwd()).resolve()
        self.tasks = tasks
        self.batch_size, self.limit, self.device = batch_size, limit, device
        self.python, self.script = python, None if script is None else Path(script)
        self.include_path = [str(p) for p in include_path]
        self.extra_args = list(extra_args)
        self.snapshot = snapshot
        self.jobs: list[EvalJob] = []
        self._reported: set[int] = set()  # ids of the jobs poll() has returned

    # ---- shared ----------------------------------------------------------------------------------------------------
    def entry(self) -> list[str]:
        """What follows `python` to run an evaluation: `-m nanovlm.evaluation.run`, or the `script` file."""
        return ["-m", RUN_MODULE] if self.script is None else [str(self.script)]

    def eval_args(self) -> list[str]:
        """Arguments of the evaluation other than checkpoint, tasks, step and output dir."""
        args = ["--batch_size", str(self.batch_size)]
        if self.limit is not None:
            args += ["--limit", str(self.limit)]
        if self.device:
            args += ["--device", self.device]
        for path in self.include_path:
            args += ["--include_path", path]
        return args + self.extra_args

    def command(self, job: EvalJob) -> list[str]:
        """The evaluation's command line for `job`."""
        checkpoint = job.snapshot or job.checkpoint
        return [
            self.python, *self.entry(), "--checkpoint", str(checkpoint), "--tasks", ",".join(job.tasks),
            "--global_step", str(job.step), "--output_dir", str(self.results_dir),
            "--source_checkpoint", str(job.checkpoint), *self.eval_args(),
        ]  # fmt: skip

    def submit(self, checkpoint: str | os.PathLike, step: int) -> EvalJob:
        """Queue an evaluation of `checkpoint` (saved at `step`); returns its job at once."""
        checkpoint = Path(checkpoint).resolve()
        job = EvalJob(
            step=step,
            checkpoint=checkpoint,
            tasks=list(self.tasks),
            results_path=result_file(self.results_dir, step),
            log_path=self.results_dir / "logs" / f"step_{step}.log",
        )
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        for stale in [job.results_path, *self.results_dir.glob(f"step_{step}_*.json")]:
            stale.unlink(missing_ok=True)  # an earlier run's (partial) results would be read as this job's
        try:
            if self.snapshot:
                job.snapshot = snapshot_checkpoint(checkpoint, self.results_dir / "checkpoints" / f"step_{step}")
            self._start(job)
        except Exception as error:  # noqa: BLE001 - a failed submission is reported, never fatal to training
            self._fail(job, f"could not submit the evaluation: {type(error).__name__}: {error}")
        self.jobs.append(job)
        logger.info("lmms-eval: submitted %s for %s (tasks %s)", job.describe(), checkpoint, ",".join(job.tasks))
        return job

    @property
    def pending(self) -> list[EvalJob]:
        return [job for job in self.jobs if not job.finished]

    def poll(self) -> list[EvalJob]:
        """Update every pending job; return the jobs that finished (or failed to submit) since the last call."""
        for job in self.pending:
            self._update(job)
        newly = [job for job in self.jobs if job.finished and id(job) not in self._reported]
        self._reported.update(id(job) for job in newly)
        return newly

    def wait(self, timeout: float, interval: float = 1.0) -> list[EvalJob]:
        """Poll until nothing is pending or `timeout` seconds passed; return the jobs that finished meanwhile."""
        deadline = time.monotonic() + timeout
        finished = self.poll()
        while self.pending and time.monotonic() < deadline:
            time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
            finished += self.poll()
        return finished

    def _fail(self, job: EvalJob, error: str) -> None:
        job.status, job.error, job.finished_at = "failed", error, time.time()
        self._cleanup(job)

    def _finish(self, job: EvalJob, returncode: int | None = None) -> None:
        """The job has ended: read its results (a partial file still counts) or mark it failed."""
        if read_results(job):
            job.status, job.finished_at = "done", time.time()
            if job.failed_tasks:
                job.error = "; ".join(f"{task}: {why}" for task, why in job.failed_tasks.items())
            self._cleanup(job)
        else:
            code = f" with exit code {returncode}" if returncode is not None else ""
            self._fail(job, f"the evaluation ended{code} without writing {job.results_path}")

    def _cleanup(self, job: EvalJob) -> None:
        if job.snapshot is not None and job.snapshot.exists():
            shutil.rmtree(job.snapshot, ignore_errors=True)

    @abstractmethod
    def _start(self, job: EvalJob) -> None:
        """Start (or queue) `job`."""

    @abstractmethod
    def _update(self, job: EvalJob) -> None:
        """Refresh a pending job's status."""


class LocalEvalLauncher(EvalLauncher):
    """Runs evaluations as background processes on this machine (`max_concurrent` at a time)."""

    def __init__(self, results_dir: str | os.PathLike, tasks: Sequence[str], *, max_concurrent: int = 1, **kwargs):
        super().__init__(results_dir, tasks, **kwargs)
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}.")
        self.max_concurrent = max_concurrent

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and not k.startswith("ACCELERATE_")}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def _start(self, job: EvalJob) -> None:
        running = sum(1 for j in self.jobs if j.status == "running")
        if running >= self.max_concurrent:
            return  # stays queued; started by _update when a slot frees
        with open(job.log_path, "w") as log:
            job.process = subprocess.Popen(
                self.command(job), stdout=log, stderr=subprocess.STDOUT, env=self._environment(), cwd=self.work_dir,
                start_new_session=True,  # a Ctrl-C in the training terminal does not kill it
            )  # fmt: skip
        job.status = "running"

    def _update(self, job: EvalJob) -> None:
        if job.status == "queued":
            self._start(job)
            return
        returncode = job.process.poll()
        if returncode is not None:
            self._finish(job, returncode)
            for queued in [j for j in self.jobs if j.status == "queued"][:1]:
                self._start(queued)


class SlurmEvalLauncher(EvalLauncher):
    """Submits one `sbatch` job per checkpoint from a job-script template (see `DEFAULT_SLURM_TEMPLATE`).

    Template placeholders: checkpoint (the snapshot to load), source_checkpoint, step, tasks (comma-separated),
    tasks_space (space-separated, quoted), results_dir, log_file, job_name, python, run_evaluation (what follows
    python: `-m nanovlm.evaluation.run`), merge_results (the merge script's file), work_dir, eval_args. A job is done
    when
    `step_{step}.json` appears; it failed when it left the queue (`squeue` no longer lists it) and the file is
    still missing `grace_s` seconds later.
    """

    def __init__(
        self,
        results_dir: str | os.PathLike,
        tasks: Sequence[str],
        *,
        template: str | os.PathLike | None = None,
        sbatch: Sequence[str] = ("sbatch",),
        squeue: Sequence[str] = ("squeue",),
        grace_s: float = 120.0,
        job_name: str = "nanovlm_lmms_eval",
        **kwargs,
    ) -> None:
        super().__init__(results_dir, tasks, **kwargs)
        if template is None:
            self.template = DEFAULT_SLURM_TEMPLATE
        elif Path(template).is_file():
            self.template = Path(template).read_text()
        else:
            raise FileNotFoundError(
                f"SLURM job template {template} does not exist; pass a file, or None for the default."
            )
        if shutil.which(sbatch[0]) is None:
            raise FileNotFoundError(
                f"A SLURM job template is configured but {sbatch[0]!r} is not on PATH; run on a SLURM login node, or "
                "unset --lmms_eval_slurm_template to evaluate in a local process."
            )
        self.sbatch, self.squeue = list(sbatch), list(squeue)
        self.grace_s, self.job_name = grace_s, job_name
        self.render(EvalJob(0, Path("checkpoint"), self.tasks, Path("r"), Path("l")))  # unknown placeholders fail now
        self._left_queue: dict[int, float] = {}

    def render(self, job: EvalJob) -> str:
        """The job script for `job`."""
        q = shlex.quote
        values = {
            "checkpoint": q(str(job.snapshot or job.checkpoint)),
            "source_checkpoint": q(str(job.checkpoint)),
            "step": job.step,
            "tasks": q(",".join(job.tasks)),
            "tasks_space": " ".join(q(t) for t in job.tasks),
            "results_dir": q(str(self.results_dir)),
            "log_file": str(job.log_path),
            "job_name": f"{self.job_name}_step{job.step}",
            "python": q(self.python),
            "run_evaluation": " ".join(q(a) for a in self.entry()),
            "merge_results": q(str(MERGE_RESULTS_FILE)),
            "work_dir": q(str(self.work_dir)),
            "eval_args": " ".join(q(a) for a in self.eval_args()),
        }
        return render_template(self.template, values)

    def _start(self, job: EvalJob) -> None:
        script = self.results_dir / "slurm" / f"step_{job.step}.sbatch"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(self.render(job))
        done = subprocess.run([*self.sbatch, "--parsable", str(script)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(self.sbatch)} exited with {done.returncode}: {done.stderr.strip()}")
        job.job_id = done.stdout.strip().split(";")[0]
        job.status = "running"

    def _in_queue(self, job: EvalJob) -> bool:
        try:
            out = subprocess.run([*self.squeue, "-h", "-j", job.job_id, "-o", "%T"], capture_output=True, text=True,
                                 timeout=30, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as error:
            logger.warning(
                "lmms-eval: could not query SLURM for job %s (%s); assuming it still runs", job.job_id, error
            )
            return True
        return bool(out.stdout.strip())

    def _update(self, job: EvalJob) -> None:
        if job.results_path.is_file():
            self._finish(job)
        elif self._in_queue(job):
            self._left_queue.pop(job.step, None)
        elif time.monotonic() - self._left_queue.setdefault(job.step, time.monotonic()) > self.grace_s:
            self._finish(job)


def build_launcher(
    results_dir: str | os.PathLike,
    tasks: Iterable[str],
    *,
    slurm_template: str | os.PathLike | None = None,
    **kwargs,
) -> EvalLauncher:
    """`SlurmEvalLauncher` when a job template is given ("default": `DEFAULT_SLURM_TEMPLATE`), else
    `LocalEvalLauncher` (kwargs go to the launcher)."""
    if slurm_template:
        kwargs.pop("max_concurrent", None)
        template = None if str(slurm_template) == "default" else slurm_template
        return SlurmEvalLauncher(results_dir, list(tasks), template=template, **kwargs)
    return LocalEvalLauncher(results_dir, list(tasks), **kwargs)


__all__ = [
    "DEFAULT_SLURM_TEMPLATE",
    "EvalJob",
    "EvalLauncher",
    "LocalEvalLauncher",
    "SlurmEvalLauncher",
    "build_launcher",
    "log_tail",
    "read_results",
    "render_template",
    "result_file",
    "snapshot_checkpoint",
    "write_json_atomic",
]
