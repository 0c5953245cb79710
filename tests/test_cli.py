"""Tests of ``qwen-image-omni check`` / ``bench`` and of the legacy vllm-omni emulation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import QwenImageTransformer2DModel as DiffusersTransformer

from qwen_image_omni import QwenImageTransformer2DModel, cli
from qwen_image_omni.legacy import legacy_forward, legacy_text_rope, legacy_txt_freqs, legacy_txt_seq_len

MODEL_CLASSES = [DiffusersTransformer, QwenImageTransformer2DModel]


@pytest.fixture(scope="module")
def source():
    """The embedded tiny random-weight model of ``check``."""
    return cli.tiny_source()


@pytest.fixture(scope="module")
def inputs(source):
    """``check``'s fp32 inputs: a 37-token and a 5-token prompt, width 256."""
    return cli.make_inputs(source.config, cli.TINY_LATENT_GRID, torch.float32)


def kwargs_for(inputs, layout, prompt="pos"):
    """Forward kwargs of one CFG branch on the CPU in fp32."""
    return cli.forward_kwargs(inputs, prompt, layout, torch.float32, torch.device("cpu"))


def run(model, kwargs, mode=None):
    """Image-token output of a plain (mode None) or legacy forward."""
    with torch.no_grad():
        if mode is None:
            return model(**kwargs)[0]
        return legacy_forward(model, mode, **kwargs)[0]


# ----------------------------------------------------------------------------- legacy


def test_legacy_txt_seq_len_is_max_valid_count():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    assert legacy_txt_seq_len(mask) == 4
    assert legacy_txt_seq_len(mask.bool()) == 4


def test_legacy_rejects_missing_mask_and_unknown_mode():
    with pytest.raises(ValueError, match="encoder_hidden_states_mask"):
        legacy_txt_seq_len(None)
    with pytest.raises(ValueError, match="mode must be one of"):
        legacy_txt_freqs(torch.ones(4, 2, dtype=torch.complex64), 2, "fused")


def test_legacy_txt_freqs_native_truncates_kernel_pads_with_identity():
    table = torch.polar(torch.ones(6, 3), torch.rand(6, 3))
    assert torch.equal(legacy_txt_freqs(table, 2, "native"), table[:2])
    padded = legacy_txt_freqs(table, 2, "kernel")
    assert padded.shape == table.shape
    assert torch.equal(padded[:2], table[:2])
    assert torch.equal(padded[2:], torch.ones(4, 3, dtype=table.dtype))


@pytest.mark.parametrize(
    ("cls", "errors"),
    # diffusers' eager rotary multiply fails to broadcast, as vllm-omni's native path did; ours
    # checks the table's shape before its kernel runs and raises a ValueError instead.
    [(DiffusersTransformer, RuntimeError), (QwenImageTransformer2DModel, (RuntimeError, ValueError))],
    ids=["diffusers", "ours"],
)
def test_legacy_native_raises_on_padded_prompt(source, inputs, cls, errors):
    model = source.load(cls, torch.float32).eval()
    for layout in ("right", "left"):
        with pytest.raises(errors):
            run(model, kwargs_for(inputs, layout), mode="native")


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=["diffusers", "ours"])
def test_legacy_kernel_runs_and_differs_from_diffusers_on_padded_prompt(source, inputs, cls):
    model = source.load(cls, torch.float32).eval()
    reference = source.load(DiffusersTransformer, torch.float32).eval()
    # Left padding puts valid tokens past max(mask.sum()): the legacy table leaves them unrotated.
    kwargs = kwargs_for(inputs, "left")
    legacy = run(model, kwargs, mode="kernel")
    assert torch.isfinite(legacy).all()
    assert (legacy - run(reference, kwargs)).abs().max() > 1e-3
    # Right padding: positions past the table are all masked out of attention, image outputs match.
    kwargs = kwargs_for(inputs, "right")
    torch.testing.assert_close(run(model, kwargs, mode="kernel"), run(reference, kwargs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["native", "kernel"])
@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=["diffusers", "ours"])
def test_legacy_without_padding_equals_diffusers(source, inputs, cls, mode):
    model = source.load(cls, torch.float32).eval()
    reference = source.load(DiffusersTransformer, torch.float32).eval()
    for prompt in ("pos", "neg"):
        kwargs = kwargs_for(inputs, "unpadded", prompt)
        torch.testing.assert_close(run(model, kwargs, mode=mode), run(reference, kwargs), rtol=0, atol=1e-6)


