"""Qwen-Image Diffusion-DPO: the training adapter against diffusers, the ODE rollout, rollout/trainer agreement.

The adapter's prediction is checked against diffusers' own ``QwenImageTransformer2DModel`` (same
weights), the rollout's clean latents against diffusers' ``QwenImagePipeline`` (same noise), and
the trainer's prediction on re-collated prompt embeddings against the rollout's own, step by step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

from qwen_image_omni.pipelines import DiffusionModelBase, DiffusionModelConfig, VllmOmniPipelineBase, sd3_dpo
from qwen_image_omni.pipelines import utils as pipeline_utils
from qwen_image_omni.pipelines.qwen_image_dpo import (
    CLEAN_LATENTS_KEY,
    QwenImageDPO,
    QwenImageDPOPipeline,
    diffusion_dpo_loss,
)
from qwen_image_omni.pipelines.qwen_image_flow_grpo import QWEN_IMAGE_SCHEDULER_CONFIG, QwenImage

from tests.support.rl_tiny import HEIGHT, IMAGE_TOKENS, NEGATIVE_LENGTHS, PROMPT_LENGTHS, STEPS, WIDTH, collate, prompt_rows
from tests.support.tiny import TINY_CONFIG, make_pair

TOL = 1e-5
ROLLOUT_WIDTH = 64  # the rollout's prompt width: much wider than the 37 / 5 valid tokens
TRAINER_WIDTH = 96  # the trainer re-collates to another fixed width
IMG_SHAPES = [[(1, HEIGHT // 16, WIDTH // 16)]] * 2


def dpo_config(true_cfg_scale: float = 1.0, **pipeline) -> DiffusionModelConfig:
    """The trainer's config for the tiny set-up (64x64 images, 4 steps)."""
    return DiffusionModelConfig(
        architecture="QwenImagePipeline",
        algorithm="dpo",
        pipeline={"height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS, "true_cfg_scale": true_cfg_scale,
                  **pipeline},
    )  # fmt: skip


@pytest.fixture(scope="module")
def models():
    """``(ours, diffusers')`` tiny transformers with the same weights."""
    return make_pair(seed=0)


@pytest.fixture(scope="module")
def rows():
    """Unpadded positive / negative prompt rows (37 / 30 and 5 / 3 valid tokens)."""
    return prompt_rows(PROMPT_LENGTHS, seed=1), prompt_rows(NEGATIVE_LENGTHS, seed=2)


