"""Qwen-Image DiffusionNFT: the training adapter, the ODE rollout, the loss and rollout/trainer agreement.

The adapter's prediction is diffusers' ``QwenImageTransformer2DModel`` (same weights), with
diffusers' true CFG; the rollout's clean latents are diffusers' ``QwenImagePipeline``'s (same noise,
same schedule); the trainer, re-collating the rollout's prompt embeddings to another width,
reproduces the rollout's prediction at every recorded ODE state. verl-omni's own implementation is
compared in ``tests/integrations/verl_omni/test_qwen_image_diffusion_nft.py``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

from qwen_image_omni.pipelines import DiffusionModelBase, DiffusionModelConfig, VllmOmniPipelineBase
from qwen_image_omni.pipelines import utils as pipeline_utils
from qwen_image_omni.pipelines.qwen_image_diffusion_nft import (
    QwenImageDiffusionNFT,
    QwenImageDiffusionNFTPipeline,
    advantage_to_reward_prob,
    diffusion_nft_loss,
    forward_process_sample,
    group_advantages,
    select_train_timesteps,
)
from qwen_image_omni.pipelines.qwen_image_flow_grpo import QWEN_IMAGE_SCHEDULER_CONFIG, QwenImage, build_img_shapes
from qwen_image_omni.pipelines.schedulers import FlowMatchSDEDiscreteScheduler

from tests.support.rl_tiny import HEIGHT, IMAGE_TOKENS, NEGATIVE_LENGTHS, PROMPT_LENGTHS, STEPS, WIDTH, collate, prompt_rows
from tests.support.tiny import TINY_CONFIG, make_pair

TOL = 1e-5
MICRO_BATCH = {"height": HEIGHT, "width": WIDTH, "vae_scale_factor": 8}


def nft_config(true_cfg_scale: float = 1.0) -> DiffusionModelConfig:
    """The trainer's config for the tiny set-up."""
    return DiffusionModelConfig(
        architecture="QwenImagePipeline",
        algorithm="diffusion_nft",
        pipeline={"height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS, "true_cfg_scale": true_cfg_scale},
    )


@pytest.fixture(scope="module")
def models():
    """(ours, diffusers' reference): one set of random weights."""
    return make_pair(seed=0)


@pytest.fixture(scope="module")
def rows():
    return prompt_rows(PROMPT_LENGTHS, seed=1), prompt_rows(NEGATIVE_LENGTHS, seed=2)


def _noised(batch: int = 2, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=generator)
    return x_t, torch.tensor([743.1313, 250.0])[:batch]


def _predict(module, config, x_t, timesteps, prompt, negative=None, micro_batch=MICRO_BATCH, step=0):
    """The trainer's path: prepare_model_inputs + forward (through the registry dispatchers)."""
    inputs, negative_inputs = pipeline_utils.prepare_model_inputs(
        module, config, x_t, timesteps, prompt.embeds, prompt.mask,
        None if negative is None else negative.embeds, None if negative is None else negative.mask,
        micro_batch, step,
    )  # fmt: skip
    with torch.no_grad():
        return pipeline_utils.forward(module, config, inputs, negative_inputs)


def _reference(reference, x_t, timesteps, prompt) -> torch.Tensor:
    """diffusers' transformer called as diffusers' QwenImagePipeline calls it."""
    with torch.no_grad():
        return reference(
            hidden_states=x_t,
            timestep=timesteps / 1000,
            encoder_hidden_states=prompt.embeds,
            encoder_hidden_states_mask=prompt.mask,
            img_shapes=build_img_shapes(HEIGHT, WIDTH, x_t.shape[0]),
            return_dict=False,
        )[0]


def _diffusers_cfg(cond: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """diffusers' QwenImagePipeline's true-CFG lines, written out."""
    comb = neg + scale * (cond - neg)
    return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


# -- registry ---------------------------------------------------------------------------------------


def test_registered_for_diffusion_nft():
    assert DiffusionModelBase.get_class(nft_config()) is QwenImageDiffusionNFT
    assert issubclass(QwenImageDiffusionNFT, QwenImage)
    assert QwenImageDiffusionNFTPipeline.training_adapter is QwenImageDiffusionNFT
    assert QwenImageDiffusionNFTPipeline.algorithm == "diffusion_nft"


@pytest.mark.skipif(importlib.util.find_spec("vllm_omni") is not None, reason="vllm-omni replaces the rollout class")
def test_diffusers_rollout_registered_without_vllm_omni():
    assert VllmOmniPipelineBase.get_class("QwenImagePipeline", "diffusion_nft") is QwenImageDiffusionNFTPipeline


# -- training adapter ---------------------------------------------------------------------------------


def test_prediction_is_diffusers_transformer(models, rows):
    ours, reference = models
    prompt = collate(rows[0])
    x_t, timesteps = _noised()
    prediction = _predict(ours, nft_config(), x_t, timesteps, prompt)
    expected = _reference(reference, x_t, timesteps, prompt)
    assert prediction.shape == x_t.shape
    assert (prediction - expected).abs().max() <= TOL


def test_inputs_are_flow_grpo_inputs_at_the_noised_latent(models, rows):
    ours, _ = models
    prompt, negative = collate(rows[0], 512), collate(rows[1], 8)
    x_t, timesteps = _noised()
    inputs, negative_inputs = QwenImageDiffusionNFT.prepare_model_inputs(
        ours, nft_config(4.0), x_t, timesteps.long(), prompt.embeds, prompt.mask, negative.embeds, negative.mask,
        MICRO_BATCH, 3,
    )  # fmt: skip
    expected, expected_negative = QwenImage.prepare_model_inputs(
        ours, nft_config(4.0), x_t, timesteps.long(), prompt.embeds, prompt.mask, negative.embeds, negative.mask,
        MICRO_BATCH, 0,
    )  # fmt: skip
    assert inputs.keys() == expected.keys() == negative_inputs.keys() == expected_negative.keys()
    assert torch.equal(inputs["hidden_states"], x_t)
    assert torch.equal(inputs["timestep"], torch.tensor([0.743, 0.25]))  # long timesteps / 1000, a float
    assert inputs["encoder_hidden_states"].shape[1] == 512 and negative_inputs["encoder_hidden_states"].shape[1] == 8
    assert not any("seq_len" in key for key in (*inputs, *negative_inputs))
    none, no_negative = QwenImageDiffusionNFT.prepare_model_inputs(
        ours, nft_config(), x_t, timesteps, prompt.embeds, None, None, None, {}, 0
    )
    assert no_negative is None and none["encoder_hidden_states_mask"] is None


@pytest.mark.parametrize("batch_values", [False, True], ids=["scalars", "per_sample_tensors"])
def test_true_cfg_is_diffusers_cfg(models, rows, batch_values):
    ours, reference = models
    prompt, negative = collate(rows[0]), collate(rows[1])
    x_t, timesteps = _noised()
    micro_batch = MICRO_BATCH
    if batch_values:
        micro_batch = {"height": torch.tensor([HEIGHT] * 2), "width": np.int64(WIDTH), "vae_scale_factor": [8, 8]}
    guided = _predict(ours, nft_config(4.0), x_t, timesteps, prompt, negative, micro_batch)
    expected = _diffusers_cfg(
        _reference(reference, x_t, timesteps, prompt), _reference(reference, x_t, timesteps, negative), 4.0
    )
    assert (guided - expected).abs().max() <= TOL
    # No guidance at a scale <= 1, nor without negative inputs (verl-omni's rule).
    plain = _predict(ours, nft_config(), x_t, timesteps, prompt)
    assert torch.equal(_predict(ours, nft_config(1.0), x_t, timesteps, prompt, negative), plain)
    assert torch.equal(_predict(ours, nft_config(4.0), x_t, timesteps, prompt), plain)
    assert (guided - plain).abs().max() > 1e-3


@pytest.mark.parametrize(("width", "negative_width"), [(512, 96), (38, 5)])
def test_over_wide_padded_prompts_give_the_unpadded_prediction(models, rows, width, negative_width):
    """Right padding to any width, random padding columns, no length passed anywhere: the tight collation's prediction.

    (Left padding moves the valid tokens' RoPE positions, so it is a different input, not a padding.)
    """
    ours, _ = models
    x_t, timesteps = _noised()
    config = nft_config(4.0)
    tight = _predict(ours, config, x_t, timesteps, collate(rows[0]), collate(rows[1]))
    wide = _predict(ours, config, x_t, timesteps, collate(rows[0], width), collate(rows[1], negative_width))
    assert (wide - tight).abs().max() <= TOL


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"latents": torch.zeros(2, 3, IMAGE_TOKENS, 16)}, ValueError, r"^`latents` must be the noised latents x_t"),
        ({"latents": [0.0]}, TypeError, "^`latents` must be a torch.Tensor, got list$"),
        ({"timesteps": torch.zeros(2, 4)}, ValueError, r"^`timesteps` must be \(batch,\) = \(2,\), one per noised"),
        ({"timesteps": torch.zeros(3)}, ValueError, r"got shape \(3,\)$"),
        ({"timesteps": 500.0}, TypeError, "^`timesteps` must be a torch.Tensor, got float$"),
        ({"step": -1}, ValueError, "^`step` must be >= 0, got -1$"),
        ({"step": 1.0}, TypeError, "^`step` must be an int, got float 1.0$"),
        ({"prompt_embeds_mask": torch.ones(2, 3)}, ValueError, "prompt_embeds_mask"),
        ({"micro_batch": {"height": 128, "width": 64}}, ValueError, "latent tokens"),
    ],
)  # fmt: skip
def test_prepare_model_inputs_errors_name_the_argument(models, rows, change, error, match):
    ours, _ = models
    prompt = collate(rows[0])
    x_t, timesteps = _noised()
    args = {
        "module": ours, "model_config": nft_config(), "latents": x_t, "timesteps": timesteps,
        "prompt_embeds": prompt.embeds, "prompt_embeds_mask": prompt.mask, "negative_prompt_embeds": None,
        "negative_prompt_embeds_mask": None, "micro_batch": MICRO_BATCH, "step": 0,
    }  # fmt: skip
    with pytest.raises(error, match=match):
        QwenImageDiffusionNFT.prepare_model_inputs(**{**args, **change})


