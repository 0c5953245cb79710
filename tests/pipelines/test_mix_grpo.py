"""MixGRPO's SDE window: seeded random (same on every rank) and progressive, trainer and rollout side."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from qwen_image_omni.pipelines import DiffusionModelBase, DiffusionModelConfig, VllmOmniPipelineBase
from qwen_image_omni.pipelines.qwen_image_flow_grpo import QwenImage, QwenImagePipelineWithLogProb
from qwen_image_omni.pipelines.qwen_image_mix_grpo import (
    QwenImageMixGRPO,
    QwenImageMixGRPOPipelineWithLogProb,
    mix_grpo_sde_window,
    pin_sde_window_range,
)

from tests.support.rl_tiny import (
    HEIGHT,
    NEGATIVE_LENGTHS,
    PROMPT_LENGTHS,
    STEPS,
    WIDTH,
    collate,
    make_pipeline,
    max_abs_delta,
    model_config,
    prompt_rows,
    recompute_log_probs,
)


# -- the window function ----------------------------------------------------------------------------


def test_random_window_is_a_function_of_seed_and_step():
    windows = [mix_grpo_sde_window("random", 2, (1, 9), step, sde_window_seed=7) for step in range(50)]
    # Global RNG state must not matter: another "rank" with different global seeds agrees.
    random.seed(123)
    torch.manual_seed(456)
    assert windows == [mix_grpo_sde_window("random", 2, (1, 9), step, sde_window_seed=7) for step in range(50)]
    assert all(1 <= start and end <= 9 and end - start == 2 for start, end in windows)
    assert {start for start, _ in windows} == set(range(1, 8)), "every start in the envelope is drawn"
    other_seed = [mix_grpo_sde_window("random", 2, (1, 9), step, sde_window_seed=8) for step in range(50)]
    assert other_seed != windows


def test_random_window_ignores_progressive_options():
    base = mix_grpo_sde_window("random", 3, (0, 10), 5)
    assert mix_grpo_sde_window("random", 3, (0, 10), 5, iters_per_group=4) == base


@pytest.mark.parametrize(
    ("size", "envelope", "iters_per_group", "expected"),
    [
        # advances by the window size every iters_per_group steps, then stays at the envelope's end
        (2, (0, 8), 3, [(0, 2)] * 3 + [(2, 4)] * 3 + [(4, 6)] * 3 + [(6, 8)] * 5),
        (1, (0, 3), 1, [(0, 1), (1, 2), (2, 3), (2, 3), (2, 3)]),
        (3, (2, 9), 2, [(2, 5), (2, 5), (5, 8), (5, 8), (6, 9), (6, 9), (6, 9)]),
    ],
)
def test_progressive_window_slides_then_stays(size, envelope, iters_per_group, expected):
    steps = range(len(expected))
    windows = [mix_grpo_sde_window("progressive", size, envelope, step, iters_per_group) for step in steps]
    assert windows == expected


def test_progressive_window_never_moves_back():
    starts = [mix_grpo_sde_window("progressive", 2, (1, 20), step, 4)[0] for step in range(200)]
    assert starts == sorted(starts) and starts[0] == 1 and starts[-1] == 18


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sample_strategy": "sliding"}, ValueError, "sample_strategy"),
        ({"sde_window_size": 6}, ValueError, "does not fit"),
        ({"sde_window_range": (3,)}, ValueError, "sde_window_range"),
        ({"global_steps": -1}, ValueError, "global_steps"),
        ({"global_steps": 1.5}, TypeError, "global_steps"),
        ({"sde_window_size": True}, TypeError, "sde_window_size"),
        ({"sample_strategy": "progressive", "iters_per_group": 0}, ValueError, "iters_per_group"),
        # Options the strategy does not read are checked too.
        ({"sample_strategy": "random", "iters_per_group": 0}, ValueError, "^`iters_per_group` must be >= 1, got 0$"),
        ({"sample_strategy": "progressive", "sde_window_seed": -1}, ValueError,
         "^`sde_window_seed` must be >= 0, got -1$"),
        ({"sde_window_range": (0.5, 5)}, TypeError, r"^`sde_window_range\[0\]` must be an int, got float 0.5$"),
        ({"sde_window_size": 2.0}, TypeError, "^`sde_window_size` must be an int, got float 2.0$"),
    ],
)  # fmt: skip
def test_window_errors_name_the_argument(kwargs, error, match):
    args = {"sample_strategy": "random", "sde_window_size": 2, "sde_window_range": (0, 5), "global_steps": 0}
    with pytest.raises(error, match=match):
        mix_grpo_sde_window(**{**args, **kwargs})


# -- trainer-side adapter -------------------------------------------------------------------------


def _mix_config(**algo) -> DiffusionModelConfig:
    return DiffusionModelConfig(
        architecture="QwenImagePipeline",
        algorithm="mix_grpo",
        pipeline={"height": HEIGHT, "width": WIDTH, "num_inference_steps": 8},
        algo=algo,
    )


@pytest.mark.skipif(
    importlib.util.find_spec("vllm_omni") is not None,
    reason="with vllm-omni installed the vllm-omni pipeline is registered (tests/integrations/vllm_omni/test_pipelines.py)",
)
def test_diffusers_rollout_registered_without_vllm_omni():
    assert VllmOmniPipelineBase.get_class("QwenImagePipeline", "mix_grpo") is QwenImageMixGRPOPipelineWithLogProb
    assert VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "mix_grpo") == (
        "qwen_image_omni.pipelines.qwen_image_mix_grpo.diffusers_rollout_pipeline.QwenImageMixGRPOPipelineWithLogProb"
    )


def test_registered_and_reuses_flow_grpo():
    config = _mix_config()
    assert DiffusionModelBase.get_class(config) is QwenImageMixGRPO
    assert issubclass(QwenImageMixGRPO, QwenImage)
    assert issubclass(QwenImageMixGRPOPipelineWithLogProb, QwenImagePipelineWithLogProb)
    for name in ("prepare_model_inputs", "sample_previous_step", "forward_and_sample_previous_step"):
        assert getattr(QwenImageMixGRPO, name).__func__ is getattr(QwenImage, name).__func__
    assert QwenImageMixGRPOPipelineWithLogProb.run_rollout is QwenImagePipelineWithLogProb.run_rollout


def test_adapter_window_from_config():
    config = _mix_config(sde_window_size=2, sde_window_range=(1, 7))
    assert QwenImageMixGRPO.sde_window(config, 5, "progressive", iters_per_group=2) == (5, 7)
    assert QwenImageMixGRPO.sde_window(config, 4, "random", sde_window_seed=3) == mix_grpo_sde_window(
        "random", 2, (1, 7), 4, sde_window_seed=3
    )
    # No range: the envelope is every step but the last; no size: the full window.
    assert QwenImageMixGRPO.sde_window(_mix_config(sde_window_size=3), 100, "progressive") == (4, 7)
    assert QwenImageMixGRPO.sde_window(_mix_config(), 0) == (0, 7)


# -- rollout pipeline -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipes() -> tuple[QwenImageMixGRPOPipelineWithLogProb, QwenImageMixGRPOPipelineWithLogProb]:
    return make_pipeline(QwenImageMixGRPOPipelineWithLogProb), make_pipeline(QwenImageMixGRPOPipelineWithLogProb)


def _rollout(pipe, seed, **window):
    prompt = collate(prompt_rows(PROMPT_LENGTHS, seed=1), 64)
    negative = collate(prompt_rows(NEGATIVE_LENGTHS, seed=2), 64)
    return pipe(
        prompt_embeds=prompt.embeds,
        prompt_embeds_mask=prompt.mask,
        negative_prompt_embeds=negative.embeds,
        negative_prompt_embeds_mask=negative.mask,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        true_cfg_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **window,
    )


def test_random_strategy_same_window_on_every_rank(pipes):
    window = {"sde_window_size": 1, "sde_window_range": (0, STEPS - 1), "sample_strategy": "random"}
    window["sde_window_seed"] = 11
    for step in range(4):
        # Two "ranks": different generators (different noise), same training step.
        first = _rollout(pipes[0], seed=step, global_steps=step, **window)
        second = _rollout(pipes[1], seed=100 + step, global_steps=step, **window)
        expected = mix_grpo_sde_window("random", 1, (0, STEPS - 1), step, sde_window_seed=11)
        assert first.sde_window == second.sde_window == expected


def test_progressive_strategy_moves_the_recorded_window(pipes):
    pipe = pipes[0]
    window = {"sde_window_size": 1, "sde_window_range": (0, STEPS - 1), "sample_strategy": "progressive"}
    seen = []
    for step in range(4):
        out = _rollout(pipe, seed=step, global_steps=step, iters_per_group=1, **window)
        start, end = out.sde_window
        seen.append((start, end))
        assert torch.equal(out.all_timesteps[0], pipe.scheduler.timesteps[start:end])
        assert out.all_latents.shape[1] == 2 and out.all_log_probs.shape == (2, 1)
    assert seen == [(0, 1), (1, 2), (2, 3), (2, 3)]


def test_trainer_recomputes_mix_grpo_rollout(pipes):
    pipe = pipes[0]
    window = {"sde_window_size": 2, "sde_window_range": (0, STEPS), "sample_strategy": "progressive"}
    out = _rollout(pipe, seed=5, global_steps=1, **window)
    assert out.sde_window == (2, 4)
    config = model_config("sde", 4.0)
    trainer = recompute_log_probs(
        pipe.transformer,
        config,
        out.all_latents,
        out.all_timesteps,
        collate(prompt_rows(PROMPT_LENGTHS, seed=1), 512),
        collate(prompt_rows(NEGATIVE_LENGTHS, seed=2), 512),
    )
    assert (max_abs_delta(out.all_log_probs, trainer) <= 1e-5).all()


def test_pin_checks_the_schedule_even_without_a_window_size():
    assert pin_sde_window_range(None, (0, 5)) == (0, 5)
    assert pin_sde_window_range(2, (0, 5), "progressive", global_steps=1) == (2, 4)
    with pytest.raises(ValueError, match="^`global_steps` must be >= 0, got -1$"):
        pin_sde_window_range(None, (0, 5), global_steps=-1)
    with pytest.raises(TypeError, match="^`iters_per_group` must be an int, got float 1.5$"):
        pin_sde_window_range(None, (0, 5), iters_per_group=1.5)


def test_pipeline_rejects_a_window_past_the_steps(pipes):
    # The progressive window has slid to (STEPS, STEPS + 2): past the trajectory, on every rank.
    message = rf"^`sde_window_range` \({STEPS}, {STEPS + 2}\) ends past the trajectory's num_inference_steps={STEPS}"
    with pytest.raises(ValueError, match=message):
        _rollout(pipes[0], seed=0, sde_window_size=2, sde_window_range=(0, STEPS + 2), sample_strategy="progressive",
                 global_steps=10)  # fmt: skip


def test_pipeline_rejects_unknown_strategy(pipes):
    with pytest.raises(ValueError, match="sample_strategy"):
        _rollout(pipes[0], seed=0, sde_window_size=1, sample_strategy="sliding")
