"""``joint_qk_norm_rope`` (torch backend) against diffusers' own q/k norm + RoPE + cat sequence."""

from __future__ import annotations

import warnings

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
@pytest.mark.parametrize("none_weights", [(), ("txt_k_weight",)], ids=["all-weights", "txt_k-none"])
@pytest.mark.parametrize("layout", ["unflatten", "fused"])
def test_gradients_match_autograd_through_diffusers(none_weights, layout):
    inputs = make_inputs(batch=2, heads=3, head_dim=64, layout=layout, none_weights=none_weights)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None and "freqs" not in n}

    def with_leaves():
        return {n: leaves.get(n, t) for n, t in inputs.items()}

    gen = torch.Generator().manual_seed(1)
    q_ref, k_ref = diffusers_reference(with_leaves())
    grad_q, grad_k = torch.randn(q_ref.shape, generator=gen), torch.randn(k_ref.shape, generator=gen)
    expected = torch.autograd.grad((q_ref * grad_q).sum() + (k_ref * grad_k).sum(), list(leaves.values()))

    q, k = ours(with_leaves())
    assert q.requires_grad and k.requires_grad
    torch.testing.assert_close(q, q_ref, rtol=1e-6, atol=1e-6)
    got = torch.autograd.grad((q * grad_q).sum() + (k * grad_k).sum(), list(leaves.values()))
    for name, g, e in zip(leaves, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_weight_only_requires_grad_uses_autograd():
    inputs = make_inputs()
    inputs["txt_q_weight"].requires_grad_()
    q, k = ours(inputs)
    assert q.requires_grad and not k.requires_grad
    (grad,) = torch.autograd.grad(q.sum(), inputs["txt_q_weight"])
    assert grad.shape == (64,) and grad.abs().sum() > 0


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
