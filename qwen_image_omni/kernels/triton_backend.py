"""Triton backend of ``joint_qk_norm_rope``: q/k RMSNorm + RoPE written straight into the joint buffers.

One forward launch per stream (text, then image) normalises and rotates q *and* k and stores them at
their rows of freshly allocated ``[B, S_txt + S_img, H, D]`` outputs, so no ``torch.cat`` remains.
A program covers a ``[BLOCK_T tokens, BLOCK_H heads, BLOCK_D]`` tile, contiguous along the head dim
(a ``tl.constexpr``), so loads and stores vectorise; it reads each token's cos/sin row once for all
its heads and for both q and k. The rotation reshapes a tile to ``[..., D/2, 2]`` (re, im) pairs and
uses ``tl.split`` / ``tl.join``. Any even ``D`` works: ``BLOCK_D = 2 * next_power_of_2(D / 2)``, masked.

Numerics follow the reference's rounding chain (``reference.rms_norm`` and ``reference.rope``):
variance and ``x * rstd`` in fp32; for half weights round to the weight dtype, multiply, round again;
rotate in fp32 with every product rounded on its own (kernels launch with ``enable_fp_fusion=False``,
so no FMA contraction); round once to the output dtype. bf16 rounding is done by hand with the
integer round-to-nearest-even trick: the Triton interpreter truncates fp32 -> bf16 casts, and the
trick is exact on GPUs too. fp16 uses the plain cast, which rounds to nearest even in both (numpy's
``astype`` in the interpreter, ``cvt.rn.f16.f32`` on GPUs; the interpreter's explicit ``"rtne"`` mode
is not a true round-to-nearest-even and is avoided).

The backward rotates the incoming gradient by ``-theta``, runs the RMSNorm backward with the fp32
``rstd`` the forward saved, and writes per-program fp32 weight-gradient partials that torch sums
afterwards (deterministic: no atomics). No gradient flows to the RoPE tables.

Both directions are ``torch.library.custom_op``s (``qwen_image_omni::joint_qk_norm_rope`` and
``..._backward``) with fake implementations and ``register_autograd``, so ``torch.compile(fullgraph=True)``
traces them without graph breaks. ``triton_op`` is not used: under ``TRITON_INTERPRET=1``,
``wrap_triton`` hands back the raw interpreted kernel, which then runs on fake tensors while tracing
and fails; and ``enable_fp_fusion`` is not among the launch options ``wrap_triton`` forwards to
inductor (only num_warps, num_stages, ...), so the rotation's no-FMA guarantee would not survive.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "Tiles",
    "joint_qk_norm_rope_bwd_kernel",
    "joint_qk_norm_rope_fwd_kernel",
    "joint_qk_norm_rope_triton",
    "plan_tiles",
    "triton_supports",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernels' ROUND constexpr
_WEIGHT_NAMES = ("img_q_weight", "img_k_weight", "txt_q_weight", "txt_k_weight")
_MAX_INT32 = 2**31 - 1


# --------------------------------------------------------------------------- device helpers
@triton.jit
def _bf16_bits(x):
    """fp32 -> the bits of the nearest-even bf16, as uint32 with the low 16 bits zero (NaN -> 0x7FC0, as torch)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return tl.where(x != x, 0x7FC00000, rounded)


