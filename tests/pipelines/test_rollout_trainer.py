"""Rollout and trainer agree on every log-probability, whatever width the prompts are collated to.

The rollout (``QwenImagePipelineWithLogProb.diffuse``) runs on a CFG pair of prompts with very
different valid lengths (37/30 and 5/3 tokens), padded to width 64. The trainer re-collates the
same embeddings to another width (512, or unpadded) and re-scores every transition of the SDE
window with ``QwenImage.prepare_model_inputs`` + ``forward_and_sample_previous_step``. Because the
transformer takes the text RoPE length from the tensor width, and both sides run the same step
functions, the per-step log-probs agree to 1e-5 for every SDE type, with and without CFG.

The legacy vllm-omni rule (text RoPE length ``max(mask.sum())``) breaks this as soon as a valid
token sits at or past that length (left padding): the check then fails, which is the rollout/trainer
KL the package removes. With right padding the "kernel" flavour happens to agree (positions past
``mask.sum()`` are all masked) and the "native" flavour raises.
"""

from __future__ import annotations

import pytest
import torch

from qwen_image_omni.pipelines.qwen_image_flow_grpo import QwenImage, QwenImagePipelineWithLogProb

from tests.support.rl_tiny import (
    NEGATIVE_LENGTHS,
    PROMPT_LENGTHS,
    STEPS,
    collate,
    legacy_rope_per_call,
    make_pipeline,
    max_abs_delta,
    model_config,
    prompt_rows,
    recompute_log_probs,
    run_diffuse,
)

TOL = 1e-5
ROLLOUT_WIDTH = 64
SDE_TYPES = ("sde", "cps", "dance_sde")
CFG_SCALES = {"cfg": 4.0, "no_cfg": 1.0}


@pytest.fixture(scope="module")
def pipe() -> QwenImagePipelineWithLogProb:
    return make_pipeline()


@pytest.fixture(scope="module")
def rows() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return prompt_rows(PROMPT_LENGTHS, seed=1), prompt_rows(NEGATIVE_LENGTHS, seed=2)


def _pair(rows, width, layout, cfg_scale):
    """(prompt, negative) collated to ``width``; no negative without CFG."""
    positive, negative = rows
    return collate(positive, width, layout), collate(negative, width, layout) if cfg_scale > 1 else None


@pytest.fixture(scope="module")
def rollouts() -> dict:
    """Rollouts shared between tests that only differ on the trainer side."""
    return {}


def _rollout(pipe, rows, rollouts, sde_type, cfg_scale, width, layout):
    key = (sde_type, cfg_scale, width, layout)
    if key not in rollouts:
        prompt, negative = _pair(rows, width, layout, cfg_scale)
        rollouts[key] = run_diffuse(pipe, prompt, negative, sde_type, cfg_scale)
    return rollouts[key]


def _rollout_and_recompute(pipe, rows, rollouts, sde_type, cfg_scale, rollout, trainer):
    """Roll out on ``rollout=(width, layout)``, re-score on ``trainer=(width, layout)``; return both log-probs."""
    _, all_latents, rollout_log_probs, all_timesteps = _rollout(pipe, rows, rollouts, sde_type, cfg_scale, *rollout)
    prompt, negative = _pair(rows, *trainer, cfg_scale)
    config = model_config(sde_type, cfg_scale)
    trainer_log_probs = recompute_log_probs(pipe.transformer, config, all_latents, all_timesteps, prompt, negative)
    return rollout_log_probs, trainer_log_probs


@pytest.mark.parametrize("trainer_width", [512, None], ids=["trainer512", "trainer_unpadded"])
@pytest.mark.parametrize("cfg", CFG_SCALES)
@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_trainer_recomputes_rollout_log_probs(pipe, rows, rollouts, sde_type, cfg, trainer_width):
    rollout, trainer = _rollout_and_recompute(
        pipe, rows, rollouts, sde_type, CFG_SCALES[cfg], (ROLLOUT_WIDTH, "right"), (trainer_width, "right")
    )
    assert rollout.shape == trainer.shape == (len(PROMPT_LENGTHS), STEPS - 1)
    assert torch.isfinite(rollout).all()
    delta = max_abs_delta(rollout, trainer)
    assert (delta <= TOL).all(), f"per-step max |Δ log-prob| {delta.tolist()} > {TOL}"


@pytest.mark.parametrize("cfg", CFG_SCALES)
def test_left_padding_agrees_when_both_sides_see_the_same_tensors(pipe, rows, rollouts, cfg):
    """The control for the legacy test below: our rule, left padding, trainer scores the rollout's tensors."""
    layout = (ROLLOUT_WIDTH, "left")
    rollout, trainer = _rollout_and_recompute(pipe, rows, rollouts, "sde", CFG_SCALES[cfg], layout, layout)
    assert (max_abs_delta(rollout, trainer) <= TOL).all()


