"""``joint_qk_norm_rope`` (torch backend) against diffusers' own q/k norm + RoPE + cat sequence."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from qwen_image_omni.kernels import BACKEND_ENV_VAR, joint_qk_norm_rope
from qwen_image_omni.kernels import torch_ops

EPS = 1e-6
NAMES = ("img_q", "img_k", "txt_q", "txt_k")
WEIGHT_NAMES = tuple(f"{n}_weight" for n in NAMES)


# --------------------------------------------------------------------------- inputs and oracle
def _freqs(seq: int, head_dim: int, gen: torch.Generator) -> torch.Tensor:
    angles = torch.rand(seq, head_dim // 2, generator=gen) * 200 - 100
    return torch.polar(torch.ones_like(angles), angles)


def make_inputs(
    batch=1,
    s_img=37,
    s_txt=13,
    heads=3,
    head_dim=64,
    dtype=torch.float32,
    weight_dtype=None,
    none_weights=(),
    layout="unflatten",
    seed=0,
):
    """Activations laid out as in the attention processor, weights, and RoPE tables.

    layout: "unflatten" ([B, S, H*D] linear output viewed as heads), "fused" (q and k sliced out of
    one [B, S, 3, H, D] projection), or "odd" (views at an odd element offset, not viewable as complex).
    """
    gen = torch.Generator().manual_seed(seed)
    weight_dtype = weight_dtype or dtype

    def stream(seq):
        if layout == "unflatten":
            qk = torch.randn(2, batch, seq, heads * head_dim, generator=gen).to(dtype)
            q, k = qk[0].unflatten(-1, (heads, -1)), qk[1].unflatten(-1, (heads, -1))
        elif layout == "fused":
            qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=gen).to(dtype)
            q, k = qkv[:, :, 0], qkv[:, :, 1]
        elif layout == "odd":
            big = torch.randn(2, batch, seq, heads, head_dim + 1, generator=gen).to(dtype)
            q, k = big[0, ..., 1:], big[1, ..., 1:]
        else:
            raise AssertionError(layout)
        return q, k

    img_q, img_k = stream(s_img)
    txt_q, txt_k = stream(s_txt)
    weights = {
        name: None if name in none_weights else (torch.rand(head_dim, generator=gen) + 0.5).to(weight_dtype)
        for name in WEIGHT_NAMES
    }
    if layout == "unflatten":
        img_freqs, txt_freqs = _freqs(s_img, head_dim, gen), _freqs(s_txt, head_dim, gen)
    else:  # row slices of a longer table with strided columns
        img_freqs = _freqs(s_img + 3, 2 * head_dim, gen)[2 : 2 + s_img, ::2]
        txt_freqs = _freqs(s_txt + 1, 2 * head_dim, gen)[1:, 1::2]
    return dict(img_q=img_q, img_k=img_k, txt_q=txt_q, txt_k=txt_k, **weights, img_freqs=img_freqs, txt_freqs=txt_freqs)


def diffusers_reference(inputs, eps=EPS):
    """What ``QwenDoubleStreamAttnProcessor2_0`` does to q and k, with diffusers' own modules."""
    parts = {}
    for name in NAMES:
        x = inputs[name]
        weight = inputs[f"{name}_weight"]
        if weight is not None:
            norm = RMSNorm(x.shape[-1], eps=eps)
            x = torch.func.functional_call(norm, {"weight": weight}, (x,))  # keeps autograd to `weight`
        parts[name] = apply_rotary_emb_qwen(x, inputs[f"{name[:3]}_freqs"], use_real=False)
    return (
        torch.cat([parts["txt_q"], parts["img_q"]], dim=1),
        torch.cat([parts["txt_k"], parts["img_k"]], dim=1),
    )


