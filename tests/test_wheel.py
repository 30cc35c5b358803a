"""nanovlm as a user installs it: a wheel built from this checkout, installed (not editable) into a fresh venv, used
from a folder outside the repository. It checks what an editable install hides: the evaluation's task files are
package data, its scripts run as `python -m nanovlm.evaluation...`, and nothing looks for a repository around the
package.

- The wheel is built offline (`pip wheel --no-deps --no-build-isolation --no-index`, this venv's setuptools) from a
  copy of the files a source distribution holds, so no build output lands in the checkout.
- The fresh venv gets the wheel only; its heavy dependencies (torch, transformers, lmms-eval) come from this venv's
  site-packages through a `.pth` line, added after the venv's own. A `.pth` line adds a folder and nothing else, so
  the editable install of /work/main that lives there (a finder activated by its own `.pth`) stays inactive; each
  run asserts that `nanovlm` was imported from the fresh venv.
- Commands run with PYTHONPATH unset, in a folder under the test's tmp dir, as README's commands would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
from test_lmms_eval import ANSWER, build_count_data, make_answering_model, save_checkpoint

from nanovlm.evaluation.scoring import answer_is_correct

ROOT = Path(__file__).resolve().parents[1]
TASK_FILES = {
    "nanovlm/evaluation/tasks/nanovlm_synthetic/nanovlm_synthetic.yaml",
    "nanovlm/evaluation/tasks/nanovlm_synthetic/nanovlm_synthetic_mc.yaml",
}

# run inside the fresh venv: the in-training launcher's local mode (what LmmsEvalCallback.from_args builds without a
# SLURM template), on the checkpoint of step 2, waiting for its background process
LAUNCHER_SCRIPT = textwrap.dedent("""
    import json, nanovlm
    from nanovlm.evaluation.launcher import LocalEvalLauncher, build_launcher
    from nanovlm.evaluation.tasks import TASKS_DIR

    launcher = build_launcher("run/eval_results", ["nanovlm_synthetic"], batch_size=4, device="cpu")
    assert isinstance(launcher, LocalEvalLauncher), type(launcher)
    launcher.submit("run/checkpoint-2", 2)
    (job,) = launcher.wait(timeout=600, interval=0.2)
    print(json.dumps({"nanovlm": nanovlm.__file__, "tasks_dir": str(TASKS_DIR), "command": launcher.command(job),
                      "status": job.status, "results": job.results, "error": job.error}))
""")


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the tests' PYTHONPATH names the checkout
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}  # fmt: skip


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory, tiny_tokenizer, tiny_processor):
    """(wheel, venv, work folder, answers); starts both evaluations (they run while the wheel's contents are checked)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "nanovlm", src / "nanovlm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp / "dist", src])  # fmt: skip
    (wheel,) = (tmp / "dist").glob("nanovlm-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(site) / "_nanovlm_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp / "work"  # outside the repository; the tasks' default data location is relative to it
    answers = build_count_data(work / "outputs" / "synthetic_data")
    model = make_answering_model(tiny_tokenizer)
    save_checkpoint(model, tiny_processor, work / "final")
    save_checkpoint(model, tiny_processor, work / "run" / "checkpoint-2")
    common = {"cwd": work, "env": clean_env(), "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    offline = subprocess.Popen([str(python), "-m", "nanovlm.evaluation.run", "--checkpoint", "final", "--tasks",
                                "nanovlm_synthetic", "nanovlm_synthetic_mc", "--device", "cpu"], **common)  # fmt: skip
    launcher = subprocess.Popen([str(python), "-c", LAUNCHER_SCRIPT], **common)
    yield wheel, venv, work, answers, offline, launcher
    for proc in (offline, launcher):
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_the_wheel_carries_the_evaluation_task_files(installed):
    wheel, venv, *_ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert TASK_FILES <= names, sorted(n for n in names if "evaluation" in n)
    assert {"nanovlm/evaluation/run.py", "nanovlm/evaluation/merge_results.py"} <= names
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert all((site / name).is_file() for name in TASK_FILES)  # installed as files, not in a zip or the repo
    entry_points = next(site.glob("nanovlm-*.dist-info")) / "entry_points.txt"
    assert "nanovlm_hf = nanovlm.evaluation.lmms:lmms_eval_manifest" in entry_points.read_text()


def test_offline_evaluation_runs_from_the_wheel(installed):
    wheel, venv, work, answers, offline, _ = installed
    output, _ = offline.communicate(timeout=600)
    assert offline.returncode == 0, output[-4000:]
    report = json.loads((work / "eval_results" / "step_0.json").read_text())  # next to the checkpoint
    share = sum(answer_is_correct(ANSWER, a) for a in answers) / len(answers)
    assert 0 < share < 1
    assert report["failed_tasks"] == {}
    assert report["results"]["nanovlm_synthetic_exact_match"] == pytest.approx(share)
    assert report["results"]["nanovlm_synthetic_exact_match_count"] == pytest.approx(share)
    assert report["results"]["nanovlm_synthetic_mc_acc"] == pytest.approx(share)


def test_in_training_launcher_local_mode_runs_from_the_wheel(installed):
    wheel, venv, work, answers, _, launcher = installed
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, output[-4000:]
    said = json.loads(output.strip().splitlines()[-1])
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert Path(said["nanovlm"]).is_relative_to(site), said["nanovlm"]  # the wheel's nanovlm, not the checkout's
    assert Path(said["tasks_dir"]).is_relative_to(site), said["tasks_dir"]
    assert said["command"][1:3] == ["-m", "nanovlm.evaluation.run"], said["command"]
    share = sum(answer_is_correct(ANSWER, a) for a in answers) / len(answers)
    assert (said["status"], said["error"]) == ("done", None), (work / "run/eval_results/logs/step_2.log").read_text()
    assert said["results"]["nanovlm_synthetic_exact_match"] == pytest.approx(share)
    saved = json.loads((work / "run" / "eval_results" / "step_2.json").read_text())
    assert (saved["global_step"], saved["failed_tasks"]) == (2, {})
    assert not (work / "run" / "eval_results" / "checkpoints" / "step_2").exists()  # the snapshot was removed
