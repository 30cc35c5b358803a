"""LoRA on the language model: scope, what trains under NanoVLMTrainer, save / reload / merge / resume, the recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from training_helpers import (
    ENTRY_SHORT,
    make_trainer,
    packed_dataset,
    run_train_entry,
    synthetic_rows,
    tiny_setup,
    training_args,
)
from transformers import AutoModel, AutoProcessor

from nanovlm import NanoVLMForConditionalGeneration
from nanovlm.training.lora import apply_lora, language_model_target_regex, merge_lora_checkpoint
from nanovlm.training.optim import part_of
from nanovlm.training.parser import parse_args

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.1)  # dropout: the resume must restore its RNG


@pytest.fixture(scope="module")
def rows():
    return synthetic_rows(64)


def base_model(tmp_path: Path) -> tuple[NanoVLMForConditionalGeneration, object, str]:
    """The tiny model saved and reloaded, so that its `name_or_path` (the adapter's base) is a folder."""
    model, processor = tiny_setup()
    path = str(tmp_path / "base")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return NanoVLMForConditionalGeneration.from_pretrained(path), processor, path


def logits(model, processor) -> torch.Tensor:
    rows = synthetic_rows(2, seed=5)
    messages = [{"role": "user", "content": [{"type": "image", "image": rows[0]["images"][0]},
                                             {"type": "text", "text": rows[0]["texts"][0]["user"]}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True,
                                           return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def lora_run(rows, tmp_path_factory):
    """4 LoRA steps (projector and vision trained in full too), checkpoints at 2 and 4, saved to `final`."""
    tmp = tmp_path_factory.mktemp("lora")
    model, processor, base_path = base_model(tmp)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp / "out", max_steps=4, save_strategy="steps", save_steps=2, **LORA)
    peft_model = apply_lora(model, args)
    trainer = make_trainer(peft_model, processor, args, packed_dataset(rows, processor))
    trainer.train()
    trainer.save_model(str(tmp / "out" / "final"))
    return dict(trainer=trainer, model=peft_model, processor=processor, before=before, base=base_path,
                out=tmp / "out", args=args, rows=rows)


def test_lora_modules_are_only_in_the_language_model(tmp_path):
    model, _ = tiny_setup()
    peft_model = apply_lora(model, training_args(tmp_path, **LORA))
    wrapped = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    layers = model.config.text_config.num_hidden_layers
    assert len(wrapped) == layers * len(TARGETS)
    assert all(".model.language_model.layers." in name for name in wrapped)
    assert not any("vision_tower" in name for name, _ in peft_model.named_parameters() if "lora_" in name)
    assert language_model_target_regex(["q_proj", "v_proj"]) == r"model\.language_model\..*\.(q_proj|v_proj)"


def test_lora_argument_errors(tmp_path):
    model, _ = tiny_setup()
    with pytest.raises(ValueError, match=r"--lr_language_backbone, got 0\.0: set --lr_language_backbone > 0"):
        apply_lora(model, training_args(tmp_path, lr_language_backbone=0.0, **LORA))
    args = training_args(tmp_path, **{**LORA, "lora_target_modules": ["q_proj", "qkv"]})
    with pytest.raises(ValueError, match=r"\['qkv'\] not found; choose from \['down_proj', 'gate_proj', 'k_proj'"):
        apply_lora(model, args)
    peft_model = apply_lora(model, training_args(tmp_path, **LORA))
    with pytest.raises(ValueError, match="already a PeftModel"):
        apply_lora(peft_model, training_args(tmp_path, **LORA))


def peft_names(name: str, params: dict) -> tuple[str, str | None]:
    """(the parameter of the peft model that `name` of the base model became, its frozen original or None)."""
    for part in ("multi_modal_projector", "vision_tower"):
        if f".{part}." in name:
            head, rest = name.split(f".{part}.", 1)
            return f"{head}.{part}.modules_to_save.default.{rest}", f"{head}.{part}.original_module.{rest}"
    module, leaf = name.rsplit(".", 1)
    wrapped = f"{module}.base_layer.{leaf}"  # a linear layer that got LoRA
    return (wrapped if wrapped in params else name), None


def test_only_adapters_projector_and_vision_change(lora_run):
    model, trainer = lora_run["model"], lora_run["trainer"]
    params = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters()}
    # what the optimizer holds is exactly what requires grad: adapters (language group, language LR) and the
    # trained copies of the projector and the vision tower
    in_optimizer = {id(p): group for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, param in params.items():
        assert (id(param) in in_optimizer) == param.requires_grad, name
        if "lora_" in name:
            assert param.requires_grad and in_optimizer[id(param)]["name"] == "language"
            assert trainer.part_lrs["language"] == lora_run["args"].lr_language_backbone
            assert param.abs().sum() > 0, name  # B starts at 0; both A and B moved in 4 steps
        elif ".modules_to_save." in name:
            assert param.requires_grad and part_of(name) in ("projector", "vision")
        else:
            assert not param.requires_grad, name
    for name, old in lora_run["before"].items():
        new_name, original = peft_names(name, params)
        if original is not None:
            assert torch.equal(params[original], old), original
            assert not torch.equal(params[new_name], old), new_name  # every projector / vision weight trained
        else:
            assert torch.equal(params[new_name], old), new_name  # every decoder, embedding and lm_head weight


def test_frozen_projector_and_vision_are_not_saved(rows, tmp_path):
    model, processor = tiny_setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp_path, max_steps=2, lr_mp=0.0, lr_vision_backbone=0.0, **LORA)
    peft_model = apply_lora(model, args)
    trainer = make_trainer(peft_model, processor, args, packed_dataset(rows, processor))
    trainer.train()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    base = peft_model.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, before[name.replace(".base_layer.", ".")]), name
    trainer.save_model(str(tmp_path / "adapter"))
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_" in k for k in keys)


def test_adapter_saves_reloads_and_merges(lora_run, tmp_path):
    model, processor, final = lora_run["model"], lora_run["processor"], lora_run["out"] / "final"
    files = set(os.listdir(final))
    assert {"adapter_model.safetensors", "adapter_config.json", "training_info.json", "processor_config.json"} <= files
    assert "model.safetensors" not in files
    with safe_open(final / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("multi_modal_projector" in k for k in keys) and any("vision_tower" in k for k in keys)
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == lora_run["base"]
    ref = logits(model, processor)

    reloaded = PeftModel.from_pretrained(NanoVLMForConditionalGeneration.from_pretrained(lora_run["base"]), final)
    torch.testing.assert_close(logits(reloaded, processor), ref, atol=1e-6, rtol=0)

    merged = merge_lora_checkpoint(final, tmp_path / "merged")  # base from adapter_config.json
    assert type(merged) is NanoVLMForConditionalGeneration
    torch.testing.assert_close(logits(merged, processor), ref, atol=1e-5, rtol=0)
    saved = set(os.listdir(tmp_path / "merged"))
    assert {"modeling_nanovlm.py", "configuration_nanovlm.py", "model.safetensors", "processor_config.json",
            "training_info.json", "README.md"} <= saved and "model_card_nanovlm.py" not in saved
    assert "- steps: 4 " in (tmp_path / "merged" / "README.md").read_text()  # the adapter run's card, not the base's
    auto_map = json.loads((tmp_path / "merged" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_nanovlm.NanoVLMForConditionalGeneration"
    assert json.loads((tmp_path / "merged" / "training_info.json").read_text())["steps"] == 4
    loaded = AutoModel.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    torch.testing.assert_close(logits(loaded, processor), ref, atol=1e-5, rtol=0)


def test_lora_resume_continues_exactly(lora_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(lora_run["out"] / "checkpoint-2", out / "checkpoint-2")
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    model = NanoVLMForConditionalGeneration.from_pretrained(lora_run["base"])
    args = training_args(out, max_steps=4, save_strategy="no", **LORA)
    peft_model = apply_lora(model, args)
    processor = lora_run["processor"]
    trainer = make_trainer(peft_model, processor, args, packed_dataset(lora_run["rows"], processor))
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    straight = dict(lora_run["model"].named_parameters())
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, straight[name], atol=1e-6, rtol=0, msg=name)


def test_lora_recipe_parses():
    model_args, data_args, args = parse_args(["--config", str(REPO / "configs/train/lora.yaml"), "--bf16", "false"])
    assert args.use_lora is True and model_args.model_name_or_path == "outputs/demo/final"
    assert args.lr_language_backbone > 0 and args.lr_vision_backbone == 0
    assert data_args.synthetic_dataset is True


def test_lora_recipe_reuses_the_demo_data():
    # lora.yaml reads the demo's synthetic folder: the same build settings, or the run stops before training
    _, demo_data, demo_args = parse_args(["--config", str(REPO / "configs/train/demo.yaml")])
    _, lora_data, lora_args = parse_args(["--config", str(REPO / "configs/train/lora.yaml")])
    assert lora_data.dataset_name_or_path == demo_data.dataset_name_or_path
    assert lora_data.synthetic_settings(lora_args.seed) == demo_data.synthetic_settings(demo_args.seed)


def test_lora_recipe_after_the_demo_through_the_entry_point(tmp_path):
    """The README's LoRA section: demo, then lora.yaml on its final/, the report on the PEFT model, merge, reload."""
    data, demo, lora = tmp_path / "data", tmp_path / "demo", tmp_path / "lora"
    run = run_train_entry("demo", ["--output_dir", demo, "--dataset_name_or_path", data, "--max_steps", 2, *ENTRY_SHORT])
    assert run.returncode == 0, run.stderr[-3000:]
    run = run_train_entry("lora", ["--model_name_or_path", demo / "final", "--output_dir", lora,
                                   "--dataset_name_or_path", data, "--max_steps", 2, *ENTRY_SHORT])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Held-out accuracy on 24 synthetic test samples" in run.stdout
    results = json.loads((lora / "results.json").read_text())
    accuracy, blind = results["test_accuracy"], results["blind_guess_accuracy"]
    assert set(accuracy) == set(blind) and "overall" in accuracy and all(0 <= v <= 1 for v in accuracy.values())
    adapter = lora / "final"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(demo / "final")

    processor = AutoProcessor.from_pretrained(adapter)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(demo / "final", trust_remote_code=True), adapter)
    ref = logits(peft_model, processor)
    merged = merge_lora_checkpoint(adapter, tmp_path / "merged")
    torch.testing.assert_close(logits(merged, processor), ref, atol=1e-5, rtol=0)
    base_only = logits(AutoModel.from_pretrained(demo / "final", trust_remote_code=True), processor)
    assert not torch.allclose(base_only, ref, atol=1e-4)  # the adapter changed the model


FRESH_LOGITS = """
import sys, torch
from transformers import AutoModel, AutoProcessor
path, inputs, out = sys.argv[1:]
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
AutoProcessor.from_pretrained(path, trust_remote_code=True)
assert not [name for name in sys.modules if name.startswith("nanovlm")], "nanovlm was imported"
with torch.no_grad():
    torch.save(model(**torch.load(inputs)).logits, out)
"""


def test_merge_refuses_to_overwrite_and_loads_in_a_fresh_process(lora_run, tmp_path):
    """Before, merging into an existing folder wrote the merged weights beside whatever was there: into a training
    checkpoint (its optimizer and trainer state kept), or over the adapter or base folder. Now a non-empty folder
    needs overwrite=True (stale files deleted) and an input folder is always refused. The merged folder loads with
    trust_remote_code in a process that never imported nanovlm (cwd outside the repository) and gives the PEFT
    model's logits."""
    final, processor = lora_run["out"] / "final", lora_run["processor"]
    stale = tmp_path / "merged" / "optimizer.pt"
    stale.parent.mkdir()
    stale.write_text("from an earlier run")
    with pytest.raises(FileExistsError, match=f"output_dir {tmp_path / 'merged'} exists and is not empty; pass a "
                                              "new folder, or overwrite=True to replace its contents"):
        merge_lora_checkpoint(final, tmp_path / "merged")
    for folder, what in ((final, "adapter"), (lora_run["base"], "base model")):
        with pytest.raises(ValueError, match=f"output_dir {folder} is the {what} folder"):
            merge_lora_checkpoint(final, folder, overwrite=True)
    with pytest.raises(FileNotFoundError, match="the base model outputs/no/base is no folder here .*; pass "
                                                "base_model_name_or_path=PATH"):
        merge_lora_checkpoint(final, tmp_path / "other", base_model_name_or_path="outputs/no/base")
    merge_lora_checkpoint(final, tmp_path / "merged", overwrite=True)
    assert not stale.exists() and (tmp_path / "merged" / "model.safetensors").is_file()

    messages = [{"role": "user", "content": [{"type": "image", "image": lora_run["rows"][0]["images"][0]},
                                             {"type": "text", "text": "What color is the circle?"}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True,
                                           return_tensors="pt")
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    (tmp_path / "fresh.py").write_text(FRESH_LOGITS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    proc = subprocess.run([sys.executable, "fresh.py", str(tmp_path / "merged"), "inputs.pt", "out.pt"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lora_run["model"].eval()
    with torch.no_grad():
        ref = lora_run["model"](**inputs).logits
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ref, atol=1e-5, rtol=0)


def test_merge_never_deletes_or_writes_into_its_inputs(lora_run):
    """`overwrite=True` into a folder that holds the adapter (the LoRA run's output_dir) deleted the whole run, and
    the merge then failed reading the adapter's processor; a folder inside the adapter mixed the two. Both are one
    line now, before anything is loaded or deleted."""
    final, run_dir = lora_run["out"] / "final", lora_run["out"]
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(ValueError, match=f"output_dir {run_dir} holds the adapter folder {final}, which "
                                         "overwrite=True would delete; pass a folder outside it"):
        merge_lora_checkpoint(final, run_dir, overwrite=True)
    with pytest.raises(ValueError, match=f"output_dir {final / 'merged'} lies inside the adapter folder {final}; "
                                         "pass a folder outside it"):
        merge_lora_checkpoint(final, final / "merged")
    assert sorted(p.name for p in run_dir.iterdir()) == before and (final / "adapter_config.json").is_file()
    assert not (final / "merged").exists()


def test_lora_settings_at_the_entry_point(tmp_path):
    """Before, an unknown --lora_target_modules name ended in apply_lora's ValueError traceback, --max_image_size
    with --model_name_or_path was silently ignored, and a relative --model_name_or_path was recorded as the adapter's
    base as it was given, so merging or evaluating the adapter from another directory failed. Now the first is one line; the second replaces the checkpoint
    processor's value (as AutoProcessor.from_pretrained(path, max_image_size=N) would), saved with the adapter and
    recorded in the run settings, or is one line naming both flags when the checkpoint's tiles cannot make it."""
    _, _, base = base_model(tmp_path)  # 32 px tiles, up to 2 per side, max_image_size 64

    def entry(*args):
        # relative to the entry point's working directory (the repository), as the recipe's outputs/demo/final
        return run_train_entry("lora", ["--model_name_or_path", os.path.relpath(base, REPO), "--output_dir", tmp_path / "out",
                                        "--dataset_name_or_path", tmp_path / "data", "--max_steps", 1, "--save_steps",
                                        1, *ENTRY_SHORT, *args], threads=1)

    for args, message in (
        (["--lora_target_modules", "q_proj", "qkv_proj"],
         "--lora_target_modules must name linear layers of the language model: ['qkv_proj'] not found; choose from "
         "['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']."),
        (["--max_image_size", "96"],
         f"--max_image_size 96 with --model_name_or_path {base} (its 32 px tiles): 3 tiles per side, over the "
         "checkpoint's max_grid 2; use at most 64"),
        (["--tile_size", "64"], f"--tile_size 64 with --model_name_or_path {base}: its vision tower takes 32 px tiles; "
                                "drop --tile_size"),
    ):
        run = entry(*args)
        assert run.returncode == 1 and "Traceback" not in run.stderr
        assert run.stderr.strip().splitlines()[-1] == f"train_accelerate.py: error: {message}"
    run = entry("--max_image_size", "32")
    assert run.returncode == 0, run.stderr[-3000:]
    for folder in ("checkpoint-1", "final"):
        assert AutoProcessor.from_pretrained(tmp_path / "out" / folder).image_processor.max_image_size == 32
    # the base as an absolute path: a relative one could not be merged or evaluated from another directory
    assert json.loads((tmp_path / "out" / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    settings = json.loads((tmp_path / "out" / "checkpoint-1" / "run_settings.json").read_text())["data"]
    assert (settings["max_image_size"], settings["tile_size"], settings["max_grid"]) == (32, 32, 2)
