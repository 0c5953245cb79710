"""Tests of ``qwen-image-omni generate`` on a tiny random diffusers Qwen-Image checkpoint built offline.

The checkpoint is built by ``tests/support/tiny_checkpoint.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel as DiffusersTransformer
from PIL import Image

from qwen_image_omni import QwenImageTransformer2DModel
from qwen_image_omni.cli import finite_float, main, seed
from qwen_image_omni.generate import load_pipeline

from tests.support.tiny_checkpoint import TEXT_DIM


def generate_argv(model, out, *extra) -> list[str]:
    """``generate`` arguments for a 64x64, 2-step image of "a cat"."""
    return ["generate", "--model", str(model), "--prompt", "a cat", "--out", str(out),
            "--steps", "2", "--height", "64", "--width", "64", *extra]  # fmt: skip


def test_tiny_template_outlives_the_dropped_prefix(checkpoint):
    # QwenImagePipeline drops the first 34 tokens of its chat template: the prompt must survive it.
    pipeline = QwenImagePipeline.from_pretrained(checkpoint, local_files_only=True)
    template_tokens = len(pipeline.tokenizer(pipeline.prompt_template_encode.format("a cat")).input_ids)
    assert template_tokens > pipeline.prompt_template_encode_start_idx + len("a cat")
    embeds, _ = pipeline.encode_prompt("a cat", device=torch.device("cpu"))
    assert embeds.shape[-1] == TEXT_DIM


def test_load_pipeline_runs_our_transformer(checkpoint):
    pipeline = load_pipeline(checkpoint, torch.float32, torch.device("cpu"))
    assert type(pipeline.transformer) is QwenImageTransformer2DModel
    reference = DiffusersTransformer.from_pretrained(checkpoint, subfolder="transformer", local_files_only=True)
    ours = pipeline.transformer.state_dict()
    assert all(torch.equal(ours[name], value) for name, value in reference.state_dict().items())


def test_generate_writes_png(checkpoint, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(generate_argv(checkpoint, out, "--seed", "0")) == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (64, 64)
        assert image.mode == "RGB"
    assert f"wrote {out} (64x64, 2 steps, no CFG, seed 0)" in capsys.readouterr().out


def test_generate_matches_diffusers_pipeline_with_cfg(checkpoint, tmp_path):
    # CFG: the positive and negative prompts have different lengths, each run at its own width.
    negative = "blurry, low quality"
    out = tmp_path / "cfg.png"
    assert main(generate_argv(checkpoint, out, "--seed", "7", "--negative-prompt", negative, "--steps", "3")) == 0

    reference = QwenImagePipeline.from_pretrained(checkpoint, local_files_only=True)
    ours = load_pipeline(checkpoint, torch.float32, torch.device("cpu"))

    def run(pipeline, output_type):
        generator = torch.Generator().manual_seed(7)
        return pipeline(prompt="a cat", negative_prompt=negative, true_cfg_scale=4.0, height=64, width=64,
                        num_inference_steps=3, generator=generator, output_type=output_type).images  # fmt: skip

    # The final latents are far more sensitive to the transformer than the 8-bit pixels.
    torch.testing.assert_close(run(ours, "latent"), run(reference, "latent"), rtol=0, atol=1e-5)
    with Image.open(out) as image:
        written = np.asarray(image, dtype=np.int16)
    assert np.abs(written - np.asarray(run(reference, "pil")[0], dtype=np.int16)).max() <= 1


def assert_usage_error(argv, capsys, message):
    """``main(argv)`` returns 2, its last stderr line ``qwen-image-omni generate: error: <message>...``, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    # A load failure comes after the settings line and diffusers' loading progress bars.
    assert "Traceback" not in err and sum(": error: " in line for line in lines) == 1, err
    assert lines[-1].startswith(f"qwen-image-omni generate: error: {message}"), err
    return err


