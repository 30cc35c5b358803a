"""The model card: the trainer writes it (every save, push_to_hub); the model class uploads transformers' generic one.

The hub is unreachable here: only the network calls (create repo, fetch the generic card, upload) are replaced;
everything between them is the real code path.
"""

from __future__ import annotations

import json
import os

import pytest
import transformers.modeling_utils
import transformers.trainer
import transformers.utils.hub as hub
from huggingface_hub import ModelCard
from training_helpers import make_trainer, packed_dataset, synthetic_rows, tiny_setup, training_args

from nanovlm.training.lora import apply_lora
from nanovlm.training.model_card import build_model_card, parameter_counts

TRAINING_INFO = {
    "dataset": "HuggingFaceM4/FineVision",
    "steps": 1234,
    "global_batch_size": 64,
    "learning_rates": {"projector": 0.00512, "vision": 5e-05, "language": 0.0},
    "eval_loss": 1.2345,
    "evaluation": {"test_accuracy": {"color": 0.875, "overall": 0.5}, "blind_guess_accuracy": {"color": 0.25}},
}


class FakeApi:
    def create_repo(self, repo_id, **kwargs):
        return type("Repo", (), {"repo_id": repo_id})()


class GenericCard:
    """transformers' generic card, as `create_and_tag_model_card` returns it (with a tag to keep)."""

    def save(self, path):
        with open(path, "w") as f:
            f.write("---\ntags:\n- kept-tag\n---\ngeneric card\n")


def capture_model_uploads(monkeypatch) -> dict:
    """Replace the network calls of `model.push_to_hub` (create repo, fetch the card, upload); returns what would have
    been uploaded."""
    uploaded = {}

    def fake_upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        uploaded["repo"] = repo_id
        uploaded["files"] = {f: open(os.path.join(working_dir, f), "rb").read() for f in os.listdir(working_dir)}

    for module in (hub, transformers.modeling_utils):  # push_to_hub / save_pretrained(push_to_hub=True)
        monkeypatch.setattr(module, "hf_api", lambda: FakeApi())
        monkeypatch.setattr(module, "create_and_tag_model_card", lambda *a, **k: GenericCard())
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", fake_upload)
    return uploaded


def expected_counts(model) -> dict[str, int]:
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    return {"vision": vision, "projector": projector, "total": model.num_parameters(),
            "language": model.num_parameters() - vision - projector}


