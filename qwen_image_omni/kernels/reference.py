"""Functional reference of ``joint_qk_norm_rope``: what every backend must compute, in plain torch.

It is diffusers' ``QwenDoubleStreamAttnProcessor2_0`` sequence with the same roundings::

    RMSNorm (if the weight is not None) -> apply_rotary_emb_qwen(use_real=False) -> cat([text, image], dim=1)

with the complex product spelled out in real arithmetic, so that it also runs on views diffusers'
``view_as_complex`` rejects, under ``torch.compile`` and under ``torch.func`` transforms. Autograd
through it gives diffusers' gradients too. The backends' tests use it as their oracle; its own test
compares it with diffusers' modules.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["joint_qk_norm_rope_reference", "rms_norm", "rope"]


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """diffusers' ``RMSNorm.forward`` (non-NPU branch); ``weight=None`` means no norm at all."""
    if weight is None:
        return x
    variance = x.float().pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return y * weight


def rope(x: Tensor, freqs: Tensor) -> Tensor:
    """``apply_rotary_emb_qwen(x, freqs, use_real=False)``: ``x`` ``[B, S, H, D]``, ``freqs`` complex ``[S, D/2]``.

    The product is (re*cos - im*sin, re*sin + im*cos) with each product rounded on its own, as in
    PyTorch's vectorized complex multiply (its scalar loop, taken for D/2 not a multiple of the SIMD
    width or strided tables, may contract an FMA and differ in the last bit).
    """
    cos, sin = torch.view_as_real(freqs).unsqueeze(1).unbind(-1)  # [S, 1, D/2] each
    re, im = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2).to(x.dtype)


def joint_qk_norm_rope_reference(
    img_q: Tensor,
    img_k: Tensor,
    txt_q: Tensor,
    txt_k: Tensor,
    *,
    img_q_weight: Tensor | None,
    img_k_weight: Tensor | None,
    txt_q_weight: Tensor | None,
    txt_k_weight: Tensor | None,
    img_freqs: Tensor,
    txt_freqs: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """``joint_qk_norm_rope`` without argument checks or backend choice: ``(joint_q, joint_k)``.

    Same arguments and results as ``qwen_image_omni.kernels.joint_qk_norm_rope``, differentiable
    with respect to every tensor, the RoPE tables included.
    """

    def part(x: Tensor, weight: Tensor | None, freqs: Tensor) -> Tensor:
        return rope(rms_norm(x, weight, eps), freqs)

    joint_q = torch.cat([part(txt_q, txt_q_weight, txt_freqs), part(img_q, img_q_weight, img_freqs)], dim=1)
    joint_k = torch.cat([part(txt_k, txt_k_weight, txt_freqs), part(img_k, img_k_weight, img_freqs)], dim=1)
    return joint_q, joint_k