def ours(inputs, **kwargs):
    inputs = dict(inputs)
    return joint_qk_norm_rope(inputs.pop("img_q"), inputs.pop("img_k"), inputs.pop("txt_q"), inputs.pop("txt_k"),
                              **inputs, **kwargs)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two bf16 tensors."""

    def ordered(x):
        bits = x.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def assert_matches(out, ref, min_exact=0.999):
    """fp32: within 1e-6; bf16/fp16: within 1 ULP, with almost all elements bit-exact."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        return
    if out.dtype == torch.bfloat16:
        assert ulp_distance(out, ref).max().item() <= 1
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-10, atol=2**-14)
    exact = (out == ref).float().mean().item()
    assert exact >= min_exact, f"only {exact:.5f} of the elements are bit-exact"


def fast_paths(inputs, monkeypatch):
    """The no-grad path's outputs with one chunk per tensor and with uneven 5-token chunks."""
    with torch.no_grad():
        one_chunk = ours(inputs)
        with monkeypatch.context() as m:
            m.setattr(torch_ops, "_chunk_rows", lambda x, seq: 5)
            many_chunks = ours(inputs)
    return (*one_chunk, *many_chunks)


def differentiable_path(inputs):
    """The autograd/compile path's outputs, called directly (no grad needed)."""
    weights = tuple(inputs[w] for w in WEIGHT_NAMES)
    args = (*(inputs[n] for n in NAMES), weights, inputs["img_freqs"], inputs["txt_freqs"], EPS)
    return torch_ops._joint_differentiable(*args)


