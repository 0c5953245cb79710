"""Triton backend of ``joint_qk_norm_rope`` and ``qk_norm_rope``: q/k RMSNorm + RoPE, one launch per stream.

One forward kernel serves both layouts: a launch normalises and rotates q *and* k of one stream and
stores them at their rows of the outputs (the joint ``[B, S_txt + S_img, H, D]`` buffers at row
``S_txt`` for the image stream; a single stream's own outputs, or given ones, in place or not), so no
``torch.cat`` remains. A program covers a ``[BLOCK_T tokens, BLOCK_H heads, BLOCK_D]`` tile,
contiguous along the head dim (a ``tl.constexpr``), so loads and stores vectorise; it loads the q and
k tiles before storing either (more bytes in flight), and reads each token's cos/sin row once for all
its heads and for both q and k. The RoPE table is a contiguous fp32 ``view_as_real`` ``[S, D/2, 2]``
(row stride a ``constexpr``: 16-byte loads), shared by the batch or one per sample (``[B, S, D/2, 2]``,
batch stride 0 when shared). The rotation reshapes a tile to ``[..., D/2, 2]`` (re, im) pairs and uses
``tl.split`` / ``tl.join``. Any even ``D`` works: ``BLOCK_D = 2 * next_power_of_2(D / 2)``, masked.

Numerics follow the reference's rounding chain (``reference.rms_norm`` and ``reference.rope``):
variance and ``x * rstd`` in fp32; for half weights round to the weight dtype, multiply, round again;
rotate in fp32 with every product rounded on its own (kernels launch with ``enable_fp_fusion=False``,
so no FMA contraction); round once to the output dtype. On GPUs the casts are the compiler's own
round-to-nearest-even conversions (``cvt.rn``). The Triton interpreter truncates fp32 -> bf16 casts
and mangles bf16 subnormals on loads, so there (``INTERPRETED``, a ``constexpr``) bf16 is rounded by
the integer round-to-nearest-even trick and widened by a bit shift; fp16 uses the plain cast in both
(numpy's ``astype`` rounds to nearest even; the interpreter's explicit ``"rtne"`` mode is not a true
round-to-nearest-even and is avoided).

The backward rotates the incoming gradient by ``-theta``, runs the RMSNorm backward with the fp32
``rstd`` the forward saved, and keeps each weight's gradient terms in registers over the
``TILES_PER_PROGRAM`` tiles a program walks (a ``constexpr``), reducing them once at the end into one
row of fp32 partials that torch sums afterwards (deterministic: no atomics). Launch sizes aim at
several programs per SM (:func:`tiles_per_program`). No gradient flows to the RoPE tables.

Every launch is planned as data first (:class:`Launch`, the ``plan_*`` functions, which also accept
``meta`` tensors), so ``compiled_figures`` can compile exactly what runs, for sm_90, without a GPU.
The ops are ``torch.library.custom_op``s (``qwen_image_omni::joint_qk_norm_rope``,
``qwen_image_omni::qk_norm_rope``, their ``..._backward`` and the in-place/``out`` variant
``qwen_image_omni::qk_norm_rope_out``) with fake implementations and ``register_autograd`` (the
``out`` variant, which mutates, has no autograd), so ``torch.compile(fullgraph=True)`` traces them
without graph breaks. ``triton_op`` is not used: under ``TRITON_INTERPRET=1``, ``wrap_triton`` hands
back the raw interpreted kernel, which then runs on fake tensors while tracing and fails; and
``enable_fp_fusion`` is not among the launch options ``wrap_triton`` forwards to inductor (only
num_warps, num_stages, ...), so the rotation's no-FMA guarantee would not survive.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "Launch",
    "Tiles",
    "joint_qk_norm_rope_triton",
    "plan_joint_backward",
    "plan_joint_forward",
    "plan_single_backward",
    "plan_single_forward",
    "plan_tiles",
    "qk_norm_rope_bwd_kernel",
    "qk_norm_rope_fwd_kernel",
    "qk_norm_rope_triton",
    "tiles_per_program",
    "triton_supports",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernels' ROUND constexpr
_MAX_INT32 = 2**31 - 1
H100_SMS = 132


# --------------------------------------------------------------------------- device helpers
@triton.jit
def _bf16_bits(x):
    """fp32 -> the bits of the nearest-even bf16, as uint32 with the low 16 bits zero (NaN -> 0x7FC0, as torch)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return tl.where(x != x, 0x7FC00000, rounded)