def test_forward_and_predict_noise_errors(models, rows):
    ours, _ = models
    prompt, negative = collate(rows[0]), collate(rows[1])
    x_t, timesteps = _noised()
    inputs, negative_inputs = QwenImageDiffusionNFT.prepare_model_inputs(
        ours, nft_config(4.0), x_t, timesteps, prompt.embeds, prompt.mask, negative.embeds, negative.mask, {}, 0
    )
    with pytest.raises(ValueError, match="^`model_config` .* is needed with `negative_model_inputs`, got None$"):
        QwenImageDiffusionNFT.forward(ours, None, inputs, negative_inputs)
    with pytest.raises(ValueError, match="true_cfg_scale=4.0 > 1 needs `negative_model_inputs`"):
        QwenImageDiffusionNFT.predict_noise(ours, inputs, None, 4.0)


def test_a_training_step_backpropagates_into_the_transformer(rows):
    """forward_process_sample -> the adapter's prediction (with grad) -> diffusion_nft_loss -> backward."""
    module, _ = make_pair(seed=3)
    prompt = collate(rows[0], 48)
    x0 = torch.randn(2, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=torch.Generator().manual_seed(0))
    timesteps = select_train_timesteps(torch.tensor([[1000.0, 743.13, 400.5]] * 2), 1 / 3, seed=0)[:, 0]
    x_t, t_expanded = forward_process_sample(x0, timesteps, torch.randn_like(x0))
    config = nft_config()
    inputs, _ = QwenImageDiffusionNFT.prepare_model_inputs(
        module, config, x_t, timesteps, prompt.embeds, prompt.mask, None, None, MICRO_BATCH, 0
    )
    with torch.no_grad():
        old = QwenImageDiffusionNFT.forward(module, config, inputs)
    prediction = QwenImageDiffusionNFT.forward(module, config, inputs)
    loss, metrics = diffusion_nft_loss(prediction, old, old, x0, x_t, t_expanded, torch.tensor([0.9, 0.1]))
    loss.backward()
    grads = [param.grad for param in module.parameters() if param.grad is not None]
    assert grads and all(torch.isfinite(grad).all() for grad in grads)
    assert metrics["actor/old_deviate"] == 0.0 and metrics["actor/ref_kl_loss"] == 0.0


