"""save_pretrained -> a fresh process without nanovlm -> Auto* with trust_remote_code; and from_backbones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TOKENIZER_CORPUS
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, SiglipConfig, SiglipModel

from nanovlm import NanoVLMForConditionalGeneration, NanoVLMProcessor, extend_tokenizer

REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["nanovlm"] = None  # importing nanovlm now fails: only the checkpoint's own files can be used
    import torch
    from PIL import Image
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor)
    path, out = sys.argv[1], sys.argv[2]
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 32), (9, 99, 199))},
                                             {"type": "text", "text": "What color is the circle?"}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True,
                                           return_tensors="pt")
    result = {"config": type(AutoConfig.from_pretrained(path, trust_remote_code=True)).__module__,
              "input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}
    for auto in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
        model = auto.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            result[auto.__name__] = model(**inputs).logits
        result[auto.__name__ + "_module"] = type(model).__module__
    torch.save(result, out)
    """
)


def _as_older_checkpoint(ckpt) -> None:
    """Make `ckpt` look like one saved by an older version: its model code imported a sibling card module
    (model_card_nanovlm.py), copied next to the weights with it."""
    (ckpt / "model_card_nanovlm.py").write_text("import json\n\nTRAINING_INFO_NAME = 'training_info.json'\n")
    modeling = ckpt / "modeling_nanovlm.py"
    code = modeling.read_text()
    anchor = "from .configuration_nanovlm import NanoVLMConfig\n"
    assert anchor in code
    modeling.write_text(code.replace(anchor, anchor + "from .model_card_nanovlm import TRAINING_INFO_NAME\n"))


@pytest.mark.parametrize("older", [False, True], ids=["current", "older_with_card_module"])
def test_trust_remote_code_roundtrip_in_fresh_process(tiny_model, tiny_processor, tmp_path, older):
    ckpt = tmp_path / "ckpt"
    tiny_model.save_pretrained(ckpt)
    tiny_processor.save_pretrained(ckpt)
    files = set(os.listdir(ckpt))
    for name in ("configuration_nanovlm.py", "modeling_nanovlm.py", "processing_nanovlm.py",
                 "image_processing_nanovlm.py", "model.safetensors", "config.json", "processor_config.json"):
        assert name in files
    assert "model_card_nanovlm.py" not in files  # the model code knows nothing of cards
    if older:
        _as_older_checkpoint(ckpt)
    auto_map = json.loads((ckpt / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_nanovlm.NanoVLMForConditionalGeneration"

    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    out = tmp_path / "remote.pt"
    proc = subprocess.run([sys.executable, str(script), str(ckpt), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = torch.load(out)

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 32), (9, 99, 199))},
                                             {"type": "text", "text": "What color is the circle?"}]}]
    local = tiny_processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                               add_generation_prompt=True, return_tensors="pt")
    assert torch.equal(remote["input_ids"], local["input_ids"])
    assert torch.equal(remote["pixel_values"], local["pixel_values"])
    assert remote["config"].startswith("transformers_modules.")
    with torch.no_grad():
        ref = tiny_model(**local).logits
    for name in ("AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM"):
        assert remote[name + "_module"].startswith("transformers_modules.")  # really the copied code
        assert torch.equal(remote[name], ref)