@triton.jit
def _round(x, ROUND: tl.constexpr, INTERPRETED: tl.constexpr):
    """Round fp32 ``x`` to fp32 (0), bf16 (1) or fp16 (2) nearest-even, keeping it in fp32."""
    if ROUND == 1:
        if INTERPRETED:
            x = _bf16_bits(x).to(tl.float32, bitcast=True)
        else:
            x = x.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _load_fp32(ptrs, mask, INTERPRETED: tl.constexpr):
    """Load and widen to fp32 exactly."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if INTERPRETED and x.dtype == tl.bfloat16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _store_rounded(ptrs, x, mask, INTERPRETED: tl.constexpr):
    """Store fp32 ``x`` rounded once, to nearest even, to the pointee dtype."""
    dtype = ptrs.dtype.element_ty
    if INTERPRETED and dtype == tl.bfloat16:
        tl.store(ptrs, (_bf16_bits(x) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, x.to(dtype), mask=mask)


@triton.jit
def _tile_offsets(tok, head, dim, stride_s, stride_h):
    """Element offsets of a ``[BLOCK_T, BLOCK_H, BLOCK_D]`` tile of a ``[S, H, D]`` slice."""
    return tok[:, None, None] * stride_s + head[None, :, None] * stride_h + dim[None, None, :]


@triton.jit
def _load_cos_sin(table_ptr, tok, seq_len, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos, sin ``[BLOCK_T, 1, BLOCK_HALF]`` from a contiguous fp32 ``view_as_real`` table ``[S, D/2, 2]``.

    Loaded as ``[BLOCK_T, 2 * BLOCK_HALF]`` rows (contiguous, constant stride: vector loads), then split."""
    col = tl.arange(0, 2 * BLOCK_HALF)
    mask = (tok[:, None] < seq_len) & (col[None, :] < 2 * HALF)
    rows = tl.load(table_ptr + tok[:, None] * (2 * HALF) + col[None, :], mask=mask, other=0.0)
    cos, sin = tl.split(tl.reshape(rows, (rows.shape[0], BLOCK_HALF, 2)))
    return cos[:, None, :], sin[:, None, :]


@triton.jit
def _rotate(x, cos, sin):
    """Multiply the interleaved (re, im) pairs of ``x`` ``[T, H, D]`` by ``cos + i sin``, each product rounded."""
    re, im = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
    return tl.reshape(tl.join(re * cos - im * sin, re * sin + im * cos), x.shape)


@triton.jit
def _weight(w_ptr, dim, HALF: tl.constexpr, HAS_W: tl.constexpr, INTERPRETED: tl.constexpr):
    """The RMSNorm weight as fp32 ``[BLOCK_D]`` (zeros when there is none: unused then)."""
    if HAS_W:
        w = _load_fp32(w_ptr + dim, dim < 2 * HALF, INTERPRETED)
    else:
        w = tl.zeros(dim.shape, dtype=tl.float32)
    return w


@triton.jit
def _norm_rotate(x, w, cos, sin, eps, HEAD_DIM: tl.constexpr, HAS_W: tl.constexpr, ROUND: tl.constexpr,
                 INTERPRETED: tl.constexpr):
    """RMSNorm (if ``HAS_W``) + rotation of one fp32 tile: ``(rotated fp32, rstd [T, H])`` (rstd 1 without a norm)."""
    if HAS_W:
        variance = tl.math.div_rn(tl.sum(x * x, axis=2), HEAD_DIM * 1.0)  # mean = sum / D, like torch
        rstd = tl.math.rsqrt(variance + eps)
        x = _round(_round(x * rstd[:, :, None], ROUND, INTERPRETED) * w[None, None, :], ROUND, INTERPRETED)
    else:
        rstd = tl.full((x.shape[0], x.shape[1]), 1.0, tl.float32)
    return _rotate(x, cos, sin), rstd


@triton.jit
def _unrotate_norm_backward(dy, x, rstd, w, cos, sin, HEAD_DIM: tl.constexpr, HAS_W: tl.constexpr,
                            ROUND: tl.constexpr, INTERPRETED: tl.constexpr):
    """Gradient of one tile: rotate by -theta, then the RMSNorm backward.

    Returns ``(dx, dw_terms)``: ``dw_terms`` ``[T, H, D]`` are this tile's weight-gradient terms, summed by the caller."""
    dy = _rotate(dy, cos, -sin)
    if HAS_W:
        n = x * rstd[:, :, None]
        dw_terms = dy * _round(n, ROUND, INTERPRETED)  # the weight multiplied the rounded n
        dn = dy * w[None, None, :]
        mean_dn_n = tl.math.div_rn(tl.sum(dn * n, axis=2), HEAD_DIM * 1.0)
        dy = (dn - n * mean_dn_n[:, :, None]) * rstd[:, :, None]
    else:
        dw_terms = tl.zeros_like(dy)
    return dy, dw_terms


