"""``qwen-image-omni check``: the runs, the table and the verdict, on the embedded model and on checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import QwenImageTransformer2DModel as DiffusersTransformer

from qwen_image_omni import QwenImageTransformer2DModel, cli
from qwen_image_omni.check import runs
from qwen_image_omni.check.sources import TINY_CONFIG


def test_collate_layouts():
    embeds = torch.ones(1, 3, 2)
    right, right_mask = runs.collate(embeds, 5, "right")
    left, left_mask = runs.collate(embeds, 5, "left")
    assert right_mask.tolist() == [[1, 1, 1, 0, 0]] and left_mask.tolist() == [[0, 0, 1, 1, 1]]
    assert right[0, :, 0].tolist() == [1, 1, 1, 0, 0] and left[0, :, 0].tolist() == [0, 0, 1, 1, 1]
    unpadded, mask = runs.collate(embeds, 5, "unpadded")
    assert unpadded is embeds and mask.tolist() == [[1, 1, 1]]
    with pytest.raises(ValueError, match="width must be"):
        runs.collate(embeds, 2, "right")


def table_row(out: str, name: str) -> str:
    """The table line of implementation ``name``."""
    return next(line for line in out.splitlines() if line.startswith(name + " "))


def test_check_default_passes_and_shows_legacy_failures(capsys):
    assert cli.main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert table_row(out, "ours").endswith("OK")
    assert "ERROR: The size of tensor a (256)" in table_row(out, "legacy-native")
    assert table_row(out, "legacy-kernel").endswith("DIVERGES")
    assert "verdict: PASS" in out


class Shifted(QwenImageTransformer2DModel):
    """Ours with every output moved by 1e-3: must fail the check."""

    def forward(self, *args, **kwargs):
        (sample,) = super().forward(*args, **kwargs)
        return (sample + 1e-3,)


class Broken(QwenImageTransformer2DModel):
    """Ours raising on every call: must fail the check with the message in the table."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("broken on purpose")


@pytest.mark.parametrize(("cls", "status"), [(Shifted, "DIVERGES"), (Broken, "ERROR: broken on purpose")])
def test_check_fails_when_ours_differs_or_raises(monkeypatch, capsys, cls, status):
    monkeypatch.setattr(runs, "QwenImageTransformer2DModel", cls)
    assert cli.main(["check", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert table_row(out, "ours").endswith(status)
    assert "verdict: FAIL" in out


@pytest.mark.parametrize("layout", ["pipeline", "transformer-dir"])
def test_check_model_on_saved_checkpoint(tmp_path, capsys, layout):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        DiffusersTransformer(**TINY_CONFIG).save_pretrained(tmp_path / "transformer")
    path = tmp_path if layout == "pipeline" else tmp_path / "transformer"
    assert cli.main(["check", "--model", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bf16 on cpu" in out and "latent grid (1, 32, 32)" in out
    assert "x diffusers' own bf16 error vs diffusers fp32" in out
    assert table_row(out, "ours").endswith("OK")


@pytest.fixture(scope="module")
def saved_transformer(tmp_path_factory):
    """A saved tiny transformer folder (config.json + weights) to break in copies."""
    path = tmp_path_factory.mktemp("tiny-transformer") / "transformer"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        DiffusersTransformer(**TINY_CONFIG).save_pretrained(path)
    return path


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda f: (f / "diffusion_pytorch_model.safetensors").unlink(),
         "--model: {f} holds no weights; expected one of diffusion_pytorch_model.safetensors, "
         "diffusion_pytorch_model.safetensors.index.json, diffusion_pytorch_model.bin, "
         "diffusion_pytorch_model.bin.index.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "--model: cannot read {f}/config.json: Expecting"),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "--model: {f}/config.json is not a JSON object"),
        (lambda f: (f / "config.json").write_text('{"num_layers": 2}'),
         "--model: {f}/config.json lacks in_channels, attention_head_dim, num_attention_heads, joint_attention_dim; "
         "not a QwenImageTransformer2DModel config"),
        (lambda f: _edit_config(f, num_attention_heads=0),
         "--model: {f}/config.json: num_attention_heads must be a positive int, got 0"),
        (lambda f: _edit_config(f, joint_attention_dim=True),
         "--model: {f}/config.json: joint_attention_dim must be a positive int, got True"),
        (lambda f: (f / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage"),
         "--model: cannot load the transformer in {f}: Unable to load weights from checkpoint file"),
        (lambda f: _edit_config(f, num_attention_heads=2),
         "--model: cannot load the transformer in {f}: Error(s) in loading state_dict for "),
    ],
    ids=["no-weights", "bad-json", "json-list", "missing-keys", "zero-heads", "bool-dim", "corrupt-weights",
         "weights-not-fitting-config"],
)  # fmt: skip
def test_check_model_broken_checkpoint_is_one_clear_line(saved_transformer, tmp_path, capsys, break_it, message):
    folder = tmp_path / "transformer"
    shutil.copytree(saved_transformer, folder)
    break_it(folder)
    for path in (tmp_path, folder):  # a pipeline directory, or the transformer folder itself
        assert cli.main(["check", "--model", str(path), "--device", "cpu"]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(f"qwen-image-omni check: error: {message.format(f=folder)}"), captured.err
        assert captured.err.count("\n") == 1
