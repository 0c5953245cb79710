"""Tiny RL set-ups for the rollout/trainer tests and benchmark: pipeline, prompts, collation, re-scoring.

A rollout runs :meth:`QwenImagePipelineWithLogProb.diffuse` on prompt embeddings collated to some
width; :func:`recompute_log_probs` re-scores every recorded transition the way a trainer does
(:meth:`QwenImage.prepare_model_inputs` + :meth:`QwenImage.forward_and_sample_previous_step`),
possibly on embeddings re-collated to another width. :func:`legacy_rope_per_call` makes a model
size its text RoPE table the legacy vllm-omni way, ``max(mask.sum())`` of each call's own mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qwen_image_omni.check.legacy import legacy_text_rope, legacy_txt_seq_len
from qwen_image_omni.pipelines.config import DiffusionModelConfig
from qwen_image_omni.pipelines.qwen_image_flow_grpo import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    QwenImage,
    QwenImagePipelineWithLogProb,
    build_img_shapes,
    full_sde_window,
    set_qwen_image_timesteps,
)
from qwen_image_omni.pipelines.schedulers import FlowMatchSDEDiscreteScheduler

from tests.support.tiny import TINY_CONFIG, make_pair

HEIGHT = WIDTH = 64  # pixels: a 4x4 grid of packed latent tokens with the VAE's factor 8
IMAGE_TOKENS = 16
STEPS = 4
PROMPT_LENGTHS = (37, 30)  # valid tokens of the positive prompt, per sample
NEGATIVE_LENGTHS = (5, 3)  # valid tokens of the negative prompt, per sample
LAYOUTS = ("right", "left")


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
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    longest = max(row.shape[0] for row in rows)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width must be >= the longest row ({longest}), got {width}")
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(len(rows), width, rows[0].shape[1], generator=generator)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        n = row.shape[0]
        cols = slice(0, n) if layout == "right" else slice(width - n, width)
        embeds[i, cols] = row
        mask[i, cols] = 1
    return Prompt(embeds, mask)


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
    """One rollout through ``pipe.diffuse``; returns ``(latents, all_latents, all_log_probs, all_timesteps)``."""
    batch = prompt.embeds.shape[0]
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=generator)
    timesteps = set_qwen_image_timesteps(pipe.scheduler, STEPS, IMAGE_TOKENS, "cpu")
    do_true_cfg = negative is not None and true_cfg_scale > 1
    with torch.no_grad():
        return pipe.diffuse(
            prompt.embeds,
            prompt.mask,
            negative.embeds if negative is not None else None,
            negative.mask if negative is not None else None,
            latents,
            build_img_shapes(HEIGHT, WIDTH, batch),
            timesteps,
            do_true_cfg,
            None,
            true_cfg_scale,
            noise_level,
            full_sde_window(STEPS),
            sde_type,
            generator,
            True,
        )


def recompute_log_probs(
    module: nn.Module,
    config: DiffusionModelConfig,
    all_latents: torch.Tensor,
    all_timesteps: torch.Tensor,
    prompt: Prompt,
    negative: Prompt | None,
) -> torch.Tensor:
    """Re-score every recorded transition as the trainer does; returns ``(B, W)`` log-probs."""
    scheduler = QwenImage.build_scheduler(config)
    micro_batch = {"height": HEIGHT, "width": WIDTH, "vae_scale_factor": 8}
    scheduler_inputs = {"all_latents": all_latents, "all_timesteps": all_timesteps}
    log_probs = []
    for step in range(all_timesteps.shape[1]):
        model_inputs, negative_inputs = QwenImage.prepare_model_inputs(
            module,
            config,
            all_latents,
            all_timesteps,
            prompt.embeds,
            prompt.mask,
            None if negative is None else negative.embeds,
            None if negative is None else negative.mask,
            micro_batch,
            step,
        )
        with torch.no_grad():
            log_prob, _, _, _ = QwenImage.forward_and_sample_previous_step(
                module, scheduler, config, model_inputs, negative_inputs, scheduler_inputs, step
            )
        log_probs.append(log_prob)
    return torch.stack(log_probs, dim=1)


@contextlib.contextmanager
def legacy_rope_per_call(model: nn.Module, mode: str = "kernel") -> Iterator[nn.Module]:
    """Inside, every forward of ``model`` sizes its text RoPE table as legacy vllm-omni did.

    Each call uses ``max(mask.sum(dim=1))`` of its own ``encoder_hidden_states_mask`` (so the
    positive and negative CFG branches get their own lengths, as vllm-omni threaded one length
    list per branch), through :func:`qwen_image_omni.check.legacy.legacy_text_rope`.
    """
    calls = contextlib.ExitStack()

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        length = legacy_txt_seq_len(kwargs["encoder_hidden_states_mask"])
        calls.enter_context(legacy_text_rope(module, length, mode))

    def leave(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        calls.close()

    pre = model.register_forward_pre_hook(enter, with_kwargs=True)
    post = model.register_forward_hook(leave, with_kwargs=True)
    try:
        yield model
    finally:
        pre.remove()
        post.remove()
        calls.close()


def max_abs_delta(rollout: torch.Tensor, trainer: torch.Tensor) -> torch.Tensor:
    """Per-step ``max |rollout - trainer|`` over the batch, shape ``(W,)``."""
    return (rollout - trainer).abs().amax(dim=0)


def approx_kl(rollout: torch.Tensor, trainer: torch.Tensor) -> tuple[float, float]:
    """``(k2, k3)`` estimates of KL(rollout || trainer) from log-probs of rollout samples.

    With ``d = log p_trainer - log p_rollout``: ``k2 = mean(0.5 d^2)``, ``k3 = mean(exp(d) - 1 - d)``.
    """
    delta = (trainer - rollout).double()
    return float((0.5 * delta**2).mean()), float((delta.exp() - 1 - delta).mean())