# --------------------------------------------------------------------------- kernels
@triton.jit
def qk_norm_rope_fwd_kernel(
    q_ptr, k_ptr, wq_ptr, wk_ptr, table_ptr,  # one stream's inputs; table: fp32 view_as_real [(B,) S, D/2, 2]
    out_q_ptr, out_k_ptr, rstd_q_ptr, rstd_k_ptr,  # outputs [B, S_out, H, D] and rstd [B, S_out, H]
    seq_len, heads, out_row0,  # this stream's tokens start at output row out_row0
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb,
    stride_oqb, stride_oqs, stride_oqh, stride_okb, stride_oks, stride_okh, stride_rb, stride_rs,
    eps,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_WQ: tl.constexpr, HAS_WK: tl.constexpr, ROUND: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Grid ``(cdiv(S, BLOCK_T), cdiv(H, BLOCK_H), B)``: norm + rotate q and k of one token x head tile."""
    pid_t, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    head = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    dim = tl.arange(0, 2 * BLOCK_HALF)
    row_mask = (tok[:, None] < seq_len) & (head[None, :] < heads)
    mask = row_mask[:, :, None]
    if BLOCK_HALF != HALF:
        mask = mask & (dim < 2 * HALF)[None, None, :]

    # Every load first (q, k, table, weights), then the math, then the stores.
    x_q = _load_fp32(q_ptr + pid_b * stride_qb + _tile_offsets(tok, head, dim, stride_qs, stride_qh), mask,
                     INTERPRETED)
    x_k = _load_fp32(k_ptr + pid_b * stride_kb + _tile_offsets(tok, head, dim, stride_ks, stride_kh), mask,
                     INTERPRETED)
    cos, sin = _load_cos_sin(table_ptr + pid_b * stride_tb, tok, seq_len, HALF, BLOCK_HALF)  # once for all heads
    w_q = _weight(wq_ptr, dim, HALF, HAS_WQ, INTERPRETED)
    w_k = _weight(wk_ptr, dim, HALF, HAS_WK, INTERPRETED)
    y_q, rstd_q = _norm_rotate(x_q, w_q, cos, sin, eps, 2 * HALF, HAS_WQ, ROUND, INTERPRETED)
    y_k, rstd_k = _norm_rotate(x_k, w_k, cos, sin, eps, 2 * HALF, HAS_WK, ROUND, INTERPRETED)

    row = out_row0 + tok
    rstd_offs = pid_b * stride_rb + row[:, None] * stride_rs + head[None, :]
    tl.store(rstd_q_ptr + rstd_offs, rstd_q, mask=row_mask)
    tl.store(rstd_k_ptr + rstd_offs, rstd_k, mask=row_mask)
    _store_rounded(out_q_ptr + pid_b * stride_oqb + _tile_offsets(row, head, dim, stride_oqs, stride_oqh), y_q, mask,
                   INTERPRETED)
    _store_rounded(out_k_ptr + pid_b * stride_okb + _tile_offsets(row, head, dim, stride_oks, stride_okh), y_k, mask,
                   INTERPRETED)


@triton.jit
def qk_norm_rope_bwd_kernel(
    gq_ptr, gk_ptr, q_ptr, k_ptr, wq_ptr, wk_ptr, table_ptr, rstd_q_ptr, rstd_k_ptr,
    dq_ptr, dk_ptr, dwq_ptr, dwk_ptr,  # dq, dk: [B, S, H, D] contiguous; dwq, dwk: fp32 partials [programs, D]
    seq_len, heads, grad_row0,  # this stream's rows of the output gradients (and of rstd) start at grad_row0
    stride_gqb, stride_gqs, stride_gqh, stride_gqd, stride_gkb, stride_gks, stride_gkh, stride_gkd,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb,
    stride_rb, stride_rs, stride_db, stride_ds, stride_dh,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr, HAS_WQ: tl.constexpr, HAS_WK: tl.constexpr, ROUND: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Grid ``(cdiv(S, BLOCK_T * TILES_PER_PROGRAM), cdiv(H, BLOCK_H), B)``; each program walks
    ``TILES_PER_PROGRAM`` token tiles and writes one row of weight-gradient partials per weight.
    The incoming gradients may have any strides (``.sum()`` hands over stride-0 expansions)."""
    pid_t, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    head = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    dim = tl.arange(0, 2 * BLOCK_HALF)
    w_q = _weight(wq_ptr, dim, HALF, HAS_WQ, INTERPRETED)
    w_k = _weight(wk_ptr, dim, HALF, HAS_WK, INTERPRETED)
    dw_q = tl.zeros((BLOCK_T, BLOCK_H, 2 * BLOCK_HALF), dtype=tl.float32)
    dw_k = tl.zeros((BLOCK_T, BLOCK_H, 2 * BLOCK_HALF), dtype=tl.float32)
    for i in range(TILES_PER_PROGRAM):
        tok = (pid_t * TILES_PER_PROGRAM + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        row = grad_row0 + tok
        row_mask = (tok[:, None] < seq_len) & (head[None, :] < heads)
        mask = row_mask[:, :, None]
        if BLOCK_HALF != HALF:
            mask = mask & (dim < 2 * HALF)[None, None, :]
        rstd_offs = pid_b * stride_rb + row[:, None] * stride_rs + head[None, :]
        g_q = _load_fp32(gq_ptr + pid_b * stride_gqb + _tile_offsets(row, head, dim * stride_gqd, stride_gqs,
                                                                     stride_gqh), mask, INTERPRETED)
        g_k = _load_fp32(gk_ptr + pid_b * stride_gkb + _tile_offsets(row, head, dim * stride_gkd, stride_gks,
                                                                     stride_gkh), mask, INTERPRETED)
        x_q = _load_fp32(q_ptr + pid_b * stride_qb + _tile_offsets(tok, head, dim, stride_qs, stride_qh), mask,
                         INTERPRETED)
        x_k = _load_fp32(k_ptr + pid_b * stride_kb + _tile_offsets(tok, head, dim, stride_ks, stride_kh), mask,
                         INTERPRETED)
        r_q = tl.load(rstd_q_ptr + rstd_offs, mask=row_mask, other=0.0)
        r_k = tl.load(rstd_k_ptr + rstd_offs, mask=row_mask, other=0.0)
        cos, sin = _load_cos_sin(table_ptr + pid_b * stride_tb, tok, seq_len, HALF, BLOCK_HALF)
        d_q, terms_q = _unrotate_norm_backward(g_q, x_q, r_q, w_q, cos, sin, 2 * HALF, HAS_WQ, ROUND, INTERPRETED)
        d_k, terms_k = _unrotate_norm_backward(g_k, x_k, r_k, w_k, cos, sin, 2 * HALF, HAS_WK, ROUND, INTERPRETED)
        dw_q += terms_q
        dw_k += terms_k
        d_offs = pid_b * stride_db + _tile_offsets(tok, head, dim, stride_ds, stride_dh)
        _store_rounded(dq_ptr + d_offs, d_q, mask, INTERPRETED)
        _store_rounded(dk_ptr + d_offs, d_k, mask, INTERPRETED)
    program = (pid_b * tl.num_programs(1) + pid_h) * tl.num_programs(0) + pid_t
    if HAS_WQ:
        tl.store(dwq_ptr + program * (2 * HALF) + dim, tl.sum(tl.sum(dw_q, axis=1), axis=0), mask=dim < 2 * HALF)
    if HAS_WK:
        tl.store(dwk_ptr + program * (2 * HALF) + dim, tl.sum(tl.sum(dw_k, axis=1), axis=0), mask=dim < 2 * HALF)


# --------------------------------------------------------------------------- launch plans
_INTERPRETED = not isinstance(qk_norm_rope_fwd_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1


class Tiles(NamedTuple):
    """The kernels' tile sizes for one head count and head dim (``plan_tiles``)."""

    block_t: int  # tokens per forward tile
    block_h: int  # heads per tile
    bwd_block_t: int  # tokens per backward tile (it holds more live values: smaller keeps registers down)
    num_warps: int
    max_tiles_per_program: int  # most token tiles one backward program walks (see tiles_per_program)


class Launch(NamedTuple):
    """One kernel launch, as data: what ``kernel[grid](**args, num_warps=..., enable_fp_fusion=...)`` runs."""

    name: str  # e.g. "joint fwd txt", "single bwd"
    kernel: Any  # the @triton.jit function
    grid: tuple[int, int, int]
    args: dict  # every kernel parameter by name: tensors (possibly on the meta device), ints, floats, constexprs
    num_warps: int
    enable_fp_fusion: bool

    def run(self) -> None:
        """Launch it."""
        self.kernel[self.grid](**self.args, num_warps=self.num_warps, enable_fp_fusion=self.enable_fp_fusion)


def plan_tiles(heads: int, head_dim: int, *, gpu: bool = not _INTERPRETED) -> Tiles:
    """Tile sizes for ``heads`` x ``head_dim`` (``gpu`` defaults to "not interpreted").

    GPUs: a head block dividing H (8 of 24), about 4K elements per forward tile and 1K per backward
    tile (its live values and register-held weight-gradient terms stay under 128 registers at D = 128,
    no spills on sm_90). The interpreter (about 5-30 ms per program instance): large tiles, all heads at once."""
    cap = 8 if gpu else 32
    if heads <= cap:
        block_h = triton.next_power_of_2(heads)  # e.g. 3 -> 4, the fourth head masked
    else:
        block_h = max(b for b in (1, 2, 4, 8, 16, 32) if b <= cap and heads % b == 0)
    if not gpu:
        return Tiles(block_t=32, block_h=block_h, bwd_block_t=32, num_warps=4, max_tiles_per_program=4)
    block_d = 2 * triton.next_power_of_2(head_dim // 2)
    block_t = max(1, 4096 // (block_h * block_d))
    bwd_block_t = max(1, 1024 // (block_h * block_d))
    return Tiles(block_t=block_t, block_h=block_h, bwd_block_t=bwd_block_t, num_warps=4, max_tiles_per_program=16)


def tiles_per_program(seq: int, heads: int, batch: int, tiles: Tiles, *, sms: int = H100_SMS) -> int:
    """Token tiles per backward program: the most (a power of two up to ``tiles.max_tiles_per_program``,
    fewer weight-gradient partials) that still gives every SM four programs (a 128-register program of
    4 warps leaves room for four per SM), so short text streams fill the GPU too."""
    tiles_total = triton.cdiv(seq, tiles.bwd_block_t) * triton.cdiv(heads, tiles.block_h) * batch
    count = tiles.max_tiles_per_program
    while count > 1 and tiles_total // count < 4 * sms:
        count //= 2
    return count


def _table(freqs: Tensor) -> tuple[Tensor, int]:
    """The fp32 ``view_as_real`` table, contiguous (constexpr row stride), and its batch stride (0: shared)."""
    table = torch.view_as_real(freqs.contiguous())
    return table, table.stride(0) if table.dim() == 4 else 0


def _stream_args(q, k, w_q, w_k, freqs, tiles: Tiles) -> dict:
    """The arguments both kernels take for one stream: q, k, weights and table, with their strides and
    the constexprs that specialise the kernels (all but the token tile and the tiles per program)."""
    _, seq, heads, head_dim = q.shape
    table, stride_tb = _table(freqs)
    return dict(
        q_ptr=q, k_ptr=k, wq_ptr=q if w_q is None else w_q, wk_ptr=k if w_k is None else w_k, table_ptr=table,
        seq_len=seq, heads=heads,
        stride_qb=q.stride(0), stride_qs=q.stride(1), stride_qh=q.stride(2),
        stride_kb=k.stride(0), stride_ks=k.stride(1), stride_kh=k.stride(2), stride_tb=stride_tb,
        HALF=head_dim // 2, BLOCK_HALF=triton.next_power_of_2(head_dim // 2), BLOCK_H=tiles.block_h,
        HAS_WQ=w_q is not None, HAS_WK=w_k is not None, ROUND=_ROUNDING[q.dtype], INTERPRETED=_INTERPRETED,
    )  # fmt: skip


def _forward_launch(name, q, k, w_q, w_k, freqs, out_q, out_k, rstd_q, rstd_k, row0, eps) -> Launch:
    batch, seq, heads, head_dim = q.shape
    tiles = plan_tiles(heads, head_dim)
    args = dict(
        _stream_args(q, k, w_q, w_k, freqs, tiles),
        out_q_ptr=out_q, out_k_ptr=out_k, rstd_q_ptr=rstd_q, rstd_k_ptr=rstd_k, out_row0=row0,
        stride_oqb=out_q.stride(0), stride_oqs=out_q.stride(1), stride_oqh=out_q.stride(2),
        stride_okb=out_k.stride(0), stride_oks=out_k.stride(1), stride_okh=out_k.stride(2),
        stride_rb=rstd_q.stride(0), stride_rs=rstd_q.stride(1),
        eps=eps, BLOCK_T=tiles.block_t,
    )  # fmt: skip
    grid = (triton.cdiv(seq, tiles.block_t), triton.cdiv(heads, tiles.block_h), batch)
    return Launch(name, qk_norm_rope_fwd_kernel, grid, args, tiles.num_warps, False)


def _backward_launch(name, grad_q, grad_k, q, k, w_q, w_k, freqs, rstd_q, rstd_k, row0) -> tuple[Launch, tuple]:
    """The launch for one stream and its outputs ``(dq, dk, partials_q, partials_k)`` (partials empty without a weight)."""
    batch, seq, heads, head_dim = q.shape
    tiles = plan_tiles(heads, head_dim)
    count = tiles_per_program(seq, heads, batch, tiles)
    grid = (triton.cdiv(seq, tiles.bwd_block_t * count), triton.cdiv(heads, tiles.block_h), batch)
    programs = grid[0] * grid[1] * grid[2]
    dq, dk = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k))
    partials = tuple(q.new_empty((programs, head_dim) if w is not None else (0,), dtype=torch.float32)
                     for w in (w_q, w_k))
    args = dict(
        _stream_args(q, k, w_q, w_k, freqs, tiles),
        gq_ptr=grad_q, gk_ptr=grad_k, rstd_q_ptr=rstd_q, rstd_k_ptr=rstd_k,
        dq_ptr=dq, dk_ptr=dk, dwq_ptr=partials[0], dwk_ptr=partials[1], grad_row0=row0,
        stride_gqb=grad_q.stride(0), stride_gqs=grad_q.stride(1), stride_gqh=grad_q.stride(2),
        stride_gqd=grad_q.stride(3), stride_gkb=grad_k.stride(0), stride_gks=grad_k.stride(1),
        stride_gkh=grad_k.stride(2), stride_gkd=grad_k.stride(3),
        stride_rb=rstd_q.stride(0), stride_rs=rstd_q.stride(1),
        stride_db=dq.stride(0), stride_ds=dq.stride(1), stride_dh=dq.stride(2),
        BLOCK_T=tiles.bwd_block_t, TILES_PER_PROGRAM=count,
    )  # fmt: skip
    return Launch(name, qk_norm_rope_bwd_kernel, grid, args, tiles.num_warps, False), (dq, dk, *partials)


def _rstd(like: Tensor, rows: int) -> Tensor:
    return like.new_empty(like.shape[0], rows, like.shape[2], dtype=torch.float32)


def plan_joint_forward(img_q, img_k, txt_q, txt_k, weights, img_freqs, txt_freqs, eps):
    """Launches of the joint forward and its outputs ``(joint_q, joint_k, rstd_q, rstd_k)``.

    ``weights``: ``(img_q_weight, img_k_weight, txt_q_weight, txt_k_weight)``. ``rstd_*`` is the fp32
    ``[B, S_txt + S_img, H]`` factor each head was scaled by (1 for a stream without a weight)."""
    batch, s_img, heads, head_dim = img_q.shape
    s_txt = txt_q.shape[1]
    joint_q = img_q.new_empty(batch, s_txt + s_img, heads, head_dim)
    joint_k = torch.empty_like(joint_q)
    rstd_q, rstd_k = _rstd(img_q, s_txt + s_img), _rstd(img_q, s_txt + s_img)
    w_img_q, w_img_k, w_txt_q, w_txt_k = weights
    launches = [
        _forward_launch("joint fwd txt", txt_q, txt_k, w_txt_q, w_txt_k, txt_freqs, joint_q, joint_k, rstd_q, rstd_k,
                        0, eps),
        _forward_launch("joint fwd img", img_q, img_k, w_img_q, w_img_k, img_freqs, joint_q, joint_k, rstd_q, rstd_k,
                        s_txt, eps),
    ]
    return launches, (joint_q, joint_k, rstd_q, rstd_k)


def plan_joint_backward(grad_q, grad_k, img_q, img_k, txt_q, txt_k, weights, img_freqs, txt_freqs, rstd_q, rstd_k):
    """Launches of the joint backward and their outputs per stream: ``{"txt": (dq, dk, partials_q, partials_k),
    "img": ...}`` (a weight's gradient is its partials summed over rows)."""
    w_img_q, w_img_k, w_txt_q, w_txt_k = weights
    txt, txt_out = _backward_launch("joint bwd txt", grad_q, grad_k, txt_q, txt_k, w_txt_q, w_txt_k, txt_freqs,
                                    rstd_q, rstd_k, 0)
    img, img_out = _backward_launch("joint bwd img", grad_q, grad_k, img_q, img_k, w_img_q, w_img_k, img_freqs,
                                    rstd_q, rstd_k, txt_q.shape[1])
    return [txt, img], {"txt": txt_out, "img": img_out}


def plan_single_forward(q, k, weights, freqs, eps, out=None):
    """Launch of the single-stream forward and its outputs ``(out_q, out_k, rstd_q, rstd_k)``.

    ``weights``: ``(q_weight, k_weight)``; ``out``: ``(out_q, out_k)`` to write into (q and k: in place)."""
    out_q, out_k = out if out is not None else (torch.empty_like(q, memory_format=torch.contiguous_format),
                                                torch.empty_like(k, memory_format=torch.contiguous_format))
    rstd_q, rstd_k = _rstd(q, q.shape[1]), _rstd(q, q.shape[1])
    launch = _forward_launch("single fwd", q, k, *weights, freqs, out_q, out_k, rstd_q, rstd_k, 0, eps)
    return [launch], (out_q, out_k, rstd_q, rstd_k)


def plan_single_backward(grad_q, grad_k, q, k, weights, freqs, rstd_q, rstd_k):
    """Launch of the single-stream backward and its outputs ``(dq, dk, partials_q, partials_k)``."""
    launch, outputs = _backward_launch("single bwd", grad_q, grad_k, q, k, *weights, freqs, rstd_q, rstd_k, 0)
    return [launch], outputs


def _weight_grad(partials: Tensor, weight: Tensor | None) -> Tensor:
    return partials.sum(0).to(weight.dtype) if weight is not None else partials.new_empty(0)


# --------------------------------------------------------------------------- custom ops: joint layout
@torch.library.custom_op("qwen_image_omni::joint_qk_norm_rope", mutates_args=())
def _joint_op(
    img_q: Tensor, img_k: Tensor, txt_q: Tensor, txt_k: Tensor,
    img_q_weight: Tensor | None, img_k_weight: Tensor | None, txt_q_weight: Tensor | None, txt_k_weight: Tensor | None,
    img_freqs: Tensor, txt_freqs: Tensor, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward: ``(joint_q, joint_k, rstd_q, rstd_k)`` (see ``plan_joint_forward``)."""
    weights = (img_q_weight, img_k_weight, txt_q_weight, txt_k_weight)
    launches, outputs = plan_joint_forward(img_q, img_k, txt_q, txt_k, weights, img_freqs, txt_freqs, eps)
    for launch in launches:
        launch.run()
    return outputs


@_joint_op.register_fake
def _(img_q, img_k, txt_q, txt_k, img_q_weight, img_k_weight, txt_q_weight, txt_k_weight, img_freqs, txt_freqs, eps):
    batch, s_img, heads, head_dim = img_q.shape
    joint = (batch, txt_q.shape[1] + s_img, heads, head_dim)
    return (img_q.new_empty(joint), img_q.new_empty(joint),
            img_q.new_empty(joint[:3], dtype=torch.float32), img_q.new_empty(joint[:3], dtype=torch.float32))


@torch.library.custom_op("qwen_image_omni::joint_qk_norm_rope_backward", mutates_args=())
def _joint_backward_op(
    grad_q: Tensor, grad_k: Tensor, img_q: Tensor, img_k: Tensor, txt_q: Tensor, txt_k: Tensor,
    img_q_weight: Tensor | None, img_k_weight: Tensor | None, txt_q_weight: Tensor | None, txt_k_weight: Tensor | None,
    img_freqs: Tensor, txt_freqs: Tensor, rstd_q: Tensor, rstd_k: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: gradients of ``img_q, img_k, txt_q, txt_k`` and of the four weights (empty for None)."""
    weights = (img_q_weight, img_k_weight, txt_q_weight, txt_k_weight)
    launches, out = plan_joint_backward(grad_q, grad_k, img_q, img_k, txt_q, txt_k, weights, img_freqs, txt_freqs,
                                        rstd_q, rstd_k)
    for launch in launches:
        launch.run()
    (img_dq, img_dk, img_pq, img_pk), (txt_dq, txt_dk, txt_pq, txt_pk) = out["img"], out["txt"]
    weight_grads = (_weight_grad(p, w) for p, w in zip((img_pq, img_pk, txt_pq, txt_pk), weights))
    return (img_dq, img_dk, txt_dq, txt_dk, *weight_grads)


@_joint_backward_op.register_fake
def _(grad_q, grad_k, img_q, img_k, txt_q, txt_k, img_q_weight, img_k_weight, txt_q_weight, txt_k_weight,
      img_freqs, txt_freqs, rstd_q, rstd_k):
    return _fake_grads((img_q, img_k, txt_q, txt_k), (img_q_weight, img_k_weight, txt_q_weight, txt_k_weight))


def _fake_grads(inputs: tuple, weights: tuple) -> tuple:
    acts = tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs)
    return acts + tuple(torch.empty_like(w) if w is not None else inputs[0].new_empty(0, dtype=torch.float32)
                        for w in weights)


def _setup_context(ctx, inputs, output):
    *tensors, eps = inputs  # activations, weights, tables
    ctx.save_for_backward(*tensors, output[2], output[3])
    ctx.mark_non_differentiable(output[2], output[3])


def _weight_grads_or_none(grads: tuple, weights: tuple) -> tuple:
    return tuple(g if w is not None else None for g, w in zip(grads, weights))


def _joint_backward(ctx, grad_q, grad_k, _grad_rstd_q, _grad_rstd_k):
    img_q, img_k, txt_q, txt_k, *weights, img_freqs, txt_freqs, rstd_q, rstd_k = ctx.saved_tensors
    grads = _joint_backward_op(grad_q, grad_k, img_q, img_k, txt_q, txt_k, *weights, img_freqs, txt_freqs,
                               rstd_q, rstd_k)
    return (*grads[:4], *_weight_grads_or_none(grads[4:], weights), None, None, None)  # none to tables or eps


_joint_op.register_autograd(_joint_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- custom ops: single stream
@torch.library.custom_op("qwen_image_omni::qk_norm_rope", mutates_args=())
def _single_op(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, freqs: Tensor,
               eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward: ``(out_q, out_k, rstd_q, rstd_k)`` (see ``plan_single_forward``)."""
    launches, outputs = plan_single_forward(q, k, (q_weight, k_weight), freqs, eps)
    for launch in launches:
        launch.run()
    return outputs


@_single_op.register_fake
def _(q, k, q_weight, k_weight, freqs, eps):
    rstd = q.shape[:3]
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            q.new_empty(rstd, dtype=torch.float32), q.new_empty(rstd, dtype=torch.float32))


@torch.library.custom_op("qwen_image_omni::qk_norm_rope_backward", mutates_args=())
def _single_backward_op(grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, q_weight: Tensor | None,
                        k_weight: Tensor | None, freqs: Tensor, rstd_q: Tensor,
                        rstd_k: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward: gradients of ``q, k`` and of the two weights (empty for None)."""
    launches, (dq, dk, partials_q, partials_k) = plan_single_backward(grad_q, grad_k, q, k, (q_weight, k_weight),
                                                                     freqs, rstd_q, rstd_k)
    for launch in launches:
        launch.run()
    return dq, dk, _weight_grad(partials_q, q_weight), _weight_grad(partials_k, k_weight)


@_single_backward_op.register_fake
def _(grad_q, grad_k, q, k, q_weight, k_weight, freqs, rstd_q, rstd_k):
    return _fake_grads((q, k), (q_weight, k_weight))


def _single_backward(ctx, grad_q, grad_k, _grad_rstd_q, _grad_rstd_k):
    q, k, q_weight, k_weight, freqs, rstd_q, rstd_k = ctx.saved_tensors
    grads = _single_backward_op(grad_q, grad_k, q, k, q_weight, k_weight, freqs, rstd_q, rstd_k)
    return (*grads[:2], *_weight_grads_or_none(grads[2:], (q_weight, k_weight)), None, None)


_single_op.register_autograd(_single_backward, setup_context=_setup_context)


@torch.library.custom_op("qwen_image_omni::qk_norm_rope_out", mutates_args=("out_q", "out_k"))
def _single_out_op(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, freqs: Tensor, eps: float,
                   out_q: Tensor, out_k: Tensor) -> None:
    """Forward into ``out_q``, ``out_k`` (which may be q and k themselves); no autograd."""
    launches, _ = plan_single_forward(q, k, (q_weight, k_weight), freqs, eps, out=(out_q, out_k))
    for launch in launches:
        launch.run()


@_single_out_op.register_fake
def _(q, k, q_weight, k_weight, freqs, eps, out_q, out_k):
    return None


# --------------------------------------------------------------------------- public API
def triton_supports(activations: dict, weights: dict, outs: dict | None = None) -> str | None:
    """None when the Triton kernels handle these (already validated) inputs, else why not.

    ``activations``, ``weights`` and ``outs`` map argument names to tensors (weights may be None). Needs
    one dtype (fp32, fp16 or bf16) for all activations, non-None weights and outputs, unit stride along
    the head dim, CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``), and 32-bit offsets within
    a batch item.
    """
    outs = outs or {}
    dtypes = {t.dtype for t in activations.values()}
    if len(dtypes) > 1:
        return "mixed activation dtypes: " + ", ".join(f"{n} {t.dtype}" for n, t in activations.items())
    first = next(iter(activations.values()))
    dtype = first.dtype
    if dtype not in _SUPPORTED_DTYPES:
        return f"activation dtype {dtype} (needs float32, float16 or bfloat16)"
    for name, w in weights.items():
        if w is not None and w.dtype != dtype:
            return f"{name} dtype {w.dtype} differs from the activations' {dtype}"
        if w is not None and w.stride(-1) != 1:
            return f"{name} has stride {w.stride(-1)} (needs 1)"
    for name, t in {**activations, **outs}.items():
        if t.stride(-1) != 1:
            return f"{name} has last-dim stride {t.stride(-1)} (needs 1)"
    if first.device.type != "cuda" and not (_INTERPRETED and first.device.type == "cpu"):
        return f"device {first.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)"
    _, _, heads, head_dim = first.shape
    extents = [sum(t.shape[1] for n, t in activations.items() if n.endswith("q")) * heads * head_dim]
    extents += [sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:])) + 1
                for t in (*activations.values(), *outs.values())]
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
    joint_q, joint_k, _, _ = _joint_op(
        img_q, img_k, txt_q, txt_k, img_q_weight, img_k_weight, txt_q_weight, txt_k_weight, img_freqs, txt_freqs, eps
    )
    return joint_q, joint_k


def qk_norm_rope_triton(
    q: Tensor,
    k: Tensor,
    *,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    freqs: Tensor,
    eps: float = 1e-6,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton backend of ``qk_norm_rope`` (inputs validated and ``triton_supports`` checked by the caller).

    Without ``out``: fresh contiguous ``(q_out, k_out)``, differentiable with respect to q, k and the
    weights. With ``out``: written there (in place when ``out`` is ``(q, k)``), no autograd.
    """
    if out is not None:
        _single_out_op(q, k, q_weight, k_weight, freqs, eps, out[0], out[1])
        return out[0], out[1]
    out_q, out_k, _, _ = _single_op(q, k, q_weight, k_weight, freqs, eps)
    return out_q, out_k