# --------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [3, 24])
@pytest.mark.parametrize("s_txt", [1, 13])
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_diffusers(batch, s_txt, heads, head_dim, dtype, monkeypatch):
    inputs = make_inputs(batch=batch, s_txt=s_txt, heads=heads, head_dim=head_dim, dtype=dtype)
    expected = diffusers_reference(inputs)
    outputs = (*fast_paths(inputs, monkeypatch), *differentiable_path(inputs))
    for got, ref in zip(outputs, expected * 3):
        assert got.shape == (batch, s_txt + 37, heads, head_dim)
        assert_matches(got, ref, min_exact=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bit_exact_on_a_realistic_slice(dtype):
    """Qwen-Image-like heads (24 x 128) and layout: the fast path equals diffusers bit for bit."""
    inputs = make_inputs(batch=1, s_img=256, s_txt=32, heads=24, head_dim=128, dtype=dtype)
    expected = diffusers_reference(inputs)
    with torch.no_grad():
        got = ours(inputs)
    exact = min((g == r).float().mean().item() for g, r in zip(got, expected))
    print(f"{dtype} bit-exact fraction: {exact:.6f}")
    assert exact == 1.0


@pytest.mark.parametrize(
    "none_weights",
    [("img_q_weight",), ("txt_k_weight",), ("img_k_weight", "txt_q_weight"), WEIGHT_NAMES],
    ids=["img_q", "txt_k", "img_k+txt_q", "all"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_none_weights_skip_the_norm(none_weights, dtype, monkeypatch):
    inputs = make_inputs(dtype=dtype, none_weights=none_weights)
    expected = diffusers_reference(inputs)
    for g, r in zip(fast_paths(inputs, monkeypatch), expected * 2):
        assert_matches(g, r, min_exact=1.0)


@pytest.mark.parametrize(
    "dtype, weight_dtype, none_weights",
    [
        (torch.bfloat16, torch.float32, ()),  # fp32 weights promote the result to fp32
        (torch.bfloat16, torch.float32, ("txt_q_weight",)),  # bf16 text part, fp32 image part: cat promotes
        (torch.float32, torch.bfloat16, ()),  # x * rstd rounded to bf16 before the weight
        (torch.float16, torch.float16, ()),
        (torch.float16, torch.bfloat16, ("img_k_weight",)),  # fp16 and bf16 parts: cat gives fp32
    ],
    ids=["bf16-x_fp32-w", "bf16-x_fp32-w_txt-none", "fp32-x_bf16-w", "fp16", "fp16-x_bf16-w_img-none"],
)
def test_mixed_dtypes_follow_diffusers(dtype, weight_dtype, none_weights, monkeypatch):
    inputs = make_inputs(dtype=dtype, weight_dtype=weight_dtype, none_weights=none_weights)
    expected = diffusers_reference(inputs)
    for g, r in zip(fast_paths(inputs, monkeypatch), expected * 2):
        assert_matches(g, r, min_exact=1.0)


@pytest.mark.parametrize("layout", ["fused", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("none_weights", [(), ("img_q_weight", "txt_q_weight")], ids=["norm", "no-norm-q"])
def test_strided_inputs(layout, dtype, none_weights, monkeypatch):
    inputs = make_inputs(batch=2, dtype=dtype, layout=layout, none_weights=none_weights)
    assert not inputs["img_q"].is_contiguous() and not inputs["img_freqs"].is_contiguous()
    # diffusers' view_as_complex rejects fp32 views at odd offsets: give it contiguous copies (same values).
    as_given = {n: t.contiguous() if n in NAMES and layout == "odd" else t for n, t in inputs.items()}
    expected = diffusers_reference(as_given)
    # Column-strided tables send the reference's complex multiply down PyTorch's scalar loop, which
    # rounds a few products differently (FMA) from its vectorized loop: a rare 1-ULP difference.
    for g, r in zip(fast_paths(inputs, monkeypatch), expected * 2):
        assert_matches(g, r, min_exact=0.999)


def test_inference_mode_and_outputs_are_fresh():
    inputs = make_inputs(dtype=torch.bfloat16)
    expected = diffusers_reference(inputs)
    with torch.inference_mode():
        q, k = ours(inputs)
    assert q.is_contiguous() and k.is_contiguous() and q.data_ptr() != k.data_ptr()
    assert_matches(q, expected[0], min_exact=1.0)
    assert_matches(k, expected[1], min_exact=1.0)


# --------------------------------------------------------------------------- gradients
# Tolerances. Input gradients are elementwise, like the outputs: fp32 within 1e-6, bf16 within one
# ULP (ours is one of the reference's two bf16 neighbours or the reference itself), and in practice
# bit-exact. Weight gradients are reductions over B*S*H bit-identical products (both sides follow
# the same rounding chain to get them) summed in fp32 in different orders: PyTorch's cascade sum
# over all tokens against our per-chunk cascade sums and their final sum. Each is within about
# ceil(log2 n) * u * sum|terms| of the exact sum (u = 2**-24, the pairwise-summation bound), so the
# two may differ by twice that: the absolute floor added to the 1e-6 / one-ULP budget. Measured
# differences stay near 1 * u * sum|terms|; a wrong backward is off by O(|gradient|).
FP32_ROUNDOFF = 2.0**-24
PRECISION_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}
MIN_NORMAL_EXPONENT = {torch.float32: -125, torch.bfloat16: -125, torch.float16: -13}  # as torch.frexp gives it
REQUIRES_GRAD = {
    "all": NAMES + WEIGHT_NAMES,
    "inputs": NAMES,
    "weights": WEIGHT_NAMES,
    "some": ("img_q", "txt_k", "img_k_weight"),  # mixed: a weight whose input needs none, and the reverse
}
FUNCTION_NODE = "JointQKNormRopeFunctionBackward"


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Per element, the spacing of ``t``'s dtype at ``|t|`` (fp64; the subnormal spacing below the normals)."""
    _, exponent = torch.frexp(t.double())
    exponent = exponent.clamp_min(MIN_NORMAL_EXPONENT[t.dtype]) - PRECISION_BITS[t.dtype]
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), exponent)


def with_leaves(inputs, names):
    """``inputs`` with the (non-None) tensors named in ``names`` replaced by copies that require grad."""
    leaves = {n: inputs[n].detach().clone().requires_grad_() for n in names if inputs[n] is not None}
    return {**inputs, **leaves}, leaves


def joint_grads(outputs, seed=1):
    """Random gradients for the joint outputs, in their dtypes."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs)


def forward_backward(fn, inputs, leaves, grads):
    """``fn(inputs)`` and the gradient of ``sum(outputs * grads)`` for every leaf (None if unused)."""
    outputs = fn(inputs)
    return outputs, torch.autograd.grad(outputs, list(leaves.values()), grads, allow_unused=True)


def weight_grad_terms(inputs, grads):
    """Per weight, the ``[B, S, H, D]`` products autograd sums into its gradient.

    Runs diffusers' reference with every weight expanded to its activation's full shape: the
    gradient of such a weight is the product itself, rounded as in the real backward, unreduced.
    """
    full = {
        w: inputs[w].detach().expand(inputs[w[:5]].shape).clone().requires_grad_()
        for w in WEIGHT_NAMES
        if inputs[w] is not None
    }
    if not full:
        return {}
    outputs = diffusers_reference({**inputs, **full})
    return dict(zip(full, torch.autograd.grad(outputs, list(full.values()), grads)))


def assert_weight_grad_matches(got, ref, terms, name):
    """A weight gradient within 1e-6 (fp32) or one ULP (half) of the reference, plus the summation floor."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, name
    n = terms[..., 0].numel()
    floor = 2 * max(1, math.ceil(math.log2(n))) * FP32_ROUNDOFF * terms.double().abs().sum((0, 1, 2))
    budget = 1e-6 * ref.double().abs() if got.dtype == torch.float32 else ulp(ref)
    excess = (got.double() - ref.double()).abs() - (budget + floor)
    assert excess.max().item() <= 0, f"grad of {name}: {int((excess > 0).sum())} elements off, worst by {excess.max()}"


def assert_grads_match(names, got, expected, terms):
    """Input gradients like outputs (mostly bit-exact), weight gradients with the summation floor."""
    for name, g, e in zip(names, got, expected):
        if e is None:
            assert g is None or not g.any(), f"grad of {name}: expected none"
        elif name in WEIGHT_NAMES:
            assert_weight_grad_matches(g, e, terms[name], name)
        else:
            assert_matches(g, e, min_exact=0.999)


def check_gradients(inputs, requires, monkeypatch):
    """Outputs and all gradients of ours (one chunk and 5-token chunks) against autograd through diffusers."""
    grad_inputs, leaves = with_leaves(inputs, requires)
    grads = joint_grads(diffusers_reference(inputs))
    expected_out, expected = forward_backward(diffusers_reference, grad_inputs, leaves, grads)
    terms = weight_grad_terms(inputs, grads)
    for rows in (None, 5):
        with monkeypatch.context() as m:
            if rows:
                m.setattr(torch_ops, "_chunk_rows", lambda x, seq, rows=rows: rows)
            out, got = forward_backward(ours, grad_inputs, leaves, grads)
        assert all(type(o.grad_fn).__name__ == FUNCTION_NODE for o in out)
        for o, e in zip(out, expected_out):
            assert_matches(o, e, min_exact=1.0)
        assert_grads_match(list(leaves), got, expected, terms)


@pytest.mark.parametrize("requires", list(REQUIRES_GRAD))
@pytest.mark.parametrize(
    "none_weights",
    [(), ("txt_k_weight",), ("img_q_weight", "img_k_weight"), WEIGHT_NAMES],
    ids=["all-weights", "txt_k-none", "img-none", "no-norm"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "batch, s_img, s_txt, heads, head_dim", [(2, 37, 13, 3, 64), (1, 20, 1, 2, 96), (2, 9, 6, 24, 128)]
)
def test_gradients_match_diffusers(batch, s_img, s_txt, heads, head_dim, dtype, none_weights, requires, monkeypatch):
    inputs = make_inputs(batch=batch, s_img=s_img, s_txt=s_txt, heads=heads, head_dim=head_dim, dtype=dtype,
                         none_weights=none_weights)
    if not any(inputs[n] is not None for n in REQUIRES_GRAD[requires]):
        q, k = ours(with_leaves(inputs, REQUIRES_GRAD[requires])[0])
        assert not q.requires_grad and not k.requires_grad
        return
    check_gradients(inputs, REQUIRES_GRAD[requires], monkeypatch)


@pytest.mark.parametrize(
    "dtype, weight_dtype, none_weights",
    [
        (torch.bfloat16, torch.float32, ()),
        (torch.bfloat16, torch.float32, ("txt_q_weight",)),  # bf16 text part, fp32 image part: cat promotes
        (torch.float32, torch.bfloat16, ()),
        (torch.float16, torch.float16, ()),
        (torch.float16, torch.bfloat16, ("img_k_weight",)),  # fp16 and bf16 parts: cat gives fp32
    ],
    ids=["bf16-x_fp32-w", "bf16-x_fp32-w_txt-none", "fp32-x_bf16-w", "fp16", "fp16-x_bf16-w_img-none"],
)
def test_gradients_mixed_dtypes(dtype, weight_dtype, none_weights, monkeypatch):
    inputs = make_inputs(batch=2, dtype=dtype, weight_dtype=weight_dtype, none_weights=none_weights)
    check_gradients(inputs, REQUIRES_GRAD["all"], monkeypatch)


def _strided_leaves(inputs):
    """One leaf per storage the activations are views of (as a model's linear outputs), and the views."""
    bases, views = {}, {}
    for name in NAMES:
        t = inputs[name]
        base = bases.setdefault(id(t._base), t._base.detach().clone().requires_grad_())
        views[name] = base.as_strided(t.shape, t.stride(), t.storage_offset())
    return {f"base{i}": b for i, b in enumerate(bases.values())}, views


@pytest.mark.parametrize("layout", ["unflatten", "fused", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradients_strided_inputs(layout, dtype):
    """Views of linear outputs ([B, S, H*D] unflattened, slices of a fused qkv, odd offsets) and strided tables."""
    inputs = make_inputs(batch=2, dtype=dtype, layout=layout)
    leaves, views = _strided_leaves(inputs)
    weights, weight_leaves = with_leaves(inputs, WEIGHT_NAMES)
    leaves.update(weight_leaves)
    grads = joint_grads(diffusers_reference(inputs))
    # diffusers' view_as_complex rejects fp32 views at odd offsets: give it contiguous copies (same values).
    as_given = {n: v.contiguous() if layout == "odd" else v for n, v in views.items()}
    expected_out, expected = forward_backward(diffusers_reference, {**weights, **as_given}, leaves, grads)
    out, got = forward_backward(ours, {**weights, **views}, leaves, grads)
    assert type(out[0].grad_fn).__name__ == FUNCTION_NODE
    for o, e in zip(out, expected_out):
        assert_matches(o, e, min_exact=0.999)  # see test_strided_inputs on the reference's scalar loop
    assert_grads_match(list(leaves), got, expected, weight_grad_terms(inputs, grads))


def test_gradients_realistic_slice(monkeypatch):
    """Qwen-Image-like heads (24 x 128): the default chunking spans several chunks per image stream."""
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(batch=1, s_img=256, s_txt=32, heads=24, head_dim=128, dtype=dtype)
        with monkeypatch.context() as m:
            m.setattr(torch_ops, "_CPU_CHUNK_ELEMENTS_PER_THREAD", 1 << 16)  # 21 tokens per intra-op thread
            grad_inputs, leaves = with_leaves(inputs, REQUIRES_GRAD["all"])
            grads = joint_grads(diffusers_reference(inputs))
            _, expected = forward_backward(diffusers_reference, grad_inputs, leaves, grads)
            _, got = forward_backward(ours, grad_inputs, leaves, grads)
        assert_grads_match(list(leaves), got, expected, weight_grad_terms(inputs, grads))
        for name, g, e in zip(leaves, got, expected):
            if name in NAMES:
                assert torch.equal(g, e), f"grad of {name} not bit-exact"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("upstream", ["sum", "transposed", "q-only"])
def test_gradients_any_upstream(upstream, dtype):
    """Expanded (from .sum()), non-contiguous and missing (k unused) output gradients."""
    inputs = make_inputs(batch=2, dtype=dtype)
    grad_inputs, leaves = with_leaves(inputs, REQUIRES_GRAD["all"])
    q_ref, k_ref = diffusers_reference(inputs)
    gq, gk = joint_grads((q_ref.transpose(1, 2), k_ref.transpose(1, 2)))

    def loss(outputs):
        q, k = outputs
        if upstream == "sum":
            return q.sum() + k.sum()
        if upstream == "transposed":
            return (q.transpose(1, 2) * gq).sum() + (k.transpose(1, 2) * gk).sum()
        return q.sum()

    upstream_values = {
        "sum": (torch.ones_like(q_ref), torch.ones_like(k_ref)),
        "transposed": (gq.transpose(1, 2), gk.transpose(1, 2)),
        "q-only": (torch.ones_like(q_ref), torch.zeros_like(k_ref)),
    }[upstream]
    expected = torch.autograd.grad(loss(diffusers_reference(grad_inputs)), list(leaves.values()), allow_unused=True)
    outputs = ours(grad_inputs)
    assert type(outputs[0].grad_fn).__name__ == FUNCTION_NODE
    got = torch.autograd.grad(loss(outputs), list(leaves.values()), allow_unused=True)
    assert_grads_match(list(leaves), got, expected, weight_grad_terms(inputs, upstream_values))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(use_reentrant):
    """Recomputing the forward in the backward (the model's gradient checkpointing) gives the same bits."""
    inputs = make_inputs(batch=2, dtype=torch.bfloat16)
    grad_inputs, leaves = with_leaves(inputs, REQUIRES_GRAD["all"])
    grads = joint_grads(ours(inputs))
    _, expected = forward_backward(ours, grad_inputs, leaves, grads)
    names = list(grad_inputs)

    def checkpointed(given):
        def run(*tensors):  # positional tensors, so that the reentrant variant sees them
            return ours(dict(zip(names, tensors)))

        return torch.utils.checkpoint.checkpoint(run, *given.values(), use_reentrant=use_reentrant)

    torch.autograd.backward(checkpointed(grad_inputs), grads)  # the reentrant variant refuses autograd.grad
    for name, e in zip(leaves, expected):
        assert torch.equal(leaves[name].grad, e), f"grad of {name}"


def test_backward_is_deterministic():
    inputs = make_inputs(batch=2, s_img=64, heads=4)
    grad_inputs, leaves = with_leaves(inputs, REQUIRES_GRAD["all"])
    grads = joint_grads(ours(inputs))
    first, second = (forward_backward(ours, grad_inputs, leaves, grads)[1] for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_double_backward_raises():
    inputs, leaves = with_leaves(make_inputs(), ("img_q",))
    q, _ = ours(inputs)
    with pytest.raises(RuntimeError, match="not twice differentiable.*create_graph=True"):
        torch.autograd.grad(q.sum(), leaves["img_q"], create_graph=True)


def test_freqs_that_require_grad_take_the_functional_path():
    inputs = make_inputs(batch=2)
    grad_inputs, leaves = with_leaves(inputs, ("img_q", "txt_k_weight", "img_freqs", "txt_freqs"))
    grads = joint_grads(diffusers_reference(inputs))
    _, expected = forward_backward(diffusers_reference, grad_inputs, leaves, grads)
    out, got = forward_backward(ours, grad_inputs, leaves, grads)
    assert type(out[0].grad_fn).__name__ != FUNCTION_NODE
    for name, g, e in zip(leaves, got, expected):
        # The functional path sums the tables' gradients over batch and heads in another order.
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_torch_func_grad_takes_the_functional_path():
    inputs = make_inputs()
    grads = joint_grads(diffusers_reference(inputs))

    def loss(img_q, fn):
        q, k = fn({**inputs, "img_q": img_q})
        return (q * grads[0]).sum() + (k * grads[1]).sum()

    got = torch.func.grad(loss)(inputs["img_q"], ours)
    expected = torch.func.grad(loss)(inputs["img_q"], diffusers_reference)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_gradient_checks_catch_errors():
    """The checks are not vacuous: a 2-ULP or 1e-5 error in one element fails them."""
    ref = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    off = ref.clone()
    off[3] = off[3].float() + 2 * ulp(ref[3:4]).float()
    with pytest.raises(AssertionError):
        assert_matches(off, ref)
    terms = torch.randn(1, 1, 1, 64)
    ref32 = terms.sum((0, 1, 2))
    with pytest.raises(AssertionError):
        assert_weight_grad_matches(ref32 * (1 + 1e-5), ref32, terms, "w")
    assert_weight_grad_matches(ref32, ref32, terms, "w")


# --------------------------------------------------------------------------- torch.compile
def _compiled_call(backend):
    def fn(img_q, img_k, txt_q, txt_k, w_iq, w_ik, w_tq, img_freqs, txt_freqs):
        return joint_qk_norm_rope(img_q, img_k, txt_q, txt_k, img_q_weight=w_iq, img_k_weight=w_ik,
                                  txt_q_weight=w_tq, txt_k_weight=None, img_freqs=img_freqs, txt_freqs=txt_freqs)

    return fn, torch.compile(fn, fullgraph=True, backend=backend)


def _compile_args(inputs):
    return [inputs[n] for n in (*NAMES, "img_q_weight", "img_k_weight", "txt_q_weight", "img_freqs", "txt_freqs")]


def test_compile_fullgraph_traces_with_grad():
    inputs = make_inputs(s_img=9, s_txt=3, heads=2, head_dim=16)
    args = [t.detach().clone().requires_grad_(t.dtype != torch.complex64) for t in _compile_args(inputs)]
    eager, compiled = _compiled_call("aot_eager")
    for got, ref in zip(compiled(*args), eager(*args)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    sum(t.sum() for t in compiled(*args)).backward()
    assert all(a.grad is not None for a in args[:7])


@pytest.mark.slow
def test_compile_inductor_equals_eager():
    inputs = make_inputs(s_img=9, s_txt=3, heads=2, head_dim=16)
    args = _compile_args(inputs)
    eager, compiled = _compiled_call("inductor")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*complex operators.*")  # view_as_real of the tables
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit, inside inductor
        got = compiled(*args)
    for g, r in zip(got, eager(*args)):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)  # inductor may contract into FMAs


# --------------------------------------------------------------------------- validation
def _bad(**changes):
    inputs = make_inputs()
    inputs.update(changes)
    return inputs


C64 = torch.complex64
VALIDATION_CASES = [
    (dict(img_q=torch.randn(37, 3, 64)),
     r"img_q: expected a 4-D tensor \[B, S_img, H, D\], got shape \(37, 3, 64\)"),
    (dict(txt_k=None), r"txt_k: expected a torch.Tensor, got NoneType"),
    (dict(txt_q=torch.randn(2, 13, 3, 64)),
     r"txt_q: expected shape \[B, S, H, D\] = \[1, 13, 3, 64\].*got \[2, 13, 3, 64\]"),
    (dict(img_k=torch.randn(1, 37, 4, 64)), r"img_k: expected shape .* = \[1, 37, 3, 64\].*got \[1, 37, 4, 64\]"),
    (dict(txt_k=torch.randn(1, 12, 3, 64)), r"txt_k: expected shape .* = \[1, 13, 3, 64\].*got \[1, 12, 3, 64\]"),
    (dict(img_q=torch.randn(1, 37, 3, 63)), r"img_q: head dim D must be even for RoPE, got D=63"),
    (dict(img_k=torch.randn(1, 37, 3, 64, dtype=torch.float64)),
     r"img_k: expected dtype float32, float16 or bfloat16, got torch.float64"),
    (dict(img_freqs=torch.ones(36, 32, dtype=C64)), r"img_freqs: expected shape \[S, D/2\] = \[37, 32\], got \[36, 32\]"),
    (dict(txt_freqs=torch.ones(13, 64, dtype=C64)), r"txt_freqs: expected shape \[S, D/2\] = \[13, 32\], got \[13, 64\]"),
    (dict(txt_freqs=torch.ones(13, 32)), r"txt_freqs: expected dtype complex64, got torch.float32"),
    (dict(img_k_weight=torch.ones(32)), r"img_k_weight: expected shape \[D\] = \[64\] or None, got \[32\]"),
    (dict(txt_q_weight=torch.ones(64, dtype=torch.int32)),
     r"txt_q_weight: expected dtype float32, float16 or bfloat16, got torch.int32"),
    (dict(img_freqs=torch.ones(37, 32, dtype=C64, device="meta")),
     r"img_freqs: expected device cpu \(the device of img_q\), got meta"),
]


@pytest.mark.parametrize(
    "changes, message", VALIDATION_CASES, ids=[f"{i}-{m.split(':')[0]}" for i, (_, m) in enumerate(VALIDATION_CASES)]
)
def test_validation_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        ours(_bad(**changes))


@pytest.mark.parametrize(
    "eps, shown",
    [(0.0, "0.0"), (-1e-6, "-1e-06"), (float("nan"), "nan"), (float("inf"), "inf"), ("1e-6", "str '1e-6'"),
     (None, "NoneType None"), (True, "bool True"), (torch.tensor(1e-6), "Tensor")],
    ids=["zero", "negative", "nan", "inf", "str", "none", "bool", "tensor"],
)
def test_eps_must_be_a_positive_finite_number(eps, shown):
    with pytest.raises(ValueError, match=rf"eps: expected a finite real number > 0, got {re.escape(shown)}"):
        ours(make_inputs(), eps=eps)


def test_eps_accepts_python_and_numpy_numbers():
    inputs = make_inputs(s_img=5, s_txt=2)
    expected = ours(inputs, eps=1e-5)
    for eps in (np.float32(1e-5), np.float64(1e-5)):
        for got, ref in zip(ours(inputs, eps=eps), expected):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    ours(inputs, eps=1)  # an int is a real number too


# --------------------------------------------------------------------------- backend switch
def test_backend_names(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    inputs = make_inputs(s_img=5, s_txt=2)
    expected = ours(inputs, backend="torch")
    for got, ref in zip(ours(inputs, backend="auto"), expected):  # CPU tensors: auto is torch
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        ours(inputs, backend="cuda")


def test_forced_triton_that_cannot_run_says_why(monkeypatch):
    inputs = make_inputs(s_img=5, s_txt=2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton': expected CUDA tensors .*, got cpu"):
        ours(inputs, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mixed = dict(inputs, img_q_weight=inputs["img_q_weight"].to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"backend='triton' does not support these inputs: .*dtype"):
        ours(mixed, backend="triton")


def test_backend_env_var(monkeypatch):
    import qwen_image_omni.kernels.triton_ops as triton_ops

    inputs = make_inputs(s_img=5, s_txt=2)
    calls = []
    real = triton_ops.joint_qk_norm_rope_triton
    monkeypatch.setattr(triton_ops, "joint_qk_norm_rope_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    forced = ours(inputs)
    assert calls == [1]
    for got, ref in zip(forced, ours(inputs, backend="torch")):  # an explicit backend wins over the variable
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert calls == [1]
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    ours(inputs)
    monkeypatch.setenv(BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=rf"\${BACKEND_ENV_VAR}: expected one of .*, got 'fast'"):
        ours(inputs)
