"""The eager torch backend (``joint_qk_norm_rope_torch``) against the reference: outputs and gradients.

Its chunked no-grad path and its ``autograd.Function`` must give the reference's numbers; the
functional path, taken under ``torch.compile``, ``torch.func`` and for tables that need a gradient,
is the reference itself.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from qwen_image_omni.kernels import torch_backend
from qwen_image_omni.kernels.torch_backend import joint_qk_norm_rope_torch, qk_norm_rope_torch

from tests.support.kernel_testing import (
    NAMES,
    WEIGHT_NAMES,
    assert_matches,
    call,
    check_single_stream,
    check_single_stream_out,
    forward_backward,
    joint_grads,
    make_inputs,
    make_stream_inputs,
    per_sample_tables,
    reference,
    strided_leaves,
    with_leaves,
)


def ours(inputs, **kwargs):
    return call(joint_qk_norm_rope_torch, inputs, **kwargs)


def fast_paths(inputs, monkeypatch):
    """The no-grad path's outputs with one chunk per tensor and with uneven 5-token chunks."""
    with torch.no_grad():
        one_chunk = ours(inputs)
        with monkeypatch.context() as m:
            m.setattr(torch_backend, "chunk_rows", lambda x, seq: 5)
            many_chunks = ours(inputs)
    return (*one_chunk, *many_chunks)


