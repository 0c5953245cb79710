"""Qwen-Image DPO rollout pipeline on vllm-omni (needs vllm-omni; imported when an engine asks for it).

verl-omni main's ``QwenImageDPOPipeline`` contract: each request's ``DiffusionOutput`` carries the
image, ``metadata["prompt_embeddings"]`` and ``metadata["rl"] = {"latents_clean": ...}``. Here the
loop is FlowGRPO's (:class:`~..qwen_image.rollout.QwenImageRolloutMixin`) as a deterministic ODE,
with no text length anywhere.
"""

from __future__ import annotations

from typing import Any

from ..qwen_image import RolloutRun
from ..qwen_image_flow_grpo.vllm_omni_rollout_pipeline import QwenImagePipelineWithLogProb
from .rollout import CLEAN_LATENTS_KEY, QwenImageDPORolloutMixin

__all__ = ["QwenImageDPOPipeline"]


class QwenImageDPOPipeline(QwenImageDPORolloutMixin, QwenImagePipelineWithLogProb):
    """DPO rollout on vllm-omni: the FlowGRPO vllm-omni pipeline's loop at noise level 0.

    SDE options in ``sampling_params.extra_args`` are ignored (the rollout fixes them,
    :func:`~.rollout.ode_rollout_options`); ``trajectory_*`` hold the last step. Request batches and
    vllm-omni's step execution run it alike (the FlowGRPO pipeline's modes).
    """

    @classmethod
    def rollout_options(cls, extra_args: dict[str, Any] | None) -> dict[str, Any]:
        """No options: :meth:`QwenImageDPORolloutMixin.start_rollout` sets the ODE's."""
        return {}

    def rollout_rl(self, run: RolloutRun) -> dict[str, Any]:
        """``{"latents_clean": (B, S, C) float32}``, the final packed latents the DPO trainer re-noises."""
        return {CLEAN_LATENTS_KEY: run.latents.float()}
