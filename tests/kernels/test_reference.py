"""The references against diffusers' own modules: where the backends' oracle meets diffusers.

Outputs and the gradients of the activations and weights are bit-exact; the RoPE tables' gradients
are sums over batch and heads that the two take in different orders. Per-sample tables equal
diffusers run sample by sample, each with its own table; the single-stream reference equals
diffusers' ``RMSNorm`` + ``apply_rotary_emb_qwen`` (Qwen-Image 2.1's q/k sequence).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from tests.support.kernel_testing import (
    EPS,
    NAMES,
    WEIGHT_NAMES,
    SINGLE_NAMES,
    forward_backward,
    joint_grads,
    make_inputs,
    make_stream_inputs,
    per_sample_tables,
    reference,
    single_reference,
    strided_leaves,
    with_leaves,
)


def diffusers_sequence(inputs, eps=EPS):
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


DTYPES = {  # activation dtype, weight dtype
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "bf16-x_fp32-w": (torch.bfloat16, torch.float32),  # fp32 weights promote the result to fp32
    "fp32-x_bf16-w": (torch.float32, torch.bfloat16),  # x * rstd rounded to bf16 before the weight
    "fp16-x_bf16-w": (torch.float16, torch.bfloat16),  # fp16 parts without a weight, bf16 with: cat gives fp32
}
SHAPES = [(2, 37, 13, 3, 64), (1, 20, 1, 2, 96), (2, 9, 6, 24, 128)]  # batch, s_img, s_txt, heads, head_dim


@pytest.mark.parametrize("shape", SHAPES, ids=["-".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize(
    "none_weights", [(), ("img_k_weight", "txt_q_weight"), WEIGHT_NAMES], ids=["norm", "some-none", "no-norm"]
)
@pytest.mark.parametrize("layout", ["unflatten", "fused", "odd"])
@pytest.mark.parametrize("dtypes", list(DTYPES), ids=list(DTYPES))
def test_matches_diffusers_with_gradients(dtypes, layout, none_weights, shape):
    batch, s_img, s_txt, heads, head_dim = shape
    dtype, weight_dtype = DTYPES[dtypes]
    inputs = make_inputs(batch=batch, s_img=s_img, s_txt=s_txt, heads=heads, head_dim=head_dim, dtype=dtype,
                         weight_dtype=weight_dtype, none_weights=none_weights, layout=layout)
    leaves, views = strided_leaves(inputs, (*NAMES, "img_freqs", "txt_freqs"))
    views, weight_leaves = with_leaves(views, WEIGHT_NAMES)
    leaves.update(weight_leaves)
    grads = joint_grads(reference(inputs))
    got_out, got = forward_backward(reference, views, leaves, grads)
    # diffusers gets contiguous copies (same values): its view_as_complex rejects views at odd offsets,
    # and column-strided tables send its complex multiply down PyTorch's scalar loop, whose roundings
    # may differ in the last bit (FMA) from the vectorized loop's, the ones the reference keeps.
    as_given = {n: t.contiguous() if n in NAMES or "freqs" in n else t for n, t in views.items()}
    expected_out, expected = forward_backward(diffusers_sequence, as_given, leaves, grads)
    for g, e in zip(got_out, expected_out):
        assert g.dtype == e.dtype and torch.equal(g, e)
    for name, g, e in zip(leaves, got, expected):
        if "freqs" in name:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), msg=name)
        else:
            assert g.dtype == e.dtype and torch.equal(g, e), f"grad of {name} not bit-exact"


def _sample(inputs, b):
    """Sample ``b`` of a batch as a batch of one with a shared table (what diffusers takes)."""
    return {n: None if t is None else t if n.endswith("weight") else t[b] if n.endswith("freqs") else t[b : b + 1]
            for n, t in inputs.items()}


def _per_sample_leaves(inputs, names):
    """Leaves for the named tensors (contiguous copies), and ``inputs`` using them."""
    leaves = {n: inputs[n].detach().contiguous().requires_grad_() for n in names if inputs[n] is not None}
    return leaves, {**inputs, **leaves}


@pytest.mark.parametrize("dtypes", ["fp32", "bf16", "fp32-x_bf16-w"])
@pytest.mark.parametrize("none_weights", [(), ("img_k_weight",)], ids=["norm", "img_k-none"])
def test_per_sample_tables_match_diffusers_sample_by_sample(dtypes, none_weights):
    dtype, weight_dtype = DTYPES[dtypes]
    inputs = per_sample_tables(make_inputs(batch=3, s_img=11, s_txt=5, heads=2, head_dim=32, dtype=dtype,
                                           weight_dtype=weight_dtype, none_weights=none_weights))
    leaves, inputs = _per_sample_leaves(inputs, (*NAMES, *WEIGHT_NAMES))
    grads = joint_grads(reference(inputs))
    got_out, got = forward_backward(reference, inputs, leaves, grads)
    samples = [diffusers_sequence(_sample(inputs, b)) for b in range(3)]
    expected_out = [torch.cat([s[i] for s in samples]) for i in (0, 1)]
    expected = torch.autograd.grad(expected_out, list(leaves.values()), grads, allow_unused=True)
    for g, e in zip(got_out, expected_out):
        assert g.dtype == e.dtype and torch.equal(g, e)
    for name, g, e in zip(leaves, got, expected):
        if "weight" in name:  # summed over the batch: per sample then added here, in one sum there
            _assert_weight_grad_close(g, e, name)
        else:
            assert g.dtype == e.dtype and torch.equal(g, e), f"grad of {name} not bit-exact"


def _assert_weight_grad_close(g, e, name):
    """A weight gradient summed in another order: within a few roundings of its dtype, relative to its max."""
    tol = 1e-5 if g.dtype == torch.float32 else 2**-6
    torch.testing.assert_close(g.float(), e.float(), rtol=tol, atol=tol * e.abs().max().item(), msg=name)


def diffusers_single(inputs, eps=EPS):
    """Qwen-Image 2.1's q/k sequence with diffusers' modules: RMSNorm, then ``apply_rotary_emb_qwen``."""
    out = []
    for name in SINGLE_NAMES:
        x, weight = inputs[name], inputs[f"{name}_weight"]
        if weight is not None:
            x = torch.func.functional_call(RMSNorm(x.shape[-1], eps=eps), {"weight": weight}, (x,))
        out.append(apply_rotary_emb_qwen(x, inputs["freqs"], use_real=False))
    return tuple(out)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtypes", ["fp32", "bf16", "bf16-x_fp32-w"])
@pytest.mark.parametrize("none_weights", [(), ("k",)], ids=["norm", "k-none"])
def test_single_stream_matches_diffusers(per_sample, dtypes, none_weights):
    dtype, weight_dtype = DTYPES[dtypes]
    inputs = make_stream_inputs(batch=2, seq=13, heads=3, head_dim=64, dtype=dtype, weight_dtype=weight_dtype,
                                none_weights=none_weights, per_sample=per_sample)
    leaves, inputs = _per_sample_leaves(inputs, ("q", "k", "q_weight", "k_weight"))
    grads = joint_grads(single_reference(inputs))
    got_out, got = forward_backward(single_reference, inputs, leaves, grads)
    if per_sample:
        samples = [diffusers_single({**_sample(inputs, b)}) for b in range(2)]
        expected_out = [torch.cat([s[i] for s in samples]) for i in (0, 1)]
    else:
        expected_out = list(diffusers_single(inputs))
    expected = torch.autograd.grad(expected_out, list(leaves.values()), grads, allow_unused=True)
    for g, e in zip(got_out, expected_out):
        assert g.dtype == e.dtype and torch.equal(g, e)
    for name, g, e in zip(leaves, got, expected):
        if "weight" in name and per_sample:
            _assert_weight_grad_close(g, e, name)
        else:
            assert g.dtype == e.dtype and torch.equal(g, e), f"grad of {name} not bit-exact"