@pytest.mark.parametrize("cfg", CFG_SCALES)
@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_legacy_mask_sum_rope_length_drifts(pipe, rows, sde_type, cfg):
    """Legacy rollout (RoPE length max(mask.sum()) per CFG branch, left padding) vs our trainer: the check fails."""
    layout = (ROLLOUT_WIDTH, "left")
    with legacy_rope_per_call(pipe.transformer, mode="kernel"):
        prompt, negative = _pair(rows, *layout, CFG_SCALES[cfg])
        _, all_latents, rollout, all_timesteps = run_diffuse(pipe, prompt, negative, sde_type, CFG_SCALES[cfg])
    config = model_config(sde_type, CFG_SCALES[cfg])
    trainer = recompute_log_probs(pipe.transformer, config, all_latents, all_timesteps, prompt, negative)
    delta = max_abs_delta(rollout, trainer)
    assert delta.max() > 5 * TOL, f"legacy rule should drift past {TOL}, got per-step {delta.tolist()}"


def test_legacy_kernel_rule_hides_with_right_padding(pipe, rows):
    """Right padding: every position past mask.sum() is masked, so the short table changes nothing."""
    prompt, negative = _pair(rows, ROLLOUT_WIDTH, "right", 4.0)
    with legacy_rope_per_call(pipe.transformer, mode="kernel"):
        _, all_latents, rollout, all_timesteps = run_diffuse(pipe, prompt, negative, "sde", 4.0)
    config = model_config("sde", 4.0)
    trainer = recompute_log_probs(pipe.transformer, config, all_latents, all_timesteps, prompt, negative)
    assert (max_abs_delta(rollout, trainer) <= TOL).all()


def test_legacy_native_rule_raises_on_padded_prompts(pipe, rows):
    prompt, negative = _pair(rows, ROLLOUT_WIDTH, "right", 4.0)
    # Our transformer checks the table's shape before its kernel runs (ValueError); diffusers' eager
    # rotary multiply fails to broadcast (RuntimeError), as vllm-omni's native path did.
    with legacy_rope_per_call(pipe.transformer, mode="native"), pytest.raises((RuntimeError, ValueError)):
        run_diffuse(pipe, prompt, negative, "sde", 4.0)
    # The hooks are gone afterwards: the same rollout runs.
    run_diffuse(pipe, prompt, negative, "sde", 4.0)


def test_rollout_steps_go_through_the_trainer_functions(pipe, rows, monkeypatch):
    """One implementation, two callers: diffuse() calls QwenImage's step functions at every step
    (``sample_previous_step``'s two halves, the prediction and the scheduler step on it)."""
    calls = {"prepare_model_inputs": [], "predict_noise": [], "step_from_prediction": []}
    for name in calls:
        original = getattr(QwenImage, name).__func__

        def spy(cls, *args, _original=original, _name=name, **kwargs):
            result = _original(cls, *args, **kwargs)
            calls[_name].append(result)
            return result

        monkeypatch.setattr(QwenImage, name, classmethod(spy))
    prompt, negative = _pair(rows, ROLLOUT_WIDTH, "right", 4.0)
    run_diffuse(pipe, prompt, negative, "sde", 4.0)
    assert len(calls["prepare_model_inputs"]) == len(calls["predict_noise"]) == STEPS
    assert len(calls["step_from_prediction"]) == STEPS
    for model_inputs, negative_inputs in calls["prepare_model_inputs"]:
        for inputs in (model_inputs, negative_inputs):
            assert set(inputs) == {
                "hidden_states",
                "timestep",
                "guidance",
                "encoder_hidden_states",
                "encoder_hidden_states_mask",
                "img_shapes",
                "return_dict",
            }


def test_forward_output_is_what_the_trainer_needs(pipe, rows):
    """End to end: forward() on padded embeddings, then the trainer scores its output on unpadded ones."""
    prompt, negative = _pair(rows, ROLLOUT_WIDTH, "right", 4.0)
    out = pipe(
        prompt_embeds=prompt.embeds,
        prompt_embeds_mask=prompt.mask,
        negative_prompt_embeds=negative.embeds,
        negative_prompt_embeds_mask=negative.mask,
        height=64,
        width=64,
        num_inference_steps=STEPS,
        true_cfg_scale=4.0,
        noise_level=0.7,
        sde_window_size=2,
        sde_window_range=(0, STEPS),
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    )
    start, end = out.sde_window
    assert end - start == 2 and 0 <= start and end <= STEPS
    assert out.all_latents.shape == (2, 3, 16, 16) and out.all_log_probs.shape == out.all_timesteps.shape == (2, 2)
    assert torch.equal(out.all_timesteps[0], pipe.scheduler.timesteps[start:end])
    if end == STEPS:
        assert torch.equal(out.images, out.all_latents[:, -1])
    assert torch.equal(out.prompt_embeds, prompt.embeds) and torch.equal(out.negative_prompt_embeds_mask, negative.mask)
    assert set(out.custom_output) >= {"all_latents", "all_log_probs", "all_timesteps", "prompt_embeds_mask"}

    # The trainer strips the padding (nested unpadding) and re-pads to the longest valid row.
    unpadded = [collate([e[m.bool()] for e, m in zip(p.embeds, p.mask)]) for p in (prompt, negative)]
    config = model_config("sde", 4.0)
    trainer = recompute_log_probs(pipe.transformer, config, out.all_latents, out.all_timesteps, *unpadded)
    assert (max_abs_delta(out.all_log_probs, trainer) <= TOL).all()
