"""What every Qwen-Image algorithm shares, trainer and rollout alike.

- :mod:`.geometry`: image size, packed latent grid, ``img_shapes`` (:class:`ImageGeometry`, checked once);
- :mod:`.scheduling`: Qwen-Image's scheduler config and timesteps, the SDE scheduler;
- :mod:`.guidance`: true CFG;
- :mod:`.sde_window`: which steps draw SDE noise and are recorded;
- :mod:`.prompts`: :class:`PromptBatch`, the encoded prompts a rollout or trainer step reads;
- :mod:`.trainer_inputs`: what a training adapter reads from its inputs;
- :mod:`.rollout`: the rollout loop (:class:`QwenImageRolloutMixin`) and its output;
- :mod:`.token_id_prompts`: prompt embeddings from templated token ids;
- :mod:`.recompute`: :func:`recompute_log_probs`, the trainer's rescoring of a trajectory.
"""

from .geometry import QWEN_IMAGE_VAE_SCALE_FACTOR, ImageGeometry, build_img_shapes, latent_grid
from .guidance import apply_true_cfg
from .prompts import PromptBatch, pad_prompt_rows
from .recompute import recompute_log_probs
from .rollout import OUTPUT_TYPES, QwenImageRolloutMixin, QwenImageRolloutOutput, RolloutRun
from .scheduling import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    load_qwen_image_scheduler,
    sde_scheduler,
    set_pipeline_timesteps,
    set_qwen_image_timesteps,
)
from .sde_window import (
    check_rollout_scales,
    check_sde_type,
    check_sde_window,
    full_sde_window,
    sample_sde_window,
    sample_sde_windows,
)
from .token_id_prompts import QwenImageTokenIdPrompts
from .trainer_inputs import micro_batch_value, module_dtype, select_step

__all__ = [
    "OUTPUT_TYPES",
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "QWEN_IMAGE_VAE_SCALE_FACTOR",
    "ImageGeometry",
    "PromptBatch",
    "QwenImageRolloutMixin",
    "QwenImageRolloutOutput",
    "QwenImageTokenIdPrompts",
    "RolloutRun",
    "apply_true_cfg",
    "build_img_shapes",
    "check_rollout_scales",
    "check_sde_type",
    "check_sde_window",
    "full_sde_window",
    "latent_grid",
    "load_qwen_image_scheduler",
    "micro_batch_value",
    "module_dtype",
    "pad_prompt_rows",
    "recompute_log_probs",
    "sample_sde_window",
    "sample_sde_windows",
    "sde_scheduler",
    "select_step",
    "set_pipeline_timesteps",
    "set_qwen_image_timesteps",
]
