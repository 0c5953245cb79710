"""Qwen-Image with FlowGRPO: the training adapter and the rollout pipelines, one file each.

- :mod:`.diffusers_training_adapter`: :class:`QwenImage`, registered for
  ``("QwenImagePipeline", "flow_grpo")``;
- :mod:`.diffusers_rollout_pipeline`: :class:`DiffusersQwenImagePipelineWithLogProb` on diffusers
  (also importable as ``QwenImagePipelineWithLogProb``, its former name);
- :mod:`.vllm_omni_rollout_pipeline`: its vllm-omni twin, verl-omni's ``QwenImagePipelineWithLogProb``,
  imported only when an engine asks for it by its dotted path.

Trainer and rollout run the same step functions, so the trainer may re-collate the rollout's
prompt embeddings to any width and still score the same transitions.
"""

from ..model_base import VllmOmniPipelineBase

# The shared Qwen-Image names this package has always exported (their home is ..qwen_image).
from ..qwen_image import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    QWEN_IMAGE_VAE_SCALE_FACTOR,
    QwenImageRolloutMixin,
    QwenImageRolloutOutput,
    apply_true_cfg,
    build_img_shapes,
    check_sde_window,
    full_sde_window,
    latent_grid,
    sample_sde_window,
    sample_sde_windows,
    sde_scheduler,
    set_qwen_image_timesteps,
)
from .diffusers_rollout_pipeline import DiffusersQwenImagePipelineWithLogProb, QwenImagePipelineWithLogProb
from .diffusers_training_adapter import QwenImage

# The rollout pipelines, by dotted path: the vllm-omni one answers where vllm-omni is installed, and is
# imported only when asked for (an engine's custom_pipeline_name), never here.
VllmOmniPipelineBase.register_paths(
    "QwenImagePipeline",
    "flow_grpo",
    diffusers=f"{__name__}.diffusers_rollout_pipeline.QwenImagePipelineWithLogProb",
    vllm_omni=f"{__name__}.vllm_omni_rollout_pipeline.QwenImagePipelineWithLogProb",
)

__all__ = [
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "QWEN_IMAGE_VAE_SCALE_FACTOR",
    "DiffusersQwenImagePipelineWithLogProb",
    "QwenImage",
    "QwenImagePipelineWithLogProb",
    "QwenImageRolloutMixin",
    "QwenImageRolloutOutput",
    "apply_true_cfg",
    "build_img_shapes",
    "check_sde_window",
    "full_sde_window",
    "latent_grid",
    "sample_sde_window",
    "sample_sde_windows",
    "sde_scheduler",
    "set_qwen_image_timesteps",
]
