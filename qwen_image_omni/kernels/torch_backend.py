"""Eager PyTorch backend of ``joint_qk_norm_rope``.

It reproduces, bit for bit where the op order allows, ``reference.joint_qk_norm_rope_reference``
(diffusers' q/k RMSNorm -> ``apply_rotary_emb_qwen(use_real=False)`` -> ``cat([text, image], dim=1)``).
Three paths compute the same numbers:

* ``_joint_fast``: no autograd, eager only. It writes straight into the preallocated joint output
  and walks the tokens in chunks small enough that the intermediate passes stay in cache.
* ``JointQKNormRopeFunction``: the eager training path, an ``autograd.Function`` whose forward is
  ``_joint_fast`` (also saving the fp32 ``rstd``) and whose backward walks the same chunks, replaying
  the rounding chain autograd follows through the reference's ops.
* the reference itself, used under ``torch.compile`` (inductor fuses it by itself), under
  ``torch.func`` transforms and when the RoPE tables themselves need a gradient.

Input validation lives in ``qk_norm_rope``; this module assumes valid inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import joint_qk_norm_rope_reference

__all__ = ["CPU_CHUNK_ELEMENTS_PER_THREAD", "JointQKNormRopeFunction", "chunk_rows", "joint_qk_norm_rope_torch"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)

# CPU chunk size: 2**18 fp32 values (1 MiB) per intra-op thread and scratch buffer, so the few
# buffers a chunk uses stay in cache while the ~7 forward / ~14 backward elementwise passes run over
# them. Smaller chunks lose more to per-op overhead; the whole tensor would go through DRAM on every pass.
CPU_CHUNK_ELEMENTS_PER_THREAD = 1 << 18


def _norm_dtype(x_dtype: torch.dtype, weight: Tensor | None) -> torch.dtype:
    """Dtype ``rms_norm`` (or its absence when ``weight`` is None) gives, kept by ``rope``."""
    if weight is None:
        return x_dtype
    if weight.dtype in _HALF_DTYPES:
        return weight.dtype
    # x * rsqrt(fp32 variance) is fp32 for every allowed x dtype; fp32 * fp32 weight stays fp32.
    return torch.promote_types(torch.float32, weight.dtype)


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
    part_dtype = _norm_dtype(x.dtype, weight)
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
        _norm_rope_chunk(out[b, rows], x[b, rows], weight, freqs[rows], eps, buf, rstd_chunk)


def chunk_rows(x: Tensor, seq: int) -> int:
    """Tokens per chunk of the eager paths for inputs like ``x`` (``seq`` joint tokens).

    Cache-sized on CPU (``CPU_CHUNK_ELEMENTS_PER_THREAD``); one chunk per tensor elsewhere (no cache to win there).
    """
    if x.device.type != "cpu":
        return max(1, seq)
    return max(1, CPU_CHUNK_ELEMENTS_PER_THREAD * torch.get_num_threads() // (x.shape[2] * x.shape[3]))


def _joint_fast(img_q, img_k, txt_q, txt_k, weights, img_freqs, txt_freqs, eps, rstds=(None,) * 4):
    """No-autograd path: fills slices of the preallocated joint outputs instead of cat.

    ``rstds`` (one ``[B, S, H, 1]`` fp32 tensor or None per input, in argument order) receive the
    RMSNorm ``rstd`` of the inputs that have a weight, for the backward.
    """
    w_img_q, w_img_k, w_txt_q, w_txt_k = weights
    r_img_q, r_img_k, r_txt_q, r_txt_k = rstds
    batch, s_img, heads, head_dim = img_q.shape
    s_txt = txt_q.shape[1]
    buf = _Scratch(chunk_rows(img_q, s_img + s_txt), heads, head_dim, img_q.device)
    # Strided tables would send the complex multiply down PyTorch's scalar loop, which may contract
    # FMAs; its vectorized loop rounds each product as the reference does.
    img_freqs, txt_freqs = img_freqs.contiguous(), txt_freqs.contiguous()
    streams = (
        ((txt_q, w_txt_q, r_txt_q), (img_q, w_img_q, r_img_q)),
        ((txt_k, w_txt_k, r_txt_k), (img_k, w_img_k, r_img_k)),
    )
    outputs = []
    for (txt, w_txt, r_txt), (img, w_img, r_img) in streams:
        dtype = torch.promote_types(_norm_dtype(txt.dtype, w_txt), _norm_dtype(img.dtype, w_img))
        joint = torch.empty(batch, s_txt + s_img, heads, head_dim, dtype=dtype, device=img.device)
        _norm_rope_into(joint[:, :s_txt], txt, w_txt, txt_freqs, eps, buf, r_txt)
        _norm_rope_into(joint[:, s_txt:], img, w_img, img_freqs, eps, buf, r_img)
        outputs.append(joint)
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
    part_dtype = _norm_dtype(x.dtype, weight)
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
                grad_x_chunk, weight_grad, grad[b, rows], x[b, rows], weight, rstd_chunk, freqs_conj[rows], buf
            )
        )
    return torch.stack(partials).sum(0) if weight_grad else None


class JointQKNormRopeFunction(torch.autograd.Function):
    """Eager autograd path: the chunked forward of ``_joint_fast`` and a chunked backward.

    The forward saves the inputs by reference and the fp32 ``rstd`` per (token, head) of each
    normalised input; the backward walks the same cache-sized chunks, writes each input gradient
    straight into its buffer and sums the chunks' fp32 weight-gradient partials in one reduction
    (deterministic: no atomics, a fixed order). The gradients equal autograd through the reference
    (see ``_norm_rope_backward_chunk``). The RoPE tables get no gradient (callers that need one use
    the reference). Not twice differentiable: a backward with ``create_graph=True`` raises.
    """

    @staticmethod
    def forward(ctx, img_q, img_k, txt_q, txt_k, w_img_q, w_img_k, w_txt_q, w_txt_k, img_freqs, txt_freqs, eps):
        """``_joint_fast``, keeping what the backward needs."""
        inputs = (img_q, img_k, txt_q, txt_k)
        weights = (w_img_q, w_img_k, w_txt_q, w_txt_k)
        rstds = tuple(
            None if w is None else torch.empty(*x.shape[:3], 1, dtype=torch.float32, device=x.device)
            for x, w in zip(inputs, weights)
        )
        joint_q, joint_k = _joint_fast(*inputs, weights, img_freqs, txt_freqs, eps, rstds)
        ctx.save_for_backward(*inputs, *weights, img_freqs, txt_freqs, *rstds)
        ctx.set_materialize_grads(False)
        return joint_q, joint_k

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        """Gradients of the four inputs and weights (None where not needed); None for the tables and eps."""
        if torch.is_grad_enabled():  # backward(create_graph=True): the ops below record no graph
            raise RuntimeError(
                "joint_qk_norm_rope: the eager torch backend is not twice differentiable, so backward with "
                "create_graph=True is not supported; for higher-order gradients call it under torch.func "
                "transforms (e.g. torch.func.grad), which take the functional path"
            )
        saved = ctx.saved_tensors
        inputs, weights, (img_freqs, txt_freqs), rstds = saved[:4], saved[4:8], saved[8:10], saved[10:]
        img_q, _, txt_q, _ = inputs
        _, s_img, heads, head_dim = img_q.shape
        s_txt = txt_q.shape[1]
        buf = _Scratch(chunk_rows(img_q, s_img + s_txt), heads, head_dim, img_q.device)
        # The conjugate tables, materialised once and contiguous (see _joint_fast).
        conj = {"img": img_freqs.contiguous().conj_physical(), "txt": txt_freqs.contiguous().conj_physical()}
        grads = [None] * 11
        for i, (x, weight, rstd) in enumerate(zip(inputs, weights, rstds)):
            joint_grad = grad_q if i % 2 == 0 else grad_k
            need_x = ctx.needs_input_grad[i]
            need_w = weight is not None and ctx.needs_input_grad[4 + i]
            if joint_grad is None or not (need_x or need_w):
                continue
            stream = "img" if i < 2 else "txt"
            grad = joint_grad[:, s_txt:] if stream == "img" else joint_grad[:, :s_txt]
            grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
            grad_w = _norm_rope_backward_into(grad_x, need_w, grad, x, weight, rstd, conj[stream], buf)
            grads[i] = grad_x
            grads[4 + i] = None if grad_w is None else grad_w.to(weight.dtype)
        return tuple(grads)


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

    Without autograd: the chunked no-grad path. With autograd: ``JointQKNormRopeFunction``,
    except under ``torch.compile``, under ``torch.func`` transforms or when a RoPE table needs a
    gradient, which run ``joint_qk_norm_rope_reference`` itself. All give the reference's numbers.
    """
    acts = (img_q, img_k, txt_q, txt_k)
    weights = (img_q_weight, img_k_weight, txt_q_weight, txt_k_weight)
    if not torch.compiler.is_compiling():
        if not _needs_autograd((*acts, img_freqs, txt_freqs, *weights)):
            return _joint_fast(*acts, weights, img_freqs, txt_freqs, eps)
        # An autograd.Function without setup_context/vmap rules cannot run under torch.func transforms.
        if not (img_freqs.requires_grad or txt_freqs.requires_grad or torch._C._are_functorch_transforms_active()):
            return JointQKNormRopeFunction.apply(*acts, *weights, img_freqs, txt_freqs, eps)
    return joint_qk_norm_rope_reference(
        *acts, img_q_weight=img_q_weight, img_k_weight=img_k_weight, txt_q_weight=txt_q_weight,
        txt_k_weight=txt_k_weight, img_freqs=img_freqs, txt_freqs=txt_freqs, eps=eps,
    )
