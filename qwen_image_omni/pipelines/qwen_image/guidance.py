"""Qwen-Image's true classifier-free guidance."""

from __future__ import annotations

import torch


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
