"""Units of the Qwen-Image FlowGRPO adapter and rollout pipeline.

The end-to-end rollout/trainer agreement is tested in test_rollout_trainer.py.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from torch import nn

from qwen_image_omni.pipelines import DiffusionModelBase, VllmOmniPipelineBase
from qwen_image_omni.pipelines.qwen_image_flow_grpo import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    QwenImage,
    QwenImagePipelineWithLogProb,
    apply_true_cfg,
    build_img_shapes,
    check_sde_window,
    full_sde_window,
    sample_sde_window,
    set_qwen_image_timesteps,
)
from qwen_image_omni.pipelines.qwen_image import PromptBatch
from qwen_image_omni.pipelines.schedulers import FlowMatchSDEDiscreteScheduler

from tests.support.rl_tiny import (
    HEIGHT,
    IMAGE_TOKENS,
    NEGATIVE_LENGTHS,
    PROMPT_LENGTHS,
    STEPS,
    WIDTH,
    collate,
    make_pipeline,
    model_config,
    prompt_rows,
)
from tests.support.tiny import TINY_CONFIG

# -- helpers ------------------------------------------------------------------------------------------


def test_apply_true_cfg_is_diffusers_formula():
    generator = torch.Generator().manual_seed(0)
    cond, neg = torch.randn(2, 16, 8, generator=generator), torch.randn(2, 16, 8, generator=generator)
    comb = neg + 4.0 * (cond - neg)
    expected = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    assert torch.equal(apply_true_cfg(cond, neg, 4.0), expected)
    assert torch.allclose(apply_true_cfg(cond, neg, 4.0).norm(dim=-1), cond.norm(dim=-1))
    with pytest.raises(ValueError, match="negative_noise_pred"):
        apply_true_cfg(cond, neg[:, :3], 4.0)


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("image_seq_len", [16, 4096])
def test_timesteps_match_diffusers_qwen_image_pipeline(steps, image_seq_len):
    ours = FlowMatchSDEDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    timesteps = set_qwen_image_timesteps(ours, steps, image_seq_len, "cpu")
    reference = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    mu = calculate_shift(image_seq_len, 256, 8192, 0.5, 0.9)
    expected, _ = retrieve_timesteps(reference, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(timesteps, expected)
    assert torch.equal(ours.sigmas, reference.sigmas)


def test_build_scheduler_default_and_from_local_path(tmp_path):
    config = model_config("sde", 1.0)
    scheduler = QwenImage.build_scheduler(config)
    assert isinstance(scheduler, FlowMatchSDEDiscreteScheduler)
    assert scheduler.config.max_image_seq_len == 8192 and scheduler.config.shift_terminal == 0.02
    assert len(scheduler.timesteps) == STEPS

    FlowMatchSDEDiscreteScheduler.from_config({**QWEN_IMAGE_SCHEDULER_CONFIG, "max_shift": 1.5}).save_pretrained(
        tmp_path / "scheduler"
    )
    config.local_path = str(tmp_path)
    loaded = QwenImage.build_scheduler(config)
    assert loaded.config.max_shift == 1.5
    assert not torch.equal(loaded.timesteps, scheduler.timesteps)


def test_sde_windows():
    assert full_sde_window(4) == (0, 3)
    assert full_sde_window(1) == (0, 1)
    generator = torch.Generator().manual_seed(0)
    windows = {sample_sde_window(2, (1, 6), 10, generator) for _ in range(200)}
    assert windows == {(1, 3), (2, 4), (3, 5), (4, 6)}
    with pytest.raises(ValueError, match="sde_window_range"):
        sample_sde_window(3, (0, 2), 10)
    with pytest.raises(ValueError, match="sde_window"):
        check_sde_window((2, 5), 4)
    with pytest.raises(ValueError, match="sde_window_size"):
        sample_sde_window(0, (0, 2), 10)


def test_a_window_range_past_the_steps_fails_on_every_draw():
    # (0, 5) with 4 steps: some draws used to fit and others to fail; now none is drawn.
    message = r"^`sde_window_range` \(0, 5\) ends past the trajectory's num_inference_steps=4; pass a range with high <= 4$"
    for seed in range(20):
        with pytest.raises(ValueError, match=message):
            sample_sde_window(2, (0, 5), 4, torch.Generator().manual_seed(seed))
    assert sample_sde_window(2, (2, 4), 4) == (2, 4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sample_sde_window(2, (0.5, 4), 4), "^`sde_window_range\\[0\\]` must be an int, got float 0.5$"),
        (lambda: sample_sde_window(2.0, (0, 4), 4), "^`sde_window_size` must be an int, got float 2.0$"),
        (lambda: sample_sde_window(2, (0, 4), 4.0), "^`num_steps` must be an int, got float 4.0$"),
        (lambda: check_sde_window((0, 2.5), 4), "^`sde_window\\[1\\]` must be an int, got float 2.5$"),
    ],
)
def test_window_bounds_must_be_ints_not_floored(call, message):
    with pytest.raises(TypeError, match=message):
        call()


@pytest.mark.parametrize(
    ("height", "width", "error", "message"),
    [
        (72, 64, ValueError, r"^`height` must be a multiple of 16 \(VAE scale factor 8 x 2x2 latent patches\), "
                             "got 72; try 64 or 80$"),
        (64, 8, ValueError, r"^`width` must be a multiple of 16 .*, got 8; try 16$"),
        (0, 64, ValueError, "^`height` must be >= 1, got 0$"),
        (64.0, 64, TypeError, "^`height` must be an int, got float 64.0$"),
    ],
)  # fmt: skip
def test_image_sizes_must_be_multiples_of_16(height, width, error, message):
    with pytest.raises(error, match=message):
        build_img_shapes(height, width, 1)


def test_image_size_multiple_follows_the_vae_scale_factor():
    assert build_img_shapes(96, 64, 2, vae_scale_factor=4) == [[(1, 12, 8)]] * 2
    with pytest.raises(ValueError, match=r"^`height` must be a multiple of 8 \(VAE scale factor 4 x"):
        build_img_shapes(100, 64, 1, vae_scale_factor=4)


# -- trainer-side adapter --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe() -> QwenImagePipelineWithLogProb:
    return make_pipeline()


def _trajectory(batch=2, states=3):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, states, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=generator)
    return latents, torch.tensor([[1000.0, 743.1313]] * batch)


@pytest.mark.skipif(
    importlib.util.find_spec("vllm_omni") is not None,
    reason="with vllm-omni installed the vllm-omni pipeline is registered (tests/integrations/vllm_omni/test_pipelines.py)",
)
def test_diffusers_rollout_registered_for_flow_grpo_without_vllm_omni():
    assert DiffusionModelBase.get_class(model_config("sde", 1.0)) is QwenImage
    assert VllmOmniPipelineBase.get_class("QwenImagePipeline", "flow_grpo") is QwenImagePipelineWithLogProb
    assert VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "flow_grpo") == (
        "qwen_image_omni.pipelines.qwen_image_flow_grpo.diffusers_rollout_pipeline.QwenImagePipelineWithLogProb"
    )


def test_prepare_model_inputs_slices_the_step_and_passes_no_length(pipe):
    latents, timesteps = _trajectory()
    prompt = collate(prompt_rows(PROMPT_LENGTHS, 1), 512)
    negative = collate(prompt_rows(NEGATIVE_LENGTHS, 2), 8)
    inputs, negative_inputs = QwenImage.prepare_model_inputs(
        pipe.transformer, model_config("sde", 4.0), latents, timesteps, prompt.embeds, prompt.mask,
        negative.embeds, negative.mask, {"height": HEIGHT, "width": WIDTH}, 1,
    )  # fmt: skip
    assert torch.equal(inputs["hidden_states"], latents[:, 1])
    assert torch.equal(inputs["timestep"], timesteps[:, 1] / 1000)
    assert inputs["img_shapes"] == [[(1, 4, 4)]] * 2 == build_img_shapes(HEIGHT, WIDTH, 2)
    assert inputs["encoder_hidden_states"].shape[1] == 512 and negative_inputs["encoder_hidden_states"].shape[1] == 8
    assert torch.equal(negative_inputs["encoder_hidden_states_mask"], negative.mask)
    assert inputs["guidance"] is None and inputs["return_dict"] is False
    assert not any("seq_len" in key for key in (*inputs, *negative_inputs))

    # Already-selected latents / timesteps (forward-process objectives) are used as they are.
    selected, _ = QwenImage.prepare_model_inputs(
        pipe.transformer, model_config("sde", 1.0), latents[:, 2], timesteps[:, 0], prompt.embeds, None, None, None,
        {"height": torch.tensor([HEIGHT, HEIGHT]), "width": np.int64(WIDTH)}, 0,
    )
    assert torch.equal(selected["hidden_states"], latents[:, 2]) and selected["encoder_hidden_states_mask"] is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"latents": torch.zeros(2, 16)}, "latents"),
        ({"step": 3}, "step"),
        ({"prompt_embeds_mask": torch.ones(2, 5)}, "prompt_embeds_mask"),
        ({"prompt_embeds": torch.zeros(2, 5)}, "prompt_embeds"),
        ({"micro_batch": {"height": 128, "width": 64}}, "latent tokens"),
        ({"micro_batch": {"height": -8, "width": 64}}, "height"),
        ({"micro_batch": {"height": torch.tensor([64, 128]), "width": 64}}, "one value"),
        ({"micro_batch": {"height": 72, "width": 64}}, "^`height` must be a multiple of 16 .*, got 72; try 64 or 80$"),
        ({"micro_batch": {"height": 0, "width": 64}}, "^`height` must be >= 1, got 0$"),
        ({"step": -1}, "^`step` must be >= 0, got -1$"),
    ],
)
def test_prepare_model_inputs_errors_name_the_argument(pipe, change, match):
    latents, timesteps = _trajectory()
    prompt = collate(prompt_rows(PROMPT_LENGTHS, 1), 40)
    args = {
        "module": pipe.transformer,
        "model_config": model_config("sde", 1.0),
        "latents": latents,
        "timesteps": timesteps,
        "prompt_embeds": prompt.embeds,
        "prompt_embeds_mask": prompt.mask,
        "negative_prompt_embeds": None,
        "negative_prompt_embeds_mask": None,
        "micro_batch": {},
        "step": 0,
    }
    with pytest.raises(ValueError, match=match):
        QwenImage.prepare_model_inputs(**{**args, **change})


@pytest.mark.parametrize(("step", "message"), [(1.0, "got float 1.0"), (True, "got bool True"),
                                             (torch.tensor(1.0), "got Tensor tensor\\(1\\.\\)"),
                                             (torch.tensor([1]), "got Tensor tensor\\(\\[1\\]\\)"),
                                             (torch.tensor(True), "got Tensor tensor\\(True\\)")])
def test_step_must_be_an_int(pipe, step, message):
    latents, timesteps = _trajectory()
    prompt = collate(prompt_rows(PROMPT_LENGTHS, 1))
    config = model_config("sde", 1.0)
    with pytest.raises(TypeError, match=f"^`step` must be an int, {message}$"):
        QwenImage.prepare_model_inputs(pipe.transformer, config, latents, timesteps, prompt.embeds, prompt.mask,
                                       None, None, {}, step)  # fmt: skip
    for integer in (np.int64(1), torch.tensor(1)):  # what indexing a step array or tensor gives
        inputs, _ = QwenImage.prepare_model_inputs(
            pipe.transformer, config, latents, timesteps, prompt.embeds, prompt.mask, None, None, {}, integer
        )
        assert torch.equal(inputs["hidden_states"], latents[:, 1])
    scheduler = QwenImage.build_scheduler(config)
    with pytest.raises(TypeError, match=f"^`step` must be an int, {message}$"):
        QwenImage.forward_and_sample_previous_step(
            pipe.transformer, scheduler, config, inputs, None, {"all_latents": latents, "all_timesteps": timesteps}, step
        )


def test_forward_and_sample_previous_step_errors(pipe):
    latents, timesteps = _trajectory()
    prompt = collate(prompt_rows(PROMPT_LENGTHS, 1))
    scheduler = QwenImage.build_scheduler(model_config("sde", 4.0))
    inputs, _ = QwenImage.prepare_model_inputs(
        pipe.transformer, model_config("sde", 4.0), latents, timesteps, prompt.embeds, prompt.mask, None, None, {}, 0
    )
    trajectory = {"all_latents": latents, "all_timesteps": timesteps}
    with pytest.raises(ValueError, match="negative_model_inputs"):
        QwenImage.forward_and_sample_previous_step(
            pipe.transformer, scheduler, model_config("sde", 4.0), inputs, None, trajectory, 0
        )
    with pytest.raises(ValueError, match="all_timesteps"):
        QwenImage.forward_and_sample_previous_step(
            pipe.transformer, scheduler, model_config("sde", 1.0), inputs, None, {"all_latents": latents}, 0
        )
    with pytest.raises(ValueError, match="step"):
        QwenImage.forward_and_sample_previous_step(
            pipe.transformer, scheduler, model_config("sde", 1.0), inputs, None, trajectory, 2
        )
    with torch.no_grad():
        log_prob, mean, std, sqrt_dt = QwenImage.forward_and_sample_previous_step(
            pipe.transformer, scheduler, model_config("sde", 1.0), inputs, None, trajectory, 1
        )
    assert log_prob.shape == sqrt_dt.shape == (2,) and mean.shape == latents[:, 0].shape and std.shape == (2, 1, 1)


# -- rollout pipeline ----------------------------------------------------------------------------------


def _embeds_kwargs(cfg: bool = True) -> dict:
    prompt = collate(prompt_rows(PROMPT_LENGTHS, 1), 64)
    kwargs = {"prompt_embeds": prompt.embeds, "prompt_embeds_mask": prompt.mask}
    if cfg:
        negative = collate(prompt_rows(NEGATIVE_LENGTHS, 2), 64)
        kwargs.update(negative_prompt_embeds=negative.embeds, negative_prompt_embeds_mask=negative.mask)
    return kwargs


def _run(pipe, **kwargs):
    defaults = {
        "height": HEIGHT,
        "width": WIDTH,
        "num_inference_steps": STEPS,
        "true_cfg_scale": 4.0,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "latent",
        "sde_window_range": (0, STEPS),
    }
    return pipe(**{**defaults, **kwargs})


def test_steps_outside_the_window_are_euler(pipe):
    noise = torch.randn(2, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=torch.Generator().manual_seed(0))
    window = {"sde_window_size": 1, "sde_window_range": (1, 2), "noise_level": 0.9}
    out = _run(pipe, **_embeds_kwargs(cfg=False), latents=noise, **window)
    assert out.sde_window == (1, 2)
    # Re-run step 0 by hand: the window's entry state is one deterministic Euler step from the noise.
    timesteps = pipe.scheduler.timesteps
    inputs, _ = QwenImage.prepare_model_inputs(
        pipe.transformer, model_config("sde", 1.0), noise, timesteps[:1].expand(2), out.prompt_embeds,
        out.prompt_embeds_mask, None, None, {}, 0,
    )  # fmt: skip
    with torch.no_grad():
        velocity = QwenImage.predict_noise(pipe.transformer, inputs, None, 1.0)
    sigmas = pipe.scheduler.sigmas
    assert torch.allclose(out.all_latents[:, 0], noise + (sigmas[1] - sigmas[0]) * velocity, atol=1e-6)
    assert torch.isfinite(out.all_log_probs).all()


def test_same_generator_same_rollout(pipe):
    first = _run(pipe, **_embeds_kwargs(), sde_window_size=2)
    second = _run(pipe, **_embeds_kwargs(), sde_window_size=2)
    assert first.sde_window == second.sde_window
    assert torch.equal(first.all_latents, second.all_latents) and torch.equal(first.all_log_probs, second.all_log_probs)


def test_cfg_off_without_negative_and_logprobs_off(pipe):
    out = _run(pipe, **_embeds_kwargs(cfg=False), logprobs=False, num_images_per_prompt=2)
    assert out.all_log_probs is None and out.negative_prompt_embeds is None
    assert out.prompt_embeds.shape[0] == out.all_latents.shape[0] == 4
    assert out.all_latents.shape[1] == STEPS  # full window: every step but the last, plus its entry state


class StubTextEncoder(nn.Module):
    """Stands in for Qwen2.5-VL: returns embeddings of the ids as the last hidden state."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, TINY_CONFIG["joint_attention_dim"])

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        return SimpleNamespace(hidden_states=(self.embed(input_ids),))


