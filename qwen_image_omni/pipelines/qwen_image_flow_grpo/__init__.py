"""Qwen-Image with FlowGRPO: the training adapter and the rollout pipelines, one file each.

- :mod:`.common`: Qwen-Image helpers every Qwen-Image algorithm shares (geometry, timesteps, true
  CFG, the SDE window);
- :mod:`.diffusers_training_adapter`: :class:`QwenImage`, registered for
  ``("QwenImagePipeline", "flow_grpo")``;
- :mod:`.rollout`: :class:`QwenImageRolloutMixin`, the rollout loop the diffusers and the vllm-omni
  rollout pipelines share, and :class:`QwenImageRolloutOutput`;
- :mod:`.diffusers_rollout_pipeline`: :class:`QwenImagePipelineWithLogProb` on diffusers;
- :mod:`.vllm_omni_rollout_pipeline`: its vllm-omni twin, imported only with vllm-omni installed.

Trainer and rollout run the same step functions, and no text length is passed anywhere: the
transformer takes the text RoPE length from ``encoder_hidden_states.shape[1]``, so the trainer may
re-collate the rollout's prompt embeddings to any right-padded width and still score the same
transitions.
"""

from .common import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    QWEN_IMAGE_VAE_SCALE_FACTOR,
    apply_true_cfg,
    build_img_shapes,
    check_sde_window,
    check_sde_windows,
    full_sde_window,
    latent_grid,
    sample_sde_window,
    sample_sde_windows,
    sde_scheduler,
    set_qwen_image_timesteps,
)
from .diffusers_rollout_pipeline import QwenImagePipelineWithLogProb
from .diffusers_training_adapter import QwenImage
from .rollout import QwenImageRolloutMixin, QwenImageRolloutOutput

__all__ = [
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "QWEN_IMAGE_VAE_SCALE_FACTOR",
    "QwenImage",
    "QwenImagePipelineWithLogProb",
    "QwenImageRolloutMixin",
    "QwenImageRolloutOutput",
    "apply_true_cfg",
    "build_img_shapes",
    "check_sde_window",
    "check_sde_windows",
    "full_sde_window",
    "latent_grid",
    "sample_sde_window",
    "sample_sde_windows",
    "sde_scheduler",
    "set_qwen_image_timesteps",
]
