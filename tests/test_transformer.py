"""Parity of qwen_image_omni.QwenImageTransformer2DModel with diffusers' class, and its own contract."""

import json
import warnings

import pytest
import torch
from diffusers import QwenImageTransformer2DModel as DiffusersQwenImageTransformer2DModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwen_image_omni.transformer as transformer_module
from qwen_image_omni import QwenImageTransformer2DModel

from .tiny import TINY_CONFIG, make_inputs, make_pair, run

FP32 = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def assert_matches_reference(pair, inputs, **tolerance):
    ours, reference = pair
    torch.testing.assert_close(run(ours, inputs), run(reference, inputs), **(tolerance or FP32))


# --------------------------------------------------------------------------- parity with diffusers


def test_no_mask(pair):
    assert_matches_reference(pair, make_inputs())


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int32, torch.float32])
@pytest.mark.parametrize("pattern", ["right", "left", "holes"])
def test_mask_patterns_and_dtypes(pair, pattern, dtype):
    inputs = make_inputs(batch=2, text_width=9)
    mask = torch.ones(2, 9, dtype=torch.long)
    if pattern == "right":
        mask[0, 6:] = 0
        mask[1, 3:] = 0
    elif pattern == "left":
        mask[0, :2] = 0
        mask[1, :5] = 0
    else:
        mask[0, [1, 4, 8]] = 0
        mask[1, ::2] = 0
    inputs["encoder_hidden_states_mask"] = mask.to(dtype)
    assert_matches_reference(pair, inputs)


def test_batch_with_different_valid_lengths(pair):
    assert_matches_reference(pair, make_inputs(batch=3, text_width=11, valid=[11, 4, 1]))


def test_all_valid_mask_is_dropped_and_matches(pair):
    ours, _ = pair
    inputs = make_inputs(batch=2, text_width=6, valid=[6, 6])
    assert ours._text_attention_mask(inputs["encoder_hidden_states_mask"], 2, 6) is None
    assert_matches_reference(pair, inputs)
    no_mask = {k: v for k, v in inputs.items() if k != "encoder_hidden_states_mask"}
    torch.testing.assert_close(run(ours, inputs), run(ours, no_mask), rtol=0, atol=0)


def test_sample_without_valid_text_is_finite(pair):
    inputs = make_inputs(batch=2, text_width=5, valid=[5, 0])
    out = run(pair[0], inputs)
    assert torch.isfinite(out).all()
    assert_matches_reference(pair, inputs)


def test_timestep_batch_of_one(pair):
    inputs = make_inputs(batch=2)
    inputs["timestep"] = inputs["timestep"][:1]
    assert_matches_reference(pair, inputs)


def test_edit_several_images():
    pair = make_pair(seed=3)
    assert_matches_reference(pair, make_inputs(batch=2, img_shapes=((1, 4, 4), (1, 2, 6), (1, 6, 2)), valid=[7, 3]))


def test_edit_plus_zero_cond_t_two_images():
    pair = make_pair(seed=4, zero_cond_t=True)
    assert_matches_reference(pair, make_inputs(batch=2, img_shapes=((1, 4, 4), (1, 4, 4), (1, 2, 4)), valid=[7, 2]))


def test_layered_with_additional_t_cond():
    overrides = dict(use_layer3d_rope=True, use_additional_t_cond=True)
    pair = make_pair(seed=5, **overrides)
    inputs = make_inputs(batch=2, img_shapes=((1, 4, 4), (1, 4, 4), (1, 4, 4)), valid=[7, 5])
    inputs["additional_t_cond"] = torch.tensor([0, 1])
    assert_matches_reference(pair, inputs)


def test_layered_requires_additional_t_cond():
    ours, _ = make_pair(seed=5, use_layer3d_rope=True, use_additional_t_cond=True)
    with pytest.raises(ValueError, match="additional_t_cond"):
        run(ours, make_inputs(batch=1, img_shapes=((1, 4, 4), (1, 4, 4))))


def test_controlnet_residuals(pair):
    inputs = make_inputs(batch=2, valid=[7, 2])
    tokens, width = inputs["hidden_states"].shape[1], TINY_CONFIG["num_attention_heads"] * 32
    inputs["controlnet_block_samples"] = [torch.randn(2, tokens, width) * 0.1]
    assert_matches_reference(pair, inputs)


def test_attention_kwargs_and_processors(pair):
    ours, reference = pair
    inputs = make_inputs(valid=[7, 3])
    expected = run(reference, inputs)
    assert all(type(p).__name__ == "QwenDoubleStreamAttnProcessor" for p in ours.attn_processors.values())
    # diffusers' own processor runs on our model too: our RoPE tables have diffusers' format.
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    original = ours.attn_processors
    ours.set_attn_processor(QwenDoubleStreamAttnProcessor2_0())
    try:
        torch.testing.assert_close(run(ours, inputs), expected, **FP32)
    finally:
        ours.set_attn_processor(original)
    inputs["attention_kwargs"] = {"scale": 1.0}  # the LoRA scale, consumed by apply_lora_scale
    torch.testing.assert_close(run(ours, inputs), expected, **FP32)


