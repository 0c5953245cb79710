"""Qwen-Image helpers shared by every Qwen-Image algorithm: image geometry, timesteps, true CFG, SDE window.

The trainer-side adapters and the rollout pipelines of all Qwen-Image algorithms (FlowGRPO, MixGRPO,
DPO, DiffusionNFT, Edit FlowGRPO, Dual-GRPO) build their inputs from these, so trainer and rollout
agree by construction.
"""

from __future__ import annotations

import logging
import os
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from ..checks import check_image_size, check_int, check_noise_level, check_number, check_step
from ..schedulers.flow_match_sde import SDE_TYPES, FlowMatchSDEDiscreteScheduler

logger = logging.getLogger(__name__)

T = TypeVar("T")

QWEN_IMAGE_VAE_SCALE_FACTOR = 8
"""Pixels per latent pixel of Qwen-Image's VAE; latents are then packed in 2x2 patches."""

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

OUTPUT_TYPES = ("latent", "pt", "pil")


# --------------------------------------------------------------------------------------------------
# Small shared helpers: image geometry, timesteps, CFG, SDE window.
# --------------------------------------------------------------------------------------------------


def latent_grid(height: int, width: int, vae_scale_factor: int = QWEN_IMAGE_VAE_SCALE_FACTOR) -> tuple[int, int]:
    """The packed latent grid ``(rows, cols)`` of an image: ``pixels / vae_scale_factor / 2`` each.

    Raises:
        TypeError: an argument is not an int.
        ValueError: ``height`` or ``width`` is not a positive multiple of ``2 * vae_scale_factor``
            (diffusers would floor it, silently cropping the image).
    """
    height = check_image_size("`height`", height, vae_scale_factor)
    width = check_image_size("`width`", width, vae_scale_factor)
    return height // vae_scale_factor // 2, width // vae_scale_factor // 2


def build_img_shapes(
    height: int, width: int, batch_size: int, vae_scale_factor: int = QWEN_IMAGE_VAE_SCALE_FACTOR
) -> list[list[tuple[int, int, int]]]:
    """``img_shapes`` for the transformer: ``[[(1, rows, cols)]] * batch_size``, as diffusers' pipeline builds it."""
    rows, cols = latent_grid(height, width, vae_scale_factor)
    return [[(1, rows, cols)]] * check_int("`batch_size`", batch_size, 1)


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
    (:meth:`QwenImage.set_timesteps`) and rollout (:meth:`QwenImagePipelineWithLogProb.forward`)
    both come here, so they get identical timesteps.

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
    rows, cols = latent_grid(pipeline.height, pipeline.width, QWEN_IMAGE_VAE_SCALE_FACTOR)
    return set_qwen_image_timesteps(scheduler, pipeline.num_inference_steps, rows * cols, device)


def apply_true_cfg(
    noise_pred: torch.Tensor, negative_noise_pred: torch.Tensor, true_cfg_scale: float
) -> torch.Tensor:
    """Qwen-Image's true CFG: ``comb = neg + scale * (cond - neg)``, rescaled to the norm of ``cond``.

    The rescale is per token over the channel dimension: ``comb * ||cond|| / ||comb||``
    (``torch.norm(..., dim=-1, keepdim=True)``), exactly as diffusers' ``QwenImagePipeline``.
    """
    if noise_pred.shape != negative_noise_pred.shape:
        raise ValueError(
            f"`negative_noise_pred` must have the shape of `noise_pred` {tuple(noise_pred.shape)}, "
            f"got {tuple(negative_noise_pred.shape)}"
        )
    comb_pred = negative_noise_pred + true_cfg_scale * (noise_pred - negative_noise_pred)
    cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
    noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
    return comb_pred * (cond_norm / noise_norm)


