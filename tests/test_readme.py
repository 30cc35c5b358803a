"""README.md, executed: every ```bash command and ```python block, in README order, as a user would run them.

How each block is run:
- A scratch directory is laid out like the repo (symlinks to configs/, eval/, nanovlm/, train_accelerate.py, .venv,
  setup.cfg, and a bench/ folder of file symlinks so bench/results/ lands in the scratch), so the README's relative
  paths (outputs/demo/final, configs/train/demo.yaml, .venv/bin/python, ...) resolve and every output stays in it.
- Bash blocks are split into commands (`\\` continuations joined, comments dropped; a `# -> ...` line after a command
  is that command's stated result, checked where it names a file or keys). Each command runs with `bash -c` in the
  scratch directory; `python` blocks run as files with `.venv/bin/python` there.
- Environment: `PYTHONPATH` is the repo root, so the code under test is this checkout's even when `.venv` is an
  editable install of another one (a git worktree sharing a venv); `HF_HUB_OFFLINE=1` so a hub download fails fast and
  the same way everywhere; `.venv/bin` first on `PATH`, as in an activated venv (the GPU commands say `accelerate`).
- The install commands (`python3 -m venv .venv && .venv/bin/pip install [-c constraints.txt] -e ...`) are checked,
  not re-run: re-running them would re-point the shared editable install at the scratch directory (or, from a git
  worktree, at the worktree) and needs the package index. Instead the check asserts what the install guarantees: the
  venv exists, nanovlm is installed, every requirement of setup.cfg (and of the named extras) is installed inside its
  range, and every `name==version` pin of the constraints file is the installed version. CI has just run the same
  install for real (.ci/run), so the pair covers it.
- The test command (`.venv/bin/python -m pytest -q`) runs with `--collect-only` appended, in the repo root: the full
  suite is what CI runs with that very command, and running it from inside itself would recurse. Collection still
  fails on any import error in any test module.
- Training commands get overrides appended (the parser lets a later flag win): 40 demo steps (6 for DDP and LoRA;
  the restart-data resume trains 20 more) and small synthetic splits (`FAST_TRAIN`, `FAST_DATA`); the rows the
  README's examples use (test rows 5 and 18) are identical to the full demo's, since synthetic sample i depends
  only on (seed, split, i). Other commands get smaller sizes where they have them (`--num_train`, `--samples`). No
  block is skipped.
- Blocks that need the hub or GPUs are the only exceptions, named in `EXCEPTIONS`: each one is checked to fail here
  with its one-line message (the converter's hub error, the training arguments' "no bf16/GPU" error, the hub error of
  `from_backbones`'s first download) or to parse (`bash -n`, the accelerate config, the script's own argument
  parser). `test_every_block_is_run` checks that the blocks found equal the blocks run plus these exceptions, so a
  new block can never be skipped silently, and a stale exception fails too.

Steps depend on earlier ones (the LoRA block finetunes the demo's final/), so run the whole file; a failure message
names the earlier steps that failed.
"""

from __future__ import annotations

import configparser
import dataclasses
import hashlib
import importlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT = 900  # seconds per command: generous, the 2-core CI box may be shared

FAST_DATA = [
    "--synthetic_num_train", "240", "--synthetic_num_validation", "16", "--synthetic_num_test", "24",
    "--synthetic_num_train_simple", "40",
]
# 40 steps (~10 s on 2 idle cores): after 6 the model often answers with <|im_end|> alone, and the generate
# commands must print an answer
DEMO_STEPS = 40
FAST_TRAIN = [
    "--max_steps", str(DEMO_STEPS), "--eval_interval", "20", "--logging_steps", "5", "--dataloader_num_workers", "0",
    "--per_device_eval_batch_size", "8",
]
SHORT_STEPS = ["--max_steps", "6", "--eval_interval", "3"]  # runs nothing later reads: DDP, LoRA
QUESTION_TYPES = ("color", "count", "size", "multi_image", "position", "reading")


# ---------------------------------------------------------------------------------------------------------------
# README parsing


@dataclasses.dataclass
class Step:
    """One thing the README asks the user to run: a bash command or a whole python block."""

    block: int  # index among the README's bash/python blocks
    lang: str  # "bash" or "python"
    text: str  # the command (continuations joined) or the python source
    section: str  # the enclosing "## " heading
    results: list[str] = dataclasses.field(default_factory=list)  # "# -> ..." lines stated after a bash command
    id: str = ""


