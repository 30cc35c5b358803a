"""nanovlm-generate: the streamed answer equals `generate` + decode on the same inputs; input errors exit 2 in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MAX_GRID, TOKENIZER_CORPUS, make_tiny_config
from PIL import Image
from transformers import LlamaConfig, set_seed

from nanovlm import NanoVLMForConditionalGeneration, NanoVLMProcessor, train_tokenizer
from nanovlm.cli.generate import build_messages, main

PROMPT = "What color is the circle?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny saved nanovlm checkpoint plus the in-memory model and processor it was saved from."""
    root = tmp_path_factory.mktemp("generate")
    tokenizer = train_tokenizer(TOKENIZER_CORPUS, vocab_size=400, max_grid=TINY_MAX_GRID)
    config = make_tiny_config(tokenizer)
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights than the init: varied, non-trivial greedy answers
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = NanoVLMProcessor.from_config(tokenizer, config, max_grid=TINY_MAX_GRID)
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    images = [root / "wide.png", root / "small.png"]
    Image.new("RGB", (80, 40), (200, 30, 30)).save(images[0])
    Image.new("RGB", (20, 20), (10, 90, 250)).save(images[1])
    return {"dir": ckpt, "model": model, "processor": processor, "images": images, "root": root}


def reference_answer(ckpt, image_paths, prompt=PROMPT, system=None, seed=None, **generate_kwargs) -> str:
    """What the CLI should print: `model.generate` on the same chat, decoded without special tokens."""
    processor, model = ckpt["processor"], ckpt["model"]
    images = [Image.open(p).convert("RGB") for p in image_paths]
    inputs = processor.apply_chat_template(build_messages(images, prompt, system), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    if seed is not None:
        set_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, **generate_kwargs)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_streamed_greedy_answer_equals_generate(checkpoint, capsys):
    code, out, _ = run(capsys, "--model", checkpoint["dir"], "--image", checkpoint["images"][0],
                       "--prompt", PROMPT, "--max_new_tokens", 12)
    expected = reference_answer(checkpoint, checkpoint["images"][:1], max_new_tokens=12, do_sample=False)
    assert code == 0
    assert expected.strip()  # a real answer, not an immediate end-of-sequence
    assert out == expected + "\n"


def test_several_images_and_system_turn(checkpoint, capsys):
    images = checkpoint["images"]
    code, out, _ = run(capsys, "--model", checkpoint["dir"], "--image", images[0], "--image", images[1],
                       "--system", "Answer briefly.", "--prompt", "Compare them.", "--max_new_tokens", 10)
    expected = reference_answer(checkpoint, images, "Compare them.", "Answer briefly.", max_new_tokens=10,
                                do_sample=False)
    assert code == 0
    assert out == expected + "\n"


def test_seeded_sampling_is_reproducible_and_matches_generate(checkpoint, capsys):
    argv = ["--model", checkpoint["dir"], "--image", checkpoint["images"][1], "--prompt", PROMPT,
            "--max_new_tokens", 10, "--do_sample", "--temperature", 1.5, "--top_k", 50, "--top_p", 0.95,
            "--seed", 7]
    first, second = run(capsys, *argv), run(capsys, *argv)
    expected = reference_answer(checkpoint, checkpoint["images"][1:], seed=7, max_new_tokens=10, do_sample=True,
                                temperature=1.5, top_k=50, top_p=0.95)
    assert first[:2] == second[:2] == (0, expected + "\n")


def test_text_only_prompt(checkpoint, capsys):
    code, out, _ = run(capsys, "--model", checkpoint["dir"], "--prompt", "Describe the picture.",
                       "--max_new_tokens", 6)
    assert code == 0
    assert out == reference_answer(checkpoint, [], "Describe the picture.", max_new_tokens=6, do_sample=False) + "\n"


def _assert_one_line_error(code: int, out: str, err: str, match: str) -> None:
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("nanovlm-generate: error:")]
    assert len(lines) == 1, err
    assert match in lines[0], lines[0]


def test_missing_image_file(checkpoint, capsys):
    missing = checkpoint["root"] / "nope.png"
    result = run(capsys, "--model", checkpoint["dir"], "--image", missing, "--prompt", PROMPT)
    _assert_one_line_error(*result, match=f"image file not found: {missing}")


def test_unreadable_image(checkpoint, capsys):
    bad = checkpoint["root"] / "broken.png"
    bad.write_bytes(b"this is not a PNG")
    result = run(capsys, "--model", checkpoint["dir"], "--image", bad, "--prompt", PROMPT)
    _assert_one_line_error(*result, match=f"cannot read image {bad}: Cannot decode image")


def test_missing_model_folder(checkpoint, capsys):
    missing = checkpoint["root"] / "no_such_model"
    result = run(capsys, "--model", missing, "--prompt", PROMPT)
    _assert_one_line_error(*result, match=f"model folder not found: {missing}")


def test_unknown_hub_id_offline(capsys):
    result = run(capsys, "--model", "nobody-here/not-a-model-xyz", "--prompt", PROMPT)
    _assert_one_line_error(*result, match="cannot load model nobody-here/not-a-model-xyz: no such local folder, and the hub has no such model")


def test_folder_without_config(tmp_path, capsys):
    result = run(capsys, "--model", tmp_path, "--prompt", PROMPT)
    _assert_one_line_error(*result, match=f"cannot load model {tmp_path}: the folder has no loadable config.json")


def test_model_that_is_not_a_nanovlm(tmp_path, capsys):
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=50).save_pretrained(tmp_path)
    result = run(capsys, "--model", tmp_path, "--prompt", PROMPT)
    _assert_one_line_error(*result, match="is a 'llama' checkpoint, not a nanovlm one")


