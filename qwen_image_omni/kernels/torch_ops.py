"""Eager PyTorch backend of ``joint_qk_norm_rope``.

It reproduces, bit for bit where the op order allows, what diffusers'
``QwenDoubleStreamAttnProcessor2_0`` does to q and k::

    RMSNorm (if the weight is not None) -> apply_rotary_emb_qwen(use_real=False) -> cat([text, image], dim=1)

Two paths compute the same numbers:

* ``_joint_differentiable``: plain functional ops, used whenever autograd is needed and under
  ``torch.compile`` (inductor fuses it by itself).
* ``_joint_fast``: no autograd, eager only. It writes straight into the preallocated joint output
  and walks the tokens in chunks small enough that the intermediate passes stay in cache.

Input validation lives in ``qwen_image_omni.kernels``; this module assumes valid inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

_HALF_DTYPES = (torch.float16, torch.bfloat16)

# CPU chunk size: 2**18 fp32 values (1 MiB) per intra-op thread and scratch buffer, so the few
# buffers a chunk uses stay in L2/L3 while the 5-9 elementwise passes run over them. Smaller chunks
# lose more to per-op overhead; the whole tensor would go through DRAM on every pass.
_CPU_CHUNK_ELEMENTS_PER_THREAD = 1 << 18


def norm_dtype(x_dtype: torch.dtype, weight: Tensor | None) -> torch.dtype:
    """Dtype diffusers' ``RMSNorm`` (or its absence when ``weight`` is None) gives, kept by RoPE."""
    if weight is None:
        return x_dtype
    if weight.dtype in _HALF_DTYPES:
        return weight.dtype
    # x * rsqrt(fp32 variance) is fp32 for every allowed x dtype; fp32 * fp32 weight stays fp32.
    return torch.promote_types(torch.float32, weight.dtype)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """diffusers' ``RMSNorm.forward`` (non-NPU branch); ``weight=None`` means no norm at all."""
    if weight is None:
        return x
    variance = x.float().pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(variance + eps)
    if weight.dtype in _HALF_DTYPES:
        y = y.to(weight.dtype)
    return y * weight


