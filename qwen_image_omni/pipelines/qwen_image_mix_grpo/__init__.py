"""Qwen-Image with MixGRPO: FlowGRPO's step functions with a sliding SDE window.

- :mod:`.diffusers_training_adapter`: :class:`QwenImageMixGRPO` (``("QwenImagePipeline", "mix_grpo")``)
  and the window schedule :func:`mix_grpo_sde_window`;
- :mod:`.diffusers_rollout_pipeline`: :class:`DiffusersQwenImageMixGRPOPipelineWithLogProb` on
  diffusers (also importable as ``QwenImageMixGRPOPipelineWithLogProb``, its former name);
- :mod:`.vllm_omni_rollout_pipeline`: its vllm-omni twin ``QwenImageMixGRPOPipelineWithLogProb``,
  imported only when an engine asks for it by its dotted path.
"""

from ..model_base import VllmOmniPipelineBase
from .diffusers_rollout_pipeline import (
    DiffusersQwenImageMixGRPOPipelineWithLogProb,
    QwenImageMixGRPOPipelineWithLogProb,
)
from .diffusers_training_adapter import (
    MIX_GRPO_ROLLOUT_OPTIONS,
    WINDOW_STRATEGIES,
    QwenImageMixGRPO,
    mix_grpo_sde_window,
    pin_sde_window_range,
)

# The rollout pipelines, by dotted path: the vllm-omni one answers where vllm-omni is installed, and is
# imported only when asked for (an engine's custom_pipeline_name), never here.
VllmOmniPipelineBase.register_paths(
    "QwenImagePipeline",
    "mix_grpo",
    diffusers=f"{__name__}.diffusers_rollout_pipeline.QwenImageMixGRPOPipelineWithLogProb",
    vllm_omni=f"{__name__}.vllm_omni_rollout_pipeline.QwenImageMixGRPOPipelineWithLogProb",
)

__all__ = [
    "MIX_GRPO_ROLLOUT_OPTIONS",
    "WINDOW_STRATEGIES",
    "DiffusersQwenImageMixGRPOPipelineWithLogProb",
    "QwenImageMixGRPO",
    "QwenImageMixGRPOPipelineWithLogProb",
    "mix_grpo_sde_window",
    "pin_sde_window_range",
]