def noised_latents(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(noisy, clean, noise, timesteps)`` of one (chosen, rejected) pair, noised as verl-omni's DPO trainer does."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randn(2, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=generator)
    noise = torch.randn(1, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=generator).repeat(2, 1, 1)
    scheduler = QwenImageDPO.build_scheduler(dpo_config())
    timesteps = scheduler.timesteps[torch.tensor([371, 371])]
    return scheduler.scale_noise(clean, timesteps, noise), clean, noise, timesteps


def adapter_prediction(module, config, latents, timesteps, prompt, negative=None) -> torch.Tensor:
    """``prepare_model_inputs`` + ``forward`` of the DPO adapter, no grad."""
    inputs, negative_inputs = QwenImageDPO.prepare_model_inputs(
        module, config, latents, timesteps, prompt.embeds, prompt.mask,
        None if negative is None else negative.embeds, None if negative is None else negative.mask,
        {"height": HEIGHT, "width": WIDTH, "vae_scale_factor": 8}, 0,
    )  # fmt: skip
    with torch.no_grad():
        return QwenImageDPO.forward(module, config, inputs, negative_inputs)


def diffusers_prediction(reference, latents, timesteps, prompt, negative=None, true_cfg_scale=1.0) -> torch.Tensor:
    """diffusers' transformer called as diffusers' ``QwenImagePipeline`` calls it, its true-CFG formula inline."""

    def call(side):
        with torch.no_grad():
            return reference(
                hidden_states=latents, encoder_hidden_states=side.embeds, encoder_hidden_states_mask=side.mask,
                timestep=timesteps / 1000, img_shapes=IMG_SHAPES, return_dict=False,
            )[0]  # fmt: skip

    prediction = call(prompt)
    if negative is None:
        return prediction
    negative_prediction = call(negative)
    combined = negative_prediction + true_cfg_scale * (prediction - negative_prediction)
    return combined * (torch.norm(prediction, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


# -- registry, scheduler ------------------------------------------------------------------------------


def test_registered_for_qwen_image_dpo():
    assert DiffusionModelBase.get_class(dpo_config()) is QwenImageDPO
    assert VllmOmniPipelineBase.get_class("QwenImagePipeline", "dpo") is QwenImageDPOPipeline
    assert VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "dpo") == (
        "qwen_image_omni.pipelines.qwen_image_dpo.diffusers_rollout_pipeline.QwenImageDPOPipeline"
    )
    # One loss for every Diffusion-DPO adapter: it only compares predictions with `noise - latents`.
    assert diffusion_dpo_loss is sd3_dpo.diffusion_dpo_loss


def test_build_scheduler_keeps_the_training_schedule(tmp_path):
    scheduler = QwenImageDPO.build_scheduler(dpo_config())
    assert type(scheduler) is FlowMatchEulerDiscreteScheduler
    reference = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    assert dict(scheduler.config) == dict(reference.config)
    assert len(scheduler.timesteps) == 1000 and torch.equal(scheduler.timesteps, reference.timesteps)

    FlowMatchEulerDiscreteScheduler.from_config({**QWEN_IMAGE_SCHEDULER_CONFIG, "max_shift": 1.5}).save_pretrained(
        tmp_path / "scheduler"
    )
    config = dpo_config()
    config.local_path = str(tmp_path)
    assert QwenImageDPO.build_scheduler(config).config.max_shift == 1.5


@pytest.mark.parametrize("steps", [4, 10])
def test_set_timesteps_is_diffusers_qwen_image_schedule(steps):
    scheduler = QwenImageDPO.build_scheduler(dpo_config())
    pipeline_utils.set_timesteps(scheduler, dpo_config(num_inference_steps=steps), "cpu")
    reference = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    mu = calculate_shift(IMAGE_TOKENS, 256, 8192, 0.5, 0.9)
    expected, _ = retrieve_timesteps(reference, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(scheduler.timesteps, expected) and torch.equal(scheduler.sigmas, reference.sigmas)


# -- the prediction -------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("layout", ["right", "left"])
def test_prediction_is_diffusers_transformer(models, rows, true_cfg_scale, layout):
    ours, reference = models
    noisy, _, _, timesteps = noised_latents()
    prompt = collate(rows[0], ROLLOUT_WIDTH, layout)
    negative = collate(rows[1], ROLLOUT_WIDTH, layout) if true_cfg_scale > 1 else None
    config = dpo_config(true_cfg_scale)
    prediction = adapter_prediction(ours, config, noisy, timesteps, prompt, negative)
    expected = diffusers_prediction(reference, noisy, timesteps, prompt, negative, true_cfg_scale)
    assert prediction.shape == noisy.shape
    torch.testing.assert_close(prediction, expected, rtol=0, atol=TOL)
    # Dispatch through the registry gives the same tensors.
    inputs, negative_inputs = pipeline_utils.prepare_model_inputs(
        ours, config, noisy, timesteps, prompt.embeds, prompt.mask,
        None if negative is None else negative.embeds, None if negative is None else negative.mask, {}, 0,
    )  # fmt: skip
    with torch.no_grad():
        assert torch.equal(pipeline_utils.forward(ours, config, inputs, negative_inputs), prediction)
        sampled = QwenImageDPO.forward_and_sample_previous_step(ours, None, config, inputs, negative_inputs, None, 0)
    assert torch.equal(sampled, prediction)


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0], ids=["no_cfg", "cfg"])
def test_prompt_width_does_not_change_the_prediction(models, rows, true_cfg_scale):
    """Right padding to any width (garbage, even NaN, in the padding) predicts what the tight prompt does."""
    ours, _ = models
    noisy, _, _, timesteps = noised_latents()
    config = dpo_config(true_cfg_scale)

    def predict(width, fill=None):
        prompt, negative = collate(rows[0], width), collate(rows[1], width)
        for side in (prompt, negative):
            if fill is not None:
                side.embeds[side.mask == 0] = fill
        return adapter_prediction(ours, config, noisy, timesteps, prompt, negative if true_cfg_scale > 1 else None)

    tight = predict(None)
    for width, fill in ((ROLLOUT_WIDTH, None), (TRAINER_WIDTH, float("nan")), (512, None)):
        torch.testing.assert_close(predict(width, fill), tight, rtol=0, atol=TOL)


def test_negative_prompt_is_ignored_without_cfg(models, rows):
    ours, _ = models
    noisy, _, _, timesteps = noised_latents()
    prompt, negative = collate(rows[0]), collate(rows[1])
    inputs, negative_inputs = QwenImageDPO.prepare_model_inputs(
        ours, dpo_config(1.0), noisy, timesteps, prompt.embeds, prompt.mask, negative.embeds, negative.mask, {}, 0
    )
    assert negative_inputs is None
    assert set(inputs) == {"hidden_states", "timestep", "guidance", "encoder_hidden_states",
                           "encoder_hidden_states_mask", "img_shapes", "return_dict"}  # fmt: skip
    assert inputs["guidance"] is None and inputs["img_shapes"] == IMG_SHAPES
    assert torch.equal(inputs["timestep"], timesteps / 1000)
    # A 0-d timestep applies to the whole batch.
    scalar, _ = QwenImageDPO.prepare_model_inputs(
        ours, dpo_config(1.0), noisy, timesteps[0], prompt.embeds, prompt.mask, None, None, {}, 0
    )
    assert torch.equal(scalar["timestep"], timesteps / 1000)


def test_guidance_embeds_checkpoint_gets_the_guidance_scale(rows):
    model, _ = make_pair(seed=0, guidance_embeds=True)
    noisy, _, _, timesteps = noised_latents()
    prompt = collate(rows[0])
    inputs, _ = QwenImageDPO.prepare_model_inputs(
        model, dpo_config(guidance_scale=3.5), noisy, timesteps, prompt.embeds, prompt.mask, None, None, {}, 0
    )
    assert torch.equal(inputs["guidance"], torch.full((2,), 3.5))


def _prepare(config, prompt, negative=(None, None), latents=None, timesteps=None, micro_batch=None):
    noisy, _, _, noised_timesteps = noised_latents()
    module, _ = make_pair(seed=0)
    return QwenImageDPO.prepare_model_inputs(
        module, config, noisy if latents is None else latents,
        noised_timesteps if timesteps is None else timesteps, *prompt, *negative, micro_batch or {}, 0,
    )  # fmt: skip


def test_prepare_model_inputs_errors_name_the_argument(rows):
    prompt, negative = collate(rows[0]), collate(rows[1])
    noisy, _, _, timesteps = noised_latents()
    with pytest.raises(ValueError, match="`prompt_embeds_mask` is required"):
        _prepare(dpo_config(), (prompt.embeds, None))
    with pytest.raises(ValueError, match=r"true_cfg_scale=4.0 > 1 .* \['negative_prompt_embeds', 'negative_prompt_"):
        _prepare(dpo_config(4.0), (prompt.embeds, prompt.mask))
    with pytest.raises(ValueError, match=r"needs \['negative_prompt_embeds_mask'\]"):
        _prepare(dpo_config(4.0), (prompt.embeds, prompt.mask), (negative.embeds, None))
    with pytest.raises(ValueError, match="`latents` must be the .* noised latents, got \\(2, 1, 16, 16\\)"):
        _prepare(dpo_config(), (prompt.embeds, prompt.mask), latents=noisy[:, None])
    with pytest.raises(ValueError, match=r"`timesteps` must have shape \(2,\).*got \(2, 4\)"):
        _prepare(dpo_config(), (prompt.embeds, prompt.mask), timesteps=timesteps[:, None].expand(2, 4))
    with pytest.raises(TypeError, match="`timesteps` must be a torch.Tensor, got float"):
        _prepare(dpo_config(), (prompt.embeds, prompt.mask), timesteps=500.0)
    with pytest.raises(ValueError, match="`prompt_embeds_mask` must have shape"):
        _prepare(dpo_config(), (prompt.embeds, prompt.mask[:, :-1]))
    with pytest.raises(ValueError, match="`negative_prompt_embeds` must have batch size 2"):
        _prepare(dpo_config(4.0), (prompt.embeds, prompt.mask), (negative.embeds[:1], negative.mask[:1]))
    with pytest.raises(ValueError, match="packs into 8x8=64 latent tokens, but latents have 16"):
        _prepare(dpo_config(), (prompt.embeds, prompt.mask), micro_batch={"height": 128, "width": 128})


def test_forward_with_cfg_needs_negative_inputs(models, rows):
    prompt = collate(rows[0])
    inputs, _ = _prepare(dpo_config(), (prompt.embeds, prompt.mask))
    with pytest.raises(ValueError, match="true_cfg_scale=4.0 > 1 needs `negative_model_inputs`"):
        QwenImageDPO.forward(models[0], dpo_config(4.0), inputs, None)
    with pytest.raises(ValueError, match="true_cfg_scale=4.0 > 1 needs `negative_model_inputs`"):
        QwenImageDPO.forward_and_sample_previous_step(models[0], None, dpo_config(4.0), inputs, None, None, 0)


def test_one_dpo_training_step(rows):
    """Noise a pair, predict with the trained and the reference model, take the loss and its gradient."""
    module, _ = make_pair(seed=0)
    ref_module, _ = make_pair(seed=5)
    noisy, clean, noise, timesteps = noised_latents()
    prompt = collate(rows[0], ROLLOUT_WIDTH)
    config = dpo_config()
    inputs, negative_inputs = QwenImageDPO.prepare_model_inputs(
        module, config, noisy, timesteps, prompt.embeds, prompt.mask, None, None, {}, 0
    )
    prediction = QwenImageDPO.forward(module, config, inputs, negative_inputs)
    with torch.no_grad():
        ref_prediction = QwenImageDPO.forward(ref_module, config, inputs, negative_inputs)
    loss, metrics = diffusion_dpo_loss(prediction, ref_prediction, noise - clean, beta=2500.0)
    target = noise - clean
    model_err = ((prediction.detach() - target) ** 2).flatten(1).mean(1)
    ref_err = ((ref_prediction - target) ** 2).flatten(1).mean(1)
    inside = -0.5 * 2500.0 * ((model_err[0] - model_err[1]) - (ref_err[0] - ref_err[1]))
    torch.testing.assert_close(loss.detach(), -torch.nn.functional.logsigmoid(inside), rtol=1e-6, atol=1e-6)
    assert set(metrics) == {"implicit_acc", "model_mse", "ref_mse", "model_diff", "ref_diff"}
    loss.backward()
    assert module.proj_out.weight.grad is not None and torch.isfinite(module.proj_out.weight.grad).all()


# -- the rollout ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(models) -> QwenImageDPOPipeline:
    """The DPO rollout pipeline around our tiny transformer (no text encoder, no VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler as Euler  # a stock scheduler, converted by the pipeline

    return QwenImageDPOPipeline(transformer=models[0], scheduler=Euler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG))


def _initial_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=torch.Generator().manual_seed(seed))


def _rollout(pipe, prompt, negative, true_cfg_scale=4.0, **kwargs):
    return pipe(
        prompt_embeds=prompt.embeds, prompt_embeds_mask=prompt.mask,
        negative_prompt_embeds=None if negative is None else negative.embeds,
        negative_prompt_embeds_mask=None if negative is None else negative.mask,
        true_cfg_scale=true_cfg_scale, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
        latents=_initial_noise(), generator=torch.Generator().manual_seed(1), output_type="latent", **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0], ids=["no_cfg", "cfg"])
def test_rollout_clean_latents_are_diffusers_pipeline_latents(models, pipe, rows, true_cfg_scale):
    """Same noise, same weights: our ODE rollout on over-wide prompts lands where diffusers' pipeline does."""
    _, reference = models
    tight_prompt, tight_negative = collate(rows[0]), collate(rows[1])
    diffusers_pipe = DiffusersQwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=None, text_encoder=None, tokenizer=None, transformer=reference,
    )  # fmt: skip
    expected = diffusers_pipe(
        prompt_embeds=tight_prompt.embeds, prompt_embeds_mask=tight_prompt.mask,
        negative_prompt_embeds=tight_negative.embeds, negative_prompt_embeds_mask=tight_negative.mask,
        true_cfg_scale=true_cfg_scale, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
        latents=_initial_noise(), output_type="latent",
    ).images  # fmt: skip
    negative = collate(rows[1], ROLLOUT_WIDTH) if true_cfg_scale > 1 else None
    out = _rollout(pipe, collate(rows[0], ROLLOUT_WIDTH), negative, true_cfg_scale)
    clean = out.rl[CLEAN_LATENTS_KEY]
    assert clean.dtype == torch.float32 and clean.shape == (2, IMAGE_TOKENS, TINY_CONFIG["in_channels"])
    torch.testing.assert_close(clean, expected, rtol=0, atol=TOL)
    assert torch.equal(clean, out.images)


