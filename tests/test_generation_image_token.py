"""`generate` never emits the image token (an input placeholder): with and without cache, greedy and sampling, for
fresh models, checkpoints loaded with trust_remote_code in a fresh process, and checkpoints whose
generation_config.json predates the suppression. The model is rigged so the image token is its unsuppressed argmax."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY_MAX_GRID, make_tiny_config
from PIL import Image
from transformers import GenerationConfig

from nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration, NanoVLMProcessor
from nanovlm.cli.generate import main as generate_main

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 5


@pytest.fixture
def image_token_model(tiny_tokenizer):
    """A tiny model whose raw argmax is the image token at every position: the last MLP's bias writes a large
    constant into hidden dim 0, and the (tied) image-token row of the head reads only that dim."""
    config = make_tiny_config(tiny_tokenizer, mlp_bias=True)
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(config).eval()
    with torch.no_grad():
        bias = model.model.language_model.layers[-1].mlp.down_proj.bias
        bias.zero_()[0] = 100.0
        row = model.lm_head.weight[config.image_token_id]
        row.zero_()[0] = 10.0
    model.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    return model


@pytest.fixture
def batch(tiny_processor):
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 32), (200, 10, 10))},
                                             {"type": "text", "text": "What color is the circle?"}]}]
    return dict(tiny_processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                   add_generation_prompt=True, return_tensors="pt"))


def _generations(model, batch) -> dict[str, list[int]]:
    """New tokens of greedy and seeded-sampling generation, each with and without the KV cache."""
    out = {}
    for mode, sample in (("greedy", False), ("sample", True)):
        for cache in (True, False):
            torch.manual_seed(0)
            ids = model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=sample, use_cache=cache)
            out[f"{mode}_{'cache' if cache else 'nocache'}"] = ids[0, batch["input_ids"].shape[1]:].tolist()
    return out


def _assert_suppressed(generations: dict[str, list[int]], image_token_id: int) -> None:
    assert generations["greedy_cache"] == generations["greedy_nocache"]
    for name, tokens in generations.items():
        assert len(tokens) == NEW, name
        assert image_token_id not in tokens, name


def test_fresh_model_never_generates_the_image_token(image_token_model, batch):
    image_id = image_token_model.config.image_token_id
    with torch.no_grad():
        assert image_token_model(**batch).logits[0, -1].argmax().item() == image_id  # the rig works
    assert image_token_model.generation_config.suppress_tokens == [image_id]
    _assert_suppressed(_generations(image_token_model, batch), image_id)


def test_user_generation_config_and_suppress_tokens_keep_the_image_token_suppressed(image_token_model, batch):
    image_id, other = image_token_model.config.image_token_id, 7
    model, kw = image_token_model, dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    greedy = model.generate(**batch, **kw)[0].tolist()
    # a user config without suppress_tokens, one with its own, and suppress_tokens as a keyword: theirs + ours
    given = model.generate(**batch, generation_config=GenerationConfig(**kw))[0].tolist()
    own = model.generate(**batch, generation_config=GenerationConfig(suppress_tokens=[greedy[-1], other], **kw))
    keyword = model.generate(**batch, suppress_tokens=[greedy[-1]], **kw)
    assert given == greedy
    for out in (own[0].tolist(), keyword[0].tolist()):
        new = out[len(out) - NEW:]
        assert image_id not in new and greedy[-1] not in new and other not in new
    model.generation_config = GenerationConfig(**kw)  # replaced after loading: still suppressed
    assert model.generate(**batch, use_cache=False)[0].tolist() == greedy


def test_every_build_path_records_the_suppression(tiny_tokenizer, tiny_config):
    image_id = tiny_config.image_token_id
    fresh = NanoVLMForConditionalGeneration._from_config(NanoVLMConfig.from_dict(tiny_config.to_dict()))
    assert fresh.generation_config.suppress_tokens == [image_id]
    unset = make_tiny_config(tiny_tokenizer)
    unset.image_token_id = None
    model = NanoVLMForConditionalGeneration(unset)
    assert model.generation_config.suppress_tokens is None  # nothing to suppress yet ...
    model.resize_for_tokenizer(tiny_tokenizer)
    assert model.generation_config.suppress_tokens == [image_id]  # ... until the tokenizer names the image token


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModel, AutoModelForImageTextToText
    batch, out, new, paths = torch.load(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    result = {"nanovlm_imported": None}
    for i, path in enumerate(paths):
        auto = (AutoModelForImageTextToText, AutoModel)[i % 2]
        model = auto.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            argmax = model(**batch).logits[0, -1].argmax().item()
        gens = {}
        for mode, sample in (("greedy", False), ("sample", True)):
            for cache in (True, False):
                torch.manual_seed(0)
                ids = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=sample,
                                     use_cache=cache)
                gens[f"{mode}_{'cache' if cache else 'nocache'}"] = ids[0, batch["input_ids"].shape[1]:].tolist()
        result[path] = {"argmax": argmax, "suppress_tokens": model.generation_config.suppress_tokens,
                        "generations": gens, "module": type(model).__module__}
    result["nanovlm_imported"] = "nanovlm" in sys.modules
    torch.save(result, out)
    """
)