def check_sde_window(sde_window: tuple[int, int], num_steps: int) -> tuple[int, int]:
    """Validate ``(start, end)``: ints with ``0 <= start < end <= num_steps``; return it as a tuple."""
    if not isinstance(sde_window, (tuple, list)) or len(sde_window) != 2:
        raise ValueError(f"`sde_window` must be a (start, end) pair, got {sde_window!r}")
    start, end = check_int("`sde_window[0]`", sde_window[0]), check_int("`sde_window[1]`", sde_window[1])
    if not 0 <= start < end <= num_steps:
        raise ValueError(
            f"`sde_window` must satisfy 0 <= start < end <= num_steps={num_steps}, got ({start}, {end})"
        )
    return start, end


def full_sde_window(num_steps: int) -> tuple[int, int]:
    """The window used when no ``sde_window_size`` is given: every step but the last, ``(0, N - 1)``.

    The last step lands on sigma = 0, where ``"cps"`` has zero noise (no density to train on); this
    is verl-omni's default as well.
    """
    num_steps = check_int("`num_steps`", num_steps, 1)
    return (0, max(1, num_steps - 1))


def sample_sde_window(
    sde_window_size: int,
    sde_window_range: tuple[int, int],
    num_steps: int,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Draw the SDE window: ``start ~ U{range[0], ..., range[1] - size}``, ``end = start + size``.

    Args:
        sde_window_size: number of SDE steps W.
        sde_window_range: ``(low, high)`` envelope the whole window must lie in (``high`` exclusive,
            at most ``num_steps``).
        num_steps: number of denoising steps; the window must end at or before it.
        generator: random generator for the draw (the rollout passes its SDE generator).

    Raises:
        ValueError: a size or range that does not fit, whatever the draw would give.
        TypeError: a non-int size, bound or step count.
    """
    size = check_int("`sde_window_size`", sde_window_size, 1)
    low, high = _check_window_range(sde_window_range, size, check_int("`num_steps`", num_steps, 1))
    device = generator.device if generator is not None else "cpu"
    start = int(torch.randint(low, high - size + 1, (1,), generator=generator, device=device).item())
    return check_sde_window((start, start + size), num_steps)


def sample_sde_windows(
    sde_window_size: int | None,
    sde_window_range: tuple[int, int],
    num_steps: int,
    generator: torch.Generator | list[torch.Generator] | None,
    batch_size: int,
) -> list[tuple[int, int]]:
    """One SDE window per sample: each drawn from that sample's generator when ``generator`` is a list.

    A packed request batch then rolls out what each request would alone (verl-omni main's
    ``request_batch`` contract). One generator (or None) draws one window that every sample shares;
    no ``sde_window_size`` gives every sample :func:`full_sde_window`.

    Raises:
        ValueError, TypeError: as :func:`sample_sde_window`; a generator list whose length is not
            ``batch_size``.
    """
    batch_size = check_int("`batch_size`", batch_size, 1)
    if sde_window_size is None:
        return [full_sde_window(num_steps)] * batch_size
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(f"`generator` must hold one generator per sample ({batch_size}), got {len(generator)}")
        return [sample_sde_window(sde_window_size, sde_window_range, num_steps, each) for each in generator]
    return [sample_sde_window(sde_window_size, sde_window_range, num_steps, generator)] * batch_size


def check_sde_windows(
    sde_window: tuple[int, int] | list[tuple[int, int]], num_steps: int, batch_size: int
) -> list[tuple[int, int]]:
    """One ``(start, end)`` per sample from a shared window or a per-sample list; all of one size.

    Raises:
        ValueError: a window out of range, a list whose length is not ``batch_size``, or windows of
            different sizes (the trajectories are stacked into one ``(B, W + 1, ...)`` tensor).
    """
    if isinstance(sde_window, tuple) or (
        isinstance(sde_window, list) and len(sde_window) == 2 and all(isinstance(v, int) for v in sde_window)
    ):
        return [check_sde_window(sde_window, num_steps)] * batch_size
    if not isinstance(sde_window, list) or len(sde_window) != batch_size:
        raise ValueError(f"`sde_window` must be one (start, end) pair or a list of {batch_size}, got {sde_window!r}")
    windows = [check_sde_window(window, num_steps) for window in sde_window]
    if len({end - start for start, end in windows}) != 1:
        raise ValueError(f"per-sample SDE windows must all have one size, got {windows}")
    return windows


def _check_window_range(sde_window_range: tuple[int, int], size: int, num_steps: int) -> tuple[int, int]:
    """``(low, high)`` with room for a window of ``size`` steps inside ``[0, num_steps)``."""
    if not isinstance(sde_window_range, (tuple, list)) or len(sde_window_range) != 2:
        raise ValueError(f"`sde_window_range` must be a (low, high) pair, got {sde_window_range!r}")
    low = check_int("`sde_window_range[0]`", sde_window_range[0])
    high = check_int("`sde_window_range[1]`", sde_window_range[1])
    if low < 0 or high - low < size:
        raise ValueError(
            f"`sde_window_range` (low, high) must have 0 <= low and high - low >= sde_window_size={size}, "
            f"got ({low}, {high})"
        )
    # Checked here, not on the drawn window, so a range past the end fails on every call, not on some draws.
    if high > num_steps:
        raise ValueError(
            f"`sde_window_range` ({low}, {high}) ends past the trajectory's num_inference_steps={num_steps}; "
            f"pass a range with high <= {num_steps}"
        )
    return low, high


def _check_sde_type(sde_type: str) -> str:
    if sde_type not in SDE_TYPES:
        raise ValueError(f"`sde_type` must be one of {SDE_TYPES}, got {sde_type!r}")
    return sde_type


def _check_rollout_scales(true_cfg_scale: Any, guidance_scale: Any, noise_level: Any, sde_type: str) -> None:
    """A rollout's scales must be finite numbers >= 0: a NaN would silently turn CFG off or give NaN log-probs."""
    _check_sde_type(sde_type)
    check_number("`true_cfg_scale`", true_cfg_scale, 0.0)
    check_number("`guidance_scale`", guidance_scale, 0.0)
    check_noise_level("`noise_level`", noise_level, sde_type)


def _micro_batch_value(micro_batch: Any, key: str) -> Any:
    """``micro_batch[key]`` as a Python scalar, or None: from a dict or a TensorDict (tensor or non-tensor data)."""
    if micro_batch is None:
        return None
    value = micro_batch.get(key, None)
    if type(value).__name__.startswith("NonTensor"):  # tensordict's NonTensorData / NonTensorStack
        value = value.tolist()
    if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
        values = set(torch.as_tensor(value).reshape(-1).tolist())
        if len(values) != 1:
            raise ValueError(
                f"micro_batch[{key!r}] must hold one value for the whole micro-batch, got {sorted(values)}"
            )
        value = values.pop()
    return value.item() if isinstance(value, np.generic) else value


def _select_step(tensor: torch.Tensor, step: int, selected_ndim: int, name: str) -> torch.Tensor:
    """``tensor[:, step]`` for a trajectory (``selected_ndim + 1`` dims), ``tensor`` itself if already selected."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim == selected_ndim + 1:
        return tensor[:, check_step(step, tensor, name)]
    if tensor.ndim == selected_ndim:
        return tensor
    raise ValueError(
        f"`{name}` must have {selected_ndim + 1} dims (a trajectory) or {selected_ndim} (one step), "
        f"got shape {tuple(tensor.shape)}"
    )


def _match_batch(
    negative_embeds: torch.Tensor, negative_mask: torch.Tensor | None, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Repeat a single negative prompt for every sample; any other batch must equal the prompt's."""
    if negative_embeds.shape[0] == batch_size:
        return negative_embeds, negative_mask
    if negative_embeds.shape[0] == 1:
        expanded_mask = None if negative_mask is None else negative_mask.expand(batch_size, -1)
        return negative_embeds.expand(batch_size, -1, -1), expanded_mask
    raise ValueError(
        f"the negative prompt must have 1 or batch={batch_size} samples (as the prompt), got {negative_embeds.shape[0]}"
    )


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


def _module_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating parameter (what its input projections expect)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


# --------------------------------------------------------------------------------------------------