def test_rollout_output_is_verl_omni_dpo_contract(pipe, rows):
    prompt, negative = collate(rows[0], ROLLOUT_WIDTH), collate(rows[1], ROLLOUT_WIDTH)
    out = _rollout(pipe, prompt, negative)
    assert set(out.rl) == {"latents_clean"}
    metadata = out.output["metadata"]
    assert torch.equal(metadata["rl"]["latents_clean"], out.rl["latents_clean"])
    assert torch.equal(out.output["payload"]["image"], out.images)
    embeddings = out.prompt_embeddings
    assert torch.equal(embeddings["prompt_embeds"], prompt.embeds) and torch.equal(embeddings["prompt_embeds_mask"],
                                                                                   prompt.mask)  # fmt: skip
    assert torch.equal(embeddings["negative_prompt_embeds_mask"], negative.mask)
    assert torch.equal(metadata["prompt_embeddings"]["negative_prompt_embeds"], negative.embeds)
    # Deterministic: no log-probs, and the recorded last step ends on the clean latents.
    assert out.all_log_probs is None and out.sde_window == (STEPS - 1, STEPS)
    assert out.all_latents.shape == (2, 2, IMAGE_TOKENS, TINY_CONFIG["in_channels"])
    assert torch.equal(out.all_latents[:, -1], out.rl["latents_clean"])
    assert torch.equal(out.all_timesteps[:, 0], pipe.scheduler.timesteps[-1].expand(2))
    again = pipe(
        prompt_embeds=prompt.embeds, prompt_embeds_mask=prompt.mask, negative_prompt_embeds=negative.embeds,
        negative_prompt_embeds_mask=negative.mask, true_cfg_scale=4.0, height=HEIGHT, width=WIDTH,
        num_inference_steps=STEPS, latents=_initial_noise(), generator=torch.Generator().manual_seed(99),
        output_type="latent",
    )  # fmt: skip
    assert torch.equal(again.rl["latents_clean"], out.rl["latents_clean"])