def readme_fences(text: str) -> list[tuple[str, str, int]]:
    """(language tag, body, line number) of every fenced block, in order."""
    fences, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^```(\S*)\s*$", lines[i])
        if match:
            start, body = i, []
            i += 1
            while i < len(lines) and lines[i].rstrip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"README.md line {start + 1}: unclosed ``` fence")
            fences.append((match.group(1), "\n".join(body) + "\n", start + 1))
        i += 1
    return fences


def split_commands(body: str) -> list[tuple[str, list[str]]]:
    """A bash block's commands (continuation lines joined), each with the `# -> ...` lines that follow it."""
    commands: list[tuple[str, list[str]]] = []
    pending = ""
    for line in body.splitlines():
        stripped = line.strip()
        if pending:
            pending += " " + stripped.rstrip("\\").strip()
            if not stripped.endswith("\\"):
                commands.append((pending, []))
                pending = ""
            continue
        if not stripped:
            continue
        if stripped.startswith("#"):
            if stripped.startswith("# ->") and commands:
                commands[-1][1].append(stripped[len("# ->"):].strip())
            continue
        if stripped.endswith("\\"):
            pending = stripped.rstrip("\\").strip()
        else:
            commands.append((stripped, []))
    if pending:
        raise ValueError(f"README bash command ends in a line continuation: {pending!r}")
    return commands


def readme_steps(text: str | None = None) -> list[Step]:
    """Every bash command and python block of README.md, in order."""
    text = README.read_text() if text is None else text
    headings = [(m.start(), m.group(1).strip()) for m in re.finditer(r"^## (.+)$", text, re.M)]
    line_offsets = [0] + [m.end() for m in re.finditer("\n", text)]
    steps: list[Step] = []
    block = 0
    for lang, body, line in readme_fences(text):
        if lang not in ("bash", "python"):
            continue
        offset = line_offsets[line - 1]
        section = next((h for pos, h in reversed(headings) if pos < offset), "top")
        if lang == "python":
            steps.append(Step(block, lang, body, section))
        else:
            for command, results in split_commands(body):
                steps.append(Step(block, lang, command, section, results))
        block += 1
    for number, step in enumerate(steps, 1):
        words = re.findall(r"[a-z0-9_]+", step.section.lower())[:3]
        step.id = f"{number:02d}-{'-'.join(words)}"
    return steps


STEPS = readme_steps()


# ---------------------------------------------------------------------------------------------------------------
# the scratch directory and running things in it


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A directory laid out like the repo, where the README's relative paths resolve and outputs stay."""
    venv = ROOT / ".venv"
    if not (venv / "bin" / "python").exists():
        pytest.fail(f"tests/test_readme.py runs the README with its own venv: create {venv} with the README's install")
    work = tmp_path_factory.mktemp("readme")
    for name in ("configs", "eval", "nanovlm", "train_accelerate.py", ".venv", "setup.cfg", "constraints.txt"):
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    (work / "bench").mkdir()
    for path in (ROOT / "bench").iterdir():
        if path.name not in ("results", "__pycache__"):
            (work / "bench" / path.name).symlink_to(path)
    return work


FAILED: list[str] = []  # ids of steps that failed, for the messages of later ones


def env() -> dict[str, str]:
    bin_dir = str(ROOT / ".venv" / "bin")
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "2",
    }