def test_bf16(pair):
    ours, reference = make_pair(dtype=torch.bfloat16)
    inputs = make_inputs(valid=[7, 3], dtype=torch.bfloat16)
    torch.testing.assert_close(run(ours, inputs), run(reference, inputs), rtol=2e-2, atol=2e-2)


def test_gradient_checkpointing_matches_plain_backward():
    ours, _ = make_pair(seed=6)
    ours.train()
    inputs = make_inputs(valid=[7, 3])

    def grads():
        ours.zero_grad()
        ours(**inputs).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    plain = grads()
    ours.enable_gradient_checkpointing()
    checkpointed = grads()
    ours.disable_gradient_checkpointing()
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradients_match_diffusers():
    ours, reference = make_pair(seed=7)
    inputs = make_inputs(valid=[7, 3])
    for model in (ours, reference):
        model.zero_grad()
        model(**inputs).sample.square().mean().backward()
    ref_grads = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-7, msg=name)


# --------------------------------------------------------------------------- the text RoPE length


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    valid=st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=3),
    extra=st.integers(min_value=0, max_value=40),
)
def test_padding_invariance(pair, valid, extra):
    """Masked padding columns added on the right change no image-token output."""
    ours, _ = pair
    width = max(max(valid), 1)
    inputs = make_inputs(batch=len(valid), text_width=width, valid=valid, seed=sum(valid) + extra)
    padded = dict(inputs)
    garbage = torch.randn(len(valid), extra, TINY_CONFIG["joint_attention_dim"])
    padded["encoder_hidden_states"] = torch.cat([inputs["encoder_hidden_states"], garbage], dim=1)
    padded["encoder_hidden_states_mask"] = torch.cat(
        [inputs["encoder_hidden_states_mask"], torch.zeros(len(valid), extra, dtype=torch.long)], dim=1
    )
    torch.testing.assert_close(run(ours, padded), run(ours, inputs), rtol=1e-6, atol=1e-6)


def test_padding_past_4096_text_positions(pair):
    ours, reference = pair
    inputs = make_inputs(batch=1, text_width=5, valid=[5])
    width = 4200
    padded = dict(inputs)
    padded["encoder_hidden_states"] = torch.cat(
        [inputs["encoder_hidden_states"], torch.randn(1, width - 5, TINY_CONFIG["joint_attention_dim"])], dim=1
    )
    padded["encoder_hidden_states_mask"] = torch.cat(
        [inputs["encoder_hidden_states_mask"], torch.zeros(1, width - 5, dtype=torch.long)], dim=1
    )
    torch.testing.assert_close(run(ours, padded), run(ours, inputs), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError):  # diffusers' 4096-row table is too short here (vllm-omni #2791)
        run(reference, padded)


def test_txt_seq_lens_accepted_ignored_and_warned_once(pair, monkeypatch):
    ours, _ = pair
    monkeypatch.setattr(transformer_module, "_TXT_SEQ_LENS_WARNED", False)
    inputs = make_inputs(batch=2, text_width=9, valid=[9, 3])
    expected = run(ours, inputs)
    with pytest.warns(FutureWarning, match="txt_seq_lens"):
        got = run(ours, {**inputs, "txt_seq_lens": [9, 3]})
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run(ours, {**inputs, "txt_seq_lens": [3, 3]})  # a too-short legacy length: still ignored
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.update(encoder_hidden_states_mask=torch.ones(2, 5)), r"encoder_hidden_states_mask.*\(2, 7\).*\(2, 5\)"),
        (lambda i: i.update(encoder_hidden_states_mask=torch.ones(7)), r"encoder_hidden_states_mask.*\(7,\)"),
        (lambda i: i.update(img_shapes=[[(1, 4, 5)]] * 2), r"img_shapes.*20 image tokens.*24"),
        (lambda i: i.update(img_shapes=None), r"img_shapes.*required"),
        (lambda i: i.update(img_shapes=[[(1, 4, 6)]] * 3), r"img_shapes.*1 or batch=2.*got 3"),
        (lambda i: i.update(encoder_hidden_states=torch.randn(2, 7, 25)), r"joint_attention_dim=24.*\(2, 7, 25\)"),
        (lambda i: i.update(timestep=torch.rand(3)), r"timestep.*1 or batch=2.*\(3,\)"),
        (lambda i: i.update(hidden_states=torch.randn(2, 24, 15)), r"in_channels=16.*\(2, 24, 15\)"),
        (lambda i: i.update(encoder_hidden_states_mask=torch.full((2, 7), -float("inf"))), r"1 for valid"),
        (lambda i: i.update(guidance=torch.ones(2)), r"guidance"),
    ],
)
def test_errors_name_argument_expected_and_actual(pair, change, message):
    inputs = make_inputs(batch=2, text_width=7)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        run(pair[0], inputs)


