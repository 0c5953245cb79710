"""Qwen-Image with Dual-GRPO: FlowGRPO's image rollout plus text sampled from the text encoder.

- :mod:`.text_sampling`: :class:`QwenImageTextSamplingMixin`, the text sampling both rollout
  pipelines share, and the ``metadata["rl"]`` keys;
- :mod:`.diffusers_training_adapter`: :class:`QwenImageDualGRPO`, registered for
  ``("QwenImagePipeline", "dual_grpo")``: FlowGRPO's image step functions and
  :meth:`~QwenImageDualGRPO.text_log_probs`, the trainer-side twin of the rollout's text log-probs;
- :mod:`.diffusers_rollout_pipeline`: :class:`QwenImagePipelineWithDualLogProb` on diffusers;
- :mod:`.vllm_omni_rollout_pipeline`: its vllm-omni twin, imported only with vllm-omni installed.

No text length is passed anywhere on the image side: the transformer takes it from
``encoder_hidden_states.shape[1]``.
"""

from .diffusers_rollout_pipeline import QwenImagePipelineWithDualLogProb
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

__all__ = [
    "LLM_ALL_LOG_PROBS_KEY",
    "LLM_RESPONSE_IDS_KEY",
    "LLM_RESPONSE_MASK_KEY",
    "TEXT_ENCODER_RESPONSES_KEY",
    "TEXT_SAMPLING_OPTIONS",
    "QwenImageDualGRPO",
    "QwenImagePipelineWithDualLogProb",
    "QwenImageTextSamplingMixin",
    "left_pad_prompts",
    "text_sampling_options",
]
