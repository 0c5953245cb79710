"""What the kernel tests share: inputs laid out as the attention processors have them (joint and
single-stream, shared or per-sample RoPE tables), calls with such inputs (the reference's among them:
the backends' oracle), and comparisons."""

from __future__ import annotations

import torch

from qwen_image_omni.kernels import joint_qk_norm_rope_reference, qk_norm_rope_reference

EPS = 1e-6
NAMES = ("img_q", "img_k", "txt_q", "txt_k")
WEIGHT_NAMES = tuple(f"{n}_weight" for n in NAMES)


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
    """Activations laid out as in the attention processor, weights, and RoPE tables, by argument name.

    layout: "unflatten" ([B, S, H*D] linear output viewed as heads), "fused" (q and k sliced out of
    one [B, S, 3, H, D] projection), or "odd" (views at an odd element offset, not viewable as complex).
    The tables are contiguous for "unflatten", else row slices of a longer table with strided columns.
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
    else:
        img_freqs = _freqs(s_img + 3, 2 * head_dim, gen)[2 : 2 + s_img, ::2]
        txt_freqs = _freqs(s_txt + 1, 2 * head_dim, gen)[1:, 1::2]
    return dict(img_q=img_q, img_k=img_k, txt_q=txt_q, txt_k=txt_k, **weights, img_freqs=img_freqs, txt_freqs=txt_freqs)


def per_sample_tables(inputs, seed=7):
    """``inputs`` with every RoPE table replaced by a per-sample ``[B, S, D/2]`` one (each sample its own angles).

    The tables are views with a stride along the batch that is not the row count (slices of a longer table),
    so the backends must honour the given strides."""
    gen = torch.Generator().manual_seed(seed)
    first = next(v for n, v in inputs.items() if not n.endswith(("freqs", "weight")))
    batch = first.shape[0]
    out = dict(inputs)
    for name in [n for n in inputs if n.endswith("freqs")]:
        seq, half = inputs[name].shape[-2:]
        out[name] = _freqs(batch * (seq + 2), 2 * half, gen).unflatten(0, (batch, seq + 2))[:, 1 : seq + 1]
    return out


SINGLE_NAMES = ("q", "k")


def make_stream_inputs(batch=2, seq=29, heads=3, head_dim=64, dtype=torch.float32, weight_dtype=None,
                       none_weights=(), layout="unflatten", per_sample=False, seed=0):
    """Single-stream inputs by argument name: ``q``, ``k``, ``q_weight``, ``k_weight``, ``freqs``
    (``per_sample``: a ``[B, S, D/2]`` table); layouts as :func:`make_inputs`."""
    joint = make_inputs(batch=batch, s_img=seq, s_txt=1, heads=heads, head_dim=head_dim, dtype=dtype,
                        weight_dtype=weight_dtype, layout=layout, seed=seed,
                        none_weights=tuple(f"img_{n}" for n in none_weights))
    inputs = dict(q=joint["img_q"], k=joint["img_k"], q_weight=joint["img_q_weight"], k_weight=joint["img_k_weight"],
                  freqs=joint["img_freqs"])
    return per_sample_tables(inputs, seed=seed + 7) if per_sample else inputs


def call_single(fn, inputs, **kwargs):
    """``fn(q, k, q_weight=..., k_weight=..., freqs=..., **kwargs)`` from ``inputs``."""
    inputs = dict(inputs)
    return fn(inputs.pop("q"), inputs.pop("k"), **inputs, **kwargs)


def single_reference(inputs, eps=EPS):
    """The single-stream oracle: ``qk_norm_rope_reference`` of a ``make_stream_inputs`` dict."""
    return call_single(qk_norm_rope_reference, inputs, eps=eps)


def call(fn, inputs, **kwargs):
    """``fn(img_q, img_k, txt_q, txt_k, **weights, img_freqs=..., txt_freqs=..., **kwargs)`` from ``inputs``."""
    inputs = dict(inputs)
    activations = [inputs.pop(n) for n in NAMES]
    return fn(*activations, **inputs, **kwargs)


def reference(inputs, eps=EPS):
    """The oracle: ``joint_qk_norm_rope_reference`` of a ``make_inputs`` dict."""
    return call(joint_qk_norm_rope_reference, inputs, eps=eps)


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


def with_leaves(inputs, names):
    """``inputs`` with the (non-None) tensors named in ``names`` replaced by copies that require grad."""
    leaves = {n: inputs[n].detach().clone().requires_grad_() for n in names if inputs[n] is not None}
    return {**inputs, **leaves}, leaves


def strided_leaves(inputs, names):
    """Leaves for the storages the named tensors view (as a model's linear outputs), and the tensors
    as views of those leaves with their own strides and offsets.

    Returns ``(leaves, inputs)``: the leaves keyed by the names that view them (joined by "+"), and
    ``inputs`` with those names replaced by the views.
    """
    groups = {}
    for name in names:
        t = inputs[name]
        base = t if t._base is None else t._base
        groups.setdefault(id(base), (base, []))[1].append(name)
    leaves, views = {}, {}
    for base, group in groups.values():
        leaf = base.detach().clone().requires_grad_()
        leaves["+".join(group)] = leaf
        for name in group:
            t = inputs[name]
            views[name] = leaf.as_strided(t.shape, t.stride(), t.storage_offset())
    return leaves, {**inputs, **views}


def joint_grads(outputs, seed=1):
    """Random gradients for the joint outputs, in their dtypes."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs)


def forward_backward(fn, inputs, leaves, grads):
    """``fn(inputs)`` and the gradient of ``sum(outputs * grads)`` for every leaf (None if unused)."""
    outputs = fn(inputs)
    return outputs, torch.autograd.grad(outputs, list(leaves.values()), grads, allow_unused=True)


def assert_weight_grad_close(got, expected, name):
    """A weight gradient, a sum over B*S*H terms taken in another order: within a few roundings of its
    dtype, relative to its largest element."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, name
    tol = 1e-5 if got.dtype == torch.float32 else 2**-6
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item(),
                               msg=name)


def check_single_stream_out(fn, where, dtype, assert_output):
    """``fn(..., out=...)`` writes the reference's numbers into given buffers (``where="buffers"``) or into
    q and k themselves (``"in-place"``) and returns those very tensors; ``assert_output(got, expected)``."""
    inputs = make_stream_inputs(dtype=dtype, per_sample=True)
    expected = single_reference(inputs)
    q, k = inputs["q"].clone(), inputs["k"].clone()
    out = (torch.empty_like(q), torch.empty_like(k)) if where == "buffers" else (q, k)
    got = call_single(fn, {**inputs, "q": q, "k": k}, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    for g, e in zip(out, expected):
        assert_output(g, e)


def check_single_stream(fn, inputs, *, assert_output=assert_matches, assert_input_grad=None,
                        requires=("q", "k", "q_weight", "k_weight")):
    """``fn`` (a single-stream implementation) against ``single_reference``: outputs and the gradients of
    the tensors named in ``requires`` (leaves are contiguous copies; the inputs' own strides are checked
    without autograd). ``assert_output(got, expected)`` compares outputs, ``assert_input_grad`` q and k's
    gradients (default: as outputs, at least 99.9 % bit-exact). Returns ``fn``'s outputs."""
    assert_input_grad = assert_input_grad or (lambda g, e: assert_matches(g, e, min_exact=0.999))
    with torch.no_grad():
        for o, e in zip(call_single(fn, inputs), single_reference(inputs)):
            assert_output(o, e)
    grad_inputs, leaves = with_leaves(inputs, requires)
    grads = joint_grads(single_reference(inputs))
    expected_out, expected = forward_backward(single_reference, grad_inputs, leaves, grads)
    out, got = forward_backward(lambda i: call_single(fn, i), grad_inputs, leaves, grads)
    for o, e in zip(out, expected_out):
        assert_output(o, e)
    for name, g, e in zip(leaves, got, expected):
        if name.endswith("weight"):
            assert_weight_grad_close(g, e, name)
        else:
            assert_input_grad(g, e)
    return out
