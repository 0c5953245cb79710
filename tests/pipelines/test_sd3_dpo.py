"""SD3 Diffusion-DPO adapter against a tiny random diffusers SD3Transformer2DModel, and the DPO loss."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from qwen_image_omni import pipelines
from qwen_image_omni.pipelines import DiffusionModelConfig
from qwen_image_omni.pipelines.sd3_dpo import SD3_SCHEDULER_CONFIG, StableDiffusion3DPO, diffusion_dpo_loss

TINY_SD3 = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=6,
    pos_embed_max_size=8,
)
BATCH, TEXT = 4, 5


@pytest.fixture(scope="module", params=["sd3", "sd3.5"])
def module(request):
    """A tiny random SD3 transformer; ``sd3.5`` adds a dual-attention layer and q/k RMSNorm."""
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if request.param == "sd3.5" else {}
    torch.manual_seed(0)
    return SD3Transformer2DModel(**TINY_SD3, **extra).eval()


def config(guidance_scale=None) -> DiffusionModelConfig:
    return DiffusionModelConfig(
        architecture="StableDiffusion3Pipeline", algorithm="dpo", pipeline={"guidance_scale": guidance_scale}
    )


def batch_tensors(seed=0, text=TEXT, batch=BATCH):
    """Noised latents, timesteps, and positive and negative prompt tensors."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        latents=torch.randn(batch, 4, 8, 8, generator=g),
        timesteps=torch.rand(batch, generator=g) * 1000,
        prompt_embeds=torch.randn(batch, text, 12, generator=g),
        negative_prompt_embeds=torch.randn(batch, text + 2, 12, generator=g),
        micro_batch={
            "pooled_prompt_embeds": torch.randn(batch, 6, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(batch, 6, generator=g),
        },
    )


def prepare(module, model_config, t, **overrides):
    kwargs = dict(
        module=module,
        model_config=model_config,
        latents=t["latents"],
        timesteps=t["timesteps"],
        prompt_embeds=t["prompt_embeds"],
        prompt_embeds_mask=None,
        negative_prompt_embeds=t["negative_prompt_embeds"],
        negative_prompt_embeds_mask=None,
        micro_batch=t["micro_batch"],
        step=0,
    )
    kwargs.update(overrides)
    return StableDiffusion3DPO.prepare_model_inputs(**kwargs)


def run(module, inputs):
    with torch.no_grad():
        return module(**inputs, return_dict=False)[0]


# ----------------------------------------------------------------------------- adapter


def test_inputs_without_guidance_fit_the_transformer(module):
    t = batch_tensors()
    inputs, negative = prepare(module, config(), t)
    assert negative is None
    assert set(inputs) == {"hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"}
    assert inputs["hidden_states"] is t["latents"]
    assert inputs["timestep"].shape == (BATCH,)
    assert inputs["encoder_hidden_states"] is t["prompt_embeds"]
    assert inputs["pooled_projections"] is t["micro_batch"]["pooled_prompt_embeds"]
    out = run(module, inputs)
    assert out.shape == t["latents"].shape and torch.isfinite(out).all()
    with torch.no_grad():
        assert torch.equal(StableDiffusion3DPO.forward(module, config(), inputs, None), out)


@pytest.mark.parametrize("guidance_scale", [None, 1.0])
def test_guidance_off_ignores_negatives(module, guidance_scale):
    _, negative = prepare(module, config(guidance_scale), batch_tensors())
    assert negative is None


def test_inputs_with_guidance_and_guided_forward(module):
    t = batch_tensors()
    model_config = config(guidance_scale=3.0)
    inputs, negative = prepare(module, model_config, t)
    assert set(negative) == set(inputs)
    assert negative["hidden_states"] is inputs["hidden_states"]
    assert torch.equal(negative["timestep"], inputs["timestep"])
    assert negative["encoder_hidden_states"] is t["negative_prompt_embeds"]
    assert negative["pooled_projections"] is t["micro_batch"]["negative_pooled_prompt_embeds"]
    positive_out, negative_out = run(module, inputs), run(module, negative)
    with torch.no_grad():
        guided = StableDiffusion3DPO.forward(module, model_config, inputs, negative)
    torch.testing.assert_close(guided, negative_out + 3.0 * (positive_out - negative_out))
    with pytest.raises(ValueError, match="needs negative_model_inputs, got None"):
        StableDiffusion3DPO.forward(module, model_config, inputs, None)


def test_guidance_without_negatives_raises(module):
    t = batch_tensors()
    t["micro_batch"].pop("negative_pooled_prompt_embeds")
    with pytest.raises(ValueError, match=r"guidance_scale=3.0 > 1 .* \['negative_prompt_embeds', .*negative_pooled"):
        prepare(module, config(3.0), t, negative_prompt_embeds=None)


