"""Qwen-Image DiffusionNFT rollout pipeline on vllm-omni (needs vllm-omni; imported when an engine asks for it).

verl-omni main's ``QwenImageDiffusionNFTPipeline`` contract: each request's ``DiffusionOutput``
carries the image, ``metadata["prompt_embeddings"]`` and ``metadata["rl"] = {"latents_clean",
"train_timesteps"}``. Here the loop is FlowGRPO's
(:class:`~..qwen_image.rollout.QwenImageRolloutMixin`) as a deterministic ODE
(:class:`~.rollout.QwenImageDiffusionNFTRolloutMixin`, shared with the diffusers rollout pipeline),
with no text length anywhere. Requests carry templated token ids, precomputed embeddings or text,
as for the FlowGRPO twin; RL frameworks load it with ``load_format="custom_pipeline"`` and
``custom_pipeline_name=VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "diffusion_nft")``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..qwen_image import RolloutRun
from ..qwen_image_flow_grpo.vllm_omni_rollout_pipeline import QwenImagePipelineWithLogProb
from .rollout import QwenImageDiffusionNFTRolloutMixin

__all__ = ["QwenImageDiffusionNFTPipeline"]


class QwenImageDiffusionNFTPipeline(QwenImageDiffusionNFTRolloutMixin, QwenImagePipelineWithLogProb):
    """DiffusionNFT rollout on vllm-omni: the FlowGRPO vllm-omni pipeline's loop as the deterministic ODE.

    Like verl-omni's own rollout it takes no SDE option from ``sampling_params.extra_args`` (they
    are ignored: the ODE fixes them, :func:`~.rollout.nft_ode_options`); the one option read there
    is ``return_trajectory`` (default False). ``trajectory_latents`` / ``trajectory_timesteps`` hold
    the last ODE step ``(n, 2, S, C)`` / ``(n, 1)`` (the whole path with ``return_trajectory``),
    ``trajectory_log_probs`` is None.
    """

    @classmethod
    def rollout_options(cls, extra_args: dict[str, Any] | None) -> dict[str, Any]:
        """``{"return_trajectory": extra_args.get("return_trajectory", False)}``; other keys are ignored.

        Raises:
            TypeError: ``extra_args`` is not a dict, or its ``return_trajectory`` is not a bool.
        """
        if extra_args is not None and not isinstance(extra_args, dict):
            raise TypeError(f"`extra_args` must be a dict or None, got {type(extra_args).__name__}")
        return_trajectory = (extra_args or {}).get("return_trajectory", False)
        if not isinstance(return_trajectory, bool):
            raise TypeError(f"`extra_args['return_trajectory']` must be a bool, got {type(return_trajectory).__name__}")
        return {"return_trajectory": return_trajectory}

    def rollout_rl(self, run: RolloutRun) -> dict[str, torch.Tensor]:
        """``{"latents_clean": (B, S, C) float32, "train_timesteps": (B, N)}`` of the run's schedule
        (:func:`~.rollout.diffusion_nft_rl`)."""
        return self.diffusion_nft_rl(run.latents, run.timesteps)