def assert_argparse_error(argv, capsys, message):
    """argparse rejects ``argv`` (exit 2) with ``qwen-image-omni generate: error: <message>`` as its last line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"qwen-image-omni generate: error: {message}"


def broken_copy(checkpoint, tmp_path, break_it):
    """A copy of the tiny checkpoint with ``break_it(root)`` applied."""
    root = tmp_path / "broken"
    shutil.copytree(checkpoint, root)
    break_it(root)
    return root


def test_missing_model_path(tmp_path, capsys):
    argv = generate_argv(tmp_path / "nowhere", tmp_path / "x.png")
    assert_usage_error(argv, capsys, "--model: ")
    assert not (tmp_path / "x.png").exists()


def test_model_dir_without_model_index(checkpoint, tmp_path, capsys):
    assert_usage_error(generate_argv(tmp_path, tmp_path / "x.png"), capsys, "--model: ")
    # A component folder is not a checkpoint either.
    assert_usage_error(generate_argv(checkpoint / "transformer", tmp_path / "x.png"), capsys, "--model: ")


def test_model_of_another_pipeline_class(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert_usage_error(generate_argv(tmp_path, tmp_path / "x.png"), capsys, "--model: ")


def test_out_must_be_a_writable_png(checkpoint, tmp_path, capsys):
    assert_usage_error(generate_argv(checkpoint, tmp_path / "x.jpg"), capsys, "--out: expected a .png")
    assert_usage_error(generate_argv(checkpoint, tmp_path / "missing" / "x.png"), capsys, "--out: ")
    (tmp_path / "file").write_text("")
    assert_usage_error(generate_argv(checkpoint, tmp_path / "file" / "x.png"), capsys, "--out: ")
    (tmp_path / "dir.png").mkdir()
    assert_usage_error(generate_argv(checkpoint, tmp_path / "dir.png"), capsys, "--out: ")


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if the pipeline loads: argument errors must come before the (slow) load."""

    def fail(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before --out was checked")

    monkeypatch.setattr("qwen_image_omni.generate.load_pipeline", fail)


def test_out_in_a_folder_that_cannot_be_written_is_one_line_before_the_load(checkpoint, capsys, no_load):
    # /sys refuses new files to every user, root included (os.access says yes to root).
    err = assert_usage_error(generate_argv(checkpoint, "/sys/x.png"), capsys, "--out: cannot write '/sys/x.png': ")
    assert "Traceback" not in err


def test_out_under_a_folder_that_cannot_be_searched_is_one_line(checkpoint, tmp_path, capsys, monkeypatch, no_load):
    def unsearchable(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr("pathlib.Path.stat", unsearchable)  # what a non-root user meets in a folder mode 0700
    assert_usage_error(generate_argv(checkpoint, tmp_path / "x.png"), capsys, "--out: cannot write ")


def test_out_check_leaves_no_file_behind(checkpoint, tmp_path):
    from qwen_image_omni.generate import check_out

    assert check_out(str(tmp_path / "x.png")) == tmp_path / "x.png"
    assert not (tmp_path / "x.png").exists()


def test_size_must_be_a_multiple_of_16(checkpoint, tmp_path, capsys):
    argv = generate_argv(checkpoint, tmp_path / "x.png", "--height", "72")
    assert_usage_error(argv, capsys, "--height: must be a multiple of 16")


def test_true_cfg_scale_needs_a_negative_prompt(checkpoint, tmp_path, capsys):
    argv = generate_argv(checkpoint, tmp_path / "x.png", "--true-cfg-scale", "5")
    assert_usage_error(argv, capsys, "--true-cfg-scale: ")


def test_true_cfg_scale_at_most_1_with_a_negative_prompt(checkpoint, tmp_path, capsys):
    argv = generate_argv(checkpoint, tmp_path / "x.png", "--negative-prompt", " ", "--true-cfg-scale", "1")
    err = assert_usage_error(argv, capsys, "--true-cfg-scale: must be above 1 with --negative-prompt, got 1; ")
    assert "runs without guidance" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "x"])
def test_true_cfg_scale_must_be_finite(checkpoint, tmp_path, capsys, value):
    argv = generate_argv(checkpoint, tmp_path / "x.png", "--negative-prompt", " ", f"--true-cfg-scale={value}")
    assert_argparse_error(argv, capsys, f"argument --true-cfg-scale: expected a finite number, got {value!r}")


@pytest.mark.parametrize("value", ["-1", str(2**64), "1.5", "seven"])
def test_seed_out_of_range_is_rejected_before_the_load(checkpoint, tmp_path, capsys, value):
    argv = generate_argv(checkpoint, tmp_path / "x.png", "--seed", value)
    assert_argparse_error(argv, capsys, f"argument --seed: expected an integer in [0, 2**64 - 1], got {value!r}")
    assert not (tmp_path / "x.png").exists()


def test_seed_and_scale_types_accept_their_whole_range():
    assert seed("0") == 0 and seed(str(2**64 - 1)) == 2**64 - 1
    assert finite_float("4.5") == 4.5 and finite_float("-1e3") == -1000.0


def _write(path, text):
    path.write_text(text)


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda root: (root / "transformer" / "diffusion_pytorch_model.safetensors").unlink(),
         "--model: {root}/transformer holds no weights; expected one of diffusion_pytorch_model.safetensors, "),
        (lambda root: _write(root / "transformer" / "config.json", "{not json"),
         "--model: cannot read {root}/transformer/config.json: "),
        (lambda root: _write(root / "transformer" / "config.json", "[1, 2]"),
         "--model: {root}/transformer/config.json is not a JSON object"),
        (lambda root: _write(root / "transformer" / "config.json", "{}"),
         "--model: {root}/transformer/config.json lacks in_channels, num_layers, attention_head_dim, "
         "num_attention_heads, joint_attention_dim; not a QwenImageTransformer2DModel config"),
        (lambda root: _write(root / "transformer" / "config.json", json.dumps(
            {**json.loads((root / "transformer" / "config.json").read_text()), "num_layers": "one"})),
         "--model: {root}/transformer/config.json: num_layers must be a positive int, got 'one'"),
        (lambda root: _write(root / "transformer" / "config.json", json.dumps(
            {**json.loads((root / "transformer" / "config.json").read_text()), "_class_name": "FluxTransformer2DModel"})),
         "--model: {root}/transformer/config.json is the config of a 'FluxTransformer2DModel', "
         "not of a QwenImageTransformer2DModel"),
        (lambda root: (root / "text_encoder" / "model.safetensors").unlink(),
         "--model: {root}/text_encoder holds no weights; expected one of model.safetensors, "),
        (lambda root: _write(root / "vae" / "diffusion_pytorch_model.safetensors", "garbage"),
         "--model: cannot load {root}: Unable to load weights from checkpoint file"),
        (lambda root: _write(root / "transformer" / "config.json", json.dumps(
            {**json.loads((root / "transformer" / "config.json").read_text()), "num_attention_heads": 1})),
         "--model: cannot load {root}: Error(s) in loading state_dict for QwenImageTransformer2DModel: size mismatch"),
    ],
    ids=["no-transformer-weights", "bad-json", "json-list", "empty-config", "bad-value", "other-class",
         "no-text-encoder-weights", "corrupt-vae-weights", "weights-not-fitting-config"],
)  # fmt: skip
def test_broken_checkpoint_is_one_clear_line(checkpoint, tmp_path, capsys, break_it, message):
    root = broken_copy(checkpoint, tmp_path, break_it)
    assert_usage_error(generate_argv(root, tmp_path / "x.png", "--seed", "0"), capsys, message.format(root=root))
    assert not (tmp_path / "x.png").exists()