def test_scalar_timestep_and_trajectory_slicing(module):
    t = batch_tensors()
    inputs, _ = prepare(module, config(), t, timesteps=torch.tensor(500.0))
    assert torch.equal(inputs["timestep"], torch.full((BATCH,), 500.0))
    trajectory = torch.stack([t["latents"], 2 * t["latents"], 3 * t["latents"]], dim=1)
    timesteps = torch.tensor([[900.0, 500.0, 100.0]]).expand(BATCH, 3)
    inputs, _ = prepare(module, config(), t, latents=trajectory, timesteps=timesteps, step=1)
    assert torch.equal(inputs["hidden_states"], 2 * t["latents"])
    assert torch.equal(inputs["timestep"], torch.full((BATCH,), 500.0))
    assert run(module, inputs).shape == t["latents"].shape


@pytest.mark.parametrize(
    ("step", "states", "error", "message"),
    [
        (1.0, 3, TypeError, "^`step` must be an int, got float 1.0$"),
        (3, 3, ValueError, r"^`step` must be in \[0, 3\) for `latents` of shape \(4, 3, 4, 8, 8\), got 3$"),
        (-1, 3, ValueError, "^`step` must be >= 0, got -1$"),
        (2, 2, ValueError, r"^`step` must be in \[0, 2\) for `timesteps` of shape \(4, 2\), got 2$"),
    ],
)
def test_trajectory_step_must_index_both_tensors(module, step, states, error, message):
    t = batch_tensors()
    trajectory = torch.stack([t["latents"]] * 3, dim=1)
    timesteps = torch.full((BATCH, states), 500.0)
    with pytest.raises(error, match=message):
        prepare(module, config(), t, latents=trajectory, timesteps=timesteps, step=step)


def test_prompt_width_is_free_and_mask_is_unused(module):
    """Any prompt width fits; the mask is accepted but SD3 attends to every text position."""
    t = batch_tensors(text=9)
    mask = torch.zeros(BATCH, 9, dtype=torch.bool)
    mask[:, :3] = True
    with_mask, _ = prepare(module, config(), t, prompt_embeds_mask=mask)
    without, _ = prepare(module, config(), t)
    assert torch.equal(run(module, with_mask), run(module, without))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda t: t["micro_batch"].pop("pooled_prompt_embeds"), ValueError, r"micro_batch\['pooled_prompt_embeds'\]"),
        (lambda t: t.update(latents=torch.randn(BATCH, 3, 8, 8)), ValueError, r"in_channels=4 .* shape \(4, 3, 8, 8\)"),
        (lambda t: t.update(latents=torch.randn(BATCH, 64, 4)), ValueError, "latents must have 4 or 5 dimensions"),
        (lambda t: t.update(prompt_embeds=torch.randn(BATCH, 5, 7)), ValueError, "joint_attention_dim=12"),
        (lambda t: t.update(prompt_embeds=torch.randn(2, 5, 12)), ValueError, "prompt_embeds must have batch size 4"),
        (lambda t: t.update(timesteps=torch.rand(3)), ValueError, "timesteps must have batch size 4"),
        (lambda t: t.update(timesteps=[1.0] * BATCH), TypeError, "timesteps must be a torch.Tensor, got list"),
        (
            lambda t: t["micro_batch"].update(pooled_prompt_embeds=torch.randn(BATCH, 5)),
            ValueError,
            "pooled_projection_dim=6",
        ),
    ],
)
def test_input_errors_name_the_argument(module, change, error, message):
    t = batch_tensors()
    change(t)
    with pytest.raises(error, match=message):
        prepare(module, config(), t)


def test_forward_and_sample_previous_step_is_not_available(module):
    with pytest.raises(NotImplementedError, match="no reverse step"):
        StableDiffusion3DPO.forward_and_sample_previous_step(module, None, config(), {}, None, None, 0)


def test_build_scheduler_default_and_from_disk(tmp_path):
    scheduler = StableDiffusion3DPO.build_scheduler(config())
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    assert scheduler.config.shift == SD3_SCHEDULER_CONFIG["shift"] == 3.0
    assert len(scheduler.timesteps) == 1000

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=2.5).save_pretrained(tmp_path / "scheduler")
    model_config = DiffusionModelConfig(local_path=str(tmp_path), algorithm="dpo")
    scheduler = pipelines.build_scheduler(model_config)  # dispatch through the registry
    assert scheduler.config.shift == 2.5
    before = scheduler.timesteps.clone()
    pipelines.set_timesteps(scheduler, model_config, "cpu")  # a no-op for DPO
    assert torch.equal(scheduler.timesteps, before)


def test_dispatch_through_utils(module):
    t = batch_tensors()
    inputs, negative = pipelines.prepare_model_inputs(
        module, config(), t["latents"], t["timesteps"], t["prompt_embeds"], None, None, None, t["micro_batch"], 0
    )
    assert negative is None and run(module, inputs).shape == t["latents"].shape


