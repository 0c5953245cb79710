"""The public ops ``joint_qk_norm_rope`` (Qwen-Image 1.x: two streams joined) and ``qk_norm_rope``
(one stream, Qwen-Image 2.1): argument checks, then the backend.

The backends (``torch_backend``, ``triton_backend``) assume valid arguments; what they compute is
defined by ``reference``.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os

import torch
from torch import Tensor

from .reference import result_dtype
from .torch_backend import joint_qk_norm_rope_torch, needs_autograd, qk_norm_rope_torch

__all__ = ["BACKEND_ENV_VAR", "BACKENDS", "joint_qk_norm_rope", "qk_norm_rope"]

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


def _resolve_backend(backend: str, activations: dict, weights: dict, outs: dict) -> str:
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
    device = next(iter(activations.values())).device
    if backend == "auto":
        if device.type == "cuda" and _triton_importable():
            from .triton_backend import triton_supports

            if triton_supports(activations, weights, outs) is None:
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

        reason = triton_supports(activations, weights, outs)
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
    if torch.compiler.is_compiling():  # dynamo may trace eps as a symbolic float
        return
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps: expected a finite real number > 0, got {type(eps).__name__} {eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite real number > 0, got {eps!r}")


def _check_stream(names: tuple[str, str], q: object, k: object, seq_name: str, like: Tensor | None) -> None:
    """q and k of one stream: ``[B, S, H, D]`` each, B/H/D (and the device) as ``like`` (the first stream's q)."""
    acts = dict(zip(names, (_check_activation(names[0], q, seq_name), _check_activation(names[1], k, seq_name))))
    like = q if like is None else like
    batch, _, heads, head_dim = like.shape
    if head_dim % 2:
        raise ValueError(f"{names[0]}: head dim D must be even for RoPE, got D={head_dim}")
    for name, t in acts.items():
        expected = (batch, q.shape[1], heads, head_dim)
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name}: expected shape [B, S, H, D] = {list(expected)} "
                f"(B, H, D from the first q, S from {names[0]}), got {list(t.shape)}"
            )