def test_token_ids_match_precomputed_embeddings(pipe):
    torch.manual_seed(0)
    text_pipe = QwenImagePipelineWithLogProb(
        transformer=pipe.transformer, scheduler=pipe.scheduler, text_encoder=StubTextEncoder()
    )
    drop = text_pipe.prompt_template_encode_start_idx
    ids = torch.randint(0, 100, (2, drop + 12))
    mask = torch.ones_like(ids)
    mask[1, drop + 7 :] = 0  # the second prompt has 7 tokens after the template prefix
    negative_ids = torch.randint(0, 100, (drop + 3,))
    out = _run(text_pipe, prompt_token_ids=ids, prompt_mask=mask, negative_prompt_ids=negative_ids, sde_window_size=2)
    assert out.prompt_embeds.shape == (2, 12, TINY_CONFIG["joint_attention_dim"])
    assert out.prompt_embeds_mask.sum(dim=1).tolist() == [12, 7]
    assert out.negative_prompt_embeds.shape[1] == 3
    with torch.no_grad():
        assert torch.equal(out.prompt_embeds[0], text_pipe.text_encoder.embed(ids[0, drop:]))
    again = _run(
        text_pipe,
        prompt_embeds=out.prompt_embeds,
        prompt_embeds_mask=out.prompt_embeds_mask,
        negative_prompt_embeds=out.negative_prompt_embeds[:1],
        negative_prompt_embeds_mask=out.negative_prompt_embeds_mask[:1],
        sde_window_size=2,
    )
    assert torch.equal(again.all_log_probs, out.all_log_probs)