def test_dpo_training_step_at_initialisation(module):
    """Policy == reference gives inside = 0: loss log 2, and gradients reach the transformer."""
    policy = copy.deepcopy(module).train()
    t = batch_tensors()
    noise = torch.randn_like(t["latents"])
    sigma = (t["timesteps"] / 1000).view(-1, 1, 1, 1)
    clean = t["latents"]
    target = noise - clean
    noisy = (1 - sigma) * clean + sigma * noise
    inputs, negative = prepare(policy, config(), t, latents=noisy)
    prediction = StableDiffusion3DPO.forward(policy, config(), inputs, negative)
    with torch.no_grad():
        reference = StableDiffusion3DPO.forward(module, config(), inputs, negative)
    loss, metrics = diffusion_dpo_loss(prediction, reference, target, beta=2500.0)
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))
    assert metrics["implicit_acc"] == 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


# ----------------------------------------------------------------------------- loss


def hand_case():
    """Two pairs, target zero, per-row errors by hand: model (1, 2 | 0, 4), reference (2, 1 | 1, 0)."""
    target = torch.zeros(4, 1, 1, 2)
    model = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [2.0, 2.0]]).view(4, 1, 1, 2)
    reference = torch.tensor([[0.0, 2.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]).view(4, 1, 1, 2)
    return model, reference, target


def test_loss_matches_hand_computation():
    model, reference, target = hand_case()
    model.requires_grad_(True)
    reference.requires_grad_(True)
    loss, metrics = diffusion_dpo_loss(model, reference, target, beta=1.0)
    # pair 0: model_diff = 1 - 2 = -1, ref_diff = 2 - 1 = 1, inside = -0.5 * (-1 - 1) = 1.0
    # pair 1: model_diff = 0 - 4 = -4, ref_diff = 1 - 0 = 1, inside = -0.5 * (-4 - 1) = 2.5
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["implicit_acc"].item() == 1.0
    assert metrics["model_mse"].item() == pytest.approx((1 + 2 + 0 + 4) / 4)
    assert metrics["ref_mse"].item() == pytest.approx((2 + 1 + 1 + 0) / 4)
    assert metrics["model_diff"].item() == pytest.approx(-2.5)
    assert metrics["ref_diff"].item() == pytest.approx(1.0)
    assert all(not m.requires_grad for m in metrics.values())

    loss.backward()
    assert reference.grad is None  # the reference is detached
    # d loss / d model[0, ..., 0] = -(1 - sigmoid(1)) / 2  *  (-beta / 2)  *  2 * (1 - 0) / 2
    sigmoid = 1 / (1 + math.exp(-1.0))
    assert model.grad[0, 0, 0, 0].item() == pytest.approx(0.25 * (1 - sigmoid), rel=1e-6)


def test_swapping_chosen_and_rejected_flips_the_sign():
    model, reference, target = hand_case()
    swap = [1, 0, 3, 2]
    loss, metrics = diffusion_dpo_loss(model[swap], reference[swap], target, beta=1.0)
    expected = (math.log1p(math.exp(1.0)) + math.log1p(math.exp(2.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["implicit_acc"].item() == 0.0


def test_loss_equals_reference_implementation_layout():
    """Same value as the DiffusionDPO train.py snippet, which stacks all chosen rows before all rejected."""
    g = torch.Generator().manual_seed(3)
    model, reference, target = (torch.randn(6, 4, 3, 3, generator=g) for _ in range(3))
    beta = 5000.0
    loss, metrics = diffusion_dpo_loss(model, reference, target, beta)

    order = [0, 2, 4, 1, 3, 5]  # adjacent pairs -> [w0, w1, w2, l0, l1, l2]
    model_pred, ref_pred, tgt = model[order], reference[order], target[order]
    model_losses = (model_pred - tgt).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - tgt).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    expected = -1 * F.logsigmoid(inside_term).mean()

    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["implicit_acc"], implicit_acc)


def test_loss_in_bf16_is_computed_in_fp32():
    model, reference, target = hand_case()
    loss, _ = diffusion_dpo_loss(model.bfloat16(), reference.bfloat16(), target.bfloat16(), beta=1.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.5))) / 2, rel=1e-6)


@pytest.mark.parametrize(
    "shapes, beta, message",
    [
        (((3, 2), (3, 2), (3, 2)), 1.0, "even, non-zero batch size, got 3"),
        (((0, 2), (0, 2), (0, 2)), 1.0, "even, non-zero batch size, got 0"),
        (((4, 2), (4, 3), (4, 2)), 1.0, r"same shape, got \(4, 2\), \(4, 3\), \(4, 2\)"),
        (((4, 2), (4, 2), (4, 2)), 0.0, "beta must be a positive finite number, got 0.0"),
        (((4, 2), (4, 2), (4, 2)), -5.0, "beta must be a positive finite number, got -5.0"),
        (((4, 2), (4, 2), (4, 2)), float("inf"), "beta must be a positive finite number, got inf"),
        (((4, 2), (4, 2), (4, 2)), True, "beta must be a positive finite number, got True"),
    ],
)
def test_loss_errors(shapes, beta, message):
    tensors = [torch.zeros(shape) for shape in shapes]
    with pytest.raises(ValueError, match=message):
        diffusion_dpo_loss(*tensors, beta=beta)
