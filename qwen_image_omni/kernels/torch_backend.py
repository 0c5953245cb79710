"""Eager PyTorch backend of ``joint_qk_norm_rope`` and ``qk_norm_rope``.

It reproduces, bit for bit where the op order allows, ``reference`` (diffusers' q/k RMSNorm ->
``apply_rotary_emb_qwen(use_real=False)``, then ``cat([text, image], dim=1)`` for the joint layout).
Both layouts are a list of parts (an input, its weight and table, the output and first row it goes
to), and three paths compute the same numbers:

* ``_norm_rope_fast``: no autograd, eager only. It writes straight into the preallocated (or given)
  outputs and walks the tokens in chunks small enough that the intermediate passes stay in cache.
* ``NormRopeFunction``: the eager training path, an ``autograd.Function`` whose forward is
  ``_norm_rope_fast`` (also saving the fp32 ``rstd``) and whose backward walks the same chunks, replaying
  the rounding chain autograd follows through the reference's ops.
* the reference itself, used under ``torch.compile`` (inductor fuses it by itself), under
  ``torch.func`` transforms and when the RoPE tables themselves need a gradient.

Input validation lives in ``qk_norm_rope``; this module assumes valid inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from typing import NamedTuple

from .reference import joint_qk_norm_rope_reference, qk_norm_rope_reference, result_dtype

__all__ = [
    "CPU_CHUNK_ELEMENTS_PER_THREAD",
    "NormRopeFunction",
    "chunk_rows",
    "joint_qk_norm_rope_torch",
    "needs_autograd",
    "qk_norm_rope_torch",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)

# CPU chunk size: 2**18 fp32 values (1 MiB) per intra-op thread and scratch buffer, so the few
# buffers a chunk uses stay in cache while the ~7 forward / ~14 backward elementwise passes run over
# them. Smaller chunks lose more to per-op overhead; the whole tensor would go through DRAM on every pass.
CPU_CHUNK_ELEMENTS_PER_THREAD = 1 << 18


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
        self.rstd = torch.empty(rows, heads, 1, dtype=torch.float32, device=device)

    def get(self, name: str, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
        key = (name, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(self._shape, dtype=dtype, device=self._device)
        return self._buffers[key][:n]


def _norm_rope_chunk(
    out: Tensor, x: Tensor, weight: Tensor | None, freqs: Tensor, eps: float, buf: _Scratch, rstd: Tensor | None
):
    """``out[:] = rope(rms_norm(x))`` for one chunk ``[n, H, D]``, keeping the reference's roundings.

    ``rstd`` (``[n, H, 1]`` fp32) receives the RMSNorm's ``rsqrt(variance + eps)`` when given.
    """
    n = x.shape[0]
    part_dtype = result_dtype(x.dtype, weight)
    # xf is x.float(); fp32 inputs are used in place (strided views are fine for the norm ops).
    xf = x if x.dtype == torch.float32 else buf.get("xf", n).copy_(x)
    if weight is None:
        y = xf
    else:
        work = buf.get("work", n)
        rstd = buf.rstd[:n] if rstd is None else rstd
        torch.mul(xf, xf, out=work)
        torch.mean(work, -1, keepdim=True, out=rstd)  # mean (= sum / D) to keep the reference's rounding
        rstd.add_(eps).rsqrt_()
        y = torch.mul(xf, rstd, out=work)
        if weight.dtype in _HALF_DTYPES:
            # RMSNorm's `.to(weight.dtype)` rounding, then the weight multiply in that dtype (one more
            # rounding), stored exactly in fp32. Each op keeps one dtype: on CPU, writing a broadcast
            # product straight into a buffer of another dtype takes a much slower casting loop.
            y = work.copy_(buf.get("half", n, weight.dtype).copy_(y).mul_(weight))
        else:
            y.mul_(weight)
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


def _table_rows(freqs: Tensor, b: int, rows: slice) -> Tensor:
    """Rows of a shared ``[S, D/2]`` or per-sample ``[B, S, D/2]`` table for sample ``b``."""
    return freqs[b, rows] if freqs.dim() == 3 else freqs[rows]


def _chunks(batch: int, seq: int, rows: int):
    """``(b, slice)`` over every sample and every run of at most ``rows`` tokens."""
    for b in range(batch):
        for start in range(0, seq, rows):
            yield b, slice(start, min(start + rows, seq))


def _norm_rope_into(
    out: Tensor, x: Tensor, weight: Tensor | None, freqs: Tensor, eps: float, buf: _Scratch, rstd: Tensor | None
):
    """Write ``rope(rms_norm(x))`` into ``out`` (``[B, S, H, D]``) chunk by chunk, and ``rstd`` if given."""
    for b, rows in _chunks(*x.shape[:2], buf.rows):
        rstd_chunk = None if rstd is None else rstd[b, rows]
        _norm_rope_chunk(out[b, rows], x[b, rows], weight, _table_rows(freqs, b, rows), eps, buf, rstd_chunk)


def chunk_rows(x: Tensor, seq: int) -> int:
    """Tokens per chunk of the eager paths for inputs like ``x`` (``seq`` joint tokens).

    Cache-sized on CPU (``CPU_CHUNK_ELEMENTS_PER_THREAD``); one chunk per tensor elsewhere (no cache to win there).
    """
    if x.device.type != "cpu":
        return max(1, seq)
    return max(1, CPU_CHUNK_ELEMENTS_PER_THREAD * torch.get_num_threads() // (x.shape[2] * x.shape[3]))


class _Part(NamedTuple):
    """Where one input goes: its table, its output and the output row its first token lands on."""

    table: int
    output: int
    row0: int


def _parts(layout: str, inputs: tuple) -> tuple[_Part, ...]:
    """Parts of ``layout``, in input order: "joint" (img_q, img_k, txt_q, txt_k; tables img, txt) or
    "single" (q, k; one table)."""
    if layout == "single":
        return (_Part(0, 0, 0), _Part(0, 1, 0))
    s_txt = inputs[2].shape[1]
    return (_Part(0, 0, s_txt), _Part(0, 1, s_txt), _Part(1, 0, 0), _Part(1, 1, 0))


def _new_outputs(layout: str, inputs: tuple, weights: tuple) -> list[Tensor]:
    """Fresh outputs: ``[B, rows, H, D]`` in the promotion of their parts' dtypes (``torch.cat``'s rule)."""
    outputs = []
    for index in (0, 1):
        mine = [(x, w, p) for x, w, p in zip(inputs, weights, _parts(layout, inputs)) if p.output == index]
        rows = max(p.row0 + x.shape[1] for x, _, p in mine)
        dtype = result_dtype(mine[0][0].dtype, mine[0][1])
        for x, w, _ in mine[1:]:
            dtype = torch.promote_types(dtype, result_dtype(x.dtype, w))
        batch, _, heads, head_dim = mine[0][0].shape
        outputs.append(torch.empty(batch, rows, heads, head_dim, dtype=dtype, device=mine[0][0].device))
    return outputs


def _norm_rope_fast(layout, inputs, weights, tables, eps, rstds=None, outputs=None):
    """No-autograd path: fills the outputs (fresh, or ``outputs``) part by part instead of cat.

    ``rstds`` (one ``[B, S, H, 1]`` fp32 tensor or None per input) receive the RMSNorm ``rstd`` of
    the inputs that have a weight, for the backward.
    """
    outputs = _new_outputs(layout, inputs, weights) if outputs is None else list(outputs)
    rstds = (None,) * len(inputs) if rstds is None else rstds
    img_q = inputs[0]
    buf = _Scratch(chunk_rows(img_q, outputs[0].shape[1]), *img_q.shape[2:], img_q.device)
    # Strided tables would send the complex multiply down PyTorch's scalar loop, which may contract
    # FMAs; its vectorized loop rounds each product as the reference does.
    tables = [t.contiguous() for t in tables]
    for x, weight, rstd, part in zip(inputs, weights, rstds, _parts(layout, inputs)):
        out = outputs[part.output][:, part.row0 : part.row0 + x.shape[1]]
        _norm_rope_into(out, x, weight, tables[part.table], eps, buf, rstd)
    return outputs[0], outputs[1]


def _norm_rope_backward_chunk(
    grad_x: Tensor | None,
    weight_grad: bool,
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    rstd: Tensor | None,
    freqs_conj: Tensor,
    buf: _Scratch,
) -> Tensor | None:
    """Backward of ``rope(rms_norm(x))`` for one chunk ``[n, H, D]``.

    Fills ``grad_x`` (when not None) and returns this chunk's weight gradient, an fp32 ``[D]`` sum,
    when ``weight_grad`` (else None). It rounds wherever autograd through the reference's ops rounds: the
    output gradient to the part's dtype (cat's backward), the rotated gradient to the part's dtype
    (rope's ``.float()``), ``g * weight`` and ``g * (x * rstd)`` in the part's dtype (RMSNorm's weight
    multiply), and the two x-gradient terms, through ``x * rstd`` and through
    ``x.float().pow(2).mean()``, each to x's dtype before they are summed in x's dtype.
    """
    n, _, head_dim = x.shape
    part_dtype = result_dtype(x.dtype, weight)
    if grad.dtype != part_dtype:
        grad = buf.get("grad", n, part_dtype).copy_(grad)
    rotated = buf.get("rotated", n)
    if grad.dtype != torch.float32 or not _complex_viewable(grad):
        grad = rotated.copy_(grad)
    # The backward of the complex product: multiply by conj(freqs), i.e. rotate by -theta.
    torch.mul(_as_complex(grad), freqs_conj.unsqueeze(1), out=_as_complex(rotated))
    if weight is None:
        grad_x.copy_(rotated)
        return None
    xf = x if x.dtype == torch.float32 else buf.get("xf", n).copy_(x)
    half = part_dtype in _HALF_DTYPES
    grad_y = buf.get("grad_y", n, part_dtype).copy_(rotated) if half else rotated
    work = buf.get("work", n)
    partial = None
    if weight_grad:
        # Recompute the forward's x * rstd (rounded to a half weight's dtype): its product with
        # grad_y, in the part's dtype, is what autograd reduces to the weight gradient.
        terms = torch.mul(xf, rstd, out=work)
        if half:
            terms = buf.get("terms", n, part_dtype).copy_(terms)
        terms.mul_(grad_y)
        partial = terms.sum((0, 1), dtype=torch.float32)
    if grad_x is None:
        return partial
    if half:
        grad_z = rotated.copy_(torch.mul(grad_y, weight, out=buf.get("grad_z", n, part_dtype)))
    else:
        grad_z = rotated.mul_(weight)
    # The term through x * rstd, rounded to x's dtype (via fp32 buffers, see _norm_rope_chunk).
    if x.dtype == torch.float32:
        torch.mul(grad_z, rstd, out=grad_x)
    else:
        grad_x.copy_(torch.mul(grad_z, rstd, out=work))
    dot = torch.mul(grad_z, xf, out=work).sum(-1, keepdim=True)  # d loss / d rstd
    # rsqrt' = -0.5 * rstd**3, mean' = 1 / D, pow(2)' = 2 * x: autograd's ops in autograd's order.
    coef = dot.mul_(-0.5).mul_(rstd.pow(3)).div_(head_dim).mul_(2)
    variance_term = torch.mul(xf, coef, out=work)
    if x.dtype != torch.float32:
        variance_term = buf.get("variance_term", n, x.dtype).copy_(variance_term)  # rounded on its own
    grad_x.add_(variance_term)
    return partial


def _norm_rope_backward_into(grad_x, weight_grad, grad, x, weight, rstd, freqs_conj, buf) -> Tensor | None:
    """``_norm_rope_backward_chunk`` over every chunk of one ``[B, S, H, D]`` input.

    Returns the weight gradient (fp32) when ``weight_grad``: the chunks' partial sums are summed in
    one reduction at the end, so its rounding error grows like one cascade sum over all the tokens,
    not with the number of chunks.
    """
    partials = []
    for b, rows in _chunks(*x.shape[:2], buf.rows):
        grad_x_chunk = None if grad_x is None else grad_x[b, rows]
        rstd_chunk = None if rstd is None else rstd[b, rows]
        partials.append(
            _norm_rope_backward_chunk(
                grad_x_chunk, weight_grad, grad[b, rows], x[b, rows], weight, rstd_chunk,
                _table_rows(freqs_conj, b, rows), buf,
            )
        )
    return torch.stack(partials).sum(0) if weight_grad else None


class NormRopeFunction(torch.autograd.Function):
    """Eager autograd path of both layouts: the chunked forward of ``_norm_rope_fast`` and a chunked backward.

    ``apply(layout, eps, *inputs, *weights, *tables)``. The forward saves the inputs by reference and
    the fp32 ``rstd`` per (token, head) of each normalised input; the backward walks the same
    cache-sized chunks, writes each input gradient straight into its buffer and sums the chunks' fp32
    weight-gradient partials in one reduction (deterministic: no atomics, a fixed order). The gradients
    equal autograd through the reference (see ``_norm_rope_backward_chunk``). The RoPE tables get no
    gradient (callers that need one use the reference). Not twice differentiable: a backward with
    ``create_graph=True`` raises.
    """

    @staticmethod
    def forward(ctx, layout, eps, *tensors):
        """``_norm_rope_fast``, keeping what the backward needs."""
        n = 4 if layout == "joint" else 2
        inputs, weights, tables = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        rstds = tuple(
            None if w is None else torch.empty(*x.shape[:3], 1, dtype=torch.float32, device=x.device)
            for x, w in zip(inputs, weights)
        )
        outputs = _norm_rope_fast(layout, inputs, weights, tables, eps, rstds)
        ctx.layout, ctx.n = layout, n
        ctx.save_for_backward(*tensors, *rstds)
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        """Gradients of the inputs and weights (None where not needed); None for the layout, eps and tables."""
        if torch.is_grad_enabled():  # backward(create_graph=True): the ops below record no graph
            raise RuntimeError(
                "qk_norm_rope: the eager torch backend is not twice differentiable, so backward with "
                "create_graph=True is not supported; for higher-order gradients call it under torch.func "
                "transforms (e.g. torch.func.grad), which take the functional path"
            )
        n = ctx.n
        saved = ctx.saved_tensors
        inputs, weights, tables, rstds = saved[:n], saved[n : 2 * n], saved[2 * n : -n], saved[-n:]
        img_q = inputs[0]
        buf = _Scratch(chunk_rows(img_q, max(x.shape[1] for x in inputs)), *img_q.shape[2:], img_q.device)
        # The conjugate tables, materialised once and contiguous (see _norm_rope_fast).
        conj = [t.contiguous().conj_physical() for t in tables]
        grads = [None] * (2 * n)
        for i, (x, weight, rstd, part) in enumerate(zip(inputs, weights, rstds, _parts(ctx.layout, inputs))):
            grad_out = grad_outputs[part.output]
            need_x = ctx.needs_input_grad[2 + i]
            need_w = weight is not None and ctx.needs_input_grad[2 + n + i]
            if grad_out is None or not (need_x or need_w):
                continue
            grad = grad_out[:, part.row0 : part.row0 + x.shape[1]]
            grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
            grad_w = _norm_rope_backward_into(grad_x, need_w, grad, x, weight, rstd, conj[part.table], buf)
            grads[i] = grad_x
            grads[n + i] = None if grad_w is None else grad_w.to(weight.dtype)
        return (None, None, *grads, *(None,) * len(tables))


def needs_autograd(tensors) -> bool:
    """Whether autograd records an op on ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _eager_path(layout: str, inputs: tuple, weights: tuple, tables: tuple, eps: float):
    """The eager paths' result, or None where the reference must run (compile, torch.func, table gradients)."""
    if torch.compiler.is_compiling():
        return None
    if not needs_autograd((*inputs, *weights, *tables)):
        return _norm_rope_fast(layout, inputs, weights, tables, eps)
    # An autograd.Function without setup_context/vmap rules cannot run under torch.func transforms.
    if any(t.requires_grad for t in tables) or torch._C._are_functorch_transforms_active():
        return None
    return NormRopeFunction.apply(layout, eps, *inputs, *weights, *tables)


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

    Without autograd: the chunked no-grad path. With autograd: ``NormRopeFunction``, except under
    ``torch.compile``, under ``torch.func`` transforms or when a RoPE table needs a gradient, which
    run ``joint_qk_norm_rope_reference`` itself. All give the reference's numbers.
    """
    inputs = (img_q, img_k, txt_q, txt_k)
    weights = (img_q_weight, img_k_weight, txt_q_weight, txt_k_weight)
    result = _eager_path("joint", inputs, weights, (img_freqs, txt_freqs), eps)
    if result is not None:
        return result
    return joint_qk_norm_rope_reference(
        *inputs, img_q_weight=img_q_weight, img_k_weight=img_k_weight, txt_q_weight=txt_q_weight,
        txt_k_weight=txt_k_weight, img_freqs=img_freqs, txt_freqs=txt_freqs, eps=eps,
    )  # fmt: skip


def qk_norm_rope_torch(
    q: Tensor,
    k: Tensor,
    *,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    freqs: Tensor,
    eps: float = 1e-6,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Eager torch backend of ``qk_norm_rope`` (inputs are assumed validated; ``out`` only without autograd).

    The paths of :func:`joint_qk_norm_rope_torch`, for one stream; with ``out`` the results are written
    there (in place when ``out`` is ``(q, k)``).
    """
    if out is not None and not torch.compiler.is_compiling():
        return _norm_rope_fast("single", (q, k), (q_weight, k_weight), (freqs,), eps, outputs=out)
    result = _eager_path("single", (q, k), (q_weight, k_weight), (freqs,), eps)
    if result is None:
        result = qk_norm_rope_reference(q, k, q_weight=q_weight, k_weight=k_weight, freqs=freqs, eps=eps)
    if out is None:
        return result
    return out[0].copy_(result[0]), out[1].copy_(result[1])
