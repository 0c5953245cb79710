"""Qwen-Image's noise schedule: its scheduler config, timesteps with the dynamic shift, and the SDE scheduler."""

from __future__ import annotations

import os
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from ..checks import check_int
from ..schedulers.flow_match_sde import FlowMatchSDEDiscreteScheduler
from .geometry import QWEN_IMAGE_VAE_SCALE_FACTOR, ImageGeometry

T = TypeVar("T")

QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
"""Qwen-Image's ``scheduler/scheduler_config.json``, used when the model path has no scheduler folder."""


def set_qwen_image_timesteps(
    scheduler: FlowMatchSDEDiscreteScheduler,
    num_inference_steps: int,
    image_seq_len: int,
    device: str | torch.device | None = None,
    sigmas: list[float] | np.ndarray | None = None,
) -> torch.Tensor:
    """Set Qwen-Image's schedule on ``scheduler`` and return ``scheduler.timesteps``.

    As diffusers' ``QwenImagePipeline``: sigmas ``np.linspace(1, 1/N, N)`` unless given, shifted by
    ``mu = calculate_shift(image_seq_len, ...)`` with the scheduler's own config values. Trainer
    (:meth:`QwenImage.set_timesteps`) and rollout (the rollout loop's ``start_rollout``) both come
    here, so they get identical timesteps.

    Args:
        scheduler: the scheduler to configure.
        num_inference_steps: number of denoising steps N.
        image_seq_len: packed latent tokens per image (``rows * cols``), for the dynamic shift.
        device: where the timesteps and sigmas go.
        sigmas: custom sigmas (length N) instead of the linear ones.
    """
    num_inference_steps = check_int("`num_inference_steps`", num_inference_steps, 1)
    image_seq_len = check_int("`image_seq_len`", image_seq_len, 1)
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    elif len(sigmas) != num_inference_steps:
        raise ValueError(f"`sigmas` must have num_inference_steps={num_inference_steps} entries, got {len(sigmas)}")
    config = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
    return scheduler.timesteps


def load_qwen_image_scheduler(scheduler_cls: type[T], local_path: str | None) -> T:
    """``scheduler_cls`` from ``<local_path>/scheduler`` when that folder exists, else from Qwen-Image's
    default config (:data:`QWEN_IMAGE_SCHEDULER_CONFIG`)."""
    if local_path and os.path.isdir(os.path.join(local_path, "scheduler")):
        return scheduler_cls.from_pretrained(local_path, subfolder="scheduler")
    return scheduler_cls.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)


def set_pipeline_timesteps(scheduler: Any, pipeline: Any, device: str | torch.device | None) -> torch.Tensor:
    """Qwen-Image's schedule for a pipeline config (``height``, ``width``, ``num_inference_steps``):
    :func:`set_qwen_image_timesteps` with the image's packed latent size."""
    image_seq_len = ImageGeometry(pipeline.height, pipeline.width, QWEN_IMAGE_VAE_SCALE_FACTOR).image_seq_len
    return set_qwen_image_timesteps(scheduler, pipeline.num_inference_steps, image_seq_len, device)


def sde_scheduler(scheduler: Any) -> FlowMatchSDEDiscreteScheduler:
    """``scheduler`` as our SDE scheduler: kept if it is one, rebuilt from a flow-match Euler scheduler's config."""
    if isinstance(scheduler, FlowMatchSDEDiscreteScheduler):
        return scheduler
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchSDEDiscreteScheduler.from_config(scheduler.config)
    raise TypeError(
        "`scheduler` must be a FlowMatchSDEDiscreteScheduler (or a FlowMatchEulerDiscreteScheduler to convert), "
        f"got {type(scheduler).__name__}"
    )
