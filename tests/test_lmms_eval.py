"""The lmms-eval adapter (nanovlm.evaluation.lmms) and the offline synthetic tasks (nanovlm.evaluation.tasks, with
nanovlm.evaluation.synthetic_task), on tiny models.

Models whose answers the tests control:
- `make_answering_model`: attention and MLP outputs zeroed, so each position's logits depend on its own token only;
  embeddings and an untied lm_head make it answer ANSWER after any token and end the turn after ANSWER;
- a monkeypatched `generate` (answers looked up from the question's tag) and a monkeypatched `forward` (an oracle
  that puts the logits on a chosen option), both on the real tiny model so inputs still go through it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_config
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.evaluator import simple_evaluate

from nanovlm import NanoVLMForConditionalGeneration
from nanovlm.data.synthetic import SyntheticConfig, build_synthetic_dataset, generate_split
from nanovlm.evaluation.lmms import (
    MODEL_ID,
    NanoVLMLmms,
    distributed_context,
    evaluate_tasks,
    flatten_results,
    task_manager_for,
)
from nanovlm.evaluation.prompts import cut_at_stop_strings, prompt_format_for
from nanovlm.evaluation.scoring import answer_is_correct
from nanovlm.evaluation.synthetic_task import data_overrides
from nanovlm.evaluation.tasks import TASKS_DIR

ROOT = Path(__file__).resolve().parents[1]
TASKS = str(TASKS_DIR)
ANSWER = "2"  # a single byte-level token in every tokenizer
KNOWN_TYPES = ("color", "count")  # the fake generate answers these correctly, the rest wrongly


# --------------------------------------------------------------------------------------------------------------
# helpers shared with test_eval_launcher.py


def make_answering_model(tokenizer, answer: str = ANSWER) -> NanoVLMForConditionalGeneration:
    """A tiny NanoVLM that greedily answers `answer` to anything, then emits <|im_end|>."""
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(make_tiny_config(tokenizer, tie_word_embeddings=False))
    (answer_id,) = tokenizer.encode(answer, add_special_tokens=False)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.get_input_embeddings().weight, model.lm_head.weight
        embed.zero_()
        embed[:, 0] = 1.0  # every token -> direction 0 ...
        embed[answer_id] = 0.0
        embed[answer_id, 1] = 1.0  # ... except the answer -> direction 1
        head.zero_()
        head[answer_id, 0] = 10.0  # after any token: the answer
        head[tokenizer.eos_token_id, 1] = 10.0  # after the answer: end of turn
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def save_checkpoint(model, processor, path: Path) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_count_data(path: Path, num_test: int = 10, seed: int = 3) -> list[str]:
    """A count-only synthetic test split (save_to_disk + parquet) at `path`; returns the answers in order."""
    data = build_synthetic_dataset(
        path, num_train=0, num_validation=0, num_test=num_test, seed=seed, image_size=32,
        type_weights={"count": 1.0}, multi_turn_fraction=0.0,
    )  # fmt: skip
    answers = [turn["assistant"] for row in data["test"]["texts"] for turn in row]
    share = sum(a == ANSWER for a in answers) / len(answers)
    assert 0 < share < 1, f"the test needs some but not all answers to be {ANSWER!r}: {answers}"
    return answers


def _entry_point_path(tmp_path: Path) -> str | None:
    """A folder with a dist-info declaring the lmms_eval.models entry point, unless the install already has it."""
    if any(ep.name == MODEL_ID for ep in importlib.metadata.entry_points(group="lmms_eval.models")):
        return None
    info = tmp_path / "plugin" / "nanovlm_lmms_plugin-0.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nanovlm-lmms-plugin\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(
        f"[lmms_eval.models]\n{MODEL_ID} = nanovlm.evaluation.lmms:lmms_eval_manifest\n"
    )
    return str(info.parent)


# --------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def cli_run(tmp_path_factory, tiny_tokenizer, tiny_processor):
    """`python -m lmms_eval --model nanovlm_hf ... --include_path <the packaged tasks>` on both tasks, offline, with a
    model that always answers "2" on a count-only split at the tasks' default data location (outputs/synthetic_data
    in the working directory); started first so it runs while the other tests do."""
    tmp_path = tmp_path_factory.mktemp("cli")
    answers = build_count_data(tmp_path / "outputs" / "synthetic_data")
    checkpoint = save_checkpoint(make_answering_model(tiny_tokenizer), tiny_processor, tmp_path / "ckpt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    plugin = _entry_point_path(tmp_path)
    if plugin:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [plugin, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", MODEL_ID,
           "--model_args", f"pretrained={checkpoint},device=cpu,batch_size=4",
           "--tasks", "nanovlm_synthetic,nanovlm_synthetic_mc", "--include_path", TASKS,
           "--output_path", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, tmp_path / "out", answers
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def tagged_data(tmp_path_factory):
    """Synthetic rows of every type with each question tagged "[row.turn]" (so fakes can look answers up), saved as
    one parquet file; returns (path, {tag: (answer, question_type)})."""
    rows = generate_split(8, "test", seed=5, config=SyntheticConfig(image_size=32, multi_turn_fraction=0.5))

    def tag(texts, index):
        return {
            "texts": [{"user": f"[{index}.{t}] {x['user']}", "assistant": x["assistant"]} for t, x in enumerate(texts)]
        }

    rows = rows.map(tag, input_columns=["texts"], with_indices=True)
    path = tmp_path_factory.mktemp("tagged") / "test.parquet"
    rows.to_parquet(str(path))
    expected = {
        f"{i}.{t}": (turn["assistant"], qtype)
        for i, (texts, types) in enumerate(zip(rows["texts"], rows["question_type"]))
        for t, (turn, qtype) in enumerate(zip(texts, types))
    }
    assert len({q for _, q in expected.values()}) >= 3, "the test wants several question types"
    return path, expected


@pytest.fixture
def adapter(tiny_model, tiny_processor):
    return NanoVLMLmms(pretrained=tiny_model, processor=tiny_processor, batch_size=4)


def tag_of(tokenizer, ids) -> str:
    return re.search(r"\[(\d+\.\d+)\]", tokenizer.decode(ids, skip_special_tokens=True)).group(1)


# --------------------------------------------------------------------------------------------------------------
# pure helpers


def test_prompt_formats_follow_nanovlm():
    mmstar = prompt_format_for("mmstar")
    text = "Which is red?\nOptions:\nA. apple\nB. sky\nAnswer with the option's letter from the given choices directly."
    assert mmstar.format_user(text) == "Which is red?\nChoices:\nA. apple\nB. sky\nAnswer with the letter directly."
    assert mmstar.format_user("Q?\nA. x\nB. y") == "Q?\nChoices:\nA. x\nB. y"
    assert mmstar.assistant_prefix == "Answer:"
    assert prompt_format_for("chartqa").format_user("How many?").startswith("For the question below")
    assert prompt_format_for("chartvqa").format_user("How many?") == "How many?"  # nanoVLM's misspelled key
    assert prompt_format_for("ocrbench").format_user("Read it.") == "Read it.\nGive a very brief answer."
    assert prompt_format_for("mmmu_val").format_user("Question: Q?\nA. x") == " Q?\nChoices:\nA. x"
    assert prompt_format_for("nanovlm_synthetic").format_user("What color?") == "What color?"


def test_cut_at_stop_strings():
    assert cut_at_stop_strings("red\nblue", ["\n"]) == "red"
    assert cut_at_stop_strings("red. blue\n", ["\n", "."]) == "red"
    assert cut_at_stop_strings("red blue", "blue") == "red "
    assert cut_at_stop_strings("red", ["", "\n\n"]) == "red"
    assert cut_at_stop_strings("red", None) == "red"


def test_distributed_context_reads_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed_context() == (3, 8, 1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert distributed_context() == (0, 1, 0)


def test_flatten_results_keeps_metrics_and_drops_stderr():
    results = {"results": {"mme": {"alias": "mme", "perception,none": 1200.5, "perception_stderr,none": "N/A",
                                   "acc_stderr_clt,none": 0.1},
                           "gsm": {"exact_match,flexible-extract": 0.25, "exact_match,none": 0.5}}}  # fmt: skip
    assert flatten_results(results) == {"mme_perception": 1200.5, "gsm_exact_match_flexible-extract": 0.25,
                                        "gsm_exact_match": 0.5}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# construction


def test_model_args_from_the_cli(tiny_tokenizer, tiny_processor, tmp_path):
    checkpoint = save_checkpoint(make_answering_model(tiny_tokenizer), tiny_processor, tmp_path / "ckpt")
    lm = NanoVLMLmms.create_from_arg_string(
        f"pretrained={checkpoint},batch_size=3,max_new_tokens=7,dtype=float32", {"batch_size": "1", "device": "cpu"}
    )
    assert (lm.batch_size, lm.max_new_tokens, lm.device.type, lm.model.dtype) == (3, 7, "cpu", torch.float32)
    assert (lm.rank, lm.world_size) == (0, 1)
    with pytest.raises(ValueError, match=r"Unknown model_args for nanovlm_hf: \['temprature'\]"):
        NanoVLMLmms.create_from_arg_string(f"pretrained={checkpoint},temprature=0")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 'auto'"):
        NanoVLMLmms(pretrained=checkpoint, batch_size="auto")
    with pytest.raises(ValueError, match="needs a checkpoint: pass --model_args pretrained="):
        NanoVLMLmms()


def test_a_lora_adapter_folder_is_merged_into_its_base(tiny_model, tiny_processor, tmp_path):
    from peft import LoraConfig, get_peft_model

    save_checkpoint(tiny_model, tiny_processor, tmp_path / "base")
    base = NanoVLMForConditionalGeneration.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")  # no processor files: it comes from the base
    merged = peft_model.merge_and_unload().eval()
    lm = NanoVLMLmms(pretrained=str(tmp_path / "adapter"), device="cpu", dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(lm.model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(lm.model(input_ids=ids).logits, tiny_model(input_ids=ids).logits, atol=1e-3)
    assert lm.processor.image_seq_len == tiny_processor.image_seq_len


def test_clean_keeps_a_model_passed_in(adapter, tiny_model):
    adapter.clean()  # lmms-eval calls this after every run
    assert adapter.model is tiny_model


# --------------------------------------------------------------------------------------------------------------
# generate_until


def _instance(request_type: str, args: tuple, doc_id: int = 0) -> Instance:
    return Instance(request_type, args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def _images(n, color=(200, 30, 30)):
    from PIL import Image

    return [Image.new("RGB", (32, 32), color) for _ in range(n)]


def _requests(specs):
    """Instances + the task_dict they refer to, from (context, number of images) pairs."""
    docs = [{"images": _images(n, (40 * i, 90, 200 - 30 * i))} for i, (_, n) in enumerate(specs)]
    gen = {"until": ["\n\n"], "max_new_tokens": 6, "do_sample": False, "temperature": 0}
    requests = [
        _instance("generate_until", (ctx, dict(gen), lambda d: d["images"], i, "t", "test"), i)
        for i, (ctx, _) in enumerate(specs)
    ]
    return requests, {"t": {"test": docs}}


def test_batched_left_padded_generation_equals_one_by_one(adapter):
    specs = [("What color is the circle?", 1), ("How many shapes?", 0), ("Which image has a red square?", 2),
             ("Is it on the left?", 1), ("Describe the picture.", 1)]  # fmt: skip
    requests, task_dict = _requests(specs)
    adapter.task_dict = task_dict
    batched = adapter.generate_until(requests)
    adapter._batch_size = 1
    single = adapter.generate_until(requests)
    assert batched == single
    assert len(batched) == len(specs) and all(isinstance(text, str) for text in batched)


def test_generation_honours_gen_kwargs_and_stop_strings(adapter, tiny_tokenizer, monkeypatch):
    seen = []

    def fake_generate(input_ids=None, attention_mask=None, pixel_values=None, **kwargs):
        seen.append(kwargs)
        assert attention_mask[:, -1].all(), "prompts must be left-padded"
        reply = tiny_tokenizer.encode("red.\nblue", add_special_tokens=False)
        return torch.cat([input_ids, torch.tensor([reply] * len(input_ids))], dim=1)

    monkeypatch.setattr(adapter.model, "generate", fake_generate)
    requests, adapter.task_dict = _requests([("Q1?", 1), ("Q2?", 0)])
    requests[0].args[1].update(until=["\n"], max_new_tokens=3)
    requests[1].args[1].update(until=".", do_sample=True, temperature=0.7, top_p=0.9)
    assert adapter.generate_until(requests) == ["red.", "red"]
    greedy, sampled = sorted(seen, key=lambda kw: kw["do_sample"])
    assert (greedy["max_new_tokens"], greedy["do_sample"], greedy["temperature"]) == (3, False, None)
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"]) == (True, 0.7, 0.9)


def test_multi_round_generation_follows_doc_to_text(adapter, monkeypatch):
    answers = iter(["first", "second"])
    monkeypatch.setattr(adapter, "_generate", lambda batch: [next(answers) for _ in batch])
    calls = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        calls.append((list(previous_output), round_idx))
        return None, f"round {round_idx}", round_idx == 2, previous_output, {"r": round_idx}

    adapter.task_dict = {"t": {"test": [{"images": []}]}}
    request = _instance(
        "generate_until_multi_round", ("round 0", {}, lambda d: d["images"], doc_to_text, 0, "t", "test")
    )
    assert adapter.generate_until_multi_round([request]) == [["first", "second"]]
    assert calls == [(["first"], 1), (["first", "second"], 2)]


# --------------------------------------------------------------------------------------------------------------
# loglikelihood


def _ll_requests(items):
    """loglikelihood Instances + task_dict from (context, continuation, number of images)."""
    docs = [{"images": _images(n)} for _, _, n in items]
    requests = [
        _instance("loglikelihood", (ctx, cont, lambda d: d["images"], i, "t", "test"), i)
        for i, (ctx, cont, _) in enumerate(items)
    ]
    return requests, {"t": {"test": docs}}


def test_loglikelihood_is_the_sum_of_continuation_log_probs(adapter, tiny_model, tiny_processor):
    items = [("What color is the circle?", "red", 1), ("How many shapes?", "two shapes", 0),
             ("Which image?", "image 2", 2)]  # fmt: skip
    requests, adapter.task_dict = _ll_requests(items)
    scores = adapter.score_continuations(requests)
    tokenizer = tiny_processor.tokenizer
    for (ctx, cont, n), (logprob, greedy) in zip(items, scores):
        prompt = adapter.build_prompt(ctx, n)
        inputs = tiny_processor(text=[prompt], images=[_images(n)] if n else None, return_tensors="pt")
        cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        ids = torch.cat([inputs["input_ids"], torch.tensor([cont_ids])], dim=1)
        with torch.no_grad():
            logits = tiny_model(input_ids=ids, pixel_values=inputs.get("pixel_values")).logits[0]
        steps = torch.log_softmax(logits[-len(cont_ids) - 1 : -1], -1)
        expected = steps[torch.arange(len(cont_ids)), torch.tensor(cont_ids)].sum().item()
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((steps.argmax(-1) == torch.tensor(cont_ids)).all())
    # what lmms-eval gets: the negated value (it takes argmin), wrapped so it is not turned into a string
    returned = adapter.loglikelihood(requests)
    assert all(isinstance(r, GenerationResult) for r in returned)
    assert [r.text for r in returned] == [(-lp, g) for lp, g in scores]


def test_loglikelihood_ranks_the_known_answer_first(tiny_tokenizer, tiny_processor):
    lm = NanoVLMLmms(pretrained=make_answering_model(tiny_tokenizer), processor=tiny_processor, batch_size=3)
    options = ["1", ANSWER, "3", "4"]
    requests, lm.task_dict = _ll_requests([("How many shapes are there?", o, 1) for o in options])
    scores = lm.score_continuations(requests)
    best = max(range(len(options)), key=lambda i: scores[i][0])
    assert options[best] == ANSWER
    assert [greedy for _, greedy in scores] == [o == ANSWER for o in options]
    nll = [r.text[0] for r in lm.loglikelihood(requests)]
    assert min(range(len(options)), key=nll.__getitem__) == best  # lmms-eval's argmin picks it too


# --------------------------------------------------------------------------------------------------------------
# through lmms-eval: the local synthetic tasks


def test_generation_task_scores_overall_and_per_question_type(adapter, tiny_tokenizer, tagged_data, monkeypatch):
    path, expected = tagged_data
    real_forward = adapter.model.forward

    def fake_generate(input_ids=None, attention_mask=None, pixel_values=None, **kwargs):
        real_forward(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)  # inputs are valid
        rows = []
        for ids in input_ids:
            answer, qtype = expected[tag_of(tiny_tokenizer, ids)]
            reply = f" {answer.upper()}." if qtype in KNOWN_TYPES else "wrong"
            rows.append(tiny_tokenizer.encode(reply + "\nignored", add_special_tokens=False))
        width = max(map(len, rows))
        rows = [r + [tiny_tokenizer.pad_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    monkeypatch.setattr(adapter.model, "generate", fake_generate)
    manager = task_manager_for(["nanovlm_synthetic"], TASKS)
    task = {"task": "nanovlm_synthetic", "dataset_path": str(path)}  # the data location, as a task config override
    results = simple_evaluate(model=adapter, tasks=[task], task_manager=manager, log_samples=False)
    metrics = flatten_results(results)
    types = {qtype for _, qtype in expected.values()}
    for qtype in types:
        assert metrics[f"nanovlm_synthetic_exact_match_{qtype}"] == float(qtype in KNOWN_TYPES)
    known = sum(qtype in KNOWN_TYPES for _, qtype in expected.values())
    assert metrics["nanovlm_synthetic_exact_match"] == pytest.approx(known / len(expected))
    assert 0 < known < len(expected)


def test_multiple_choice_task_ranks_the_correct_option_first(adapter, tiny_tokenizer, tagged_data, monkeypatch):
    path, expected = tagged_data
    types = [qtype for _, qtype in expected.values()]
    missed = max(set(types), key=types.count)  # for this type the oracle prefers a wrong option
    from nanovlm.data.synthetic import ANSWER_SETS

    marker = tiny_tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    real_forward = adapter.model.forward

    def oracle(input_ids=None, logits_to_keep=0, **kwargs):
        out = real_forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        logits = torch.zeros_like(out.logits)
        width, keep = input_ids.shape[1], logits.shape[1]
        for i, ids in enumerate(input_ids.tolist()):
            answer, qtype = expected[tag_of(tiny_tokenizer, ids)]
            favoured = answer if qtype != missed else next(o for o in ANSWER_SETS[qtype] if o != answer)
            start = max(j for j in range(len(ids)) if ids[j : j + len(marker)] == marker) + len(marker)
            for j, token in enumerate(tiny_tokenizer.encode(favoured, add_special_tokens=False)):
                position = start - 1 + j  # predicts token j of the answer
                if width - keep <= position < width - 1:
                    logits[i, position - (width - keep), token] = 20.0
        out.logits = logits
        return out

    monkeypatch.setattr(adapter.model, "forward", oracle)
    report = evaluate_tasks(adapter, ["nanovlm_synthetic_mc"], include_path=TASKS, task_configs=data_overrides(path))
    assert report.failed_tasks == {}
    metrics = report.results
    share = 1 - types.count(missed) / len(types)
    assert metrics["nanovlm_synthetic_mc_acc"] == pytest.approx(share)
    assert metrics["nanovlm_synthetic_mc_exact_match"] == pytest.approx(share)


def test_missing_data_names_the_fix(tmp_path, monkeypatch):
    manager = task_manager_for(["nanovlm_synthetic"], TASKS)
    from lmms_eval.tasks import get_task_dict

    with pytest.raises(FileNotFoundError, match=r"python -m nanovlm.data.synthetic --output_dir .*nowhere.*--synthetic_data"):
        get_task_dict([{"task": "nanovlm_synthetic", **data_overrides(tmp_path / "nowhere")["nanovlm_synthetic"]}],
                      manager)  # fmt: skip
    monkeypatch.chdir(tmp_path)  # the default location is relative to the working directory
    with pytest.raises(FileNotFoundError, match=rf"No synthetic 'test' split at {tmp_path}/outputs/synthetic_data "):
        get_task_dict(["nanovlm_synthetic"], manager)


def test_scripts_have_help(capsys):
    import importlib.util

    from nanovlm.evaluation import merge_results, run

    for module, expected in ((run, "--synthetic_data"), (merge_results, "--global_step")):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: python -m {module.__name__}" in out and expected in out
    # the repository's eval/ scripts, kept for older commands, are the same entry points
    for name, module in (("run_evaluation", run), ("merge_eval_results", merge_results)):
        spec = importlib.util.spec_from_file_location(name, ROOT / "eval" / f"{name}.py")
        wrapper = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(wrapper)
        assert wrapper.main is module.main


def test_lmms_eval_cli_runs_both_tasks_offline(cli_run):
    proc, out_dir, answers = cli_run
    stdout, _ = proc.communicate(timeout=600)
    files = list(out_dir.rglob("*_results.json"))
    assert files, f"no results file (the CLI exits 0 even when evaluation fails):\n{stdout[-4000:]}"
    metrics = flatten_results(json.loads(files[0].read_text()))
    share = sum(answer_is_correct(ANSWER, a) for a in answers) / len(answers)
    assert metrics["nanovlm_synthetic_exact_match"] == pytest.approx(share)
    assert metrics["nanovlm_synthetic_exact_match_count"] == pytest.approx(share)
    assert metrics["nanovlm_synthetic_mc_acc"] == pytest.approx(share)


# --------------------------------------------------------------------------------------------------------------
# the demo's final report (nanovlm.evaluation.synthetic_eval) goes through the same lmms-eval task


def test_demo_report_through_lmms_eval_scores_each_question_type(tiny_tokenizer, tiny_processor, tmp_path):
    from nanovlm.evaluation.synthetic_eval import evaluate_synthetic

    data = build_synthetic_dataset(
        tmp_path / "data", num_train=0, num_validation=0, num_test=12, seed=5, image_size=32,
        type_weights={"count": 1.0, "color": 1.0}, multi_turn_fraction=0.5,
    )  # fmt: skip
    environment = dict(os.environ)
    model = make_answering_model(tiny_tokenizer).train()  # answers ANSWER to every question
    accuracy = evaluate_synthetic(model, tiny_processor, tmp_path / "data", batch_size=5)

    turns = [(t["assistant"], q) for row in data["test"] for t, q in zip(row["texts"], row["question_type"])]
    expected = {q: sum(answer_is_correct(ANSWER, a) for a, qq in turns if qq == q) / sum(qq == q for _, qq in turns)
                for q in {q for _, q in turns}}
    expected["overall"] = sum(answer_is_correct(ANSWER, a) for a, _ in turns) / len(turns)
    assert accuracy == pytest.approx(expected)
    assert 0 < expected["count"] < 1 and expected["color"] == 0.0
    assert model.training  # put back in training mode
    assert dict(os.environ) == environment  # the data location reaches the task as its config, not the environment


def test_demo_report_failure_names_the_missing_split(tiny_model, tiny_processor, tmp_path):
    from nanovlm.evaluation.synthetic_eval import accuracy_from_metrics, evaluate_synthetic

    build_count_data(tmp_path / "data")
    with pytest.raises(RuntimeError, match=r"could not evaluate nanovlm_synthetic on .*data \(validation\): FileNotFoundError: No synthetic 'validation' split"):
        evaluate_synthetic(tiny_model, tiny_processor, tmp_path / "data", split="validation")
    with pytest.raises(FileNotFoundError, match="task folder .*nanovlm_synthetic not found"):
        evaluate_synthetic(tiny_model, tiny_processor, tmp_path / "data", tasks_dir=tmp_path)
    with pytest.raises(KeyError, match="nanovlm_synthetic_exact_match is missing"):
        accuracy_from_metrics({"other_task_acc": 1.0})
    assert accuracy_from_metrics({"nanovlm_synthetic_exact_match": 0.5, "nanovlm_synthetic_exact_match_count": 0.25}) \
        == {"count": 0.25, "overall": 0.5}
