"""The public op ``joint_qk_norm_rope``: argument checks, then the backend.

The backends (``torch_backend``, ``triton_backend``) assume valid arguments; what they compute is
defined by ``reference.joint_qk_norm_rope_reference``.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os

import torch
from torch import Tensor

from .torch_backend import joint_qk_norm_rope_torch

__all__ = ["BACKEND_ENV_VAR", "BACKENDS", "joint_qk_norm_rope"]

BACKEND_ENV_VAR = "QWEN_IMAGE_OMNI_QK_BACKEND"
BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# find_spec, not import: triton_backend (which defines kernels) is imported only when first used, so
# TRITON_INTERPRET can still be set after this package is imported.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_importable() -> bool:
    """Whether the ``triton`` package is installed (it is a Linux x86_64 dependency only)."""
    return _TRITON_INSTALLED


def _triton_runs_on(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only in its interpreter (tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _resolve_backend(backend: str, activations: tuple, weights: tuple) -> str:
    """Concrete backend for ``backend``.

    "auto" follows ``$QWEN_IMAGE_OMNI_QK_BACKEND`` when set; otherwise it picks Triton for CUDA
    tensors the kernel supports (when triton imports) and torch for everything else. A forced
    "triton" that cannot run raises ``ValueError`` saying why, instead of silently falling back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV_VAR, "auto")
        if forced not in BACKENDS:
            raise ValueError(f"${BACKEND_ENV_VAR}: expected one of {BACKENDS}, got {forced!r}")
        backend = forced
    device = activations[0].device
    if backend == "auto":
        if device.type == "cuda" and _triton_importable():
            from .triton_backend import triton_supports

            if triton_supports(*activations, weights) is None:
                return "triton"
        return "torch"
    if backend == "triton":
        if not _triton_importable():
            raise ValueError("backend='triton': the triton package is not installed; use backend='torch'")
        if not _triton_runs_on(device):
            raise ValueError(
                f"backend='triton': expected CUDA tensors (or TRITON_INTERPRET=1 for the interpreter), got {device}"
            )
        from .triton_backend import triton_supports

        reason = triton_supports(*activations, weights)
        if reason is not None:
            raise ValueError(f"backend='triton' does not support these inputs: {reason}; use backend='torch'")
    return backend


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _check_activation(name: str, t: object, seq_name: str) -> Tensor:
    t = _check_tensor(name, t)
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor [B, {seq_name}, H, D], got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
    return t


def _check_eps(eps: object) -> None:
    """RMSNorm's epsilon must be a finite real number > 0: with eps <= 0 an all-zero row gives NaN."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps: expected a finite real number > 0, got {type(eps).__name__} {eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite real number > 0, got {eps!r}")


def _validate(img_q, img_k, txt_q, txt_k, weights: dict, img_freqs, txt_freqs) -> None:
    """Shape, dtype and device checks only (no syncs, no data-dependent branches)."""
    acts = {
        "img_q": _check_activation("img_q", img_q, "S_img"),
        "img_k": _check_activation("img_k", img_k, "S_img"),
        "txt_q": _check_activation("txt_q", txt_q, "S_txt"),
        "txt_k": _check_activation("txt_k", txt_k, "S_txt"),
    }
    batch, s_img, heads, head_dim = img_q.shape
    s_txt = txt_q.shape[1]
    if head_dim % 2:
        raise ValueError(f"img_q: head dim D must be even for RoPE, got D={head_dim}")
    for name, t in acts.items():
        seq = s_img if name.startswith("img") else s_txt
        expected = (batch, seq, heads, head_dim)
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name}: expected shape [B, S, H, D] = {list(expected)} "
                f"(B, H, D from img_q, S from {name[:3]}_q), got {list(t.shape)}"
            )
    for name, (freqs, seq) in {"img_freqs": (img_freqs, s_img), "txt_freqs": (txt_freqs, s_txt)}.items():
        freqs = _check_tensor(name, freqs)
        if freqs.dtype != torch.complex64:
            raise ValueError(f"{name}: expected dtype complex64, got {freqs.dtype}")
        if tuple(freqs.shape) != (seq, head_dim // 2):
            raise ValueError(f"{name}: expected shape [S, D/2] = {[seq, head_dim // 2]}, got {list(freqs.shape)}")
    for name, w in weights.items():
        if w is None:
            continue
        w = _check_tensor(name, w)
        if tuple(w.shape) != (head_dim,):
            raise ValueError(f"{name}: expected shape [D] = [{head_dim}] or None, got {list(w.shape)}")
        if w.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {w.dtype}")
    tensors = {**acts, "img_freqs": img_freqs, "txt_freqs": txt_freqs, **weights}
    for name, t in tensors.items():
        if t is not None and t.device != img_q.device:
            raise ValueError(f"{name}: expected device {img_q.device} (the device of img_q), got {t.device}")


def joint_qk_norm_rope(
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
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """RMSNorm q/k per head, rotate them with the Qwen-Image RoPE tables, and join ``[text, image]``.

    Args:
        img_q, img_k: ``[B, S_img, H, D]`` (any strides, e.g. ``unflatten`` of a linear output).
        txt_q, txt_k: ``[B, S_txt, H, D]``.
        img_q_weight, img_k_weight, txt_q_weight, txt_k_weight: RMSNorm weights ``[D]``, or None
            for no norm on that tensor (RoPE still applies), like diffusers' ``if attn.norm_q is not None``.
        img_freqs, txt_freqs: complex64 ``[S_img, D/2]`` / ``[S_txt, D/2]`` from the Qwen-Image RoPE module.
        eps: RMSNorm epsilon, a finite real number > 0.
        backend: "auto", "torch" or "triton". "auto" follows ``$QWEN_IMAGE_OMNI_QK_BACKEND`` when set,
            else picks Triton for supported CUDA inputs and torch otherwise; an explicit name always wins.

    Returns:
        ``(joint_q, joint_k)``, each ``[B, S_txt + S_img, H, D]`` with the text tokens first, in the
        dtype diffusers' RMSNorm -> ``apply_rotary_emb_qwen`` -> ``torch.cat`` sequence gives
        (e.g. bf16 for bf16 inputs with bf16 weights, fp32 for bf16 inputs with fp32 weights).
        Differentiable once with respect to the inputs and the weights.

    Raises:
        ValueError: bad shapes, dtypes, devices, eps or backend name, or a forced "triton" that cannot run.
    """
    weights = {
        "img_q_weight": img_q_weight,
        "img_k_weight": img_k_weight,
        "txt_q_weight": txt_q_weight,
        "txt_k_weight": txt_k_weight,
    }
    _validate(img_q, img_k, txt_q, txt_k, weights, img_freqs, txt_freqs)
    if not torch.compiler.is_compiling():  # dynamo may trace eps as a symbolic float
        _check_eps(eps)
    if _resolve_backend(backend, (img_q, img_k, txt_q, txt_k), tuple(weights.values())) == "triton":
        from .triton_backend import joint_qk_norm_rope_triton as implementation
    else:
        implementation = joint_qk_norm_rope_torch
    return implementation(img_q, img_k, txt_q, txt_k, **weights, img_freqs=img_freqs, txt_freqs=txt_freqs, eps=eps)
