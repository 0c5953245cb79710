"""Parity of qwen_image_omni.QwenImageTransformer2DModel with diffusers' class, and its own contract."""

import json
import warnings

import pytest
import torch
from diffusers import QwenImageTransformer2DModel as DiffusersQwenImageTransformer2DModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwen_image_omni.models.transformer_qwenimage as transformer_module
from qwen_image_omni import QwenImageTransformer2DModel

from tests.support.tiny import TINY_CONFIG, make_inputs, make_pair, run

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


@pytest.mark.parametrize(
    "img_shapes",
    [
        [[(1, 4, 6)]] * 4,  # nested, one per row
        [[(1, 4, 6)]] * 2,  # one per prompt; rows are prompts x num_images_per_prompt (diffusers' pipelines)
        [(1, 4, 6)] * 2,  # flat: one image per sample (the ControlNet pipelines' form)
        [(1, 4, 6)] * 4,
        [[(1, 4, 6)]] * 6,  # longer than the batch
        (1, 4, 6),
    ],
)
def test_img_shapes_forms_read_as_diffusers_reads_them(pair, img_shapes):
    inputs = make_inputs(batch=4, img_shapes=((1, 4, 6),), valid=[7, 3, 5, 1])
    inputs["img_shapes"] = img_shapes
    assert_matches_reference(pair, inputs)


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_edit_img_shapes_per_prompt_with_num_images_per_prompt(zero_cond_t):
    """Edit / Edit-Plus: 2 prompts x 2 images, img_shapes listed once per prompt (as diffusers' pipelines do)."""
    pair = make_pair(seed=4, zero_cond_t=zero_cond_t)
    shapes = [(1, 4, 4), (1, 2, 6)]
    inputs = make_inputs(batch=4, img_shapes=shapes, valid=[7, 2, 5, 6])
    expected = run(pair[1], inputs)  # diffusers' class, one entry per row
    inputs["img_shapes"] = [shapes] * 2
    torch.testing.assert_close(run(pair[0], inputs), expected, **FP32)


def test_samples_with_different_shapes_get_their_own_positions(pair):
    """diffusers silently gives every sample sample 0's positions; ours gives each its own (more in
    test_mixed_grid_batches.py)."""
    ours, reference = pair
    inputs = make_inputs(batch=2, img_shapes=((1, 4, 6),), valid=[7, 3])
    inputs["img_shapes"] = [[(1, 4, 6)], [(1, 6, 4)]]  # same token count, transposed grid
    alone = {name: value[1:] if torch.is_tensor(value) else [value[1]] for name, value in inputs.items()}
    torch.testing.assert_close(run(ours, inputs)[1:], run(reference, alone), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30, "empty"])
def test_masked_padding_garbage_changes_nothing(pair, garbage):
    """Masked columns (e.g. a collation into torch.empty) never reach a valid output: bitwise diffusers' numbers."""
    ours, reference = pair
    inputs = make_inputs(batch=2, text_width=9, valid=[5, 2])
    mask = inputs["encoder_hidden_states_mask"].bool()
    expected = run(reference, inputs)  # finite padding values
    poisoned = inputs["encoder_hidden_states"].clone()
    if garbage == "empty":
        poisoned[~mask] = torch.empty_like(poisoned)[~mask]
    else:
        poisoned[~mask] = garbage
    got = run(ours, {**inputs, "encoder_hidden_states": poisoned})
    assert torch.equal(got, expected)


def test_text_in_another_float_dtype_is_accepted_as_in_diffusers(pair):
    """txt_norm converts the prompt embeddings (diffusers' RMSNorm), so bf16 embeds run an fp32 model."""
    inputs = make_inputs(valid=[7, 3])
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].to(torch.bfloat16)
    assert_matches_reference(pair, inputs)


