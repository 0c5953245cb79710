"""Qwen-Image MixGRPO rollout pipeline on diffusers: FlowGRPO's rollout with the MixGRPO window."""

from __future__ import annotations

from typing import Any

from ..qwen_image import QwenImageRolloutOutput
from ..qwen_image_flow_grpo.diffusers_rollout_pipeline import DiffusersQwenImagePipelineWithLogProb
from .diffusers_training_adapter import QwenImageMixGRPO, pin_sde_window_range

__all__ = ["DiffusersQwenImageMixGRPOPipelineWithLogProb", "QwenImageMixGRPOPipelineWithLogProb"]



class DiffusersQwenImageMixGRPOPipelineWithLogProb(DiffusersQwenImagePipelineWithLogProb):
    """Rollout pipeline for Qwen-Image with the MixGRPO algorithm.

    :class:`DiffusersQwenImagePipelineWithLogProb` whose SDE window is placed by
    :func:`mix_grpo_sde_window` (same window on every rank for a training step) instead of a
    per-call random draw. Steps run through :class:`QwenImageMixGRPO` (= :class:`QwenImage`'s functions).
    """

    training_adapter = QwenImageMixGRPO
    algorithm = "mix_grpo"

    def forward(
        self,
        *args: Any,
        sde_window_size: int | None = None,
        sde_window_range: tuple[int, int] = (0, 5),
        sample_strategy: str = "random",
        global_steps: int = 0,
        iters_per_group: int = 1,
        sde_window_seed: int = 0,
        **kwargs: Any,
    ) -> QwenImageRolloutOutput:
        """End-to-end generation with the MixGRPO window; see :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.

        Args:
            *args: passed on to :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.
            sde_window_size: number of SDE steps; None: the full window, nothing to slide.
            sde_window_range: ``(low, high)`` envelope of the window.
            sample_strategy: ``"random"`` or ``"progressive"``.
            global_steps: the trainer's current training step.
            iters_per_group: ``"progressive"``: training steps per window advance.
            sde_window_seed: ``"random"``: base seed of the per-step draw.
            **kwargs: passed on to :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.
        """
        sde_window_range = pin_sde_window_range(
            sde_window_size, sde_window_range, sample_strategy, global_steps, iters_per_group, sde_window_seed
        )
        return super().forward(*args, sde_window_size=sde_window_size, sde_window_range=sde_window_range, **kwargs)


QwenImageMixGRPOPipelineWithLogProb = DiffusersQwenImageMixGRPOPipelineWithLogProb
"""The pipeline's former name, kept for the code and configs that name it. The vllm-omni rollout
pipeline carries it now (verl-omni's name); where vllm-omni is not installed, the rollout registry
answers this path for ``("QwenImagePipeline", "mix_grpo")``."""