@triton.jit
def _round(x, ROUND: tl.constexpr):
    """Round fp32 ``x`` to fp32 (0), bf16 (1) or fp16 (2) nearest-even, keeping it in fp32."""
    if ROUND == 1:
        x = _bf16_bits(x).to(tl.float32, bitcast=True)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _load_fp32(ptrs, mask):
    """Load and widen to fp32 exactly (bf16 by bit shift: the interpreter mangles bf16 subnormals)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if x.dtype == tl.bfloat16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _store_rounded(ptrs, x, mask):
    """Store fp32 ``x`` rounded once, to nearest even, to the pointee dtype."""
    dtype = ptrs.dtype.element_ty
    if dtype == tl.bfloat16:
        tl.store(ptrs, (_bf16_bits(x) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, x.to(dtype), mask=mask)


@triton.jit
def _tile_offsets(tok, head, dim, stride_s, stride_h):
    """Element offsets of a ``[BLOCK_T, BLOCK_H, BLOCK_D]`` tile of a ``[S, H, D]`` slice."""
    return tok[:, None, None] * stride_s + head[None, :, None] * stride_h + dim[None, None, :]


@triton.jit
def _load_cos_sin(freqs_ptr, tok, seq_len, stride_fs, stride_fj, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos, sin ``[BLOCK_T, 1, BLOCK_HALF]`` from the fp32 ``view_as_real`` table ``[S, D/2, 2]``."""
    j = tl.arange(0, BLOCK_HALF)
    offs = tok[:, None, None] * stride_fs + j[None, :, None] * stride_fj + tl.arange(0, 2)[None, None, :]
    mask = (tok[:, None, None] < seq_len) & (j[None, :, None] < HALF)
    cos, sin = tl.split(tl.load(freqs_ptr + offs, mask=mask, other=0.0))
    return cos[:, None, :], sin[:, None, :]


@triton.jit
def _rotate(x, cos, sin):
    """Multiply the interleaved (re, im) pairs of ``x`` ``[T, H, D]`` by ``cos + i sin``, each product rounded."""
    re, im = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
    return tl.reshape(tl.join(re * cos - im * sin, re * sin + im * cos), x.shape)


@triton.jit
def _norm_rope_tile(x_ptr, out_ptr, rstd_ptr, x_offs, out_offs, rstd_offs, mask, row_mask, w, cos, sin,
                    eps, HEAD_DIM: tl.constexpr, HAS_W: tl.constexpr, ROUND: tl.constexpr):
    """RMSNorm (if ``HAS_W``) + rotation of one tile; stores the result and the fp32 ``rstd``."""
    x = _load_fp32(x_ptr + x_offs, mask)
    if HAS_W:
        variance = tl.math.div_rn(tl.sum(x * x, axis=2), HEAD_DIM * 1.0)  # mean = sum / D, like torch
        rstd = tl.math.rsqrt(variance + eps)
        tl.store(rstd_ptr + rstd_offs, rstd, mask=row_mask)
        x = _round(_round(x * rstd[:, :, None], ROUND) * w[None, None, :], ROUND)
    else:  # no norm: x is scaled by 1
        tl.store(rstd_ptr + rstd_offs, tl.full(row_mask.shape, 1.0, tl.float32), mask=row_mask)
    _store_rounded(out_ptr + out_offs, _rotate(x, cos, sin), mask)


@triton.jit
def _unrotate_norm_backward_tile(g_ptr, x_ptr, rstd_ptr, dx_ptr, g_offs, x_offs, dx_offs, rstd_offs, mask, row_mask,
                                 w, cos, sin, HEAD_DIM: tl.constexpr, HAS_W: tl.constexpr, ROUND: tl.constexpr):
    """Gradient of one tile: rotate by -theta, then the RMSNorm backward. Returns this tile's weight gradient."""
    dy = _rotate(_load_fp32(g_ptr + g_offs, mask), cos, -sin)
    if HAS_W:
        rstd = tl.load(rstd_ptr + rstd_offs, mask=row_mask, other=0.0)[:, :, None]
        n = _load_fp32(x_ptr + x_offs, mask) * rstd
        dw = tl.sum(tl.sum(dy * _round(n, ROUND), axis=1), axis=0)  # the weight multiplied the rounded n
        dn = dy * w[None, None, :]
        mean_dn_n = tl.math.div_rn(tl.sum(dn * n, axis=2), HEAD_DIM * 1.0)
        dy = (dn - n * mean_dn_n[:, :, None]) * rstd
    else:
        dw = tl.zeros_like(w)
    _store_rounded(dx_ptr + dx_offs, dy, mask)
    return dw


