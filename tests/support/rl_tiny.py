"""Tiny RL set-ups for the rollout/trainer tests and benchmark: pipeline, prompts, collation, re-scoring.

A rollout runs :meth:`QwenImagePipelineWithLogProb.rollout` on prompt embeddings collated to some
width; :func:`recompute_log_probs` re-scores every recorded transition with the package's own
trainer rescoring, possibly on embeddings re-collated to another width.
:func:`~qwen_image_omni.check.legacy.legacy_rope_per_call` (imported here) makes a model size its
text RoPE table the legacy vllm-omni way, ``max(mask.sum())`` of each call's own mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qwen_image_omni.check.legacy import legacy_rope_per_call  # noqa: F401 (the tests' name for it)
from qwen_image_omni.pipelines.config import DiffusionModelConfig
from qwen_image_omni.pipelines.qwen_image import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    ImageGeometry,
    PromptBatch,
    pad_prompt_rows,
)
from qwen_image_omni.pipelines.qwen_image import recompute_log_probs as package_recompute_log_probs
from qwen_image_omni.pipelines.qwen_image_flow_grpo import QwenImagePipelineWithLogProb
from qwen_image_omni.pipelines.schedulers import FlowMatchSDEDiscreteScheduler
from tests.support.tiny import TINY_CONFIG, make_pair

HEIGHT = WIDTH = 64  # pixels: a 4x4 grid of packed latent tokens with the VAE's factor 8
IMAGE_TOKENS = 16
STEPS = 4
PROMPT_LENGTHS = (37, 30)  # valid tokens of the positive prompt, per sample
NEGATIVE_LENGTHS = (5, 3)  # valid tokens of the negative prompt, per sample
MICRO_BATCH = ImageGeometry(HEIGHT, WIDTH).micro_batch()  # the trainer's image entries


@dataclass
class Prompt:
    """One side of a CFG pair: collated embeddings and their mask (1 = valid token)."""

    embeds: torch.Tensor
    mask: torch.Tensor


def make_pipeline(pipeline_cls: type = QwenImagePipelineWithLogProb, seed: int = 0) -> QwenImagePipelineWithLogProb:
    """A rollout pipeline around a tiny random transformer (no text encoder, no VAE)."""
    model, _ = make_pair(seed=seed)
    scheduler = FlowMatchSDEDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    return pipeline_cls(transformer=model, scheduler=scheduler)


def prompt_rows(lengths: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Unpadded random prompt embeddings, one ``(n_i, joint_attention_dim)`` tensor per sample."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, TINY_CONFIG["joint_attention_dim"], generator=generator) for n in lengths]


def collate(rows: Sequence[torch.Tensor], width: int | None = None, layout: str = "right", seed: int = 99) -> Prompt:
    """Pad rows to ``width`` (default: the longest row), valid tokens first (right) or last (left).

    Padding columns hold random values, not zeros: they are masked, so they must not matter.
    """
    embeds, mask = pad_prompt_rows(rows, width, padding_side=layout)
    noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(seed))
    return Prompt(torch.where(mask.bool().unsqueeze(-1), embeds, noise), mask)


def model_config(sde_type: str, true_cfg_scale: float, noise_level: float = 0.7) -> DiffusionModelConfig:
    """The trainer's config for the tiny set-up."""
    return DiffusionModelConfig(
        architecture="QwenImagePipeline",
        algorithm="flow_grpo",
        pipeline={"height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS, "true_cfg_scale": true_cfg_scale},
        algo={"noise_level": noise_level, "sde_type": sde_type},
    )


def run_diffuse(
    pipe: QwenImagePipelineWithLogProb,
    prompt: Prompt,
    negative: Prompt | None,
    sde_type: str,
    true_cfg_scale: float,
    noise_level: float = 0.7,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rollout through ``pipe.rollout``, every step but the last in the SDE window, noise from ``seed``.

    Returns ``(latents, all_latents, all_log_probs, all_timesteps)``.
    """
    batch = prompt.embeds.shape[0]
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=generator)
    with torch.no_grad():
        final, all_latents, all_log_probs, all_timesteps, _ = pipe.rollout(
            prompt_batch(prompt, negative if true_cfg_scale > 1 else None),
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            generator=generator,
            latents=latents,
            true_cfg_scale=true_cfg_scale,
            noise_level=noise_level,
            sde_type=sde_type,
        )
    return final, all_latents, all_log_probs, all_timesteps


def prompt_batch(prompt: Prompt, negative: Prompt | None) -> PromptBatch:
    """The package's :class:`PromptBatch` of a CFG pair (no negative: CFG off)."""
    return PromptBatch(prompt.embeds, prompt.mask, *((negative.embeds, negative.mask) if negative else (None, None)))


def recompute_log_probs(
    module: nn.Module,
    config: DiffusionModelConfig,
    all_latents: torch.Tensor,
    all_timesteps: torch.Tensor,
    prompt: Prompt,
    negative: Prompt | None,
) -> torch.Tensor:
    """The package's :func:`recompute_log_probs` on the tiny set-up's image, without gradients; ``(B, W)``."""
    with torch.no_grad():
        return package_recompute_log_probs(
            module, config, all_latents, all_timesteps, prompt_batch(prompt, negative), MICRO_BATCH
        )


def max_abs_delta(rollout: torch.Tensor, trainer: torch.Tensor) -> torch.Tensor:
    """Per-step ``max |rollout - trainer|`` over the batch, shape ``(W,)``."""
    return (rollout - trainer).abs().amax(dim=0)


def approx_kl(rollout: torch.Tensor, trainer: torch.Tensor) -> tuple[float, float]:
    """``(k2, k3)`` estimates of KL(rollout || trainer) from log-probs of rollout samples.

    With ``d = log p_trainer - log p_rollout``: ``k2 = mean(0.5 d^2)``, ``k3 = mean(exp(d) - 1 - d)``.
    """
    delta = (trainer - rollout).double()
    return float((0.5 * delta**2).mean()), float((delta.exp() - 1 - delta).mean())
