"""Qwen-Image with MixGRPO: FlowGRPO's step functions with a sliding SDE window.

- :mod:`.diffusers_training_adapter`: :class:`QwenImageMixGRPO` (``("QwenImagePipeline", "mix_grpo")``)
  and the window schedule :func:`mix_grpo_sde_window`;
- :mod:`.diffusers_rollout_pipeline`: :class:`QwenImageMixGRPOPipelineWithLogProb` on diffusers;
- :mod:`.vllm_omni_rollout_pipeline`: its vllm-omni twin, imported only with vllm-omni installed.
"""

from .diffusers_rollout_pipeline import QwenImageMixGRPOPipelineWithLogProb
from .diffusers_training_adapter import (
    MIX_GRPO_ROLLOUT_OPTIONS,
    WINDOW_STRATEGIES,
    QwenImageMixGRPO,
    mix_grpo_sde_window,
    pin_sde_window_range,
)

__all__ = [
    "MIX_GRPO_ROLLOUT_OPTIONS",
    "WINDOW_STRATEGIES",
    "QwenImageMixGRPO",
    "QwenImageMixGRPOPipelineWithLogProb",
    "mix_grpo_sde_window",
    "pin_sde_window_range",
]