def test_original_nanovlm_checkpoint_points_to_convert(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"vit_hidden_dim": 768, "lm_hidden_dim": 960}))
    result = run(capsys, "--model", tmp_path, "--prompt", PROMPT)
    _assert_one_line_error(*result, match=f"original nanoVLM checkpoint; convert it first: nanovlm-convert --input {tmp_path}")


def test_lora_adapter_folder_points_to_merge(tmp_path, capsys):
    """A LoRA run's final/ (adapter_config.json + adapter weights, no config.json): the message gives the merge."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "b"}))
    result = run(capsys, "--model", tmp_path, "--prompt", PROMPT)
    _assert_one_line_error(*result, match=(
        f"{tmp_path} is a LoRA adapter, not a full checkpoint; merge it into one first: python -c \"from "
        f"nanovlm.training.lora import merge_lora_checkpoint; merge_lora_checkpoint('{tmp_path}', '{tmp_path}-merged')\" "
        f"then --model {tmp_path}-merged"))


def test_sampling_flags_need_do_sample(checkpoint, capsys):
    code, out, err = run(capsys, "--model", checkpoint["dir"], "--prompt", PROMPT, "--temperature", 0.5)
    assert code == 2 and out == ""
    assert "--temperature only apply when sampling: add --do_sample" in err


def test_bad_ranges_name_the_flag(checkpoint, capsys):
    for flag, value, message in (("--max_new_tokens", 0, "--max_new_tokens must be >= 1, got 0"),
                                 ("--top_p", 1.5, "--top_p must be in (0, 1], got 1.5")):
        extra = ["--do_sample"] if flag == "--top_p" else []
        code, _, err = run(capsys, "--model", checkpoint["dir"], "--prompt", PROMPT, flag, value, *extra)
        assert code == 2
        assert message in err


def test_nanovlm_config_without_weights(checkpoint, tmp_path, capsys):
    (tmp_path / "config.json").write_text((checkpoint["dir"] / "config.json").read_text())
    result = run(capsys, "--model", tmp_path, "--prompt", PROMPT)
    _assert_one_line_error(*result, match=f"cannot load model {tmp_path} (")


def test_corrupt_weights_file(checkpoint, tmp_path, capsys):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint["dir"], copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    result = run(capsys, "--model", copy, "--prompt", PROMPT)
    _assert_one_line_error(*result, match=f"cannot load model {copy} (SafetensorError: ")


def test_image_token_in_the_prompt_points_to_image(checkpoint, capsys):
    result = run(capsys, "--model", checkpoint["dir"], "--prompt", "What is in <|image|>?")
    _assert_one_line_error(*result, match="--prompt holds <|image|>, a token reserved for images; pass images with "
                                          "--image (they go before the prompt) and leave the token out")


def test_image_folder_and_url_name_the_fix(checkpoint, capsys):
    """Both used to read "image file not found", which sent users looking for a file that was there (a folder) or
    suggested URLs might work once spelled differently."""
    result = run(capsys, "--model", checkpoint["dir"], "--image", checkpoint["root"], "--prompt", PROMPT)
    _assert_one_line_error(*result, match=f"--image {checkpoint['root']} is a folder; pass one image file per --image")
    url = "https://example.com/cat.png"
    result = run(capsys, "--model", checkpoint["dir"], "--image", url, "--prompt", PROMPT)
    _assert_one_line_error(*result, match=f"--image {url} is a URL; nanovlm-generate reads local image files: "
                                          "download it first (curl -o image.png URL) and pass --image image.png")


def test_training_output_folder_names_its_checkpoints(checkpoint, tmp_path):
    """`--model outputs/demo` (the training --output_dir, holding final/ and checkpoint-N/) used to fail with
    transformers' "Unrecognized model ... Should have a `model_type` key"; now the command names the checkpoints to
    pass. Run as `python -m nanovlm.cli.generate`, as a user would."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run_dir = tmp_path / "run"
    for name in ("final", "checkpoint-5", "checkpoint-40", "checkpoint-7"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "config.json").write_text((checkpoint["dir"] / "config.json").read_text())
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "nanovlm.cli.generate", "--model", str(run_dir), "--prompt", PROMPT],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    _assert_one_line_error(proc.returncode, proc.stdout, proc.stderr,
                           match=f"{run_dir} is a training output folder, not a checkpoint; pass one of its "
                                 f"checkpoints: --model {run_dir / 'final'} or --model {run_dir / 'checkpoint-40'}")


def test_lora_training_output_folder_names_its_adapter(tmp_path, capsys):
    """A LoRA run's output folder holds adapters only: the command names final/, whose own message says how to merge."""
    (tmp_path / "lora" / "final").mkdir(parents=True)
    (tmp_path / "lora" / "final" / "adapter_config.json").write_text("{}")
    result = run(capsys, "--model", tmp_path / "lora", "--prompt", PROMPT)
    _assert_one_line_error(*result, match=f"pass one of its checkpoints: --model {tmp_path / 'lora' / 'final'}")


def test_tilde_paths_after_equals_signs(checkpoint, tmp_path, monkeypatch, capsys):
    """The shell does not expand `~` in `--model=~/x`: the folder check passed (it expanded) but transformers got
    the raw string and failed with "Repo id must be in the form ...", and `--image=~/x.png` was "not found"."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(checkpoint["dir"], tmp_path / "ckpt")
    shutil.copy(checkpoint["images"][0], tmp_path / "wide.png")
    code, out, err = run(capsys, "--model=~/ckpt", "--image=~/wide.png", "--prompt", PROMPT, "--max_new_tokens", "8")
    assert code == 0, err
    assert out == reference_answer(checkpoint, checkpoint["images"][:1], max_new_tokens=8) + "\n"