# --------------------------------------------------------------------------- checkpoints and compile


def test_save_pretrained_round_trip_with_diffusers(pair, tmp_path):
    ours, reference = pair
    inputs = make_inputs(valid=[7, 4])
    ours.save_pretrained(tmp_path / "ours")
    loaded_by_diffusers = DiffusersQwenImageTransformer2DModel.from_pretrained(tmp_path / "ours")
    torch.testing.assert_close(run(loaded_by_diffusers, inputs), run(reference, inputs), rtol=0, atol=0)

    reference.save_pretrained(tmp_path / "ref" / "transformer")
    loaded_by_us = QwenImageTransformer2DModel.from_pretrained(tmp_path / "ref", subfolder="transformer")
    public = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if not k[0] == "_"}))  # noqa: E731
    assert public(loaded_by_us.config) == public(reference.config)
    assert loaded_by_us.state_dict().keys() == reference.state_dict().keys()
    torch.testing.assert_close(run(loaded_by_us, inputs), run(ours, inputs), rtol=0, atol=0)


def test_config_defaults_and_class_attributes_match_diffusers():
    ours_init = QwenImageTransformer2DModel.__init__
    ref_init = DiffusersQwenImageTransformer2DModel.__init__
    import inspect

    ours_params = {k: v.default for k, v in inspect.signature(ours_init).parameters.items() if k != "self"}
    ref_params = {k: v.default for k, v in inspect.signature(ref_init).parameters.items() if k != "self"}
    assert ours_params == ref_params
    for attribute in (
        "_supports_gradient_checkpointing",
        "_no_split_modules",
        "_skip_layerwise_casting_patterns",
        "_repeated_blocks",
        "_tp_plan",
    ):
        assert getattr(QwenImageTransformer2DModel, attribute) == getattr(DiffusersQwenImageTransformer2DModel, attribute)
    assert QwenImageTransformer2DModel._cp_plan.keys() == DiffusersQwenImageTransformer2DModel._cp_plan.keys()


def test_torch_compile_fullgraph_equals_eager(pair):
    ours, _ = pair
    inputs = make_inputs(valid=[7, 3])
    expected = run(ours, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(run(compiled, inputs), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the Triton backend in the model


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_triton_backend_in_the_model_equals_torch_backend(monkeypatch):
    """Every block's q/k go through joint_qk_norm_rope: forcing Triton (interpreted on CPU) changes nothing."""
    from qwen_image_omni.kernels import BACKEND_ENV_VAR

    ours, _ = make_pair(seed=8)
    ours = ours.to(_device())
    inputs = {k: v.to(_device()) if torch.is_tensor(v) else v for k, v in make_inputs(valid=[7, 3]).items()}
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    expected = run(ours, inputs)
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    torch.testing.assert_close(run(ours, inputs), expected, rtol=1e-6, atol=1e-6)


def test_triton_backend_compiles_fullgraph_with_gradients(monkeypatch):
    """The registered custom op traces without graph breaks, forward and backward."""
    from qwen_image_omni.kernels import BACKEND_ENV_VAR

    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    ours, _ = make_pair(seed=10)
    ours = ours.to(_device())
    inputs = {k: v.to(_device()) if torch.is_tensor(v) else v for k, v in make_inputs(valid=[7, 3]).items()}

    def loss_and_grad(model):
        ours.zero_grad()
        loss = model(**inputs).sample.square().mean()
        loss.backward()
        return loss.detach(), ours.transformer_blocks[0].attn.norm_added_k.weight.grad.clone()

    expected = loss_and_grad(ours)
    torch._dynamo.reset()
    got = loss_and_grad(torch.compile(ours, fullgraph=True, backend="aot_eager"))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
def test_one_block_model_compiles_fullgraph_on_cuda_with_triton():
    ours, _ = make_pair(seed=9, num_layers=1, num_attention_heads=24, attention_head_dim=128,
                        axes_dims_rope=(16, 56, 56), dtype=torch.bfloat16)
    ours = ours.cuda()
    inputs = make_inputs(batch=1, img_shapes=((1, 16, 16),), text_width=77, valid=[40], dtype=torch.bfloat16)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    expected = run(ours, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)
    torch.testing.assert_close(run(compiled, inputs), expected, rtol=2e-2, atol=2e-2)