def test_autocast_runs_mixed_dtypes(pair):
    ours, reference = pair
    inputs = make_inputs(valid=[7, 3], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(run(ours, inputs), run(reference, inputs), rtol=2e-2, atol=2e-2)


def test_layerwise_casting_matches_diffusers():
    """diffusers' fp8 storage / fp32 compute: the dtype check reads the compute dtype from its hook."""
    ours, reference = make_pair(seed=11)
    for model in (ours, reference):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert_matches_reference((ours, reference), make_inputs(valid=[7, 3]))


def test_python_number_timestep(pair):
    ours, _ = pair
    inputs = make_inputs(valid=[7, 3])
    expected = run(ours, {**inputs, "timestep": torch.tensor([0.25])})
    assert torch.equal(run(ours, {**inputs, "timestep": 0.25}), expected)


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
        (
            lambda i: i.update(encoder_hidden_states_mask=torch.ones(2, 5)),
            r"encoder_hidden_states_mask.*\(2, 7\).*\(2, 5\)",
        ),
        (lambda i: i.update(encoder_hidden_states_mask=torch.ones(7)), r"encoder_hidden_states_mask.*\(7,\)"),
        (lambda i: i.update(img_shapes=[[(1, 4, 5)]] * 2), r"img_shapes.*20 image tokens.*24"),
        (lambda i: i.update(img_shapes=None), r"img_shapes.*required"),
        (lambda i: i.update(img_shapes=[(1, -4, -6)] * 2), r"img_shapes.*positive.*\(1, -4, -6\)"),
        (lambda i: i.update(img_shapes=[(1, 4, 6), (1, 4, 5)]), r"img_shapes` sample 1.*20 image tokens.*24"),
        (lambda i: i.update(img_shapes=[(1, 4, 6), (1, 3, 8), (1, 6, 4)]), r"img_shapes` lists 3 samples.*batch 2"),
        (lambda i: i.update(hidden_states=torch.randn(2, 24, 16, dtype=torch.float64)), r"hidden_states.*float64"),
        (
            lambda i: i.update(encoder_hidden_states=torch.randn(2, 7, 24, dtype=torch.float64)),
            r"encoder_hidden_states.*float64",
        ),
        (
            lambda i: i.update(hidden_states=torch.randn(2, 24, 16, dtype=torch.bfloat16)),
            r"hidden_states.*model's dtype torch.float32.*bfloat16",
        ),
        (lambda i: i.update(timestep=torch.tensor([500.0, 500.0])), r"timestep.*\[0, 1\].*500"),
        (lambda i: i.update(timestep=torch.tensor([0.5, -0.1])), r"timestep.*\[0, 1\]"),
        (lambda i: i.update(timestep=torch.tensor([0.5, float("nan")])), r"timestep.*\[0, 1\]"),
        (lambda i: i.update(timestep=None), r"timestep.*required"),
        (lambda i: i.update(encoder_hidden_states_mask=torch.tensor([[1] * 5 + [-1] * 2] * 2)), r"1 for valid.*-1"),
        (lambda i: i.update(encoder_hidden_states_mask=torch.full((2, 7), 2)), r"1 for valid"),
        (lambda i: i.update(additional_t_cond=torch.tensor([0, 1])), r"additional_t_cond.*use_additional_t_cond=False"),
        (lambda i: i.update(controlnet_block_samples=[]), r"controlnet_block_samples.*non-empty"),
        (
            lambda i: i.update(controlnet_block_samples=[torch.zeros(2, 24, 63)]),
            r"controlnet_block_samples\[0\].*inner_dim=64.*\(2, 24, 63\)",
        ),
        (
            lambda i: i.update(controlnet_block_samples=[torch.zeros(3, 24, 64)]),
            r"controlnet_block_samples\[0\].*batch=2.*\(3, 24, 64\)",
        ),
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


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.update(hidden_states=[[0.0] * 16] * 24), r"hidden_states` must be a torch.Tensor.*list"),
        (
            lambda i: i.update(encoder_hidden_states=i["encoder_hidden_states"].numpy()),
            r"encoder_hidden_states.*ndarray",
        ),
        (lambda i: i.update(timestep="0.5"), r"timestep.*str"),
        (lambda i: i.update(timestep=torch.tensor([True, False])), r"timestep.*torch.bool"),
        (lambda i: i.update(txt_lens=[7, 7]), r"unexpected keyword arguments: txt_lens"),
    ],
)
def test_type_errors_name_argument(pair, change, message):
    inputs = make_inputs(batch=2, text_width=7)
    change(inputs)
    with pytest.raises(TypeError, match=message):
        run(pair[0], inputs)