# -- ODE rollout ------------------------------------------------------------------------------------------


def _pipe(module) -> QwenImageDiffusionNFTPipeline:
    scheduler = FlowMatchSDEDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    return QwenImageDiffusionNFTPipeline(transformer=module, scheduler=scheduler)


def _noise(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=torch.Generator().manual_seed(7))


def _rollout(pipe, prompt, negative, cfg_scale, **kwargs):
    arguments = {
        "prompt_embeds": prompt.embeds, "prompt_embeds_mask": prompt.mask, "height": HEIGHT, "width": WIDTH,
        "num_inference_steps": STEPS, "true_cfg_scale": cfg_scale, "latents": _noise(prompt.embeds.shape[0]),
        "output_type": "latent",
    }  # fmt: skip
    if negative is not None:
        arguments.update(negative_prompt_embeds=negative.embeds, negative_prompt_embeds_mask=negative.mask)
    return pipe(**{**arguments, **kwargs})


@pytest.mark.parametrize("cfg_scale", [4.0, 1.0], ids=["cfg", "no_cfg"])
def test_ode_clean_latents_are_diffusers_qwen_image_pipeline(models, rows, cfg_scale):
    ours, reference = models
    # Ours on over-wide padded embeddings; diffusers on the tight collation (width of the longest prompt).
    out = _rollout(_pipe(ours), collate(rows[0], 64), collate(rows[1], 64), cfg_scale)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    diffusers_pipe = QwenImagePipeline(
        scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=reference
    )
    prompt, negative = collate(rows[0]), collate(rows[1])
    with torch.no_grad():
        expected = diffusers_pipe(
            prompt_embeds=prompt.embeds, prompt_embeds_mask=prompt.mask, negative_prompt_embeds=negative.embeds,
            negative_prompt_embeds_mask=negative.mask, true_cfg_scale=cfg_scale, height=HEIGHT, width=WIDTH,
            num_inference_steps=STEPS, latents=_noise(), output_type="latent",
        ).images  # fmt: skip
    clean = out.rl["latents_clean"]
    assert clean.dtype == torch.float32 and clean.shape == expected.shape == (2, IMAGE_TOKENS, 16)
    assert (clean - expected).abs().max() <= TOL
    assert torch.equal(out.rl["train_timesteps"], scheduler.timesteps.expand(2, -1))
    assert torch.equal(out.images, clean) and torch.equal(out.all_latents[:, -1], clean)
    assert out.all_log_probs is None and out.all_latents.shape == (2, 2, IMAGE_TOKENS, 16)
    assert out.all_timesteps.shape == (2, 1) and out.sde_window == (STEPS - 1, STEPS)
    metadata = out.output["metadata"]
    assert set(metadata["rl"]) == {"latents_clean", "train_timesteps"}
    assert torch.equal(metadata["prompt_embeddings"]["prompt_embeds"], collate(rows[0], 64).embeds)
    if cfg_scale <= 1:
        assert metadata["prompt_embeddings"]["negative_prompt_embeds"] is None