def test_decoded_outputs_with_a_tiny_vae(pipe):
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4, latents_std=[1.0] * 4
    ).eval()
    vae_pipe = QwenImagePipelineWithLogProb(transformer=pipe.transformer, scheduler=pipe.scheduler, vae=vae)
    images = _run(vae_pipe, **_embeds_kwargs(), output_type="pt").images
    assert images.shape == (2, 3, HEIGHT, WIDTH) and 0 <= images.min() and images.max() <= 1
    pil = _run(vae_pipe, **_embeds_kwargs(), output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (WIDTH, HEIGHT)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"output_type": "np"}, ValueError, "output_type"),
        ({"output_type": "pil"}, ValueError, "vae"),
        ({"sde_type": "ode"}, ValueError, "sde_type"),
        ({"sde_window_size": 3, "sde_window_range": (0, 2)}, ValueError, "sde_window_range"),
        ({"latents": torch.zeros(2, 8, 16)}, ValueError, "latents"),
        ({"prompt_embeds": None}, ValueError, "prompt"),
        ({"prompt_token_ids": torch.ones(2, 40, dtype=torch.long), "prompt_embeds": None}, ValueError, "text_encoder"),
        ({"prompt_embeds_mask": torch.ones(2, 3)}, ValueError, "prompt_embeds_mask"),
        ({"height": 72}, ValueError, "^`height` must be a multiple of 16 .*, got 72; try 64 or 80$"),
        ({"width": 0}, ValueError, "^`width` must be >= 1, got 0$"),
        ({"true_cfg_scale": float("nan")}, ValueError, "^`true_cfg_scale` must be a finite number >= 0.0, got nan$"),
        ({"true_cfg_scale": "4"}, TypeError, "^`true_cfg_scale` must be a number, got str '4'$"),
        ({"guidance_scale": float("inf")}, ValueError, "^`guidance_scale` must be a finite number >= 0.0, got inf$"),
        ({"noise_level": float("nan")}, ValueError, "^`noise_level` must be a finite number >= 0.0, got nan$"),
        ({"noise_level": -1.0}, ValueError, "^`noise_level` must be a finite number >= 0.0, got -1.0$"),
        ({"noise_level": 1.5, "sde_type": "cps"}, ValueError, "^`noise_level` must be <= 1 for sde_type='cps'"),
        ({"num_inference_steps": 0}, ValueError, "^`num_inference_steps` must be >= 1, got 0$"),
        ({"num_inference_steps": 4.0}, TypeError, "^`num_inference_steps` must be an int, got float 4.0$"),
        ({"sde_window_size": 2, "sde_window_range": (0, 5)}, ValueError,
         r"^`sde_window_range` \(0, 5\) ends past the trajectory's num_inference_steps=4"),
        ({"generator": [torch.Generator()] * 3, "latents": torch.zeros(2, 16, 16)}, ValueError,
         r"^`generator` must be a single torch.Generator or a list of one per sample \(2\), got a list of 3$"),
        ({"generator": [], "latents": torch.zeros(2, 16, 16)}, ValueError, "got a list of 0$"),
        ({"max_sequence_length": 0}, ValueError, "^`max_sequence_length` must be >= 1, got 0$"),
    ],
)  # fmt: skip
def test_forward_errors_name_the_argument(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        _run(pipe, **{**_embeds_kwargs(), **kwargs})


def test_rollout_repeats_a_single_negative_prompt_without_a_mask(pipe):
    negative = collate(prompt_rows(NEGATIVE_LENGTHS[:1], 2))
    kwargs = {**_embeds_kwargs(cfg=False), "negative_prompt_embeds": negative.embeds, "sde_window_size": 1}
    with_mask = _run(pipe, **kwargs, negative_prompt_embeds_mask=torch.ones(1, negative.embeds.shape[1]))
    without = pipe.rollout(
        PromptBatch(with_mask.prompt_embeds, with_mask.prompt_embeds_mask, negative.embeds), height=HEIGHT, width=WIDTH,
        num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), true_cfg_scale=4.0,
        sde_window_size=1, sde_window_range=(0, STEPS),
    )  # fmt: skip
    assert without[4] == with_mask.sde_windows == [with_mask.sde_window] * 2
    assert torch.equal(without[1], with_mask.all_latents) and torch.equal(without[2], with_mask.all_log_probs)


def test_pipeline_converts_a_stock_scheduler_and_rejects_others(pipe):
    stock = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    converted = QwenImagePipelineWithLogProb(transformer=pipe.transformer, scheduler=stock).scheduler
    assert isinstance(converted, FlowMatchSDEDiscreteScheduler)
    assert converted.config.max_image_seq_len == 8192 and converted.config.shift_terminal == 0.02
    with pytest.raises(TypeError, match="FlowMatchSDEDiscreteScheduler"):
        QwenImagePipelineWithLogProb(transformer=pipe.transformer, scheduler=object())