@pytest.mark.parametrize("option", ["noise_level", "sde_window_size", "sde_type", "logprobs", "sde_window_range"])
def test_rollout_refuses_sde_options(pipe, rows, option):
    value = {"noise_level": 0.7, "sde_window_size": 2, "sde_type": "cps", "logprobs": True,
             "sde_window_range": (0, 2)}[option]  # fmt: skip
    with pytest.raises(TypeError, match=rf"deterministic ODE .* takes no \['{option}'\]"):
        _rollout(pipe, collate(rows[0]), None, 1.0, **{option: value})


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0], ids=["no_cfg", "cfg"])
def test_trainer_reproduces_the_rollout_prediction(pipe, rows, monkeypatch, true_cfg_scale):
    """The rollout records the prompt embeddings at width 64; the trainer re-collates them to another
    right-padded width and, with ``prepare_model_inputs`` + ``forward``, predicts what the rollout did."""
    steps = []
    original = QwenImage.predict_noise.__func__

    def spy(cls, module, model_inputs, *args, **kwargs):
        prediction = original(cls, module, model_inputs, *args, **kwargs)
        steps.append((model_inputs["hidden_states"].clone(), prediction.clone()))
        return prediction

    monkeypatch.setattr(QwenImage, "predict_noise", classmethod(spy))
    negative = collate(rows[1], ROLLOUT_WIDTH) if true_cfg_scale > 1 else None
    out = _rollout(pipe, collate(rows[0], ROLLOUT_WIDTH), negative, true_cfg_scale)
    monkeypatch.undo()
    assert len(steps) == STEPS

    def recollate(embeds, mask):
        return collate([row[valid.bool()] for row, valid in zip(embeds, mask)], TRAINER_WIDTH, seed=7)

    embeddings = out.prompt_embeddings
    prompt = recollate(embeddings["prompt_embeds"], embeddings["prompt_embeds_mask"])
    trainer_negative = None
    if true_cfg_scale > 1:
        trainer_negative = recollate(embeddings["negative_prompt_embeds"], embeddings["negative_prompt_embeds_mask"])
    config = dpo_config(true_cfg_scale)
    timesteps = pipe.scheduler.timesteps
    deltas = []
    for index, (latents, rollout_prediction) in enumerate(steps):
        trainer_prediction = adapter_prediction(
            pipe.transformer, config, latents, timesteps[index].expand(2), prompt, trainer_negative
        )
        deltas.append(float((trainer_prediction - rollout_prediction).abs().max()))
    assert max(deltas) <= TOL, f"per-step max |Δ prediction| {deltas} > {TOL}"
    # The last Euler step from the recorded entry state gives the clean latents.
    last_latents, last_prediction = steps[-1]
    sigma = pipe.scheduler.sigmas[-2]
    torch.testing.assert_close(out.rl["latents_clean"], last_latents - sigma * last_prediction, rtol=0, atol=1e-6)