def test_ode_is_deterministic_and_draws_no_noise(models, rows):
    ours, _ = models
    pipe = _pipe(ours)
    prompt, negative = collate(rows[0], 64), collate(rows[1], 64)
    first = _rollout(pipe, prompt, negative, 4.0, generator=torch.Generator().manual_seed(0))
    second = _rollout(pipe, prompt, negative, 4.0, generator=torch.Generator().manual_seed(123))
    assert torch.equal(first.rl["latents_clean"], second.rl["latents_clean"])
    full = _rollout(pipe, prompt, negative, 4.0, return_trajectory=True)
    assert full.all_latents.shape == (2, STEPS + 1, IMAGE_TOKENS, 16) and full.sde_window == (0, STEPS)
    assert torch.equal(full.all_latents[:, 0], _noise()) and torch.equal(
        full.all_latents[:, -1], first.rl["latents_clean"]
    )
    assert torch.equal(full.all_timesteps, full.rl["train_timesteps"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"noise_level": 0.7}, TypeError, r"deterministic ODE .* it takes no \['noise_level'\]$"),
        ({"sde_window_size": 2, "logprobs": True}, TypeError, r"takes no \['logprobs', 'sde_window_size'\]$"),
        ({"return_trajectory": 1}, TypeError, "^`return_trajectory` must be a bool, got int$"),
        ({"num_inference_steps": 0}, ValueError, "^`num_inference_steps` must be >= 1, got 0$"),
        ({"height": 72}, ValueError, "^`height` must be a multiple of 16"),
        ({"unknown": 1}, TypeError, "unknown"),
    ],
)  # fmt: skip
def test_rollout_errors(models, rows, kwargs, error, match):
    with pytest.raises(error, match=match):
        _rollout(_pipe(models[0]), collate(rows[0]), None, 1.0, **kwargs)