def test_saved_and_older_checkpoints_suppress_in_a_fresh_process(image_token_model, batch, tmp_path):
    image_id = image_token_model.config.image_token_id
    current, no_field, no_file = (tmp_path / name for name in ("current", "no_suppress_field", "no_gen_config"))
    for ckpt in (current, no_field, no_file):
        image_token_model.save_pretrained(ckpt)
    assert json.loads((current / "generation_config.json").read_text())["suppress_tokens"] == [image_id]
    # checkpoints saved before the suppression: generation_config.json without the field, or without the file
    gen_config = json.loads((no_field / "generation_config.json").read_text())
    del gen_config["suppress_tokens"]
    (no_field / "generation_config.json").write_text(json.dumps(gen_config))
    (no_file / "generation_config.json").unlink()
    # ... loaded by the package class too (evaluation, training resume)
    for ckpt in (no_field, no_file):
        assert NanoVLMForConditionalGeneration.from_pretrained(ckpt).generation_config.suppress_tokens == [image_id]

    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    paths = [str(p) for p in (current, no_field, no_file)]
    proc = subprocess.run([sys.executable, "remote.py", "batch.pt", "out.pt", str(NEW), *paths], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["nanovlm_imported"] is False
    for path in paths:
        loaded = result[path]
        assert loaded["module"].startswith("transformers_modules"), path  # the code copied next to the weights
        assert loaded["argmax"] == image_id, path
        assert loaded["suppress_tokens"] == [image_id], path
        _assert_suppressed(loaded["generations"], image_id)
        assert loaded["generations"] == _generations(image_token_model, batch), path


def test_cli_suppresses_the_image_token_for_checkpoints_whose_code_does_not(image_token_model, tiny_tokenizer,
                                                                             tiny_config, batch, tmp_path, capsys):
    # A checkpoint saved by an older nanovlm carries model code that never suppressed the image token. The CLI
    # imports nanovlm, whose registered model class wins over the copied code, so it still suppresses it.
    ckpt = tmp_path / "old"
    image_token_model.save_pretrained(ckpt)
    NanoVLMProcessor.from_config(tiny_tokenizer, tiny_config, max_grid=TINY_MAX_GRID).save_pretrained(ckpt)
    code = (ckpt / "modeling_nanovlm.py").read_text()
    guard = "    if generation_config is None or image_token_id is None:\n        return\n"
    assert guard in code
    (ckpt / "modeling_nanovlm.py").write_text(code.replace(guard, "    return\n"))
    gen_config = json.loads((ckpt / "generation_config.json").read_text())
    del gen_config["suppress_tokens"]
    (ckpt / "generation_config.json").write_text(json.dumps(gen_config))
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 32), (200, 10, 10)).save(image)

    argv = ["--model", str(ckpt), "--image", str(image), "--prompt", "What color is the circle?",
            "--max_new_tokens", str(NEW)]
    assert generate_main(argv) == 0
    answer = capsys.readouterr().out  # the image is `batch`'s, saved losslessly
    expected = image_token_model.generate(**batch, max_new_tokens=NEW, do_sample=False)
    expected_text = tiny_tokenizer.decode(expected[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected_text.strip()  # unsuppressed it would be image tokens only, which decode to ""
    assert answer == expected_text + "\n"
