"""Functional reference of the kernels' ops: what every backend must compute, in plain torch.

``joint_qk_norm_rope`` is diffusers' ``QwenDoubleStreamAttnProcessor2_0`` sequence with the same roundings::

    RMSNorm (if the weight is not None) -> apply_rotary_emb_qwen(use_real=False) -> cat([text, image], dim=1)

and ``qk_norm_rope`` is the same without the concatenation (one token stream, as Qwen-Image 2.1 has).
A RoPE table is shared by the batch (``[S, D/2]``) or given per sample (``[B, S, D/2]``).

with the complex product spelled out in real arithmetic, so that it also runs on views diffusers'
``view_as_complex`` rejects, under ``torch.compile`` and under ``torch.func`` transforms. Autograd
through it gives diffusers' gradients too. The backends' tests use it as their oracle; its own test
compares it with diffusers' modules.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["joint_qk_norm_rope_reference", "qk_norm_rope_reference", "result_dtype", "rms_norm", "rope"]


def result_dtype(x_dtype: torch.dtype, weight: Tensor | None) -> torch.dtype:
    """Dtype ``rope(rms_norm(x, weight))`` has for an ``x`` of ``x_dtype`` (diffusers' promotion rules)."""
    if weight is None:
        return x_dtype
    if weight.dtype in (torch.float16, torch.bfloat16):
        return weight.dtype
    return torch.promote_types(torch.float32, weight.dtype)  # x * fp32 rsqrt is fp32 for every x dtype


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
    """``apply_rotary_emb_qwen(x, freqs, use_real=False)``: ``x`` ``[B, S, H, D]``, ``freqs`` complex ``[S, D/2]``
    (diffusers' shape) or ``[B, S, D/2]`` (one table per sample: each sample as diffusers with its own table).

    The product is (re*cos - im*sin, re*sin + im*cos) with each product rounded on its own, as in
    PyTorch's vectorized complex multiply (its scalar loop, taken for D/2 not a multiple of the SIMD
    width or strided tables, may contract an FMA and differ in the last bit).
    """
    cos, sin = torch.view_as_real(freqs).unsqueeze(-3).unbind(-1)  # [(B,) S, 1, D/2] each
    re, im = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2).to(x.dtype)


def qk_norm_rope_reference(
    q: Tensor,
    k: Tensor,
    *,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    freqs: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """``qk_norm_rope`` without argument checks or backend choice: ``(q_out, k_out)``, each ``[B, S, H, D]``.

    Same arguments and results as ``qwen_image_omni.kernels.qk_norm_rope`` (no ``out``), differentiable
    with respect to every tensor, the RoPE table included.
    """
    return rope(rms_norm(q, q_weight, eps), freqs), rope(rms_norm(k, k_weight, eps), freqs)


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

    txt = qk_norm_rope_reference(txt_q, txt_k, q_weight=txt_q_weight, k_weight=txt_k_weight, freqs=txt_freqs, eps=eps)
    img = qk_norm_rope_reference(img_q, img_k, q_weight=img_q_weight, k_weight=img_k_weight, freqs=img_freqs, eps=eps)
    return torch.cat([txt[0], img[0]], dim=1), torch.cat([txt[1], img[1]], dim=1)