# -- rollout / trainer agreement ----------------------------------------------------------------------------


@pytest.mark.parametrize("trainer_width", [512, None], ids=["trainer512", "trainer_tight"])
@pytest.mark.parametrize("cfg_scale", [4.0, 1.0], ids=["cfg", "no_cfg"])
def test_trainer_reproduces_the_rollout_prediction(models, rows, monkeypatch, cfg_scale, trainer_width):
    """Rollout at width 64; the trainer re-collates to another right-padded width and re-predicts every state."""
    ours, _ = models
    rollout_predictions = []
    original = QwenImageDiffusionNFT.predict_noise.__func__

    def spy(cls, *args, **kwargs):
        prediction = original(cls, *args, **kwargs)
        rollout_predictions.append(prediction.clone())
        return prediction

    monkeypatch.setattr(QwenImageDiffusionNFT, "predict_noise", classmethod(spy))
    out = _rollout(_pipe(ours), collate(rows[0], 64), collate(rows[1], 64), cfg_scale, return_trajectory=True)
    monkeypatch.undo()
    assert len(rollout_predictions) == STEPS

    # The trainer strips the rollout's padding and re-pads to its own width.
    unpadded = [[e[m.bool()] for e, m in zip(p["embeds"], p["mask"])] for p in (
        {"embeds": out.prompt_embeds, "mask": out.prompt_embeds_mask},
        {"embeds": out.negative_prompt_embeds, "mask": out.negative_prompt_embeds_mask},
    ) if p["embeds"] is not None]  # fmt: skip
    prompt = collate(unpadded[0], trainer_width, seed=11)
    negative = collate(unpadded[1], trainer_width, seed=12) if cfg_scale > 1 else None
    config = nft_config(cfg_scale)
    train_timesteps = out.rl["train_timesteps"]
    deltas = []
    for step in range(STEPS):
        prediction = _predict(
            ours, config, out.all_latents[:, step], train_timesteps[:, step], prompt, negative, step=step
        )
        deltas.append(float((prediction - rollout_predictions[step]).abs().max()))
    assert max(deltas) <= TOL, f"per-step max |Δ prediction| {deltas} > {TOL}"


# -- loss -------------------------------------------------------------------------------------------------


def _constant_error_inputs(error: float, batch: int = 2):
    """Inputs whose clean-latent estimates miss x0 by exactly ``error`` everywhere (old = current policy)."""
    x0 = torch.zeros(batch, 4, 3)
    xt = torch.ones(batch, 4, 3)
    t = torch.full((batch, 1, 1), 0.5)
    velocity = torch.full_like(x0, (1.0 - error) / 0.5)  # x0_hat = xt - t v = error
    return velocity, x0, xt, t


