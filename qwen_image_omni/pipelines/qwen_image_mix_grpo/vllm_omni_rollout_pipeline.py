"""Qwen-Image MixGRPO rollout pipeline on vllm-omni (needs vllm-omni; imported when an engine asks for it)."""

from __future__ import annotations

from typing import Any

from ..qwen_image_flow_grpo.vllm_omni_rollout_pipeline import QwenImagePipelineWithLogProb, options_from_extra_args
from .diffusers_training_adapter import MIX_GRPO_ROLLOUT_OPTIONS, QwenImageMixGRPO, pin_sde_window_range

__all__ = ["QwenImageMixGRPOPipelineWithLogProb"]


class QwenImageMixGRPOPipelineWithLogProb(QwenImagePipelineWithLogProb):
    """MixGRPO rollout on vllm-omni: :class:`QwenImagePipelineWithLogProb` with the MixGRPO window.

    ``extra_args`` may also carry :data:`~qwen_image_omni.pipelines.qwen_image_mix_grpo.MIX_GRPO_ROLLOUT_OPTIONS`
    (``sample_strategy``, ``global_steps``, ``iters_per_group``, ``sde_window_seed``); the window is
    then the one :meth:`QwenImageMixGRPO.sde_window` gives the trainer for that step.
    """

    training_adapter = QwenImageMixGRPO
    algorithm = "mix_grpo"

    @classmethod
    def rollout_options(cls, extra_args: dict[str, Any] | None) -> dict[str, Any]:
        """FlowGRPO's options with ``sde_window_range`` pinned to this step's MixGRPO window."""
        options = super().rollout_options(extra_args)
        size, window = options["sde_window_size"], options["sde_window_range"]
        mix_grpo = options_from_extra_args(MIX_GRPO_ROLLOUT_OPTIONS, extra_args)
        options["sde_window_range"] = pin_sde_window_range(size, window, **mix_grpo)
        return options
