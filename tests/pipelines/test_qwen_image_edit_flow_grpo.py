"""Qwen-Image-Edit-Plus FlowGRPO: the adapter and rollout against diffusers, and rollout/trainer agreement.

- the adapter's prediction is diffusers' ``QwenImageTransformer2DModel`` called as diffusers'
  ``QwenImageEditPlusPipeline`` calls it (target + condition latents concatenated, per-image
  ``img_shapes``, the output sliced to the target tokens), with and without true CFG;
- the rollout with noise level 0 is diffusers' Edit-Plus denoising loop (same noise, same condition);
- the trainer re-collates the prompt embeddings to another right-padded width and re-scores every
  recorded transition with ``utils.prepare_model_inputs`` + ``utils.forward_and_sample_previous_step``:
  every log-prob agrees to 1e-5;
- bad input raises a ``ValueError`` naming what is wrong.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift, retrieve_timesteps

from qwen_image_omni.pipelines import DiffusionModelBase, DiffusionModelConfig, VllmOmniPipelineBase, utils
from qwen_image_omni.pipelines.qwen_image_edit_flow_grpo import (
    QwenImageEditPlusFlowGRPO,
    QwenImageEditPlusPipelineWithLogProb,
)
from qwen_image_omni.pipelines.qwen_image import QWEN_IMAGE_SCHEDULER_CONFIG, PromptBatch, apply_true_cfg
from qwen_image_omni.pipelines.rollout_output import per_request_rollouts
from qwen_image_omni.pipelines.schedulers import FlowMatchSDEDiscreteScheduler

from tests.support.rl_tiny import HEIGHT, IMAGE_TOKENS, NEGATIVE_LENGTHS, PROMPT_LENGTHS, STEPS, WIDTH, collate, prompt_rows
from tests.support.tiny import TINY_CONFIG, make_pair

ARCH = "QwenImageEditPlusPipeline"
TOL = 1e-5
CHANNELS = TINY_CONFIG["in_channels"]
TARGET_SHAPE = (1, HEIGHT // 16, WIDTH // 16)  # 4 x 4 = IMAGE_TOKENS
CONDITION_SHAPES = [(1, 2, 3), (1, 3, 2)]  # two condition images, 6 tokens each
CONDITION_TOKENS = sum(f * h * w for f, h, w in CONDITION_SHAPES)
IMG_SHAPES = [TARGET_SHAPE, *CONDITION_SHAPES]
ROLLOUT_WIDTH = 64
BATCH = len(PROMPT_LENGTHS)


# -- set-up -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    """(ours, diffusers' reference): the same tiny random weights."""
    return make_pair(seed=0)


@pytest.fixture(scope="module")
def pipe(models):
    scheduler = FlowMatchSDEDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    return QwenImageEditPlusPipelineWithLogProb(transformer=models[0], scheduler=scheduler)


@pytest.fixture(scope="module")
def rows():
    return prompt_rows(PROMPT_LENGTHS, seed=1), prompt_rows(NEGATIVE_LENGTHS, seed=2)


def _condition(batch: int = BATCH, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, CONDITION_TOKENS, CHANNELS, generator=torch.Generator().manual_seed(seed))


def _noise(batch: int = BATCH, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, IMAGE_TOKENS, CHANNELS, generator=torch.Generator().manual_seed(seed))


def _config(sde_type: str = "sde", true_cfg_scale: float = 4.0, noise_level: float = 0.7) -> DiffusionModelConfig:
    return DiffusionModelConfig(
        architecture=ARCH,
        algorithm="flow_grpo",
        pipeline={"height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS, "true_cfg_scale": true_cfg_scale},
        algo={"noise_level": noise_level, "sde_type": sde_type},
    )


def _micro_batch(condition: torch.Tensor, img_shapes=None) -> dict:
    return {
        "height": HEIGHT,
        "width": WIDTH,
        "vae_scale_factor": 8,
        "condition_image_latents": condition,
        "img_shapes": [list(IMG_SHAPES)] * condition.shape[0] if img_shapes is None else img_shapes,
    }


def _rollout(pipe, rows, width, sde_type="sde", cfg=4.0, noise_level=0.7, seed=3, **kwargs):
    positive, negative = rows
    prompt, neg = collate(positive, width), collate(negative, width)
    arguments = dict(
        prompt_embeds=prompt.embeds,
        prompt_embeds_mask=prompt.mask,
        condition_image_latents=_condition(),
        img_shapes=IMG_SHAPES,
        true_cfg_scale=cfg,
        num_inference_steps=STEPS,
        noise_level=noise_level,
        sde_type=sde_type,
        sde_window_range=(0, STEPS),
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    )
    if cfg > 1:
        arguments.update(negative_prompt_embeds=neg.embeds, negative_prompt_embeds_mask=neg.mask)
    return pipe(**{**arguments, **kwargs})


def _rescore(module, config, out, prompt, negative) -> torch.Tensor:
    """The trainer: ``(B, W)`` log-probs of the rollout's transitions, through the registry helpers."""
    scheduler = utils.build_scheduler(config)
    micro_batch = {"height": HEIGHT, "width": WIDTH, "vae_scale_factor": 8, **out.rl}
    scheduler_inputs = {"all_latents": out.all_latents, "all_timesteps": out.all_timesteps}
    log_probs = []
    for step in range(out.all_timesteps.shape[1]):
        model_inputs, negative_inputs = utils.prepare_model_inputs(
            module,
            config,
            out.all_latents,
            out.all_timesteps,
            prompt.embeds,
            prompt.mask,
            None if negative is None else negative.embeds,
            None if negative is None else negative.mask,
            micro_batch,
            step,
        )
        with torch.no_grad():
            log_prob, _, _, _ = utils.forward_and_sample_previous_step(
                module, scheduler, config, model_inputs, negative_inputs, scheduler_inputs, step
            )
        log_probs.append(log_prob)
    return torch.stack(log_probs, dim=1)


# -- registry -----------------------------------------------------------------------------------------


def test_registered_for_edit_plus_flow_grpo():
    assert DiffusionModelBase.get_class(_config()) is QwenImageEditPlusFlowGRPO
    if importlib.util.find_spec("vllm_omni") is None:
        assert VllmOmniPipelineBase.get_class(ARCH, "flow_grpo") is QwenImageEditPlusPipelineWithLogProb


# -- the adapter against diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no_cfg", "cfg"])
def test_adapter_prediction_is_diffusers_edit_plus_call(models, rows, cfg):
    ours, reference = models
    prompt, negative = collate(rows[0], ROLLOUT_WIDTH), collate(rows[1], 16)
    generator = torch.Generator().manual_seed(11)
    all_latents = torch.randn(BATCH, 3, IMAGE_TOKENS, CHANNELS, generator=generator)
    all_timesteps = torch.tensor([[1000.0, 750.0], [1000.0, 750.0]])
    condition = _condition()
    config = _config(true_cfg_scale=cfg)
    model_inputs, negative_inputs = utils.prepare_model_inputs(
        ours, config, all_latents, all_timesteps, prompt.embeds, prompt.mask,
        negative.embeds if cfg > 1 else None, negative.mask if cfg > 1 else None, _micro_batch(condition), 1,
    )  # fmt: skip
    assert model_inputs["hidden_states"].shape == (BATCH, IMAGE_TOKENS + CONDITION_TOKENS, CHANNELS)
    assert model_inputs["img_shapes"] == [IMG_SHAPES] * BATCH
    assert not any("seq_len" in key and key != "_target_seq_len" for key in model_inputs)
    with torch.no_grad():
        prediction = QwenImageEditPlusFlowGRPO.predict_noise(ours, model_inputs, negative_inputs, cfg, config)

        # diffusers' QwenImageEditPlusPipeline, step i: latent_model_input = cat([latents, image_latents]).
        latent_model_input = torch.cat([all_latents[:, 1], condition], dim=1)
        timestep = all_timesteps[:, 1]

        def call(embeds, mask):
            return reference(
                hidden_states=latent_model_input,
                timestep=timestep / 1000,
                guidance=None,
                encoder_hidden_states_mask=mask,
                encoder_hidden_states=embeds,
                img_shapes=[IMG_SHAPES] * BATCH,
                return_dict=False,
            )[0][:, :IMAGE_TOKENS]

        expected = call(prompt.embeds, prompt.mask)
        if cfg > 1:
            neg = call(negative.embeds, negative.mask)
            comb = neg + cfg * (expected - neg)
            expected = comb * (torch.norm(expected, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    assert prediction.shape == (BATCH, IMAGE_TOKENS, CHANNELS)
    torch.testing.assert_close(prediction, expected, atol=TOL, rtol=0)


def test_inherited_forward_and_sample_previous_step_scores_target_latents(models, rows):
    """The inherited step works on target latents; the prediction is the target slice of the full output."""
    ours, _ = models
    prompt = collate(rows[0], ROLLOUT_WIDTH)
    all_latents = torch.randn(BATCH, 2, IMAGE_TOKENS, CHANNELS, generator=torch.Generator().manual_seed(2))
    config = _config(true_cfg_scale=1.0)
    scheduler = QwenImageEditPlusFlowGRPO.build_scheduler(config)
    all_timesteps = scheduler.timesteps[1:2].expand(BATCH, 1).float()
    inputs, _ = utils.prepare_model_inputs(
        ours, config, all_latents, all_timesteps, prompt.embeds, prompt.mask, None, None, _micro_batch(_condition()), 0
    )
    with torch.no_grad():
        log_prob, mean, std, sqrt_dt = utils.forward_and_sample_previous_step(
            ours, scheduler, config, inputs, None, {"all_latents": all_latents, "all_timesteps": all_timesteps}, 0
        )
        full = ours(**{k: v for k, v in inputs.items() if k != "_target_seq_len"})[0]
        _, expected_log_prob, expected_mean, _, _ = scheduler.sample_previous_step(
            sample=all_latents[:, 0], model_output=full[:, :IMAGE_TOKENS], timestep=all_timesteps[:, 0],
            noise_level=0.7, prev_sample=all_latents[:, 1], sde_type="sde", return_sqrt_dt=True,
        )  # fmt: skip
    assert log_prob.shape == (BATCH,) and mean.shape == all_latents[:, 0].shape
    torch.testing.assert_close(log_prob, expected_log_prob, atol=0, rtol=0)
    torch.testing.assert_close(mean, expected_mean, atol=0, rtol=0)
    assert torch.isfinite(std).all() and torch.isfinite(torch.as_tensor(sqrt_dt)).all()


# -- the rollout against diffusers' Edit-Plus loop ------------------------------------------------------


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no_cfg", "cfg"])
def test_rollout_with_noise_level_0_is_diffusers_edit_plus_loop(models, pipe, rows, cfg):
    _, reference = models
    noise, condition = _noise(), _condition()
    out = _rollout(pipe, rows, ROLLOUT_WIDTH, cfg=cfg, noise_level=0.0, latents=noise, logprobs=False)

    # diffusers' QwenImageEditPlusPipeline.__call__ from step 4 on, with its Euler scheduler.
    prompt, negative = collate(rows[0], ROLLOUT_WIDTH), collate(rows[1], ROLLOUT_WIDTH)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    sigmas = np.linspace(1.0, 1 / STEPS, STEPS)
    mu = calculate_shift(
        IMAGE_TOKENS,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, STEPS, "cpu", sigmas=sigmas, mu=mu)
    torch.testing.assert_close(pipe.scheduler.timesteps, timesteps)
    scheduler.set_begin_index(0)
    latents, states = noise.clone(), [noise.clone()]
    with torch.no_grad():
        for t in timesteps:
            latent_model_input = torch.cat([latents, condition], dim=1)
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            common = dict(hidden_states=latent_model_input, timestep=timestep / 1000, guidance=None, return_dict=False)
            common["img_shapes"] = [IMG_SHAPES] * BATCH
            noise_pred = reference(
                encoder_hidden_states_mask=prompt.mask, encoder_hidden_states=prompt.embeds, **common
            )[0][:, : latents.size(1)]
            if cfg > 1:
                neg_noise_pred = reference(
                    encoder_hidden_states_mask=negative.mask, encoder_hidden_states=negative.embeds, **common
                )[0][:, : latents.size(1)]
                noise_pred = apply_true_cfg(noise_pred, neg_noise_pred, cfg)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            states.append(latents)
    assert out.sde_window == (0, STEPS - 1)
    torch.testing.assert_close(out.images, latents, atol=TOL, rtol=0)
    torch.testing.assert_close(out.all_latents, torch.stack(states[:STEPS], dim=1), atol=TOL, rtol=0)


# -- rollout / trainer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer_width", [512, None], ids=["trainer512", "trainer_unpadded"])
@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("sde_type", ["sde", "cps", "dance_sde"])
def test_trainer_recomputes_edit_rollout_log_probs(pipe, rows, sde_type, cfg, trainer_width):
    out = _rollout(pipe, rows, ROLLOUT_WIDTH, sde_type=sde_type, cfg=cfg)
    assert out.all_latents.shape == (BATCH, STEPS, IMAGE_TOKENS, CHANNELS)
    assert out.all_log_probs.shape == (BATCH, STEPS - 1) and torch.isfinite(out.all_log_probs).all()
    assert set(out.rl) == {"condition_image_latents", "img_shapes"}
    assert out.rl["img_shapes"] == [IMG_SHAPES] * BATCH
    torch.testing.assert_close(out.rl["condition_image_latents"], _condition(), atol=0, rtol=0)
    prompt = collate(rows[0], trainer_width)
    negative = collate(rows[1], trainer_width) if cfg > 1 else None
    trainer = _rescore(pipe.transformer, _config(sde_type, cfg), out, prompt, negative)
    delta = (out.all_log_probs - trainer).abs().amax(dim=0)
    assert (delta <= TOL).all(), f"per-step max |Δ log-prob| {delta.tolist()} > {TOL}"


def test_rollout_goes_through_the_trainer_dispatch(pipe, rows, monkeypatch):
    """Every rollout step builds its inputs with the trainer's input path, utils.adapter_model_inputs
    (the adapter's prepare_model_inputs, then the condition injected)."""
    from qwen_image_omni.pipelines.qwen_image import rollout as shared_loop

    calls = []
    original = utils.adapter_model_inputs

    def spy(adapter, module, model_config, *args):
        result = original(adapter, module, model_config, *args)
        assert adapter is QwenImageEditPlusFlowGRPO
        calls.append((model_config.architecture, result))
        return result

    monkeypatch.setattr(shared_loop, "adapter_model_inputs", spy)
    _rollout(pipe, rows, ROLLOUT_WIDTH)
    assert len(calls) == STEPS
    for architecture, (inputs, negative_inputs) in calls:
        assert architecture == ARCH
        for each in (inputs, negative_inputs):
            assert each["hidden_states"].shape[1] == IMAGE_TOKENS + CONDITION_TOKENS
            assert each["_target_seq_len"] == IMAGE_TOKENS and each["img_shapes"] == [IMG_SHAPES] * BATCH


def test_rollout_repeats_prompts_and_condition_per_image_and_splits_per_request(pipe, rows):
    prompt = collate(rows[0][:1], ROLLOUT_WIDTH)
    out = pipe(
        prompt_embeds=prompt.embeds,
        prompt_embeds_mask=prompt.mask,
        condition_image_latents=_condition(1),
        img_shapes=[IMG_SHAPES],
        num_images_per_prompt=2,
        true_cfg_scale=1.0,
        num_inference_steps=STEPS,
        sde_window_size=2,
        sde_window_range=(0, STEPS),
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    assert out.all_latents.shape == (2, 3, IMAGE_TOKENS, CHANNELS)
    assert out.rl["condition_image_latents"].shape == (2, CONDITION_TOKENS, CHANNELS)
    requests = per_request_rollouts(
        media=out.images, trajectory_latents=out.all_latents, trajectory_log_probs=out.all_log_probs,
        trajectory_timesteps=out.all_timesteps, prompt_embeddings=out.prompt_embeddings, rl=out.rl,
        num_requests=2, rows_per_request=1,
    )  # fmt: skip
    rl = requests[1]["output"]["metadata"]["rl"]
    assert rl["img_shapes"] == [IMG_SHAPES] and rl["condition_image_latents"].shape == (1, CONDITION_TOKENS, CHANNELS)


# -- hooks and bad input --------------------------------------------------------------------------------


def test_prepare_processor_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="processor"):
        QwenImageEditPlusFlowGRPO.prepare_processor_files(str(tmp_path))
    (tmp_path / "processor").mkdir()
    assert QwenImageEditPlusFlowGRPO.prepare_processor_files(str(tmp_path)) == str(tmp_path / "processor")
    assert json.loads((tmp_path / "processor" / "config.json").read_text()) == {"model_type": "qwen2_vl"}
    (tmp_path / "processor" / "config.json").write_text('{"model_type": "custom"}')
    QwenImageEditPlusFlowGRPO.prepare_processor_files(str(tmp_path))
    assert json.loads((tmp_path / "processor" / "config.json").read_text()) == {"model_type": "custom"}


def test_inject_condition_sets_img_shapes_on_both_inputs():
    inputs = {"hidden_states": torch.zeros(1, 2, 4), "img_shapes": [[(1, 1, 2)]]}
    negative = {"hidden_states": torch.zeros(1, 2, 4), "img_shapes": [[(1, 1, 2)]]}
    shapes = [[(1, 1, 2), (1, 1, 3)]]
    inputs, negative = QwenImageEditPlusFlowGRPO.inject_condition(
        inputs, negative, {"image_latents": torch.ones(1, 3, 4), "img_shapes": shapes}
    )
    for each in (inputs, negative):
        assert each["img_shapes"] == shapes and each["hidden_states"].shape == (1, 5, 4)
        assert each["_target_seq_len"] == 2
    assert QwenImageEditPlusFlowGRPO.inject_condition(inputs, None, None) == (inputs, None)


def _inputs(models, rows, micro_batch):
    prompt = collate(rows[0], ROLLOUT_WIDTH)
    latents = torch.zeros(BATCH, 2, IMAGE_TOKENS, CHANNELS)
    return utils.prepare_model_inputs(
        models[0], _config(), latents, torch.full((BATCH, 1), 900.0), prompt.embeds, prompt.mask, None, None,
        micro_batch, 0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "micro_batch, match",
    [
        ({"height": HEIGHT, "width": WIDTH, "image_latents": torch.zeros(BATCH, 12, CHANNELS)}, "wrong key"),
        ({"height": HEIGHT, "width": WIDTH}, "found no condition"),
        (_micro_batch(_condition(1)), "batch and channels"),
        (_micro_batch(torch.zeros(BATCH, CONDITION_TOKENS, 8)), "batch and channels"),
        (_micro_batch(torch.zeros(BATCH, 2, CONDITION_TOKENS, CHANNELS)), r"\(batch, tokens, channels\)"),
        ({**_micro_batch(_condition()), "img_shapes": None}, "needs 'img_shapes'"),
        (_micro_batch(_condition(), [IMG_SHAPES]), "one .* per sample"),
        (_micro_batch(_condition(), [[TARGET_SHAPE, (1, 2, 2)]] * BATCH), "condition tokens"),
        (_micro_batch(_condition(), [[(1, 2, 2), *CONDITION_SHAPES]] * BATCH), "target"),
        (_micro_batch(_condition(), [[TARGET_SHAPE]] * BATCH), "at least 2 shapes"),
        ({**_micro_batch(_condition()), "sp_size": 5}, "sequence-parallel"),
        (_micro_batch(_condition(), [[TARGET_SHAPE, (2, 6)]] * BATCH), "positive ints"),
    ],
    ids=[
        "image_latents_key", "no_condition", "batch", "channels", "ndim", "no_img_shapes", "img_shapes_batch",
        "condition_tokens", "target_tokens", "no_condition_shape", "sp_size", "shape_not_a_triple",
    ],
)  # fmt: skip
def test_bad_condition_raises(models, rows, micro_batch, match):
    with pytest.raises(ValueError, match=match):
        _inputs(models, rows, micro_batch)


def test_sp_size_that_divides_is_accepted(models, rows):
    inputs, _ = _inputs(models, rows, {**_micro_batch(_condition()), "sp_size": 2})
    assert inputs["hidden_states"].shape[1] == IMAGE_TOKENS + CONDITION_TOKENS


@pytest.mark.parametrize(
    "change, match",
    [
        ({"condition_image_latents": None}, "`condition_image_latents` is required"),
        ({"condition_image_latents": torch.zeros(BATCH, CONDITION_TOKENS, 8)}, "in_channels=16"),
        ({"condition_image_latents": torch.zeros(3, CONDITION_TOKENS, CHANNELS)}, "one row per prompt"),
        ({"condition_image_latents": torch.zeros(CONDITION_TOKENS, CHANNELS)}, "packed"),
        ({"img_shapes": None}, "`img_shapes` is required"),
        ({"img_shapes": [IMG_SHAPES] * 3}, "one per prompt"),
        ({"img_shapes": [TARGET_SHAPE, (1, 1, 1)]}, "condition tokens"),
        ({"img_shapes": [(1, 2, 8), *CONDITION_SHAPES], "height": HEIGHT}, "`height`=64 does not match"),
        ({"height": 32}, "`height`=32 does not match"),
        ({"prompt_embeds": None}, "`prompt_embeds` is required"),
    ],
    ids=[
        "no_condition", "channels", "batch", "ndim", "no_img_shapes", "img_shapes_batch", "img_shapes_tokens",
        "target_vs_height", "height", "no_prompt",
    ],
)  # fmt: skip
def test_pipeline_bad_input_raises(pipe, rows, change, match):
    with pytest.raises(ValueError, match=match):
        _rollout(pipe, rows, ROLLOUT_WIDTH, **change)


def test_the_loop_needs_a_condition(pipe, rows):
    """The shared loop entered without the Edit condition: the trainer's input path says what is missing."""
    prompt = collate(rows[0], ROLLOUT_WIDTH)
    with pytest.raises(ValueError, match="found no condition"):
        pipe.rollout(PromptBatch(prompt.embeds, prompt.mask), height=HEIGHT, width=HEIGHT, num_inference_steps=STEPS)
