"""The trainer's rescoring of a recorded rollout trajectory, for checks, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import DiffusionModelConfig
from ..model_base import DiffusionModelBase
from ..utils import adapter_model_inputs
from .prompts import PromptBatch


def recompute_log_probs(
    module: torch.nn.Module,
    model_config: DiffusionModelConfig,
    all_latents: torch.Tensor,
    all_timesteps: torch.Tensor,
    prompts: PromptBatch,
    micro_batch: Mapping[str, Any],
) -> torch.Tensor:
    """Re-score every recorded transition as the trainer does; returns ``(B, W)`` log-probabilities.

    Per step: the adapter registered for ``model_config`` builds the transformer inputs
    (``prepare_model_inputs``, with the condition of image-conditioned adapters) and recomputes the
    reverse step (``forward_and_sample_previous_step``) with its own scheduler (``build_scheduler``),
    what verl-omni's trainer runs. Gradients follow the caller's grad mode.

    Args:
        module: the transformer.
        model_config: the trainer's config (architecture, algorithm, pipeline and SDE settings).
        all_latents: ``(B, W + 1, S, C)`` the recorded window states.
        all_timesteps: ``(B, W)`` their timesteps.
        prompts: the prompts to score with, collated however the trainer collates them.
        micro_batch: the trainer's micro-batch (``height``, ``width``, ``vae_scale_factor``, and the
            condition entries of image-conditioned algorithms).

    Raises:
        TypeError: ``prompts`` is not a :class:`PromptBatch`.
        ValueError: trajectories whose shapes do not match (``W + 1`` states for ``W`` timesteps).
    """
    if not isinstance(prompts, PromptBatch):
        raise TypeError(f"`prompts` must be a PromptBatch, got {type(prompts).__name__}")
    if all_latents.ndim < 3 or all_timesteps.ndim != 2 or all_latents.shape[:2] != (
        all_timesteps.shape[0], all_timesteps.shape[1] + 1
    ):
        raise ValueError(
            "`all_latents` must be (B, W + 1, ...) for `all_timesteps` (B, W), got "
            f"{tuple(all_latents.shape)} and {tuple(all_timesteps.shape)}"
        )
    adapter = DiffusionModelBase.get_class(model_config)
    scheduler = adapter.build_scheduler(model_config)
    scheduler_inputs = {"all_latents": all_latents, "all_timesteps": all_timesteps}
    log_probs = []
    for step in range(all_timesteps.shape[1]):
        model_inputs, negative_inputs = adapter_model_inputs(
            adapter, module, model_config, all_latents, all_timesteps, *prompts.positive, *prompts.negative,
            micro_batch, step,
        )  # fmt: skip
        log_prob, *_ = adapter.forward_and_sample_previous_step(
            module, scheduler, model_config, model_inputs, negative_inputs, scheduler_inputs, step
        )
        log_probs.append(log_prob)
    return torch.stack(log_probs, dim=1)