QUIET_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import nanovlm  # registered with the auto classes, as in nanovlm-generate, training and evaluation
    from transformers import AutoImageProcessor, AutoProcessor
    for auto in (AutoProcessor, AutoImageProcessor):
        loaded = auto.from_pretrained(sys.argv[1], trust_remote_code=True)
        image_processor = getattr(loaded, "image_processor", loaded)
        print(type(image_processor).__module__ + "." + type(image_processor).__name__)
    """
)


def test_processor_loads_without_a_backend_warning_when_nanovlm_is_imported(tiny_processor, tmp_path):
    """With nanovlm imported, AutoProcessor/AutoImageProcessor pick the registered NanoVLMImageProcessor, and
    transformers (which asks for its "torchvision" backend whenever torchvision is installed) does not warn that
    "Requested torchvision backend is not available": our one class serves both backends."""
    ckpt = tmp_path / "ckpt"
    tiny_processor.save_pretrained(ckpt)
    script = tmp_path / "quiet.py"
    script.write_text(QUIET_LOAD_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, str(script), str(ckpt)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["nanovlm.image_processing_nanovlm.NanoVLMImageProcessor"] * 2, proc.stdout
    assert "backend is not available" not in proc.stderr, proc.stderr[-2000:]


def test_push_to_hub_publishes_the_saved_files(tiny_model, tmp_path, monkeypatch):
    """push_to_hub uploads exactly what save_pretrained writes. The hub is unreachable here, so the three network
    calls (create repo, fetch card, upload) are replaced; everything between them is the real code path."""
    import transformers.utils.hub as hub

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    class FakeCard:
        def save(self, path):
            open(path, "w").write("card")

    def fake_upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        uploaded["repo"] = repo_id
        uploaded["files"] = {f: open(os.path.join(working_dir, f), "rb").read() for f in os.listdir(working_dir)}

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: FakeCard())
    monkeypatch.setattr(type(tiny_model), "_upload_modified_files", fake_upload)
    tiny_model.push_to_hub("me/tiny")
    tiny_model.save_pretrained(tmp_path / "local")
    local = set(os.listdir(tmp_path / "local"))
    assert uploaded["repo"] == "me/tiny"
    assert set(uploaded["files"]) == local | {"README.md"}
    for name in ("modeling_nanovlm.py", "configuration_nanovlm.py", "config.json"):
        assert uploaded["files"][name] == (tmp_path / "local" / name).read_bytes()


def _tiny_backbones(tmp_path, tie: bool):
    vision = SiglipModel(SiglipConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=16),
    ))
    vision.save_pretrained(tmp_path / "siglip")
    from nanovlm import train_tokenizer

    base_tok = train_tokenizer(TOKENIZER_CORPUS, vocab_size=300, max_grid=1)
    base_tok.save_pretrained(tmp_path / "lm")
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(base_tok),
                                      tie_word_embeddings=tie))
    lm.save_pretrained(tmp_path / "lm")
    return vision, lm


def test_from_backbones_loads_weights_and_extends_vocab(tmp_path):
    for tie in (True, False):
        vision, lm = _tiny_backbones(tmp_path / str(tie), tie)
        tok = extend_tokenizer(str(tmp_path / str(tie) / "lm"), max_grid=4)
        old_vocab = lm.config.vocab_size
        model = NanoVLMForConditionalGeneration.from_backbones(
            tmp_path / str(tie) / "siglip", tmp_path / str(tie) / "lm", tokenizer=tok, pixel_shuffle_factor=2
        )
        tower = model.model.vision_tower.state_dict()
        for key, value in vision.vision_model.state_dict().items():
            if not key.startswith("head."):
                assert torch.equal(tower[key], value), key
        assert not any(k.startswith("head.") for k in tower)
        lm_state = model.model.language_model.state_dict()
        for key, value in lm.model.state_dict().items():
            if key == "embed_tokens.weight":
                assert torch.equal(lm_state[key][:old_vocab], value)
            else:
                assert torch.equal(lm_state[key], value), key
        emb = model.get_input_embeddings().weight
        assert emb.shape[0] == len(tok) > old_vocab
        new_rows = emb[old_vocab:]
        assert 0.01 < new_rows.std().item() < 0.03  # N(0, 0.02)
        assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image|>")
        assert model.generation_config.suppress_tokens == [model.config.image_token_id]
        if tie:
            assert model.lm_head.weight.data_ptr() == emb.data_ptr()
        else:
            assert model.lm_head.weight.data_ptr() != emb.data_ptr()
            assert torch.equal(model.lm_head.weight[:old_vocab], lm.lm_head.weight)
        # the result runs end to end and survives a save/load
        proc = NanoVLMProcessor.from_config(tok, model.config, max_grid=4)
        inputs = proc(text="<|image|>hi", images=[Image.new("RGB", (64, 64))], return_tensors="pt")
        logits = model(**inputs).logits
        model.save_pretrained(tmp_path / f"nanovlm{tie}")
        again = NanoVLMForConditionalGeneration.from_pretrained(tmp_path / f"nanovlm{tie}")
        assert torch.equal(again(**inputs).logits, logits)
        assert (again.lm_head.weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()) == tie