def run(command: str, cwd: Path, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def show(proc: subprocess.CompletedProcess) -> str:
    earlier = f" (earlier README steps failed: {', '.join(FAILED)})" if FAILED else ""
    return f"exit {proc.returncode}{earlier}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, show(proc)
    return proc


def with_args(command: str, args: list[str]) -> str:
    return command + " " + " ".join(shlex.quote(a) for a in args)


def python_block(source: str, cwd: Path, name: str) -> subprocess.CompletedProcess:
    path = cwd / f"readme_{name}.py"
    path.write_text(source)
    return run(f".venv/bin/python {path.name}", cwd)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# the install commands: checked, not re-run (see the module docstring)

INSTALL_CHECK = r"""
import configparser, importlib.metadata as md, re, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
root, extras, constraints = sys.argv[1], [e for e in sys.argv[2].split(",") if e], sys.argv[3]
cfg = configparser.ConfigParser()
cfg.read(f"{root}/setup.cfg")
lines = cfg["options"]["install_requires"].splitlines()
for extra in extras:
    lines += cfg["options.extras_require"][extra].splitlines()
problems = []
for line in filter(None, (l.split("#")[0].strip() for l in lines)):
    req = Requirement(line)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        problems.append(f"{req.name}: not installed"); continue
    if not req.specifier.contains(version, prereleases=True):
        problems.append(f"{req.name} {version} is outside setup.cfg's {req.specifier}")
try:
    md.distribution("nanovlm")
except md.PackageNotFoundError:
    problems.append("nanovlm: not installed")
if constraints:
    for line in open(f"{root}/{constraints}"):
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)(\s*;.*)?", line)
        if not m:
            problems.append(f"{constraints}: not an exact pin: {line!r}"); continue
        if m.group(4) and not Requirement(m.group(1) + m.group(4)).marker.evaluate():
            continue
        try:
            version = md.version(m.group(1))
        except md.PackageNotFoundError:
            continue  # pinned for another platform or extra, not installed here
        if canonicalize_name(version) != canonicalize_name(m.group(3)):
            problems.append(f"{m.group(1)} {version} installed, {constraints} pins {m.group(3)}")
print("\n".join(problems))
sys.exit(1 if problems else 0)
"""


def check_install(part: str, cwd: Path) -> None:
    """`python3 -m venv .venv` / `.venv/bin/pip install [-c FILE] -e SPEC`: the environment that makes."""
    words = shlex.split(part)
    if words == ["python3", "-m", "venv", ".venv"]:
        assert (cwd / ".venv" / "pyvenv.cfg").is_file(), "no .venv/pyvenv.cfg: .venv is not a venv"
        return
    assert words[:2] == [".venv/bin/pip", "install"], f"unexpected install command in README: {part!r}"
    constraints, spec, rest = "", None, words[2:]
    while rest:
        flag = rest.pop(0)
        if flag in ("-c", "--constraint") and rest:
            constraints = rest.pop(0)
        elif flag in ("-e", "--editable") and rest:
            spec = rest.pop(0)
        else:
            raise AssertionError(f"tests/test_readme.py does not know pip's {flag!r} in {part!r}: teach check_install")
    match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec or "")
    assert match, f"README installs {spec!r}; tests/test_readme.py expects -e . or -e '.[extra]'"
    extras = match.group(1) or ""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    for extra in filter(None, extras.split(",")):
        assert extra in cfg["options.extras_require"], f"README installs extra [{extra}], which setup.cfg lacks"
    if constraints:
        assert (ROOT / constraints).is_file(), f"README installs with -c {constraints}, which the repo lacks"
    proc = subprocess.run([str(cwd / ".venv/bin/python"), "-c", INSTALL_CHECK, str(ROOT), extras, constraints],
                          capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, f"the environment is not what {part!r} installs:\n{proc.stdout}{proc.stderr[-2000:]}"


def run_chain(step: Step, cwd: Path) -> str:
    """Check the install parts of a `venv && pip install && ...` chain; return the rest of the chain."""
    parts = step.text.split(" && ")
    while parts and (parts[0].startswith("python3 -m venv") or " install " in parts[0]):
        check_install(parts.pop(0), cwd)
    assert parts, f"nothing after the install in {step.text!r}"
    return " && ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# what each command must do


def check_demo(cwd: Path, proc: subprocess.CompletedProcess, output_dir: str = "outputs/demo") -> None:
    ok(proc)
    out = cwd / output_dir
    assert re.search(r"Held-out accuracy on 24 synthetic test samples", proc.stdout), show(proc)
    table = proc.stdout.split("Held-out accuracy", 1)[1]
    for qtype in (*QUESTION_TYPES, "overall"):
        assert re.search(rf"^{qtype}\s+[01]\.\d{{3}}\s+[01]\.\d{{3}}", table, re.M), f"no table row {qtype}:\n{table}"
    results = json.loads((out / "results.json").read_text())
    assert set(results["test_accuracy"]) == set(results["blind_guess_accuracy"]) >= {"overall", *QUESTION_TYPES}
    for name in ("loss.png", "learning_rate.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in ("model.safetensors", "config.json", "modeling_nanovlm.py", "processor_config.json"):
        assert (out / "final" / name).is_file(), f"{output_dir}/final/{name} missing"


def step_quickstart(step: Step, cwd: Path) -> None:
    command = run_chain(step, cwd)
    if "-m pytest" in command:
        # the suite itself is CI's run of this very command; here: it collects, every module imports
        proc = ok(run(with_args(command, ["--collect-only"]), ROOT))
        for path in sorted((ROOT / "tests").glob("test_*.py")):
            assert f"tests/{path.name}::" in proc.stdout, f"{path.name} collected no test:\n{proc.stdout[-2000:]}"
        assert re.search(r"^\d+ tests collected", proc.stdout, re.M), show(proc)
        return
    assert command.endswith("train_accelerate.py --config configs/train/demo.yaml"), command
    check_demo(cwd, run(with_args(command, FAST_DATA + FAST_TRAIN), cwd))


def step_usage(step: Step, cwd: Path) -> None:
    proc = ok(python_block(step.text, cwd, "usage"))
    assert proc.stdout.strip(), f"the model answered nothing:\n{show(proc)}"
    assert "past_key_values" not in proc.stderr, f"generate warns about its cache argument:\n{proc.stderr[-2000:]}"


def step_generic(step: Step, cwd: Path) -> None:
    """Any command without its own checks: it must succeed."""
    proc = ok(run(step.text, cwd))
    if "nanovlm-generate" in step.text:
        assert proc.stdout.strip(), f"nanovlm-generate printed no answer:\n{show(proc)}"
        assert "past_key_values" not in proc.stderr, proc.stderr[-2000:]
    if "save('example.png')" in step.text:
        for name in re.findall(r"save\('([^']+)'\)", step.text):
            assert (cwd / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def step_api(step: Step, cwd: Path) -> None:
    proc = ok(python_block(step.text + "\nprint(type(model).__name__, model.config.model_type)\n", cwd, "api"))
    assert proc.stdout.strip().splitlines()[-1] == "NanoVLMForConditionalGeneration nanovlm", show(proc)


def step_ddp(step: Step, cwd: Path) -> None:
    proc = ok(run(with_args(step.text, FAST_DATA + FAST_TRAIN + SHORT_STEPS), cwd))
    out = cwd / "outputs/demo_ddp"
    assert (out / "final" / "model.safetensors").is_file(), show(proc)
    state = json.loads((out / "checkpoint-6" / "data_state.json").read_text())
    assert state["world_size"] == 2 and len(state["ranks"]) == 2, f"not one 2-process DDP run: {state}"


def step_resume(step: Step, cwd: Path) -> None:
    out = cwd / "outputs/demo"
    before = {p.relative_to(out): sha256(p) for p in sorted(out.rglob("*")) if p.is_file() and "runs" not in p.parts}
    proc = ok(run(with_args(step.text, FAST_DATA + FAST_TRAIN), cwd))
    after = {p.relative_to(out): sha256(p) for p in sorted(out.rglob("*")) if p.is_file() and "runs" not in p.parts}
    changed = sorted(str(p) for p in set(before) | set(after) if before.get(p) != after.get(p))
    # the demo run above is complete (DEMO_STEPS of DEMO_STEPS): resuming it must change no model or checkpoint
    changed = [p for p in changed if p.endswith((".safetensors", ".pt", ".pth", ".bin", "trainer_state.json"))]
    assert not changed, f"resuming a finished run changed {changed}\n{show(proc)}"
    said = proc.stdout + proc.stderr
    assert re.search(rf"\b{DEMO_STEPS}\b", said) and "complete" in said.lower(), f"no 'complete at step N':\n{show(proc)}"


def step_resume_restart(step: Step, cwd: Path) -> None:
    """Resuming the finished demo with new data settings and a higher --max_steps trains on from its last
    checkpoint, the data restarted and packed with the new settings (20 steps here; the README's 200)."""
    assert "--max_steps" in step.text, "on the finished demo, the README's restart command must raise --max_steps"
    steps = DEMO_STEPS + 20
    proc = ok(run(with_args(step.text, FAST_DATA + FAST_TRAIN + ["--max_steps", str(steps)]), cwd))
    assert "the data restarts from its beginning (--resume_restart_data)" in proc.stderr, show(proc)
    checkpoint = cwd / "outputs/demo" / f"checkpoint-{steps}"
    settings = json.loads((checkpoint / "run_settings.json").read_text())["data"]
    assert (settings["seq_length"], settings["max_sample_length"]) == (512, 512), settings
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == steps and [e["step"] for e in state["log_history"] if "eval_loss" in e][-2:] == [
        DEMO_STEPS, steps], state["log_history"]


def step_eval(step: Step, cwd: Path) -> None:
    ok(run(step.text, cwd))
    assert step.results, "the README states no result for nanovlm.evaluation.run"
    path, _, payload = step.results[0].partition(": ")
    keys = re.findall(r'"(\w+)": \.\.\.', payload)
    assert keys, step.results
    report = json.loads((cwd / path).read_text())
    assert not report["failed_tasks"], report["failed_tasks"]
    for key in keys:
        assert 0.0 <= report["results"][key] <= 1.0, (key, report["results"])


def step_lmms_cli(step: Step, cwd: Path) -> None:
    ok(run(step.text, cwd))
    output = re.search(r"--output_path (\S+)", step.text).group(1)
    files = sorted((cwd / output).rglob("*results*.json"))
    assert files, f"lmms-eval wrote no results under {output}"
    results = json.loads(files[-1].read_text())["results"]
    assert {"nanovlm_synthetic", "nanovlm_synthetic_mc"} <= set(results), sorted(results)


def step_lora(step: Step, cwd: Path) -> None:
    args = FAST_DATA + FAST_TRAIN + SHORT_STEPS
    proc = ok(run(with_args(step.text, args), cwd))
    final = cwd / "outputs/lora/final"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (final / name).is_file(), f"outputs/lora/final/{name} missing\n{show(proc)}"


LORA_EQUALITY = """
import sys, datasets, torch
from peft import PeftModel
from transformers import AutoModel, AutoProcessor
merged = AutoModel.from_pretrained("outputs/lora/merged", trust_remote_code=True).eval()
adapted = ({expr}).eval()  # the README's own words for loading the adapter on its base
processor = AutoProcessor.from_pretrained("outputs/lora/merged", trust_remote_code=True)
row = datasets.load_from_disk("outputs/synthetic_data")["test"][0]
messages = [{{"role": "user", "content": [{{"type": "image", "image": row["images"][0]}},
                                         {{"type": "text", "text": row["texts"][0]["user"]}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
with torch.no_grad():
    a, b = merged(**inputs).logits, adapted(**inputs).logits
print("max_abs_diff", (a - b).abs().max().item())
"""


def step_merge(step: Step, cwd: Path) -> None:
    ok(run(step.text, cwd))
    assert (cwd / "outputs/lora/merged/model.safetensors").is_file()
    expr = re.search(r"`(PeftModel\.from_pretrained\(.+?\))`", README.read_text(), re.S)
    assert expr, "the README no longer shows PeftModel.from_pretrained(...): update tests/test_readme.py"
    proc = ok(python_block(LORA_EQUALITY.format(expr=" ".join(expr.group(1).split())), cwd, "lora_equality"))
    diff = float(re.search(r"max_abs_diff (\S+)", proc.stdout).group(1))
    assert diff < 1e-4, f"the merged checkpoint and the adapter on its base disagree by {diff}"


def step_synthetic(step: Step, cwd: Path) -> None:
    import datasets

    # the --overwrite command rebuilds the folder an earlier command built, with other settings: keep them other
    num_train = 60 if "--overwrite" in step.text else 120
    args = ["--num_train", str(num_train), "--num_validation", "12", "--num_test", "12"]
    if "--num_train_simple" in step.text:
        args += ["--num_train_simple", "24"]
    proc = ok(run(with_args(step.text, args), cwd))
    assert "blind guess on test" in proc.stdout, show(proc)
    output = re.search(r"--output_dir (\S+)", step.text).group(1)
    splits = datasets.load_from_disk(str(cwd / output))
    assert {name: len(splits[name]) for name in ("train", "validation", "test")} == {
        "train": num_train, "validation": 12, "test": 12}
    if "--num_train_simple" in step.text:
        assert len(splits["train_simple"]) == 24
    if "--train_max_turns" in step.text:
        turns = [len(t) for t in splits["train"]["texts"]]
        assert max(turns) == 4 and sum(turns) > 2 * len(turns), f"turns per training row: {sorted(turns)}"


def step_bench(step: Step, cwd: Path) -> None:
    proc = ok(run(with_args(step.text, ["--samples", "400", "--dataset-samples", "400"]), cwd))
    report = json.loads((cwd / re.search(r"--out (\S+)", step.text).group(1)).read_text())
    assert len(report["packers"]) == 3 and report["dataset"]["samples"] > 0, show(proc)


# (substring of the command or block, runner), first match wins; anything else runs as written via step_generic
RUNNERS = [
    ("--resume_restart_data true", step_resume_restart),
    ("train_accelerate.py --config configs/train/demo.yaml --resume_from_checkpoint", step_resume),
    ("torch.distributed.run --standalone --nproc_per_node 2", step_ddp),
    (" && ", step_quickstart),
    ("from transformers import AutoModel, AutoProcessor", step_usage),
    ("# 2. From a config", step_api),
    ("-m nanovlm.evaluation.run --checkpoint outputs/demo/final", step_eval),
    ("-m lmms_eval --model nanovlm_hf", step_lmms_cli),
    ("--config configs/train/lora.yaml", step_lora),
    ("merge_lora_checkpoint(", step_merge),
    ("-m nanovlm.data.synthetic", step_synthetic),
    ("bench/packing.py", step_bench),
]


# ---------------------------------------------------------------------------------------------------------------
# the named exceptions: need the hub or GPUs


def bash_parses(step: Step) -> None:
    proc = subprocess.run(["bash", "-n", "-c", step.text], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def except_gpu_training(step: Step, cwd: Path) -> None:
    """8-GPU accelerate launch: the accelerate config loads and the training arguments parse (or fail, on a
    machine without bf16 GPUs, with the one-line reason)."""
    bash_parses(step)
    words = shlex.split(step.text)
    assert words[:3] == ["accelerate", "launch", "--config_file"], words
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(cwd / words[3]))
    assert config.num_processes == 8 and config.distributed_type.value == "MULTI_GPU", config
    script = words.index("train_accelerate.py")
    from nanovlm.training.parser import parse_args

    cwd_before = os.getcwd()
    os.chdir(cwd)
    try:
        parse_args(words[script + 1:])
    except ValueError as error:  # no GPU here: the one reason, nothing else wrong with the recipe
        assert "doesn't support bf16/gpu" in str(error) and "\n" not in str(error), str(error)
    finally:
        os.chdir(cwd_before)


def except_gpu_eval(step: Step, cwd: Path) -> None:
    """8-GPU torchrun evaluation on hub benchmarks: the module's own parser accepts the arguments."""
    bash_parses(step)
    words = shlex.split(step.text)
    assert words[:5] == ["torchrun", "--nproc_per_node", "8", "-m", "nanovlm.evaluation.run"], words
    module = importlib.import_module(words[4])
    args = module.build_arg_parser().parse_args(words[5:])
    assert args.tasks == ["mmstar", "mmmu_val", "ocrbench", "textvqa_val"], args


def except_convert_hub(step: Step, cwd: Path) -> None:
    """Converting from a hub id: here it stops with one line saying the hub could not be reached."""
    bash_parses(step)
    proc = run(step.text, cwd)
    message = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in message, show(proc)
    assert message.startswith("nanovlm-convert: error: --input lusxvr/nanoVLM-460M-8k: not a local folder"), message
    assert not (cwd / "checkpoints").exists()


def except_python_hub(step: Step, cwd: Path) -> None:
    """from_backbones on hub ids: the block compiles and fails at its first download, for that reason only."""
    compile(step.text, "README python block", "exec")
    proc = python_block(step.text, cwd, "hub")
    last = " ".join(proc.stderr.strip().splitlines()[-2:])
    assert proc.returncode != 0 and "OSError" in last and "huggingface.co" in last, show(proc)


EXCEPTIONS = {
    "accelerate launch --config_file configs/accelerate/8gpu.yaml": except_gpu_training,
    "nanovlm-convert --input lusxvr/nanoVLM-460M-8k": except_convert_hub,
    "NanoVLMForConditionalGeneration.from_backbones(": except_python_hub,
    "torchrun --nproc_per_node 8 -m nanovlm.evaluation.run": except_gpu_eval,
}


def exception_for(step: Step):
    matches = [check for key, check in EXCEPTIONS.items() if key in step.text]
    return matches[0] if matches else None


def runner_for(step: Step):
    return next((runner for key, runner in RUNNERS if key in step.text), step_generic)


# ---------------------------------------------------------------------------------------------------------------
# the tests


def test_every_block_is_run():
    """Blocks found == blocks run + named exceptions; every exception names exactly one step; no other languages."""
    text = README.read_text()
    fences = readme_fences(text)
    tags = {tag for tag, _, _ in fences}
    assert tags <= {"bash", "python", ""}, f"README blocks tagged {tags - {'bash', 'python', ''}}: use bash or python"
    for tag, body, line in fences:  # an untagged block must not hide a command
        if not tag:
            assert not re.search(r"^\s*(\.venv/|python|pip|accelerate|torchrun)", body, re.M), f"line {line}: tag it"
    blocks = [f for f in fences if f[0] in ("bash", "python")]
    assert len(blocks) == text.count("```bash") + text.count("```python")
    assert len({s.block for s in STEPS}) == len(blocks)
    for key in EXCEPTIONS:
        assert sum(key in s.text for s in STEPS) == 1, f"exception {key!r} must name exactly one README step"
    excepted = [s for s in STEPS if exception_for(s)]
    ran = [s for s in STEPS if not exception_for(s)]
    assert len(STEPS) == len(ran) + len(excepted) and len(excepted) == len(EXCEPTIONS)
    # every step that needs the scratch's earlier outputs has its runner (a renamed command would fall to generic)
    assert {runner_for(s) for s in ran} >= {step_quickstart, step_usage, step_api, step_ddp, step_resume,
                                            step_resume_restart, step_eval,
                                            step_lmms_cli, step_lora, step_merge, step_synthetic, step_bench}


@pytest.mark.parametrize("step", STEPS, ids=[s.id for s in STEPS])
def test_readme_step(step: Step, scratch: Path):
    try:
        check = exception_for(step)
        if check is not None:
            check(step, scratch)
        else:
            runner_for(step)(step, scratch)
    except BaseException:
        FAILED.append(step.id)
        raise


def scenes(row: dict) -> list[dict]:
    return json.loads(row["scenes"]) if isinstance(row["scenes"], str) else row["scenes"]


def test_examples_match_their_rows(scratch: Path):
    """The README's example rows hold what it says: test row 18 is the first single-image test row whose first
    question asks for a colour and whose image holds one shape, test row 5 the first with two images; each prompt is
    the row's own first question, and the answer shown is the row's reference answer."""
    import datasets

    test = datasets.load_from_disk(str(scratch / "outputs/synthetic_data"))["test"]
    rows = [test[i] for i in range(len(test))]
    color = next(i for i, r in enumerate(rows) if r["question_type"][0] == "color" and len(r["images"]) == 1
                 and len(scenes(r)[0]["shapes"]) == 1)
    pair = next(i for i, r in enumerate(rows) if len(r["images"]) == 2)
    usage = next(s.text for s in STEPS if runner_for(s) is step_usage)
    question, answer = rows[color]["texts"][0]["user"], rows[color]["texts"][0]["assistant"]
    assert f'["test"][{color}]' in usage and f'"text": "{question}"' in usage and f"# -> {answer}  (" in usage, (
        color, question, answer)
    cli = [s for s in STEPS if s.section == "Command line" and "nanovlm-generate" in s.text]
    saved = next(s.text for s in STEPS if "save('example.png')" in s.text)
    assert f"t[{color}]['images'][0].save('example.png')" in saved
    assert f"t[{pair}]['images'][0].save('first.png')" in saved and f"t[{pair}]['images'][1].save('second.png')" in saved
    single = [s for s in cli if "--image example.png" in s.text]
    pairs = [s for s in cli if "--image first.png --image second.png" in s.text]
    assert len(single) == 2 and len(pairs) == 1, [s.text for s in cli]  # greedy and sampled; the pair
    for step in single:
        assert f'--prompt "{question}"' in step.text and step.results == [answer], (step, question, answer)
    pair_question, pair_answer = rows[pair]["texts"][0]["user"], rows[pair]["texts"][0]["assistant"]
    assert f'--prompt "{pair_question}"' in pairs[0].text and pairs[0].results == [pair_answer], (pairs[0], pair_question)