def rope(x: Tensor, freqs: Tensor) -> Tensor:
    """``apply_rotary_emb_qwen(x, freqs, use_real=False)`` in real arithmetic.

    ``x`` is ``[B, S, H, D]``, ``freqs`` complex ``[S, D/2]``. The complex product is spelled out
    as (re*cos - im*sin, re*sin + im*cos), each product rounded on its own like PyTorch's
    vectorized complex multiply, so it matches the reference exactly for D/2 a multiple of the
    SIMD width, and real ops keep it differentiable and compilable.
    """
    table = torch.view_as_real(freqs).unsqueeze(1)  # [S, 1, D/2, 2]
    cos, sin = table[..., 0], table[..., 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def _joint_differentiable(img_q, img_k, txt_q, txt_k, weights, img_freqs, txt_freqs, eps):
    """The functional path: autograd-friendly and traceable by ``torch.compile(fullgraph=True)``."""
    w_img_q, w_img_k, w_txt_q, w_txt_k = weights
    joint_q = torch.cat(
        [rope(rms_norm(txt_q, w_txt_q, eps), txt_freqs), rope(rms_norm(img_q, w_img_q, eps), img_freqs)], dim=1
    )
    joint_k = torch.cat(
        [rope(rms_norm(txt_k, w_txt_k, eps), txt_freqs), rope(rms_norm(img_k, w_img_k, eps), img_freqs)], dim=1
    )
    return joint_q, joint_k


def _complex_viewable(x: Tensor) -> bool:
    """Whether ``view_as_complex(x.unflatten(-1, (-1, 2)))`` is legal (pairs adjacent and aligned)."""
    if x.stride(-1) != 1 or x.storage_offset() % 2:
        return False
    return all(s % 2 == 0 for s in x.stride()[:-1])


def _as_complex(x: Tensor) -> Tensor:
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


class _Scratch:
    """Per-call chunk buffers shared by the four tensors (``rows`` tokens x H x D each)."""

    def __init__(self, rows: int, heads: int, head_dim: int, device: torch.device):
        self.rows = rows
        self._shape = (rows, heads, head_dim)
        self._device = device
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}
        self.rstd = torch.empty(rows, heads, 1, device=device)

    def get(self, name: str, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
        key = (name, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(self._shape, dtype=dtype, device=self._device)
        return self._buffers[key][:n]


def _norm_rope_chunk(out: Tensor, x: Tensor, weight: Tensor | None, freqs: Tensor, eps: float, buf: _Scratch):
    """``out[:] = rope(rms_norm(x))`` for one chunk ``[n, H, D]``, keeping the reference's roundings."""
    n = x.shape[0]
    part_dtype = norm_dtype(x.dtype, weight)
    # xf is x.float(); fp32 inputs are used in place (strided views are fine for the norm ops).
    xf = x if x.dtype == torch.float32 else buf.get("xf", n).copy_(x)
    if weight is None:
        y = xf
    else:
        work = buf.get("work", n)
        rstd = buf.rstd[:n]
        torch.mul(xf, xf, out=work)
        torch.mean(work, -1, keepdim=True, out=rstd)  # mean (= sum / D) to keep the reference's rounding
        rstd.add_(eps).rsqrt_()
        # Writing x * rstd into a half buffer is RMSNorm's `.to(weight.dtype)` rounding; the weight
        # multiply then runs in the weight's dtype (one more rounding) and is stored exactly in fp32.
        z = buf.get("half", n, weight.dtype) if weight.dtype in _HALF_DTYPES else work
        torch.mul(xf, rstd, out=z)
        y = torch.mul(z, weight, out=work)
    if not _complex_viewable(y):
        y = buf.get("work", n).copy_(y)
    f = freqs.unsqueeze(1)  # [n, 1, D/2], broadcast over heads
    if out.dtype == torch.float32 and part_dtype == torch.float32:
        torch.mul(_as_complex(y), f, out=_as_complex(out))
        return
    rotated = buf.get("work", n)
    torch.mul(_as_complex(y), f, out=_as_complex(rotated))  # in place when y is already `work`
    if part_dtype != out.dtype and part_dtype != torch.float32:
        rotated = rotated.to(part_dtype)  # round as the part's own result would be before cat upcasts it
    out.copy_(rotated)


def _norm_rope_into(out: Tensor, x: Tensor, weight: Tensor | None, freqs: Tensor, eps: float, buf: _Scratch):
    """Write ``rope(rms_norm(x))`` into ``out`` (``[B, S, H, D]``) chunk by chunk."""
    batch, seq = x.shape[:2]
    for b in range(batch):
        for start in range(0, seq, buf.rows):
            stop = min(start + buf.rows, seq)
            _norm_rope_chunk(out[b, start:stop], x[b, start:stop], weight, freqs[start:stop], eps, buf)


def _chunk_rows(x: Tensor, seq: int) -> int:
    """Tokens per chunk: cache-sized on CPU; one chunk per tensor elsewhere (no cache to win there)."""
    if x.device.type != "cpu":
        return max(1, seq)
    return max(1, _CPU_CHUNK_ELEMENTS_PER_THREAD * torch.get_num_threads() // (x.shape[2] * x.shape[3]))


def _joint_fast(img_q, img_k, txt_q, txt_k, weights, img_freqs, txt_freqs, eps):
    """No-autograd path: fills slices of the preallocated joint outputs instead of cat."""
    w_img_q, w_img_k, w_txt_q, w_txt_k = weights
    batch, s_img, heads, head_dim = img_q.shape
    s_txt = txt_q.shape[1]
    buf = _Scratch(_chunk_rows(img_q, s_img + s_txt), heads, head_dim, img_q.device)
    outputs = []
    for (txt, w_txt), (img, w_img) in (((txt_q, w_txt_q), (img_q, w_img_q)), ((txt_k, w_txt_k), (img_k, w_img_k))):
        dtype = torch.promote_types(norm_dtype(txt.dtype, w_txt), norm_dtype(img.dtype, w_img))
        joint = torch.empty(batch, s_txt + s_img, heads, head_dim, dtype=dtype, device=img.device)
        _norm_rope_into(joint[:, :s_txt], txt, w_txt, txt_freqs, eps, buf)
        _norm_rope_into(joint[:, s_txt:], img, w_img, img_freqs, eps, buf)
        outputs.append(joint)
    return outputs[0], outputs[1]


def _needs_autograd(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def joint_qk_norm_rope_torch(
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
    """Eager torch backend of ``joint_qk_norm_rope`` (inputs are assumed validated).

    Uses the chunked no-grad path when nothing needs a gradient and we are not being compiled,
    the functional path otherwise; both give the diffusers numbers.
    """
    weights = (img_q_weight, img_k_weight, txt_q_weight, txt_k_weight)
    args = (img_q, img_k, txt_q, txt_k, weights, img_freqs, txt_freqs, eps)
    if torch.compiler.is_compiling() or _needs_autograd((img_q, img_k, txt_q, txt_k, img_freqs, txt_freqs, *weights)):
        return _joint_differentiable(*args)
    return _joint_fast(*args)
