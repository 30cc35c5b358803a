"""Asynchronous checkpoint evaluation: the launchers (local process, SLURM through a fake `sbatch`), the results
merge (nanovlm.evaluation.merge_results), and LmmsEvalCallback end to end in a real NanoVLMTrainer run."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch
from training_helpers import make_trainer, packed_dataset, synthetic_rows, training_args
from transformers import TrainerState

from nanovlm.evaluation import merge_results as merge
from nanovlm.evaluation.launcher import (
    DEFAULT_SLURM_TEMPLATE,
    MERGE_RESULTS_FILE,
    LocalEvalLauncher,
    SlurmEvalLauncher,
    render_template,
    snapshot_checkpoint,
)
from nanovlm.training.callbacks import LmmsEvalCallback

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def fake_script(tmp_path: Path, body: str) -> Path:
    """A stand-in for `python -m nanovlm.evaluation.run` (same arguments) that starts in milliseconds."""
    path = tmp_path / "fake_eval.py"
    path.write_text(
        textwrap.dedent(
            """
            import argparse, json, pathlib, sys, time
            p = argparse.ArgumentParser()
            for a in ("--checkpoint", "--tasks", "--global_step", "--output_dir"):
                p.add_argument(a)
            p.add_argument("--include_path", action="append")
            args, _ = p.parse_known_args()
            out = pathlib.Path(args.output_dir) / f"step_{args.global_step}.json"
            """
        )
        + textwrap.dedent(body)
    )
    return path


def write_model_files(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "tokenizer.json"):
        (path / name).write_text(name)
    return path


def main_process_state(step: int) -> TrainerState:
    state = TrainerState()
    state.global_step = step
    return state


# --------------------------------------------------------------------------------------------------------------
# merging partial result files


def test_merge_combines_partial_files_of_one_step(tmp_path):
    (tmp_path / "step_7_mmstar.json").write_text(
        json.dumps({"global_step": 7, "tasks": ["mmstar"], "results": {"mmstar_average": 0.4}, "failed_tasks": {}})
    )
    (tmp_path / "step_7_mme.json").write_text(
        json.dumps({"global_step": 7, "tasks": ["mme"], "results": {}, "failed_tasks": {"mme": "OOM"}})
    )
    (tmp_path / "step_7_mme_retry.json").write_text(
        json.dumps({"global_step": 7, "tasks": ["mme"], "results": {"mme_perception": 1200.0}, "failed_tasks": {}})
    )
    (tmp_path / "step_7_ocr.json").write_text(
        json.dumps({"global_step": 7, "tasks": ["ocrbench"], "results": {}, "failed_tasks": {"ocrbench": "no data"}})
    )
    (tmp_path / "step_70_mmstar.json").write_text(json.dumps({"results": {"mmstar_average": 0.9}}))  # fmt: skip

    path = merge.merge_step_results(tmp_path, 7)

    merged = json.loads(path.read_text())
    assert path == tmp_path / "step_7.json"
    assert merged["results"] == {"mmstar_average": 0.4, "mme_perception": 1200.0}
    assert merged["failed_tasks"] == {"ocrbench": "no data"}  # mme succeeded on retry
    assert merged["tasks"] == ["mme", "mmstar", "ocrbench"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_7.json", "step_70_mmstar.json"]


def test_merge_without_partial_files_names_the_fix(tmp_path, caplog):
    with pytest.raises(
        FileNotFoundError, match=r"No partial result files step_3_\*.json in .*nanovlm.evaluation.run --partial"
    ):
        merge.merge_step_results(tmp_path, 3)
    assert merge.main(["--results_dir", str(tmp_path), "--global_step", "3"]) == 1


def test_merge_keeps_unreadable_partials_and_says_the_merge_is_incomplete(tmp_path, caplog):
    """Before, a truncated partial was skipped with a warning and then deleted with the others (its results lost
    without a trace), and a partial holding a JSON list crashed the merge with an AttributeError."""
    (tmp_path / "step_5_a.json").write_text(json.dumps({"tasks": ["a"], "results": {"a_acc": 0.5}}))
    (tmp_path / "step_5_b.json").write_text('{"tasks": ["b"], "results": {"b_ac')  # cut short
    (tmp_path / "step_5_c.json").write_text("[1, 2]")
    assert merge.main(["--results_dir", str(tmp_path), "--global_step", "5"]) == 1
    merged = json.loads((tmp_path / "step_5.json").read_text())
    assert merged["results"] == {"a_acc": 0.5}
    bad = [str(tmp_path / "step_5_b.json"), str(tmp_path / "step_5_c.json")]
    assert merged["unreadable_files"] == bad
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_5.json", "step_5_b.json", "step_5_c.json"]
    assert caplog.records[-1].getMessage() == (
        f"2 partial file(s) could not be read and were left out of {tmp_path / 'step_5.json'}: {', '.join(bad)}"
    )


# --------------------------------------------------------------------------------------------------------------
# pieces


def test_snapshot_links_model_files_and_survives_checkpoint_rotation(tmp_path):
    checkpoint = write_model_files(tmp_path / "checkpoint-4")
    snapshot = snapshot_checkpoint(checkpoint, tmp_path / "snap")
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    for p in checkpoint.iterdir():
        p.unlink()
    checkpoint.rmdir()  # save_total_limit deleted the checkpoint
    assert (snapshot / "model.safetensors").read_text() == "model.safetensors"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        snapshot_checkpoint(tmp_path / "missing", tmp_path / "snap2")


def test_slurm_template_placeholders(tmp_path):
    with pytest.raises(ValueError, match=r"unknown placeholders \['chekpoint'\]; the known ones are \['checkpoint'"):
        render_template("run {{chekpoint}}", {"checkpoint": "c"})
    assert render_template("a {{ x }} ${HOME} $y", {"x": 1}) == "a 1 ${HOME} $y"


def test_default_slurm_template_is_valid_bash(tmp_path):
    fake_sbatch = tmp_path / "sbatch"
    fake_sbatch.write_text("#!/bin/sh\necho 1\n")
    fake_sbatch.chmod(fake_sbatch.stat().st_mode | stat.S_IEXEC)
    launcher = SlurmEvalLauncher(tmp_path / "results", ["mmstar", "mme"], sbatch=[str(fake_sbatch)], limit=5,
                                 work_dir=tmp_path / "work")  # fmt: skip
    job = launcher.submit(write_model_files(tmp_path / "checkpoint-8"), 8)
    script = (tmp_path / "results" / "slurm" / "step_8.sbatch").read_text()
    assert job.job_id == "1" and job.status == "running"
    assert "for task in mmstar mme; do" in script
    assert f"cd {tmp_path}/work\n" in script  # where relative paths (the synthetic tasks' data) resolve
    assert " -m nanovlm.evaluation.run --checkpoint " in script  # the package's module: no repository needed
    assert f"--checkpoint {tmp_path}/results/checkpoints/step_8" in script and "--limit 5" in script
    assert f"{MERGE_RESULTS_FILE} --results_dir {tmp_path}/results --global_step 8" in script
    assert MERGE_RESULTS_FILE.is_file() and MERGE_RESULTS_FILE.parent.name == "evaluation"
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "{{" not in script and DEFAULT_SLURM_TEMPLATE.count("{{") > 10


def test_slurm_launcher_without_sbatch_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="'no-such-sbatch' is not on PATH.*unset --lmms_eval_slurm_template"):
        SlurmEvalLauncher(tmp_path, ["mmstar"], sbatch=["no-such-sbatch"])


# --------------------------------------------------------------------------------------------------------------
# launchers with fast fake jobs


def test_local_launcher_queues_beyond_max_concurrent_and_reads_results(tmp_path):
    script = fake_script(tmp_path, """
        time.sleep(0.3)
        out.write_text(json.dumps({"results": {"t_acc": int(args.global_step) / 10}, "failed_tasks": {}}))
    """)  # fmt: skip
    launcher = LocalEvalLauncher(tmp_path / "results", ["t"], script=script, max_concurrent=1)
    first = launcher.submit(write_model_files(tmp_path / "checkpoint-2"), 2)
    second = launcher.submit(write_model_files(tmp_path / "checkpoint-4"), 4)
    assert (first.status, second.status) == ("running", "queued")
    finished = launcher.wait(timeout=60, interval=0.05)
    assert [(j.step, j.status, j.results) for j in finished] == [
        (2, "done", {"t_acc": 0.2}),
        (4, "done", {"t_acc": 0.4}),
    ]
    assert not (tmp_path / "results" / "checkpoints" / "step_2").exists()  # snapshots removed after reading
    assert launcher.poll() == []  # each job is reported once


def test_failed_evaluation_is_reported_not_raised(tmp_path, caplog):
    script = fake_script(tmp_path, """
        print("CUDA error: boom", file=sys.stderr)
        sys.exit(3)
    """)  # fmt: skip
    launcher = LocalEvalLauncher(tmp_path / "results", ["t"], script=script)
    callback = LmmsEvalCallback(launcher, interval=2, await_timeout_s=60, poll_interval_s=0)
    args = training_args(tmp_path / "run", report_to="none")
    write_model_files(tmp_path / "run" / "checkpoint-2")
    callback.on_save(args, main_process_state(2), None)
    with caplog.at_level(logging.WARNING, logger="nanovlm.training.callbacks"):
        callback.on_train_end(args, main_process_state(3), None)
    (record,) = callback.history
    assert (record.step, record.results) == (2, {})
    assert "exit code 3" in record.error and "step_2.json" in record.error
    assert "CUDA error: boom" in caplog.text  # the log's tail is shown


def test_partly_failed_evaluation_logs_what_ran(tmp_path):
    script = fake_script(tmp_path, """
        out.write_text(json.dumps({"results": {"a_acc": 0.5}, "failed_tasks": {"b": "KeyError: 'x'"}}))
        sys.exit(1)
    """)  # fmt: skip
    launcher = LocalEvalLauncher(tmp_path / "results", ["a", "b", "c"], script=script)
    launcher.submit(write_model_files(tmp_path / "checkpoint-6"), 6)
    (job,) = launcher.wait(timeout=60, interval=0.05)
    assert (job.status, job.results) == ("done", {"a_acc": 0.5})
    assert job.failed_tasks == {
        "b": "KeyError: 'x'",
        "c": "no results in the results file (the task's process may have crashed)",
    }


def test_only_the_main_process_submits_and_pending_jobs_do_not_block_the_end(tmp_path, caplog):
    script = fake_script(tmp_path, "time.sleep(60)\n")
    launcher = LocalEvalLauncher(tmp_path / "results", ["t"], script=script)
    callback = LmmsEvalCallback(launcher, interval=2, await_timeout_s=0.2, poll_interval_s=0)
    args = training_args(tmp_path / "run", report_to="none")
    write_model_files(tmp_path / "run" / "checkpoint-2")
    other_rank = main_process_state(2)
    other_rank.is_world_process_zero = False
    callback.on_save(args, other_rank, None)
    callback.on_save(args, main_process_state(3), None)  # not a multiple of the interval
    assert launcher.jobs == []
    callback.on_save(args, main_process_state(2), None)
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="nanovlm.training.callbacks"):
            callback.on_train_end(args, main_process_state(2), None)
        assert time.monotonic() - start < 10
        assert "still running after 0 s; its results will be in" in caplog.text
        assert callback.history == []
    finally:
        launcher.jobs[0].process.kill()
        launcher.jobs[0].process.wait()


def test_slurm_launcher_end_to_end_with_a_fake_sbatch(tmp_path):
    """sbatch runs the rendered job in the background; the job writes two partial files and merges them with the
    real merge script; the launcher sees step_N.json appear."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\nnohup bash "${@: -1}" > /dev/null 2>&1 &\necho "4242;cluster"\n')
    (bin_dir / "squeue").write_text("#!/bin/bash\nexit 0\n")  # the job is never listed: finished
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    template = tmp_path / "job.sbatch"
    template.write_text(textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --job-name={{job_name}}
        for task in {{tasks_space}}; do
          echo "{\\"tasks\\": [\\"$task\\"], \\"results\\": {\\"${task}_acc\\": 0.5}}" \\
              > {{results_dir}}/step_{{step}}_$task.json
        done
        {{python}} {{merge_results}} --results_dir {{results_dir}} --global_step {{step}}
    """))  # fmt: skip
    launcher = SlurmEvalLauncher(
        tmp_path / "results", ["mmstar", "mme"], template=template, sbatch=[str(bin_dir / "sbatch")],
        squeue=[str(bin_dir / "squeue")], grace_s=60,
    )  # fmt: skip
    job = launcher.submit(write_model_files(tmp_path / "checkpoint-10"), 10)
    assert job.job_id == "4242"
    (done,) = launcher.wait(timeout=60, interval=0.1)
    assert (done.status, done.results, done.error) == ("done", {"mmstar_acc": 0.5, "mme_acc": 0.5}, None)


def test_from_args_reads_the_training_arguments(tmp_path):
    args = training_args(tmp_path / "run", lmms_eval_tasks=["mmstar", "mme"], eval_interval=50)
    callback = LmmsEvalCallback.from_args(args)
    assert isinstance(callback.launcher, LocalEvalLauncher)
    assert (callback.interval, callback.launcher.tasks) == (100, ["mmstar", "mme"])
    assert callback.launcher.results_dir == tmp_path / "run" / "eval_results"
    assert "--synthetic_data" not in callback.launcher.eval_args()
    # a run on the synthetic dataset points the nanovlm_synthetic tasks at its own data (train_accelerate.py)
    callback = LmmsEvalCallback.from_args(args, synthetic_data=str(tmp_path / "data"))
    assert callback.launcher.eval_args()[-2:] == ["--synthetic_data", str(tmp_path / "data")]
    with pytest.raises(ValueError, match="needs --lmms_eval_tasks"):
        LmmsEvalCallback.from_args(training_args(tmp_path / "run"))


# --------------------------------------------------------------------------------------------------------------
# end to end: a real training run, a real evaluation process (started first, checked last, to overlap the others)


@pytest.fixture(scope="module", autouse=True)
def trained_run(tmp_path_factory, tiny_tokenizer, tiny_processor):
    """Train a model that always answers "2" for 2 steps with LmmsEvalCallback (interval 2) on a count-only
    synthetic split; the checkpoint's evaluation runs in the background while the other tests run."""
    from test_lmms_eval import build_count_data, make_answering_model

    tmp_path = tmp_path_factory.mktemp("e2e")
    answers = build_count_data(tmp_path / "data")
    env = {"OMP_NUM_THREADS": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the evaluation process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = training_args(
            tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2, lr_mp=1e-9, lr_vision_backbone=1e-9,
            lr_language_backbone=1e-9, report_to="tensorboard", lmms_eval_tasks=["nanovlm_synthetic"],
            lmms_eval_interval=2,
        )  # fmt: skip
        launcher = LocalEvalLauncher(tmp_path / "run" / "eval_results", ["nanovlm_synthetic"], device="cpu",
                                     extra_args=["--synthetic_data", str(tmp_path / "data")])  # fmt: skip
        callback = LmmsEvalCallback(launcher, interval=2, await_timeout_s=0, poll_interval_s=0)
        trainer = make_trainer(make_answering_model(tiny_tokenizer), tiny_processor, args,
                               packed_dataset(synthetic_rows(8), tiny_processor), callbacks=[callback])  # fmt: skip
        trainer.train()  # on_train_end does not wait (timeout 0): the evaluation is still running
    finally:
        torch.set_num_threads(threads)
        for key, value in saved_env.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    yield tmp_path, answers, args, trainer, callback
    for job in launcher.pending:
        job.process.kill()


def test_callback_picks_up_a_checkpoint_evaluation_during_training(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_lmms_eval import ANSWER

    tmp_path, answers, args, trainer, callback = trained_run
    (job,) = callback.launcher.jobs
    assert (job.step, job.checkpoint) == (2, tmp_path / "run" / "checkpoint-2")
    deadline = time.monotonic() + 600
    while not callback.history and time.monotonic() < deadline:  # as the next training steps would
        callback.on_step_end(args, trainer.state, None)
        time.sleep(0.2)

    (record,) = callback.history
    assert record.error is None, (tmp_path / "run" / "eval_results" / "logs" / "step_2.log").read_text()[-3000:]
    expected = sum(a == ANSWER for a in answers) / len(answers)
    assert record.step == 2
    assert record.results["nanovlm_synthetic_exact_match"] == pytest.approx(expected)
    assert record.results["nanovlm_synthetic_exact_match_count"] == pytest.approx(expected)
    (entry,) = [e for e in trainer.state.log_history if "lmms_eval/step" in e]
    assert entry["lmms_eval/step"] == 2
    assert entry["lmms_eval/nanovlm_synthetic_exact_match"] == pytest.approx(expected)
    saved = json.loads((tmp_path / "run" / "eval_results" / "step_2.json").read_text())
    assert (saved["global_step"], saved["checkpoint"]) == (2, str(tmp_path / "run" / "checkpoint-2"))
    assert saved["failed_tasks"] == {}
    assert not (tmp_path / "run" / "eval_results" / "checkpoints" / "step_2").exists()
    callback.on_train_end(args, trainer.state, None)  # closes the TensorBoard writer
    events = EventAccumulator(str(tmp_path / "run" / "runs" / "lmms_eval")).Reload()
    (scalar,) = events.Scalars("lmms_eval/nanovlm_synthetic_exact_match")
    assert (scalar.step, scalar.value) == (2, pytest.approx(expected))


def test_evaluation_run_input_errors_are_one_line(tmp_path, tiny_model, tiny_processor, capsys):
    """Before, a folder without weights or a corrupt weights file ended in a traceback, and --batch_size 0 in the
    adapter's traceback; each is now argparse's one line and exit status 2."""
    from nanovlm.evaluation import run

    tiny_model.save_pretrained(tmp_path / "ckpt")
    tiny_processor.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (tmp_path / "empty").mkdir()
    cases = [
        (["--checkpoint", str(tmp_path / "ckpt"), "--batch_size", "0"], "--batch_size must be >= 1, got 0"),
        (["--checkpoint", str(tmp_path / "ckpt")],
         f"--checkpoint {tmp_path / 'ckpt'}: cannot load the model (SafetensorError: "),
        (["--checkpoint", str(tmp_path / "empty")], f"--checkpoint {tmp_path / 'empty'}: cannot load the model ("),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            run.main([*argv, "--tasks", "nanovlm_synthetic", "--device", "cpu"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err
        (line,) = [line for line in err.splitlines() if "error:" in line]
        assert line.startswith(f"python -m nanovlm.evaluation.run: error: {message}"), line


def test_evaluation_run_checks_tasks_and_results_folder_before_loading(tmp_path, capsys):
    """Before, an unknown task printed lmms-eval's KeyError traceback after loading the model, and a results folder
    that cannot be written raised after the whole evaluation; both are now one line before any model is loaded (the
    checkpoint here is an empty folder, which would fail to load)."""
    from nanovlm.evaluation import run

    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--tasks", "nanovlm_synthetc,nanovlm_synthetic"],
         "--tasks: unknown lmms-eval task 'nanovlm_synthetc' (did you mean nanovlm_synthetic, nanovlm_synthetic_mc?); "
         'list the tasks with: python -m lmms_eval --tasks list --include_path "$(python -m nanovlm.evaluation.tasks)"'),
        (["--tasks", "nanovlm_synthetic", "--output_dir", str(tmp_path / "a_file" / "results")],
         f"--output_dir {tmp_path / 'a_file' / 'results'}: cannot write the results there (NotADirectoryError: Not a "
         "directory); pass a writable --output_dir"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            run.main(["--checkpoint", str(tmp_path / "empty"), "--device", "cpu", *argv])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err
        (line,) = [line for line in err.splitlines() if "error:" in line]
        assert line == f"python -m nanovlm.evaluation.run: error: {message}"