# --------------------------------------------------------------------------- kernels
@triton.jit
def joint_qk_norm_rope_fwd_kernel(
    q_ptr, k_ptr, wq_ptr, wk_ptr, freqs_ptr,  # one stream's inputs; freqs: fp32 view_as_real [S, D/2, 2]
    out_q_ptr, out_k_ptr, rstd_q_ptr, rstd_k_ptr,  # joint outputs [B, S_joint, H, D] and rstd [B, S_joint, H]
    seq_len, heads, out_row0,  # this stream's tokens start at joint row out_row0
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_fs, stride_fj,
    stride_ob, stride_os, stride_oh, stride_rb, stride_rs,
    eps,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_WQ: tl.constexpr, HAS_WK: tl.constexpr, ROUND: tl.constexpr,
):
    """Grid ``(cdiv(S, BLOCK_T), cdiv(H, BLOCK_H), B)``: norm + rotate q and k of one token x head tile."""
    pid_t, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    q_ptr += pid_b * stride_qb
    k_ptr += pid_b * stride_kb
    out_q_ptr += pid_b * stride_ob
    out_k_ptr += pid_b * stride_ob
    rstd_q_ptr += pid_b * stride_rb
    rstd_k_ptr += pid_b * stride_rb
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    head = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    dim = tl.arange(0, 2 * BLOCK_HALF)
    row_mask = (tok[:, None] < seq_len) & (head[None, :] < heads)
    mask = row_mask[:, :, None]
    if BLOCK_HALF != HALF:
        mask = mask & (dim < 2 * HALF)[None, None, :]

    cos, sin = _load_cos_sin(freqs_ptr, tok, seq_len, stride_fs, stride_fj, HALF, BLOCK_HALF)  # once for all heads
    out_offs = _tile_offsets(out_row0 + tok, head, dim, stride_os, stride_oh)
    rstd_offs = (out_row0 + tok)[:, None] * stride_rs + head[None, :]
    w_q = _load_fp32(wq_ptr + dim, dim < 2 * HALF) if HAS_WQ else tl.zeros((2 * BLOCK_HALF,), dtype=tl.float32)
    w_k = _load_fp32(wk_ptr + dim, dim < 2 * HALF) if HAS_WK else tl.zeros((2 * BLOCK_HALF,), dtype=tl.float32)
    _norm_rope_tile(q_ptr, out_q_ptr, rstd_q_ptr, _tile_offsets(tok, head, dim, stride_qs, stride_qh), out_offs,
                    rstd_offs, mask, row_mask, w_q, cos, sin, eps, 2 * HALF, HAS_WQ, ROUND)
    _norm_rope_tile(k_ptr, out_k_ptr, rstd_k_ptr, _tile_offsets(tok, head, dim, stride_ks, stride_kh), out_offs,
                    rstd_offs, mask, row_mask, w_k, cos, sin, eps, 2 * HALF, HAS_WK, ROUND)


