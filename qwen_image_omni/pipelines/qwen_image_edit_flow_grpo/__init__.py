"""Qwen-Image-Edit-Plus with FlowGRPO: the image-conditioned training adapter and its rollout pipeline.

- :mod:`.diffusers_training_adapter`: :class:`QwenImageEditPlusFlowGRPO`, registered for
  ``("QwenImageEditPlusPipeline", "flow_grpo")``: Qwen-Image's FlowGRPO step functions plus the
  condition image (``condition_image_latents`` appended after the target tokens, condition-aware
  ``img_shapes``, the prediction sliced back to the target);
- :mod:`.rollout`: :class:`QwenImageEditRolloutMixin`, the condition handling of the Qwen-Image
  rollout loop (condition latents appended at every step, the trainer's own step functions), shared
  by both rollout pipelines;
- :mod:`.diffusers_rollout_pipeline`: :class:`DiffusersQwenImageEditPlusPipelineWithLogProb` on
  diffusers (also importable as ``QwenImageEditPlusPipelineWithLogProb``, its former name), the
  Qwen-Image rollout loop with that adapter; it records the condition latents and ``img_shapes`` in
  ``metadata["rl"]`` for the trainer;
- :mod:`.vllm_omni_rollout_pipeline`: its vllm-omni twin ``QwenImageEditPlusPipelineWithLogProb``
  (vllm-omni's Edit-Plus preprocessing and encoding, then the same loop), imported only when an
  engine asks for it by its dotted path.
"""

from ..model_base import VllmOmniPipelineBase
from .diffusers_rollout_pipeline import (
    DiffusersQwenImageEditPlusPipelineWithLogProb,
    QwenImageEditPlusPipelineWithLogProb,
)
from .diffusers_training_adapter import (
    CONDITION_LATENTS_KEY,
    IMG_SHAPES_KEY,
    SP_SIZE_KEY,
    QwenImageEditPlusFlowGRPO,
    check_img_shapes,
)
from .rollout import ARCHITECTURE, QwenImageEditRolloutMixin

# The rollout pipelines, by dotted path: the vllm-omni one answers where vllm-omni is installed, and is
# imported only when asked for (an engine's custom_pipeline_name), never here.
VllmOmniPipelineBase.register_paths(
    ARCHITECTURE,
    "flow_grpo",
    diffusers=f"{__name__}.diffusers_rollout_pipeline.QwenImageEditPlusPipelineWithLogProb",
    vllm_omni=f"{__name__}.vllm_omni_rollout_pipeline.QwenImageEditPlusPipelineWithLogProb",
)

__all__ = [
    "ARCHITECTURE",
    "CONDITION_LATENTS_KEY",
    "IMG_SHAPES_KEY",
    "SP_SIZE_KEY",
    "DiffusersQwenImageEditPlusPipelineWithLogProb",
    "QwenImageEditPlusFlowGRPO",
    "QwenImageEditPlusPipelineWithLogProb",
    "QwenImageEditRolloutMixin",
    "check_img_shapes",
]