def check_card(text: str, counts: dict[str, int], repo: str, library: str = "transformers") -> ModelCard:
    """Front matter values, the real parameter counts per part (`counts`), and the usage snippet."""
    card = ModelCard(text)
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.library_name == library
    assert {"nanovlm", "vision-language"} <= set(card.data.tags)
    for part, label in (("vision", "vision tower"), ("projector", "projector"), ("language", "language model")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert row.endswith(f"| {counts[part]:,} ({counts[part] / 1e3:.1f}K) |"), row
    assert f"**{counts['total']:,} ({counts['total'] / 1e3:.1f}K)**" in text
    assert f'AutoModel.from_pretrained("{repo}", trust_remote_code=True)' in text \
        or f'PeftModel.from_pretrained(base, "{repo}")' in text
    return card


def test_parameter_counts_match_the_modules(tiny_model):
    counts = parameter_counts(tiny_model)
    assert {k: counts[k] for k in ("vision", "projector", "language", "total")} == expected_counts(tiny_model)
    assert counts["adapter"] == 0
    assert counts["total"] == sum(p.numel() for p in tiny_model.parameters())  # tied lm_head counted once


def test_model_push_to_hub_uploads_transformers_card_and_no_card_code(tiny_model, tmp_path, monkeypatch):
    """The model class knows nothing of cards (README "Model cards"): its push uploads what save_pretrained writes
    plus transformers' generic card; the copied model code neither carries nor imports a card module."""
    uploaded = capture_model_uploads(monkeypatch)
    tiny_model.push_to_hub("me/tiny-vlm")
    tiny_model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/saved")
    files = uploaded["files"]
    assert uploaded["repo"] == "me/saved"
    assert set(files) == set(os.listdir(tmp_path / "local")) | {"README.md"}
    assert "modeling_nanovlm.py" in files and not {"model_card_nanovlm.py", "training_info.json"} & set(files)
    imports = [line for line in files["modeling_nanovlm.py"].decode().splitlines() if line.startswith(("from ", "import "))]
    assert imports and not [line for line in imports if "card" in line]
    assert files["README.md"].decode() == "---\ntags:\n- kept-tag\n---\ngeneric card\n"
    assert not hasattr(tiny_model, "training_info")


def test_card_without_training_info_and_with_backbone_names(tiny_model, tmp_path):
    tiny_model.config.vision_config._name_or_path = "google/siglip2-base-patch16-512"
    tiny_model.config.text_config._name_or_path = str(tmp_path)  # a local folder: not hub metadata
    text = build_model_card(tiny_model, repo_id="me/x")
    card = check_card(text, expected_counts(tiny_model), "me/x")
    assert card.data.base_model == ["google/siglip2-base-patch16-512"]
    assert f"| language model | {tmp_path} (llama, 2 layers" in text
    assert "No training information was recorded" in text and "## Evaluation" not in text


def test_lora_adapter_card(tmp_path):
    model, _ = tiny_setup()
    counts = expected_counts(model)
    peft_model = apply_lora(model, training_args(tmp_path, use_lora=True, lora_r=4))
    info = {"steps": 3, "lora": {"r": 4, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj"],
                                 "base_model": "me/base-vlm"}}
    text = build_model_card(peft_model, repo_id="me/adapter", training_info=info)
    card = check_card(text, counts, "me/adapter", library="peft")
    assert card.data.base_model == "me/base-vlm" or card.data.base_model == ["me/base-vlm"]
    assert 'AutoModel.from_pretrained("me/base-vlm", trust_remote_code=True)' in text
    adapter = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert f"LoRA adapter parameters (not in the total): {adapter:,}" in text
    assert parameter_counts(peft_model)["total"] == counts["total"]  # modules_to_save copies counted once


def test_trainer_push_to_hub_uploads_the_card_with_training_details(tmp_path, monkeypatch):
    model, processor = tiny_setup()
    rows = synthetic_rows(48)
    args = training_args(tmp_path / "run", max_steps=2, eval_strategy="steps", eval_steps=2,
                         hub_model_id="me/run-vlm")
    eval_rows = packed_dataset(synthetic_rows(8, seed=1), processor, infinite=False)
    trainer = make_trainer(model, processor, args, packed_dataset(rows, processor), eval_dataset=eval_rows)
    trainer.card_info["dataset"] = "outputs/synthetic_data"
    trainer.train()
    results = {"test_accuracy": {"color": 0.75, "overall": 0.6}, "blind_guess_accuracy": {"color": 0.25}}
    trainer.set_results({**results, "final_model": "final"})  # in memory for the card; results.json for the user
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == {**results, "final_model": "final"}
    (tmp_path / "run" / "results.json").unlink()  # the card does not read it back

    uploads = {}

    class Api(FakeApi):
        def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
            uploads["repo"] = repo_id
            uploads["files"] = set(os.listdir(folder_path))
            uploads["readme"] = open(os.path.join(folder_path, "README.md")).read()

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: Api())
    trainer.push_to_hub()
    assert uploads["repo"] == "me/run-vlm"
    assert {"README.md", "model.safetensors", "training_info.json"} <= uploads["files"]
    assert "model_card_nanovlm.py" not in uploads["files"]
    text = uploads["readme"]
    check_card(text, expected_counts(model), "me/run-vlm")
    eval_loss = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e][-1]
    assert f"- validation loss (last evaluation): {eval_loss:.4f}" in text
    assert "- steps: 2 (global batch 2 packed rows)" in text and "- data: `outputs/synthetic_data`" in text
    assert "| color | 0.750 | 0.250 |" in text
    info = json.loads((tmp_path / "run" / "training_info.json").read_text())
    assert info["steps"] == 2 and info["evaluation"] == results and info["eval_loss"] == eval_loss
    # the saved folder holds that card (what `hf upload` publishes); rebuilt from the loaded model it is the same
    assert (tmp_path / "run" / "README.md").read_text() == text
    from nanovlm import NanoVLMForConditionalGeneration

    loaded = NanoVLMForConditionalGeneration.from_pretrained(tmp_path / "run")
    assert build_model_card(loaded, repo_id="me/run-vlm") == text  # training_info.json read from the folder