def test_legacy_text_rope_restores_pos_embed_after_error(source, inputs):
    model = source.load(DiffusersTransformer, torch.float32).eval()
    kwargs = kwargs_for(inputs, "right")
    with pytest.raises(RuntimeError), legacy_text_rope(model, 37, "native"):
        run(model, kwargs)
    assert "forward" not in vars(model.pos_embed)
    assert torch.isfinite(run(model, kwargs)).all()


# ----------------------------------------------------------------------------- check


def test_collate_layouts():
    embeds = torch.ones(1, 3, 2)
    right, right_mask = cli.collate(embeds, 5, "right")
    left, left_mask = cli.collate(embeds, 5, "left")
    assert right_mask.tolist() == [[1, 1, 1, 0, 0]] and left_mask.tolist() == [[0, 0, 1, 1, 1]]
    assert right[0, :, 0].tolist() == [1, 1, 1, 0, 0] and left[0, :, 0].tolist() == [0, 0, 1, 1, 1]
    unpadded, mask = cli.collate(embeds, 5, "unpadded")
    assert unpadded is embeds and mask.tolist() == [[1, 1, 1]]
    with pytest.raises(ValueError, match="width must be"):
        cli.collate(embeds, 2, "right")


def table_row(out: str, name: str) -> str:
    """The table line of implementation ``name``."""
    return next(line for line in out.splitlines() if line.startswith(name + " "))


def test_check_vllm_omni_without_vllm_omni_says_so_and_passes(capsys, monkeypatch):
    """The vllm-omni report on a machine without vllm-omni (the plugin report itself: tests/test_vllm_omni_check.py)."""
    from qwen_image_omni.integrations import vllm_omni_check

    monkeypatch.setattr(vllm_omni_check, "installed_version", lambda distribution: None)
    assert cli.main(["check", "--vllm-omni"]) == 0
    assert capsys.readouterr().out.startswith("vllm-omni: not installed")


@pytest.mark.parametrize(
    ("version", "supported"),
    [("0.27.0rc1", True), ("0.30.0", True), ("0.32.0rc1", True), ("0.26.0", False), ("0.32.0", False)],
)
def test_check_vllm_omni_says_whether_the_version_is_in_the_tested_range(version, supported):
    from qwen_image_omni.integrations.vllm_omni_check import support_note

    assert support_note(version).startswith("supported" if supported else "untested")


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
    monkeypatch.setattr(cli, "QwenImageTransformer2DModel", cls)
    assert cli.main(["check", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert table_row(out, "ours").endswith(status)
    assert "verdict: FAIL" in out


@pytest.mark.parametrize("layout", ["pipeline", "transformer-dir"])
def test_check_model_on_saved_checkpoint(tmp_path, capsys, layout):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        DiffusersTransformer(**cli.TINY_CONFIG).save_pretrained(tmp_path / "transformer")
    path = tmp_path if layout == "pipeline" else tmp_path / "transformer"
    assert cli.main(["check", "--model", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bf16 on cpu" in out and "latent grid (1, 32, 32)" in out
    assert "x diffusers' own bf16 error vs diffusers fp32" in out
    assert table_row(out, "ours").endswith("OK")


def test_check_rejects_bad_model_and_device(tmp_path, capsys):
    assert cli.main(["check", "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("qwen-image-omni check: error: --model: expected a diffusers checkpoint")
    assert cli.main(["check", "--device", "banana"]) == 2
    assert capsys.readouterr().err == (
        "qwen-image-omni check: error: --device: expected a torch device such as cpu or cuda:0, got 'banana'\n"
    )


def test_device_ordinal_past_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.parse_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"^--device: 'cuda:2' requested but only 2 CUDA device\(s\) are visible$"):
        cli.parse_device("cuda:2")


@pytest.fixture(scope="module")
def saved_transformer(tmp_path_factory):
    """A saved tiny transformer folder (config.json + weights) to break in copies."""
    path = tmp_path_factory.mktemp("tiny-transformer") / "transformer"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        DiffusersTransformer(**cli.TINY_CONFIG).save_pretrained(path)
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


# ----------------------------------------------------------------------------- bench


def test_bench_loads_the_transformer_benchmark():
    assert callable(cli.load_benchmark("transformer").main)


def test_bench_says_how_when_a_script_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path)
    assert cli.main(["bench", "transformer"]) == 2
    assert "run `python benchmarks/bench_transformer.py` there" in capsys.readouterr().err


def test_bench_passes_its_arguments_to_the_script(monkeypatch, tmp_path, capsys):
    (tmp_path / "bench_transformer.py").write_text("def main(argv=None):\n    print('argv', argv)\n    return 0\n")
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path)
    assert cli.main(["bench", "transformer", "--layers", "1"]) == 0
    assert "argv ['--layers', '1']" in capsys.readouterr().out
    assert cli.main(["bench", "all", "--layers", "1"]) == 2