def _check_table(name: str, freqs: object, batch: int, seq: int, head_dim: int) -> None:
    """A complex64 RoPE table: shared ``[S, D/2]`` or per sample ``[B, S, D/2]``."""
    freqs = _check_tensor(name, freqs)
    if freqs.dtype != torch.complex64:
        raise ValueError(f"{name}: expected dtype complex64, got {freqs.dtype}")
    shapes = ((seq, head_dim // 2), (batch, seq, head_dim // 2))
    if tuple(freqs.shape) not in shapes:
        raise ValueError(
            f"{name}: expected shape [S, D/2] = {list(shapes[0])} (shared by the batch) or [B, S, D/2] = "
            f"{list(shapes[1])} (one table per sample), got {list(freqs.shape)}"
        )


def _check_weights(weights: dict, head_dim: int) -> None:
    for name, w in weights.items():
        if w is None:
            continue
        w = _check_tensor(name, w)
        if tuple(w.shape) != (head_dim,):
            raise ValueError(f"{name}: expected shape [D] = [{head_dim}] or None, got {list(w.shape)}")
        if w.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {w.dtype}")


def _check_devices(tensors: dict, first: str) -> None:
    device = tensors[first].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of {first}), got {t.device}")


def _check_out(out: object, q: Tensor, k: Tensor, weights: tuple) -> dict:
    """``out``: None, or ``(out_q, out_k)`` shaped as q and k in the dtype the op gives."""
    if out is None:
        return {}
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(f"out: expected None or a pair (out_q, out_k) of tensors, got {type(out).__name__}")
    outs = {}
    for name, o, x, w in zip(("out[0]", "out[1]"), out, (q, k), weights):
        o = _check_tensor(name, o)
        dtype = result_dtype(x.dtype, w)
        if tuple(o.shape) != tuple(x.shape) or o.dtype != dtype:
            raise ValueError(
                f"{name}: expected a {dtype} tensor of shape {list(x.shape)} (the input's shape, the op's result "
                f"dtype), got {o.dtype} {list(o.shape)}"
            )
        outs[name] = o
    return outs


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
        img_freqs, txt_freqs: complex64 ``[S_img, D/2]`` / ``[S_txt, D/2]`` from the Qwen-Image RoPE module,
            shared by the batch, or ``[B, S_img, D/2]`` / ``[B, S_txt, D/2]``: one table per sample (each
            sample then gets exactly what it gets alone with its own table).
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
    _check_stream(("img_q", "img_k"), img_q, img_k, "S_img", None)
    _check_stream(("txt_q", "txt_k"), txt_q, txt_k, "S_txt", img_q)
    batch, s_img, _, head_dim = img_q.shape
    _check_table("img_freqs", img_freqs, batch, s_img, head_dim)
    _check_table("txt_freqs", txt_freqs, batch, txt_q.shape[1], head_dim)
    _check_weights(weights, head_dim)
    acts = {"img_q": img_q, "img_k": img_k, "txt_q": txt_q, "txt_k": txt_k}
    _check_devices({**acts, "img_freqs": img_freqs, "txt_freqs": txt_freqs, **weights}, "img_q")
    _check_eps(eps)
    if _resolve_backend(backend, acts, weights, {}) == "triton":
        from .triton_backend import joint_qk_norm_rope_triton as implementation
    else:
        implementation = joint_qk_norm_rope_torch
    return implementation(img_q, img_k, txt_q, txt_k, **weights, img_freqs=img_freqs, txt_freqs=txt_freqs, eps=eps)


def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    *,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    freqs: Tensor,
    eps: float = 1e-6,
    out: tuple[Tensor, Tensor] | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """RMSNorm q/k per head and rotate them with a RoPE table: one token stream (Qwen-Image 2.1's layout).

    The same numbers as :func:`joint_qk_norm_rope` gives one stream, without the concatenation.

    Args:
        q, k: ``[B, S, H, D]`` (any strides).
        q_weight, k_weight: RMSNorm weights ``[D]``, or None for no norm on that tensor (RoPE still applies).
        freqs: complex64 ``[S, D/2]`` shared by the batch, or ``[B, S, D/2]``, one table per sample
            (Qwen-Image 2.1's frame/height/width tables are such tables).
        eps: RMSNorm epsilon, a finite real number > 0.
        out: None for fresh outputs, or ``(out_q, out_k)`` to write into: tensors of q's and k's shapes in
            the result dtype; ``out=(q, k)`` works in place. Each output must be its input itself or not
            overlap any input. Writing into ``out`` is for inference: it is refused when autograd records.
        backend: as :func:`joint_qk_norm_rope`'s.

    Returns:
        ``(q_out, k_out)`` (``out`` itself when given), each ``[B, S, H, D]`` in the dtype diffusers'
        RMSNorm -> ``apply_rotary_emb_qwen`` gives. Without ``out``: differentiable once with respect to
        q, k and the weights.

    Raises:
        ValueError: bad shapes, dtypes, devices, eps, ``out`` or backend name, ``out`` under autograd, or a
            forced "triton" that cannot run.
    """
    _check_stream(("q", "k"), q, k, "S", None)
    batch, seq, _, head_dim = q.shape
    _check_table("freqs", freqs, batch, seq, head_dim)
    weights = {"q_weight": q_weight, "k_weight": k_weight}
    _check_weights(weights, head_dim)
    outs = _check_out(out, q, k, (q_weight, k_weight))
    _check_devices({"q": q, "k": k, "freqs": freqs, **weights, **outs}, "q")
    _check_eps(eps)
    if outs and needs_autograd((q, k, freqs, q_weight, k_weight)):
        raise ValueError(
            "out: writing into given buffers is for inference, but autograd is recording (an input requires "
            "grad); call without out (fresh outputs, differentiable) or under torch.no_grad()"
        )
    if _resolve_backend(backend, {"q": q, "k": k}, weights, outs) == "triton":
        from .triton_backend import qk_norm_rope_triton as implementation
    else:
        implementation = qk_norm_rope_torch
    return implementation(q, k, q_weight=q_weight, k_weight=k_weight, freqs=freqs, eps=eps, out=out)