@triton.jit
def joint_qk_norm_rope_bwd_kernel(
    gq_ptr, gk_ptr, q_ptr, k_ptr, wq_ptr, wk_ptr, freqs_ptr, rstd_q_ptr, rstd_k_ptr,
    dq_ptr, dk_ptr, dwq_ptr, dwk_ptr,  # dq, dk: [B, S, H, D] contiguous; dwq, dwk: fp32 partials [programs, D]
    seq_len, heads, out_row0, tiles_per_program,
    stride_gqb, stride_gqs, stride_gqh, stride_gqd, stride_gkb, stride_gks, stride_gkh, stride_gkd,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_fs, stride_fj,
    stride_rb, stride_rs, stride_db, stride_ds, stride_dh,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_WQ: tl.constexpr, HAS_WK: tl.constexpr, ROUND: tl.constexpr,
):
    """Grid ``(cdiv(S, BLOCK_T * tiles_per_program), cdiv(H, BLOCK_H), B)``; each program walks
    ``tiles_per_program`` token tiles and writes one row of weight-gradient partials per weight.
    The incoming gradients may have any strides (``.sum()`` hands over stride-0 expansions)."""
    pid_t, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    gq_ptr += pid_b * stride_gqb
    gk_ptr += pid_b * stride_gkb
    q_ptr += pid_b * stride_qb
    k_ptr += pid_b * stride_kb
    rstd_q_ptr += pid_b * stride_rb
    rstd_k_ptr += pid_b * stride_rb
    dq_ptr += pid_b * stride_db
    dk_ptr += pid_b * stride_db
    head = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    dim = tl.arange(0, 2 * BLOCK_HALF)
    w_q = _load_fp32(wq_ptr + dim, dim < 2 * HALF) if HAS_WQ else tl.zeros((2 * BLOCK_HALF,), dtype=tl.float32)
    w_k = _load_fp32(wk_ptr + dim, dim < 2 * HALF) if HAS_WK else tl.zeros((2 * BLOCK_HALF,), dtype=tl.float32)
    dw_q = tl.zeros((2 * BLOCK_HALF,), dtype=tl.float32)
    dw_k = tl.zeros((2 * BLOCK_HALF,), dtype=tl.float32)
    for i in range(tiles_per_program):
        tok = (pid_t * tiles_per_program + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_mask = (tok[:, None] < seq_len) & (head[None, :] < heads)
        mask = row_mask[:, :, None]
        if BLOCK_HALF != HALF:
            mask = mask & (dim < 2 * HALF)[None, None, :]
        cos, sin = _load_cos_sin(freqs_ptr, tok, seq_len, stride_fs, stride_fj, HALF, BLOCK_HALF)
        row = out_row0 + tok
        rstd_offs = row[:, None] * stride_rs + head[None, :]
        d_offs = _tile_offsets(tok, head, dim, stride_ds, stride_dh)
        dw_q += _unrotate_norm_backward_tile(
            gq_ptr, q_ptr, rstd_q_ptr, dq_ptr, _tile_offsets(row, head, dim * stride_gqd, stride_gqs, stride_gqh),
            _tile_offsets(tok, head, dim, stride_qs, stride_qh), d_offs, rstd_offs, mask, row_mask, w_q, cos, sin,
            2 * HALF, HAS_WQ, ROUND)
        dw_k += _unrotate_norm_backward_tile(
            gk_ptr, k_ptr, rstd_k_ptr, dk_ptr, _tile_offsets(row, head, dim * stride_gkd, stride_gks, stride_gkh),
            _tile_offsets(tok, head, dim, stride_ks, stride_kh), d_offs, rstd_offs, mask, row_mask, w_k, cos, sin,
            2 * HALF, HAS_WK, ROUND)
    program = (pid_b * tl.num_programs(1) + pid_h) * tl.num_programs(0) + pid_t
    if HAS_WQ:
        tl.store(dwq_ptr + program * (2 * HALF) + dim, dw_q, mask=dim < 2 * HALF)
    if HAS_WK:
        tl.store(dwk_ptr + program * (2 * HALF) + dim, dw_k, mask=dim < 2 * HALF)


# --------------------------------------------------------------------------- launch plan
_INTERPRETED = not isinstance(joint_qk_norm_rope_fwd_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1


class Tiles(NamedTuple):
    """The kernels' launch plan for one head count and head dim (``plan_tiles``)."""

    block_t: int  # tokens per forward tile
    block_h: int  # heads per tile
    bwd_block_t: int  # tokens per backward tile (it holds more live values: smaller keeps registers ~128 on H100)
    tiles_per_program: int  # token tiles one backward program walks (fewer weight-gradient partials)
    num_warps: int


def plan_tiles(heads: int, head_dim: int, *, gpu: bool = not _INTERPRETED) -> Tiles:
    """The launch plan for ``heads`` x ``head_dim`` (``gpu`` defaults to "not interpreted").

    GPUs: a head block dividing H (8 of 24) and about 4K elements per forward tile (2K backward), no
    register spills on sm_90 at D = 128. The interpreter (about 5-30 ms per program instance): large
    tiles, all heads at once."""
    cap = 8 if gpu else 32
    if heads <= cap:
        block_h = triton.next_power_of_2(heads)  # e.g. 3 -> 4, the fourth head masked
    else:
        block_h = max(b for b in (1, 2, 4, 8, 16, 32) if b <= cap and heads % b == 0)
    if not gpu:
        return Tiles(block_t=32, block_h=block_h, bwd_block_t=32, tiles_per_program=1, num_warps=4)
    block_t = max(1, 4096 // (block_h * 2 * triton.next_power_of_2(head_dim // 2)))
    bwd_block_t = max(1, block_t // 2)
    return Tiles(block_t=block_t, block_h=block_h, bwd_block_t=bwd_block_t,
                 tiles_per_program=max(1, 16 // bwd_block_t), num_warps=4)


def _launch_options(tiles: Tiles) -> dict:
    # The interpreter ignores these; on GPUs enable_fp_fusion=False keeps a*b - c*d from becoming FMAs.
    return dict(num_warps=tiles.num_warps, enable_fp_fusion=False)


def _heads_strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


# --------------------------------------------------------------------------- custom ops
def _stream_args(x_q, x_k, freqs):
    table = torch.view_as_real(freqs)  # fp32 [S, D/2, 2], strides (2 * s0, 2 * s1, 1)
    return table, (*_heads_strides(x_q), *_heads_strides(x_k), table.stride(0), table.stride(1))


@torch.library.custom_op("qwen_image_omni::joint_qk_norm_rope", mutates_args=())
def _joint_qk_norm_rope_op(
    img_q: Tensor, img_k: Tensor, txt_q: Tensor, txt_k: Tensor,
    img_q_weight: Tensor | None, img_k_weight: Tensor | None, txt_q_weight: Tensor | None, txt_k_weight: Tensor | None,
    img_freqs: Tensor, txt_freqs: Tensor, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward: ``(joint_q, joint_k, rstd_q, rstd_k)``; ``rstd_*`` is the fp32 ``[B, S_txt + S_img, H]``
    factor each head was scaled by (1 for a stream without a weight), saved for the backward."""
    batch, s_img, heads, head_dim = img_q.shape
    s_txt = txt_q.shape[1]
    joint_q = img_q.new_empty(batch, s_txt + s_img, heads, head_dim)
    joint_k = torch.empty_like(joint_q)
    rstd_q = img_q.new_empty(batch, s_txt + s_img, heads, dtype=torch.float32)
    rstd_k = torch.empty_like(rstd_q)
    tiles = plan_tiles(heads, head_dim)
    streams = (
        (txt_q, txt_k, txt_q_weight, txt_k_weight, txt_freqs, 0),
        (img_q, img_k, img_q_weight, img_k_weight, img_freqs, s_txt),
    )
    for x_q, x_k, w_q, w_k, freqs, row0 in streams:
        seq = x_q.shape[1]
        table, strides = _stream_args(x_q, x_k, freqs)
        grid = (triton.cdiv(seq, tiles.block_t), triton.cdiv(heads, tiles.block_h), batch)
        joint_qk_norm_rope_fwd_kernel[grid](
            x_q, x_k, x_q if w_q is None else w_q, x_k if w_k is None else w_k, table,
            joint_q, joint_k, rstd_q, rstd_k, seq, heads, row0,
            *strides, *_heads_strides(joint_q), rstd_q.stride(0), rstd_q.stride(1),
            eps,
            HALF=head_dim // 2, BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            BLOCK_T=tiles.block_t, BLOCK_H=tiles.block_h,
            HAS_WQ=w_q is not None, HAS_WK=w_k is not None, ROUND=_ROUNDING[x_q.dtype],
            **_launch_options(tiles),
        )
    return joint_q, joint_k, rstd_q, rstd_k


@_joint_qk_norm_rope_op.register_fake
def _(img_q, img_k, txt_q, txt_k, img_q_weight, img_k_weight, txt_q_weight, txt_k_weight, img_freqs, txt_freqs, eps):
    batch, s_img, heads, head_dim = img_q.shape
    joint = (batch, txt_q.shape[1] + s_img, heads, head_dim)
    rstd = joint[:3]
    return (img_q.new_empty(joint), img_q.new_empty(joint),
            img_q.new_empty(rstd, dtype=torch.float32), img_q.new_empty(rstd, dtype=torch.float32))


@torch.library.custom_op("qwen_image_omni::joint_qk_norm_rope_backward", mutates_args=())
def _joint_qk_norm_rope_backward_op(
    grad_q: Tensor, grad_k: Tensor, img_q: Tensor, img_k: Tensor, txt_q: Tensor, txt_k: Tensor,
    img_q_weight: Tensor | None, img_k_weight: Tensor | None, txt_q_weight: Tensor | None, txt_k_weight: Tensor | None,
    img_freqs: Tensor, txt_freqs: Tensor, rstd_q: Tensor, rstd_k: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: gradients of ``img_q, img_k, txt_q, txt_k`` and of the four weights (empty for None)."""
    batch, s_img, heads, head_dim = img_q.shape
    tiles = plan_tiles(heads, head_dim)
    grads = {}
    streams = (
        ("txt", txt_q, txt_k, txt_q_weight, txt_k_weight, txt_freqs, 0),
        ("img", img_q, img_k, img_q_weight, img_k_weight, img_freqs, txt_q.shape[1]),
    )
    for name, x_q, x_k, w_q, w_k, freqs, row0 in streams:
        seq = x_q.shape[1]
        table, strides = _stream_args(x_q, x_k, freqs)
        dq, dk = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (x_q, x_k))
        grid = (triton.cdiv(seq, tiles.bwd_block_t * tiles.tiles_per_program), triton.cdiv(heads, tiles.block_h), batch)
        programs = grid[0] * grid[1] * grid[2]
        partials = [x_q.new_empty((programs, head_dim) if w is not None else (0,), dtype=torch.float32)
                    for w in (w_q, w_k)]
        joint_qk_norm_rope_bwd_kernel[grid](
            grad_q, grad_k, x_q, x_k, x_q if w_q is None else w_q, x_k if w_k is None else w_k, table,
            rstd_q, rstd_k, dq, dk, partials[0], partials[1],
            seq, heads, row0, tiles.tiles_per_program,
            *grad_q.stride(), *grad_k.stride(), *strides, rstd_q.stride(0), rstd_q.stride(1), *_heads_strides(dq),
            HALF=head_dim // 2, BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            BLOCK_T=tiles.bwd_block_t, BLOCK_H=tiles.block_h,
            HAS_WQ=w_q is not None, HAS_WK=w_k is not None, ROUND=_ROUNDING[x_q.dtype],
            **_launch_options(tiles),
        )
        grads[f"{name}_q"], grads[f"{name}_k"] = dq, dk
        for suffix, w, partial in (("q", w_q, partials[0]), ("k", w_k, partials[1])):
            grads[f"{name}_{suffix}_weight"] = partial.sum(0).to(w.dtype) if w is not None else partial.new_empty(0)
    return tuple(grads[n] for n in ("img_q", "img_k", "txt_q", "txt_k", *_WEIGHT_NAMES))


@_joint_qk_norm_rope_backward_op.register_fake
def _(grad_q, grad_k, img_q, img_k, txt_q, txt_k, img_q_weight, img_k_weight, txt_q_weight, txt_k_weight,
      img_freqs, txt_freqs, rstd_q, rstd_k):
    acts = tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (img_q, img_k, txt_q, txt_k))
    weights = (img_q_weight, img_k_weight, txt_q_weight, txt_k_weight)
    return acts + tuple(torch.empty_like(w) if w is not None else img_q.new_empty(0, dtype=torch.float32)
                        for w in weights)


def _setup_context(ctx, inputs, output):
    *tensors, eps = inputs  # activations, weights, tables
    ctx.save_for_backward(*tensors, output[2], output[3])
    ctx.mark_non_differentiable(output[2], output[3])


def _backward(ctx, grad_q, grad_k, _grad_rstd_q, _grad_rstd_k):
    img_q, img_k, txt_q, txt_k, *weights, img_freqs, txt_freqs, rstd_q, rstd_k = ctx.saved_tensors
    grads = _joint_qk_norm_rope_backward_op(grad_q, grad_k, img_q, img_k, txt_q, txt_k, *weights,
                                            img_freqs, txt_freqs, rstd_q, rstd_k)
    weight_grads = tuple(g if w is not None else None for g, w in zip(grads[4:], weights))
    return (*grads[:4], *weight_grads, None, None, None)  # no gradient to the tables or eps


_joint_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def triton_supports(img_q: Tensor, img_k: Tensor, txt_q: Tensor, txt_k: Tensor, weights: tuple) -> str | None:
    """None when the Triton kernels handle these (already validated) inputs, else why not.

    ``weights`` is ``(img_q_weight, img_k_weight, txt_q_weight, txt_k_weight)``. Needs one dtype
    (fp32, fp16 or bf16) for all activations and non-None weights, unit stride along the head dim,
    CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``), and 32-bit offsets within a batch item.
    """
    acts = {"img_q": img_q, "img_k": img_k, "txt_q": txt_q, "txt_k": txt_k}
    dtypes = {t.dtype for t in acts.values()}
    if len(dtypes) > 1:
        return "mixed activation dtypes: " + ", ".join(f"{n} {t.dtype}" for n, t in acts.items())
    dtype = img_q.dtype
    if dtype not in _SUPPORTED_DTYPES:
        return f"activation dtype {dtype} (needs float32, float16 or bfloat16)"
    for name, w in zip(_WEIGHT_NAMES, weights):
        if w is not None and w.dtype != dtype:
            return f"{name} dtype {w.dtype} differs from the activations' {dtype}"
        if w is not None and w.stride(-1) != 1:
            return f"{name} has stride {w.stride(-1)} (needs 1)"
    for name, t in acts.items():
        if t.stride(-1) != 1:
            return f"{name} has last-dim stride {t.stride(-1)} (needs 1)"
    if img_q.device.type != "cuda" and not (_INTERPRETED and img_q.device.type == "cpu"):
        return f"device {img_q.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)"
    batch, s_img, heads, head_dim = img_q.shape
    extents = [(s_img + txt_q.shape[1]) * heads * head_dim]
    extents += [sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:])) + 1 for t in acts.values()]
    if max(extents) > _MAX_INT32:
        return "a batch item spans more than 2**31 elements (32-bit offsets)"
    return None


def joint_qk_norm_rope_triton(
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
    """Triton backend of ``joint_qk_norm_rope`` (inputs validated and ``triton_supports`` checked by the caller).

    Returns fresh contiguous ``(joint_q, joint_k)`` of shape ``[B, S_txt + S_img, H, D]`` in the
    activations' dtype, text tokens first; differentiable with respect to the activations and the
    weights (not the RoPE tables), and traceable by ``torch.compile(fullgraph=True)``.
    """
    joint_q, joint_k, _, _ = _joint_qk_norm_rope_op(
        img_q, img_k, txt_q, txt_k, img_q_weight, img_k_weight, txt_q_weight, txt_k_weight, img_freqs, txt_freqs, eps
    )
    return joint_q, joint_k
