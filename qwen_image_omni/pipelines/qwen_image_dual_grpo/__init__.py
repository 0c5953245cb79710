"""Qwen-Image with Dual-GRPO: FlowGRPO's image rollout plus text sampled from the text encoder.

- :mod:`.text_sampling`: :class:`QwenImageTextSamplingMixin`, the text sampling both rollout
  pipelines share, and the ``metadata["rl"]`` keys;
- :mod:`.diffusers_training_adapter`: :class:`QwenImageDualGRPO`, registered for
  ``("QwenImagePipeline", "dual_grpo")``: FlowGRPO's image step functions and
  :meth:`~QwenImageDualGRPO.text_log_probs`, the trainer-side twin of the rollout's text log-probs;
- :mod:`.diffusers_rollout_pipeline`: :class:`DiffusersQwenImagePipelineWithDualLogProb` on diffusers
  (also importable as ``QwenImagePipelineWithDualLogProb``, its former name);
- :mod:`.vllm_omni_rollout_pipeline`: its vllm-omni twin, verl-omni's ``QwenImagePipelineWithDualLogProb``,
  imported only when an engine asks for it by its dotted path.
"""

from ..model_base import VllmOmniPipelineBase
from .diffusers_rollout_pipeline import DiffusersQwenImagePipelineWithDualLogProb, QwenImagePipelineWithDualLogProb
from .diffusers_training_adapter import QwenImageDualGRPO
from .text_sampling import (
    LLM_ALL_LOG_PROBS_KEY,
    LLM_RESPONSE_IDS_KEY,
    LLM_RESPONSE_MASK_KEY,
    TEXT_ENCODER_RESPONSES_KEY,
    TEXT_SAMPLING_OPTIONS,
    QwenImageTextSamplingMixin,
    left_pad_prompts,
    text_sampling_options,
)

# The rollout pipelines, by dotted path: the vllm-omni one answers where vllm-omni is installed, and is
# imported only when asked for (an engine's custom_pipeline_name), never here.
VllmOmniPipelineBase.register_paths(
    "QwenImagePipeline",
    "dual_grpo",
    diffusers=f"{__name__}.diffusers_rollout_pipeline.QwenImagePipelineWithDualLogProb",
    vllm_omni=f"{__name__}.vllm_omni_rollout_pipeline.QwenImagePipelineWithDualLogProb",
)

__all__ = [
    "LLM_ALL_LOG_PROBS_KEY",
    "LLM_RESPONSE_IDS_KEY",
    "LLM_RESPONSE_MASK_KEY",
    "TEXT_ENCODER_RESPONSES_KEY",
    "TEXT_SAMPLING_OPTIONS",
    "DiffusersQwenImagePipelineWithDualLogProb",
    "QwenImageDualGRPO",
    "QwenImagePipelineWithDualLogProb",
    "QwenImageTextSamplingMixin",
    "left_pad_prompts",
    "text_sampling_options",
]