@pytest.fixture(scope="module")
def layered_pair():
    return make_pair(seed=5, use_layer3d_rope=True, use_additional_t_cond=True)


@pytest.mark.parametrize(
    "additional_t_cond, error, message",
    [
        (torch.tensor([0.0, 1.0]), TypeError, r"additional_t_cond.*integer.*torch.float32"),
        (torch.tensor([0, 2]), ValueError, r"additional_t_cond.*0 or 1.*\[0, 2\]"),
        (torch.tensor([0, 1, 1]), ValueError, r"additional_t_cond.*\(batch=2,\).*\(3,\)"),
        (torch.tensor([[0, 1]]), ValueError, r"additional_t_cond.*\(1, 2\)"),
        ([0, 1], TypeError, r"additional_t_cond.*list"),
    ],
)
def test_additional_t_cond_errors(layered_pair, additional_t_cond, error, message):
    inputs = make_inputs(batch=2, img_shapes=((1, 4, 4), (1, 4, 4)))
    with pytest.raises(error, match=message):
        run(layered_pair[0], {**inputs, "additional_t_cond": additional_t_cond})


def test_additional_t_cond_batch_of_one_broadcasts_as_in_diffusers(layered_pair):
    inputs = make_inputs(batch=2, img_shapes=((1, 4, 4), (1, 4, 4)), valid=[7, 4])
    assert_matches_reference(layered_pair, {**inputs, "additional_t_cond": torch.tensor([1])})


def test_controlnet_residual_of_batch_one_broadcasts_as_in_diffusers(pair):
    inputs = make_inputs(batch=2, valid=[7, 2])
    inputs["controlnet_block_samples"] = [torch.randn(1, 24, 64) * 0.1, torch.randn(1, 24, 64) * 0.1]
    assert_matches_reference(pair, inputs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(axes_dims_rope=(8, 11, 13)), r"axes_dims_rope.*even.*\(8, 11, 13\)"),
        (dict(axes_dims_rope=(8, 24)), r"axes_dims_rope.*3 positive even"),
        (dict(axes_dims_rope=(8, 12, 14)), r"axes_dims_rope.*sum to attention_head_dim=32"),
        (dict(num_attention_heads=0), r"num_attention_heads.*positive int.*0"),
        (dict(attention_head_dim=31, axes_dims_rope=(8, 12, 11)), r"attention_head_dim.*even.*31"),
        (dict(in_channels=0), r"in_channels.*positive"),
        (dict(joint_attention_dim=-1), r"joint_attention_dim.*positive"),
        (dict(patch_size=1.5), r"patch_size.*positive int"),
        (dict(num_layers=-1), r"num_layers.*>= 0"),
        (dict(out_channels=0), r"out_channels.*positive int or None"),
    ],
)
def test_constructor_errors_name_the_config_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        QwenImageTransformer2DModel(**{**TINY_CONFIG, **overrides})


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
    ):
        assert getattr(QwenImageTransformer2DModel, attribute) == getattr(
            DiffusersQwenImageTransformer2DModel, attribute
        )
    # diffusers' class has a tensor-parallel plan from diffusers 0.40 on; ours has it on every version.
    if hasattr(DiffusersQwenImageTransformer2DModel, "_tp_plan"):
        assert QwenImageTransformer2DModel._tp_plan == DiffusersQwenImageTransformer2DModel._tp_plan
    assert QwenImageTransformer2DModel._cp_plan.keys() == DiffusersQwenImageTransformer2DModel._cp_plan.keys()


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
    ours, _ = make_pair(
        seed=9,
        num_layers=1,
        num_attention_heads=24,
        attention_head_dim=128,
        axes_dims_rope=(16, 56, 56),
        dtype=torch.bfloat16,
    )
    ours = ours.cuda()
    inputs = make_inputs(batch=1, img_shapes=((1, 16, 16),), text_width=77, valid=[40], dtype=torch.bfloat16)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    expected = run(ours, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)
    torch.testing.assert_close(run(compiled, inputs), expected, rtol=2e-2, atol=2e-2)