def test_every_trainer_save_writes_the_card_and_training_info(tmp_path):
    model, processor = tiny_setup()
    args = training_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=1)
    trainer = make_trainer(model, processor, args, packed_dataset(synthetic_rows(48), processor))
    trainer.train()
    for step in (1, 2):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        info = json.loads((folder / "training_info.json").read_text())
        assert info["steps"] == step and "evaluation" not in info
        assert f"- steps: {step} (global batch 2 packed rows)" in (folder / "README.md").read_text()
    trainer.set_results({"test_accuracy": {"overall": 0.5}, "blind_guess_accuracy": {"overall": 0.25}})
    trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "training_info.json").read_text())["evaluation"] == {
        "test_accuracy": {"overall": 0.5}, "blind_guess_accuracy": {"overall": 0.25}}
    card = (tmp_path / "final" / "README.md").read_text()
    assert "| overall | 0.500 | 0.250 |" in card
    assert "## Evaluation\n\nHeld-out accuracy" in card  # no validation loss: no second blank line
    # a local folder's card says which name to load once the folder is uploaded (it used to show only the local path)
    final = str(tmp_path / "final")
    assert f'# "{final}" is a local folder: after `hf upload you/name {final}`, pass "you/name"\nmodel = ' \
        f'AutoModel.from_pretrained("{final}", trust_remote_code=True)' in card
    assert "Each image becomes 32 px tiles plus a global view, 4 image tokens each." in card


def test_card_of_a_one_tile_model_describes_one_view(tiny_tokenizer):
    """With max_grid 1 (the demo) the processor makes no tiles, only the global view: the card said "tiles plus a
    global view"."""
    from conftest import make_tiny_config

    from nanovlm import NanoVLMForConditionalGeneration

    config = make_tiny_config(tiny_tokenizer)
    config.max_grid = 1
    text = build_model_card(NanoVLMForConditionalGeneration(config), repo_id="me/one-tile")
    assert "Each image becomes one 32 px view of 4 image tokens." in text and "tiles plus" not in text
    assert "local folder" not in text


def test_card_names_the_step_of_the_checkpoint_kept(tiny_model):
    """final/ holds the best checkpoint's weights, not necessarily the last step's: the card says which step."""
    info = {**TRAINING_INFO, "best_eval_loss": 0.74126, "best_step": 400}
    text = build_model_card(tiny_model, repo_id="me/x", training_info=info)
    assert "- steps: 1,234 (global batch 64 packed rows)" in text
    assert "- best validation loss at step 400 (the checkpoint kept): 0.7413" in text
    older = {k: v for k, v in info.items() if k != "best_step"}  # training_info.json of an older run
    assert "- best validation loss (the checkpoint kept): 0.7413" in build_model_card(tiny_model, training_info=older)


@pytest.mark.parametrize("name", ["me/model", "outputs/demo/final"])
def test_only_hub_ids_become_metadata(tiny_model, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    os.makedirs("outputs/demo/final")
    text = build_model_card(tiny_model, training_info={"finetuned_from": name, "dataset": name})
    card = ModelCard(text)
    expected = [name] if name == "me/model" else None
    assert card.data.base_model in (expected, name if expected else None)
    assert card.data.datasets == expected
    assert f"- finetuned from: `{name}`" in text
