"""Qwen-Image DPO rollout pipeline on diffusers: deterministic ODE images plus the clean latents.

Runs anywhere diffusers does; the vllm-omni twin is in :mod:`.vllm_omni_rollout_pipeline`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..qwen_image import QwenImageRolloutOutput
from ..qwen_image_flow_grpo.diffusers_rollout_pipeline import DiffusersQwenImagePipelineWithLogProb
from .rollout import CLEAN_LATENTS_KEY, SDE_ROLLOUT_OPTIONS, QwenImageDPORolloutMixin

__all__ = ["DiffusersQwenImageDPOPipeline", "QwenImageDPOPipeline"]


class DiffusersQwenImageDPOPipeline(QwenImageDPORolloutMixin, DiffusersQwenImagePipelineWithLogProb):
    """Rollout pipeline for Qwen-Image Diffusion-DPO: :class:`DiffusersQwenImagePipelineWithLogProb` as an ODE.

    Every step is the deterministic flow-matching Euler step (noise level 0, no log-probs), so the
    final latents are those of diffusers' ``QwenImagePipeline`` for the same noise. The output's
    ``rl`` carries them as ``latents_clean`` (:data:`~.rollout.CLEAN_LATENTS_KEY`, verl-omni's key),
    ``prompt_embeddings`` the embeddings and masks used; the trajectory fields hold the last step.
    With vllm-omni installed, ``VllmOmniPipelineBase`` maps ``("QwenImagePipeline", "dpo")`` to the
    vllm-omni twin, which runs the same loop.
    """

    def forward(self, *args: Any, **kwargs: Any) -> QwenImageRolloutOutput:
        """End-to-end generation; arguments as the FlowGRPO pipeline's ``forward`` without the SDE ones.

        Returns:
            QwenImageRolloutOutput: images; ``rl = {"latents_clean": (B, S, C) float32}``; the prompt
            embeddings and masks; ``all_latents`` ``(B, 2, S, C)`` and ``all_timesteps`` ``(B, 1)``
            of the last step; ``all_log_probs`` None.

        Raises:
            TypeError: an SDE option (:data:`~.rollout.SDE_ROLLOUT_OPTIONS`) is passed: the DPO
                rollout is deterministic and fixes them.
            ValueError, TypeError: as :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.
        """
        fixed = [name for name in SDE_ROLLOUT_OPTIONS if name in kwargs]
        if fixed:
            raise TypeError(
                f"the DPO rollout is a deterministic ODE (noise level 0, no log-probs) and takes no {fixed}"
            )
        output = super().forward(*args, **kwargs)
        # The last step's window ends on the clean latents (see `ode_rollout_options`).
        return dataclasses.replace(output, rl={CLEAN_LATENTS_KEY: output.all_latents[:, -1]})


QwenImageDPOPipeline = DiffusersQwenImageDPOPipeline
"""The pipeline's former name, kept for the code and configs that name it. The vllm-omni rollout
pipeline carries it now (verl-omni's name); where vllm-omni is not installed, the rollout registry
answers this path for ``("QwenImagePipeline", "dpo")``."""