def test_loss_hand_values():
    velocity, x0, xt, t = _constant_error_inputs(0.5)
    # x0_hat - x0 = 0.5 for both implicit policies: each loss is 0.5^2 / 0.5 = 0.5 per sample, so
    # policy = (r * 0.5 + (1 - r) * 0.5) / beta * adv_clip_max = 0.5 / 0.5 * 5 = 5, whatever r.
    loss, metrics = diffusion_nft_loss(velocity, velocity, velocity, x0, xt, t, torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(5.0) and metrics["actor/total_loss"] == pytest.approx(5.0)
    assert metrics["actor/positive_loss"] == pytest.approx(0.5) == metrics["actor/negative_loss"]
    assert metrics["actor/reward_prob_mean"] == pytest.approx(0.5)

    # The current policy 0.2 faster than old, beta = 0.5: v+ = v_old + 0.1, v- = v_old - 0.1, so with t = 0.5
    # x0_hat+ misses by 0.5 - 0.05 = 0.45 and x0_hat- by 0.55: L+ = 0.45, L- = 0.55 (the weights are the errors).
    faster = velocity + 0.2
    loss, metrics = diffusion_nft_loss(
        faster, velocity, velocity, x0, xt, t, torch.tensor([1.0, 0.0]), adv_clip_max=2.0, ref_kl_coef=3.0
    )
    policy = (0.45 / 0.5 + 0.55 / 0.5) / 2 * 2.0  # sample 0 (r=1) takes L+, sample 1 (r=0) takes L-
    assert metrics["actor/policy_loss"] == pytest.approx(policy, rel=1e-5)
    assert metrics["actor/ref_kl_loss"] == pytest.approx(0.04, rel=1e-5)
    assert metrics["actor/old_deviate"] == pytest.approx(0.04, rel=1e-5)
    assert loss.item() == pytest.approx(policy + 3.0 * 0.04, rel=1e-5)

    # A (B, K) reward_prob is averaged per sample; an exact hit is weighted by adaptive_weight_min.
    exact, x0, xt, t = _constant_error_inputs(0.0)
    loss, _ = diffusion_nft_loss(exact, exact, exact, x0, xt, t, torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    assert loss.item() == 0.0


def test_loss_gradient_flows_through_the_current_prediction_only():
    velocity, x0, xt, t = _constant_error_inputs(0.5)
    current = (velocity + 0.1).requires_grad_()
    old = velocity.clone().requires_grad_()
    ref = velocity.clone().requires_grad_()
    loss, _ = diffusion_nft_loss(current, old, ref, x0, xt, t, torch.tensor([0.8, 0.3]), ref_kl_coef=1.0)
    loss.backward()
    assert current.grad is not None and current.grad.abs().sum() > 0
    assert old.grad is None and ref.grad is None


def test_group_advantages_and_reward_prob_hand_values():
    rewards = torch.tensor([1.0, 3.0, 5.0, 2.0, 4.0])
    uid = np.array(["a", "a", "b", "c", "c"])
    advantages = group_advantages(rewards, uid, norm_by_std=True, global_std=False)
    root2 = 2**0.5  # std of (1, 3) and of (2, 4), unbiased
    expected = torch.tensor([-1 / (root2 + 1e-4), 1 / (root2 + 1e-4), 0.0, -1 / (root2 + 1e-4), 1 / (root2 + 1e-4)])
    assert torch.allclose(advantages, expected)
    assert torch.equal(group_advantages(rewards, list(uid), norm_by_std=False), torch.tensor([-1.0, 1, 0, -1, 1]))
    global_std = rewards.std()
    assert torch.allclose(
        group_advantages(rewards, uid, global_std=True), torch.tensor([-1.0, 1, 0, -1, 1]) / (global_std + 1e-4)
    )

    a = torch.tensor([-7.0, -2.5, 0.0, 2.5, 7.0])
    cases = {
        "continuous": [0.0, 0.25, 0.5, 0.75, 1.0],
        "positive_only": [0.5, 0.5, 0.5, 0.75, 1.0],
        "negative_only": [0.0, 0.25, 0.5, 0.5, 0.5],
        "one_only": [0.5, 0.5, 0.5, 0.6, 0.6],
        "binary": [0.4, 0.4, 0.5, 0.6, 0.6],
    }
    for mode, values in cases.items():
        assert torch.allclose(advantage_to_reward_prob(a, 5.0, mode), torch.tensor(values)), mode


def test_select_train_timesteps():
    schedule = torch.tensor([[1000.0, 743.13, 400.5, 100.9]] * 3)
    picked = select_train_timesteps(schedule, 0.5, seed=0)
    assert picked.shape == (3, 2) and picked.dtype == torch.long
    assert all(set(row.tolist()) <= {1000, 743, 400, 100} and len(set(row.tolist())) == 2 for row in picked)
    assert torch.equal(picked, select_train_timesteps(schedule, 0.5, seed=0))
    assert select_train_timesteps(schedule, 0.1).shape == (3, 1)  # at least one
    assert sorted(select_train_timesteps(schedule, 1.0)[0].tolist()) == [100, 400, 743, 1000]


def test_forward_process_sample():
    x0 = torch.ones(2, 3, 4)
    noise = torch.full_like(x0, -1.0)
    x_t, t = forward_process_sample(x0, torch.tensor([250, 1000]), noise)
    assert t.shape == (2, 1, 1) and torch.equal(t.flatten(), torch.tensor([0.25, 1.0]))
    assert torch.equal(x_t[0], torch.full((3, 4), 0.5)) and torch.equal(x_t[1], noise[1])
    assert forward_process_sample(x0, torch.tensor([0, 0]))[0].equal(x0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda v, x0, xt, t, r: diffusion_nft_loss(v[:1], v, v, x0, xt, t, r), ValueError,
         r"^`forward_prediction` must have the shape of `x0` \(2, 4, 3\), got \(1, 4, 3\)$"),
        (lambda v, x0, xt, t, r: diffusion_nft_loss(v, v, v, x0, xt, t, r[:1]), ValueError,
         r"^`reward_prob` must hold one value per sample \(2\)"),
        (lambda v, x0, xt, t, r: diffusion_nft_loss(v, v, v, x0, xt, torch.ones(5), r), ValueError,
         "^`t_expanded` must broadcast to `x0`"),
        (lambda v, x0, xt, t, r: diffusion_nft_loss(v, v.numpy(), v, x0, xt, t, r), TypeError,
         "^`old_prediction` must be a torch.Tensor, got ndarray$"),
        (lambda v, x0, xt, t, r: diffusion_nft_loss(v, v, v, x0, xt, t, r, mix_beta=0.0), ValueError,
         "^`mix_beta` must be > 0, got 0.0$"),
        (lambda v, x0, xt, t, r: diffusion_nft_loss(v, v, v, x0, xt, t, r, ref_kl_coef=-1.0), ValueError,
         "^`ref_kl_coef` must be a finite number >= 0.0, got -1.0$"),
        (lambda v, x0, xt, t, r: group_advantages(r, ["a"]), ValueError,
         r"^`uid` must hold one group id per reward \(2\), got 1$"),
        (lambda v, x0, xt, t, r: group_advantages(r[:, None], ["a", "b"]), ValueError, "^`rewards` must be"),
        (lambda v, x0, xt, t, r: advantage_to_reward_prob(r, 5.0, "sigmoid"), ValueError,
         "^`adv_mode` must be one of"),
        (lambda v, x0, xt, t, r: advantage_to_reward_prob(r, 0.0), ValueError, "^`adv_clip_max` must be > 0"),
        (lambda v, x0, xt, t, r: select_train_timesteps(torch.ones(4), 0.5), ValueError,
         r"^`train_timesteps` must be \(batch, timesteps\), got shape \(4,\)$"),
        (lambda v, x0, xt, t, r: select_train_timesteps(torch.ones(2, 4), 1.5), ValueError,
         r"^`timestep_fraction` must be in \(0, 1\], got 1.5$"),
        (lambda v, x0, xt, t, r: select_train_timesteps(torch.ones(2, 4), 0.5, seed=1.0), TypeError,
         "^`seed` must be an int, got float 1.0$"),
        (lambda v, x0, xt, t, r: forward_process_sample(x0, torch.ones(2, 1)), ValueError,
         r"^`timesteps` must be \(batch,\) = \(2,\)"),
        (lambda v, x0, xt, t, r: forward_process_sample(x0, torch.ones(2), torch.ones(2, 4)), ValueError,
         r"^`noise` must have the shape of `x0`"),
    ],
)  # fmt: skip
def test_loss_helpers_errors_name_the_argument(call, error, match):
    velocity, x0, xt, t = _constant_error_inputs(0.5)
    with pytest.raises(error, match=match):
        call(velocity, x0, xt, t, torch.tensor([0.5, 0.5]))