# --------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [3, 24])
@pytest.mark.parametrize("s_txt", [1, 13])
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_the_reference(batch, s_txt, heads, head_dim, dtype, monkeypatch):
    inputs = make_inputs(batch=batch, s_txt=s_txt, heads=heads, head_dim=head_dim, dtype=dtype)
    expected = reference(inputs)
    for got, ref in zip(fast_paths(inputs, monkeypatch), expected * 2):
        assert got.shape == (batch, s_txt + 37, heads, head_dim)
        assert_matches(got, ref, min_exact=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bit_exact_on_a_realistic_slice(dtype):
    """Qwen-Image-like heads (24 x 128) and layout: the fast path equals the reference bit for bit."""
    inputs = make_inputs(batch=1, s_img=256, s_txt=32, heads=24, head_dim=128, dtype=dtype)
    expected = reference(inputs)
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
    expected = reference(inputs)
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
def test_mixed_dtypes_follow_the_reference(dtype, weight_dtype, none_weights, monkeypatch):
    inputs = make_inputs(dtype=dtype, weight_dtype=weight_dtype, none_weights=none_weights)
    expected = reference(inputs)
    for g, r in zip(fast_paths(inputs, monkeypatch), expected * 2):
        assert_matches(g, r, min_exact=1.0)


@pytest.mark.parametrize("layout", ["fused", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("none_weights", [(), ("img_q_weight", "txt_q_weight")], ids=["norm", "no-norm-q"])
def test_strided_inputs(layout, dtype, none_weights, monkeypatch):
    inputs = make_inputs(batch=2, dtype=dtype, layout=layout, none_weights=none_weights)
    assert not inputs["img_q"].is_contiguous() and not inputs["img_freqs"].is_contiguous()
    expected = reference(inputs)
    for g, r in zip(fast_paths(inputs, monkeypatch), expected * 2):
        assert_matches(g, r, min_exact=1.0)


def test_inference_mode_and_outputs_are_fresh():
    inputs = make_inputs(dtype=torch.bfloat16)
    expected = reference(inputs)
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
FUNCTION_NODE = "NormRopeFunctionBackward"


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Per element, the spacing of ``t``'s dtype at ``|t|`` (fp64; the subnormal spacing below the normals)."""
    _, exponent = torch.frexp(t.double())
    exponent = exponent.clamp_min(MIN_NORMAL_EXPONENT[t.dtype]) - PRECISION_BITS[t.dtype]
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), exponent)


def weight_grad_terms(inputs, grads):
    """Per weight, the ``[B, S, H, D]`` products autograd sums into its gradient.

    Runs the reference with every weight expanded to its activation's full shape: the
    gradient of such a weight is the product itself, rounded as in the real backward, unreduced.
    """
    full = {
        w: inputs[w].detach().expand(inputs[w[:5]].shape).clone().requires_grad_()
        for w in WEIGHT_NAMES
        if inputs[w] is not None
    }
    if not full:
        return {}
    outputs = reference({**inputs, **full})
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
    """Outputs and all gradients of ours (one chunk and 5-token chunks) against autograd through the reference."""
    grad_inputs, leaves = with_leaves(inputs, requires)
    grads = joint_grads(reference(inputs))
    expected_out, expected = forward_backward(reference, grad_inputs, leaves, grads)
    terms = weight_grad_terms(inputs, grads)
    for rows in (None, 5):
        with monkeypatch.context() as m:
            if rows:
                m.setattr(torch_backend, "chunk_rows", lambda x, seq, rows=rows: rows)
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
def test_gradients_match_the_reference(
    batch, s_img, s_txt, heads, head_dim, dtype, none_weights, requires, monkeypatch
):
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


@pytest.mark.parametrize("layout", ["unflatten", "fused", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradients_strided_inputs(layout, dtype):
    """Views of linear outputs ([B, S, H*D] unflattened, slices of a fused qkv, odd offsets) and strided tables."""
    inputs = make_inputs(batch=2, dtype=dtype, layout=layout)
    leaves, views = strided_leaves(inputs, NAMES)
    views, weight_leaves = with_leaves(views, WEIGHT_NAMES)
    leaves.update(weight_leaves)
    grads = joint_grads(reference(inputs))
    expected_out, expected = forward_backward(reference, views, leaves, grads)
    out, got = forward_backward(ours, views, leaves, grads)
    assert type(out[0].grad_fn).__name__ == FUNCTION_NODE
    for o, e in zip(out, expected_out):
        assert_matches(o, e, min_exact=1.0)
    assert_grads_match(list(leaves), got, expected, weight_grad_terms(inputs, grads))


def test_gradients_realistic_slice(monkeypatch):
    """Qwen-Image-like heads (24 x 128): the default chunking spans several chunks per image stream."""
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(batch=1, s_img=256, s_txt=32, heads=24, head_dim=128, dtype=dtype)
        with monkeypatch.context() as m:
            m.setattr(torch_backend, "CPU_CHUNK_ELEMENTS_PER_THREAD", 1 << 16)  # 21 tokens per intra-op thread
            grad_inputs, leaves = with_leaves(inputs, REQUIRES_GRAD["all"])
            grads = joint_grads(reference(inputs))
            _, expected = forward_backward(reference, grad_inputs, leaves, grads)
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
    q_ref, k_ref = reference(inputs)
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
    expected = torch.autograd.grad(loss(reference(grad_inputs)), list(leaves.values()), allow_unused=True)
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
    grads = joint_grads(reference(inputs))
    _, expected = forward_backward(reference, grad_inputs, leaves, grads)
    out, got = forward_backward(ours, grad_inputs, leaves, grads)
    assert type(out[0].grad_fn).__name__ != FUNCTION_NODE
    for name, g, e in zip(leaves, got, expected):
        assert torch.equal(g, e), f"grad of {name}"


def test_torch_func_grad_takes_the_functional_path():
    inputs = make_inputs()
    grads = joint_grads(reference(inputs))

    def loss(img_q, fn):
        q, k = fn({**inputs, "img_q": img_q})
        return (q * grads[0]).sum() + (k * grads[1]).sum()

    got = torch.func.grad(loss)(inputs["img_q"], ours)
    expected = torch.func.grad(loss)(inputs["img_q"], reference)
    assert torch.equal(got, expected)


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
@pytest.mark.slow
def test_compile_inductor_equals_eager():
    """Under ``torch.compile`` the backend runs the reference, which inductor fuses (and may contract into FMAs)."""
    inputs = make_inputs(s_img=9, s_txt=3, heads=2, head_dim=16, none_weights=("txt_k_weight",))
    compiled = torch.compile(ours, fullgraph=True, backend="inductor")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*complex operators.*")  # view_as_real of the tables
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit, inside inductor
        got = compiled(inputs)
    with torch.no_grad():
        expected = ours(inputs)
    for g, r in zip(got, expected):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- per-sample tables, one stream
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("none_weights", [(), ("txt_k_weight",)], ids=["all-weights", "txt_k-none"])
def test_per_sample_tables(dtype, none_weights, monkeypatch):
    """Joint layout with a ``[B, S, D/2]`` table per stream: outputs and gradients, one chunk and 5-token chunks."""
    inputs = per_sample_tables(make_inputs(batch=3, s_img=19, s_txt=7, dtype=dtype, none_weights=none_weights))
    for got, ref in zip(fast_paths(inputs, monkeypatch), reference(inputs) * 2):
        assert_matches(got, ref, min_exact=1.0)
    check_gradients(inputs, REQUIRES_GRAD["all"], monkeypatch)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["unflatten", "fused", "odd"])
def test_single_stream(per_sample, dtype, layout, monkeypatch):
    inputs = make_stream_inputs(dtype=dtype, layout=layout, per_sample=per_sample, none_weights=("k",) * per_sample)
    for rows in (None, 5):
        with monkeypatch.context() as m:
            if rows:
                m.setattr(torch_backend, "chunk_rows", lambda x, seq, rows=rows: rows)
            out = check_single_stream(qk_norm_rope_torch, inputs)
        assert all(type(o.grad_fn).__name__ == FUNCTION_NODE for o in out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("where", ["buffers", "in-place"])
def test_single_stream_out(dtype, where):
    """``out=``: written into given buffers, or into q and k themselves; the same numbers as fresh outputs."""
    check_single_stream_out(qk_norm_rope_torch, where, dtype, lambda g, e: assert_matches(g, e, min_exact=1.0))
