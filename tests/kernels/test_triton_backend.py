"""The Triton backend (``joint_qk_norm_rope_triton``) against the reference: outputs and gradients.

Without a GPU the kernels run in the Triton interpreter (conftest sets ``TRITON_INTERPRET=1``) at
about 30 ms per program instance here, so shapes stay small; the ``cuda`` tests repeat the
comparisons at Qwen-Image shapes. Results differ from the reference only where the variance is
summed in another order: a few fp32 ULPs in fp32 (about 84 % of elements bit-exact), and in bf16/fp16
a rare flipped rounding (over 99.99 % bit-exact) that stays within 1 ULP of the (re, im) pair. With
inputs whose variance is exact in any order, every dtype is bit-exact.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from qwen_image_omni.kernels import triton_backend
from qwen_image_omni.kernels.triton_backend import joint_qk_norm_rope_triton, qk_norm_rope_triton, triton_supports

from tests.support.kernel_testing import (
    NAMES,
    WEIGHT_NAMES,
    call,
    check_single_stream,
    check_single_stream_out,
    make_inputs,
    make_stream_inputs,
    per_sample_tables,
    reference,
    ulp_distance,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 size of one unit in the last place of ``dtype`` at the magnitudes ``|x|``."""
    finfo = torch.finfo(dtype)
    _, exponent = torch.frexp(x.float().abs().clamp_min(finfo.smallest_normal))
    return finfo.eps * torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 1)  # |x| in [2^(e-1), 2^e)


def assert_close_to(out, ref, min_exact):
    """fp32: within 1e-6; bf16/fp16: within 1 ULP of the element plus 1 ULP of its (re, im) pair's
    magnitude. Returns the bit-exact fraction (asserted >= min_exact).

    A variance summed in another order can flip the rounding of the normalised input; the rotation
    carries that ULP of the larger pair member into both outputs, which is more than one ULP of a
    small output (seen in fp16 at about 1e-5 of the elements).
    """
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        pair_norm = ref.float().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*ref.shape[:-1], -1, 2)
        bound = ulp(ref, ref.dtype) + ulp(pair_norm.flatten(-2), ref.dtype)
        assert ((out.float() - ref.float()).abs() <= bound).all()
    exact = (out == ref).float().mean().item()
    assert exact >= min_exact, f"only {exact:.6f} of the elements are bit-exact"
    return exact


# fp32 differs from the reference where the variance is summed in another order; halves hide that almost always.
MIN_EXACT = {torch.float32: 0.5, torch.bfloat16: 0.999, torch.float16: 0.999}


def check_forward(inputs, eps=1e-6):
    got = call(joint_qk_norm_rope_triton, inputs, eps=eps)
    batch, s_img, heads, head_dim = inputs["img_q"].shape
    for g, r in zip(got, reference(inputs, eps=eps)):
        assert g.shape == (batch, inputs["txt_q"].shape[1] + s_img, heads, head_dim) and g.is_contiguous()
        assert_close_to(g, r, MIN_EXACT[g.dtype])
    return got


# --------------------------------------------------------------------------- forward
# A pairwise covering of batch {1, 2} x text length {1, 13} x heads {3, 24} x head dim {64, 128};
# 37 image tokens and 13 text tokens are not multiples of the 32-token tile.
SHAPES = [(1, 1, 3, 64), (1, 13, 24, 128), (2, 1, 24, 128), (2, 13, 3, 128), (2, 13, 24, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch, s_txt, heads, head_dim", SHAPES, ids=["-".join(map(str, s)) for s in SHAPES])
def test_forward_matches_the_reference(batch, s_txt, heads, head_dim, dtype):
    check_forward(make_inputs(batch=batch, s_txt=s_txt, heads=heads, head_dim=head_dim, dtype=dtype))


def compare_with_reference(inputs, dtype, label=""):
    """Triton vs the reference: assert closeness, print the bit-exact share and > 1 ULP share."""
    got = call(joint_qk_norm_rope_triton, inputs)
    ref = reference(inputs)
    exact = [assert_close_to(g, r, MIN_EXACT[dtype]) for g, r in zip(got, ref)]
    over_one_ulp = [(ulp_distance(g, r) > 1).float().mean().item() if dtype != torch.float32 else 0.0
                    for g, r in zip(got, ref)]
    print(f"{label}{dtype} vs the reference: bit-exact q {exact[0]:.6f}, k {exact[1]:.6f}; "
          f"> 1 ULP q {over_one_ulp[0]:.2e}, k {over_one_ulp[1]:.2e}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bit_exact_fraction_on_a_realistic_slice(dtype):
    """Qwen-Image heads (24 x 128): report how many elements equal the reference bit for bit."""
    compare_with_reference(make_inputs(batch=1, s_img=224, s_txt=32, heads=24, head_dim=128, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_head_dim_not_a_power_of_two(dtype):
    """D = 48: D/2 = 24 pairs in a 32-pair tile, the rest masked."""
    check_forward(make_inputs(batch=1, s_txt=5, heads=3, head_dim=48, dtype=dtype), eps=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_tiles_in_the_interpreter(dtype, monkeypatch):
    """The GPU launch plan: 8-head blocks of 24 heads, 8-token forward tiles, 4-token backward tiles
    walked 4 per program."""
    monkeypatch.setattr(triton_backend, "plan_tiles", functools.partial(triton_backend.plan_tiles, gpu=True))
    assert triton_backend.plan_tiles(24, 64) == triton_backend.Tiles(block_t=8, block_h=8, bwd_block_t=2,
                                                                     num_warps=4, max_tiles_per_program=16)
    inputs = make_inputs(batch=1, s_img=21, s_txt=3, heads=24, head_dim=64, dtype=dtype, layout="fused")
    check_forward(inputs)
    check_gradients(inputs)


@pytest.mark.parametrize("layout", ["fused", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_inputs(layout, dtype):
    """q/k sliced from a fused [B, S, 3, H, D] projection, or views at an odd offset; strided RoPE tables."""
    inputs = make_inputs(batch=2, dtype=dtype, layout=layout)
    assert not inputs["img_q"].is_contiguous() and not inputs["img_freqs"].is_contiguous()
    for g, r in zip(call(joint_qk_norm_rope_triton, inputs), reference(inputs)):
        assert_close_to(g, r, MIN_EXACT[dtype])


def exact_variance_inputs(**kwargs):
    """Activations in multiples of 1/8 within [-2, 2]: their squares and every partial sum of them are
    exact in fp32, so the variance does not depend on the summation order."""
    inputs = make_inputs(**kwargs)
    for name in NAMES:
        with torch.no_grad():
            inputs[name].copy_((inputs[name].float() * 8).round().clamp(-16, 16) / 8)
    return inputs


@pytest.mark.parametrize("layout", ["unflatten", "fused", "odd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bit_exact_when_the_variance_is_exact(dtype, layout):
    """With the summation order out of the way, every dtype equals the reference bit for bit:
    the rounding chain, the rotation without FMAs and the hand-made rounding are exact."""
    inputs = exact_variance_inputs(batch=2, s_txt=13, heads=24, head_dim=128, dtype=dtype, layout=layout,
                                   none_weights=("txt_k_weight",))
    for g, r in zip(call(joint_qk_norm_rope_triton, inputs), reference(inputs)):
        assert torch.equal(g, r)


@pytest.mark.parametrize(
    "none_weights", [("img_q_weight",), ("img_k_weight", "txt_q_weight"), WEIGHT_NAMES], ids=["img_q", "mixed", "all"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_none_weights_skip_the_norm(none_weights, dtype):
    got = check_forward(make_inputs(dtype=dtype, none_weights=none_weights))
    if none_weights == WEIGHT_NAMES:  # no norm: pure rotation, bit-exact even in fp32
        for g, r in zip(got, reference(make_inputs(dtype=dtype, none_weights=none_weights))):
            assert torch.equal(g, r)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, about inf and NaN
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_finite_values_follow_the_reference(dtype):
    """NaN, inf and squares that overflow fp32 give the reference's results (NaN rows, zeros), normed or not."""
    inputs = exact_variance_inputs(s_img=5, s_txt=3, dtype=dtype, none_weights=("txt_q_weight",))
    big = torch.finfo(dtype).max
    with torch.no_grad():
        for name in NAMES:
            inputs[name][0, 0, 0, 3] = float("nan")
            inputs[name][0, 1, 1, 4] = float("inf")
            inputs[name][0, 2, 2, :] = big  # x * x overflows: variance inf, rstd 0
    for g, r in zip(call(joint_qk_norm_rope_triton, inputs), reference(inputs)):
        torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True)


def test_outputs_are_fresh_and_inference_mode_works():
    inputs = make_inputs(dtype=torch.bfloat16, s_img=5, s_txt=2)
    with torch.inference_mode():
        q, k = call(joint_qk_norm_rope_triton, inputs)
        ref = reference(inputs)
    assert q.is_contiguous() and k.is_contiguous() and q.data_ptr() != k.data_ptr()
    assert torch.equal(q, ref[0]) and torch.equal(k, ref[1])


# --------------------------------------------------------------------------- gradients
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}  # of each tensor's max


def check_gradients(inputs, outputs_used=("q", "k")):
    """Gradients of all activations and weights vs autograd through the reference.

    For half dtypes the reference rounds every intermediate gradient to the half dtype while the
    kernel keeps fp32 until the final store, so both are also measured against fp32 autograd on the
    same (upcast) values. Leaves keep the inputs' strides.
    """
    dtype = inputs["img_q"].dtype
    leaves = {n: t.detach().requires_grad_() for n, t in inputs.items() if t is not None and "freqs" not in n}
    tensors = {n: leaves.get(n, t) for n, t in inputs.items()}
    gen = torch.Generator().manual_seed(1)

    def loss(q, k):
        grad_q, grad_k = (torch.randn(q.shape, generator=gen.manual_seed(i)).to(q.device, q.dtype) for i in (1, 2))
        return sum((o * g).sum() for name, o, g in (("q", q, grad_q), ("k", k, grad_k)) if name in outputs_used)

    grad = functools.partial(torch.autograd.grad, materialize_grads=True)  # zeros for leaves of unused outputs
    expected = grad(loss(*reference(tensors)), list(leaves.values()))
    q, k = call(joint_qk_norm_rope_triton, tensors)
    got = grad(loss(q, k), list(leaves.values()))
    accurate = expected
    if dtype != torch.float32:
        leaves32 = {n: t.detach().float().requires_grad_() for n, t in leaves.items()}
        accurate = grad(loss(*reference({n: leaves32.get(n, t) for n, t in inputs.items()})),
                        list(leaves32.values()))
    tol = GRAD_TOLERANCE[dtype]
    for name, g, e, a in zip(leaves, got, expected, accurate):
        assert g is not None and g.dtype == e.dtype and g.shape == e.shape, name
        scale = a.abs().max().item() + 1e-30
        err, err_ref = (g.float() - a).abs().max().item() / scale, (e.float() - a).abs().max().item() / scale
        assert err <= tol, f"grad of {name}: max error {err:.2e} of its max (reference: {err_ref:.2e})"
        if dtype == torch.float32:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * scale)
        else:
            assert err <= 2 * err_ref + 2 ** -8, f"grad of {name}: error {err:.2e} vs the reference's {err_ref:.2e}"


@pytest.mark.parametrize(
    "none_weights", [(), ("txt_k_weight",), WEIGHT_NAMES], ids=["all-weights", "txt_k-none", "none"]
)
@pytest.mark.parametrize("layout", ["unflatten", "fused"])
def test_gradients_fp32(layout, none_weights):
    check_gradients(make_inputs(batch=2, heads=3, head_dim=64, layout=layout, none_weights=none_weights))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("none_weights", [(), ("img_q_weight",)], ids=["all-weights", "img_q-none"])
def test_gradients_half(dtype, none_weights):
    check_gradients(make_inputs(batch=2, s_txt=1, heads=24, head_dim=64, dtype=dtype, none_weights=none_weights))


def test_gradients_d128_odd_layout():
    check_gradients(make_inputs(batch=1, heads=3, head_dim=128, layout="odd"))


def test_gradient_of_one_output_and_expanded_grads():
    """Only q used (k's gradient is zeros), and ``.sum()`` hands the backward an expanded, stride-0 gradient."""
    check_gradients(make_inputs(s_img=5, s_txt=2, heads=3, head_dim=64), outputs_used=("q",))
    inputs = make_inputs(s_img=5, s_txt=2, heads=3, head_dim=64)
    leaves = [inputs[n].detach().requires_grad_() for n in (*NAMES, *WEIGHT_NAMES)]
    inputs.update(zip((*NAMES, *WEIGHT_NAMES), leaves))
    q, _ = call(joint_qk_norm_rope_triton, inputs)
    got = torch.autograd.grad(q.sum(), leaves, materialize_grads=True)
    q_ref, _ = reference(inputs)
    expected = torch.autograd.grad(q_ref.sum(), leaves, materialize_grads=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_weight_only_requires_grad():
    inputs = make_inputs(s_img=5, s_txt=2)
    inputs["txt_q_weight"].requires_grad_()
    q, k = call(joint_qk_norm_rope_triton, inputs)
    assert q.requires_grad and k.requires_grad  # one op makes both; k's gradient to txt_q_weight is zero
    (grad,) = torch.autograd.grad(q.sum(), inputs["txt_q_weight"])
    (expected,) = torch.autograd.grad(reference(inputs)[0].sum(), inputs["txt_q_weight"])
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- per-sample tables, one stream
def _many_tiles_per_program(monkeypatch):
    """Backward programs walk several token tiles even at test sizes (as long streams do on a GPU)."""
    monkeypatch.setattr(triton_backend, "tiles_per_program",
                        functools.partial(triton_backend.tiles_per_program, sms=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_sample_tables(dtype, monkeypatch):
    """Joint layout, ``[B, S, D/2]`` tables: forward and gradients, GPU tiles walked several per program."""
    monkeypatch.setattr(triton_backend, "plan_tiles", functools.partial(triton_backend.plan_tiles, gpu=True))
    _many_tiles_per_program(monkeypatch)
    inputs = per_sample_tables(make_inputs(batch=2, s_img=21, s_txt=3, heads=8, head_dim=64, dtype=dtype))
    check_forward(inputs)
    check_gradients(inputs)


def _assert_input_grad_close(got, expected):
    """fp32: 1e-5; halves: within GRAD_TOLERANCE of the largest element (the kernel rounds once, at the end)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    scale = expected.abs().max().item() + 1e-30
    tol = GRAD_TOLERANCE[got.dtype]
    assert (got.float() - expected.float()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_single_stream(per_sample, dtype, monkeypatch):
    _many_tiles_per_program(monkeypatch)
    inputs = make_stream_inputs(batch=2, seq=37, dtype=dtype, layout="fused", per_sample=per_sample,
                                none_weights=("k",) * per_sample)
    q, k = check_single_stream(qk_norm_rope_triton, inputs, assert_output=lambda o, e: assert_close_to(
        o, e, MIN_EXACT[dtype]), assert_input_grad=_assert_input_grad_close)
    assert q.is_contiguous() and k.is_contiguous()


@pytest.mark.parametrize("where", ["buffers", "in-place"])
def test_single_stream_out(where):
    check_single_stream_out(qk_norm_rope_triton, where, torch.bfloat16,
                            lambda g, e: assert_close_to(g, e, MIN_EXACT[torch.bfloat16]))


def test_opcheck_single_stream():
    inputs = make_stream_inputs(batch=2, seq=5, heads=2, head_dim=16, per_sample=True, none_weights=("k",))
    args = [inputs[n] for n in ("q", "k", "q_weight", "k_weight", "freqs")]
    args = [t.requires_grad_() if t is not None and t.dtype != torch.complex64 else t for t in args]
    torch.library.opcheck(torch.ops.qwen_image_omni.qk_norm_rope.default, (*args, 1e-6))
    detached = [t.detach() if t is not None else None for t in args]
    out = (torch.empty_like(detached[0]), torch.empty_like(detached[1]))
    torch.library.opcheck(torch.ops.qwen_image_omni.qk_norm_rope_out.default, (*detached, 1e-6, *out))


def test_compile_per_sample_tables_without_recompiles():
    """``torch.compile(fullgraph=True)`` over both ops with per-sample tables: equal to eager, and new
    values (same shapes) never recompile."""
    def fn(q, k, wq, freqs, img_q, img_k, txt_q, txt_k, img_freqs, txt_freqs):
        single = qk_norm_rope_triton(q, k, q_weight=wq, k_weight=None, freqs=freqs)
        joint = joint_qk_norm_rope_triton(img_q, img_k, txt_q, txt_k, img_q_weight=wq, img_k_weight=None,
                                          txt_q_weight=None, txt_k_weight=wq, img_freqs=img_freqs,
                                          txt_freqs=txt_freqs)
        return sum((o.float() ** 2).sum() for o in (*single, *joint))

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for seed in range(2):
        stream = make_stream_inputs(batch=2, seq=6, heads=2, head_dim=16, per_sample=True, seed=seed)
        joint = per_sample_tables(make_inputs(batch=2, s_img=5, s_txt=3, heads=2, head_dim=16, seed=seed))
        args = [stream["q"], stream["k"], stream["q_weight"], stream["freqs"], *(joint[n] for n in NAMES),
                joint["img_freqs"], joint["txt_freqs"]]
        args = [a.detach().requires_grad_(a.dtype != torch.complex64) for a in args]
        with torch.compiler.set_stance("fail_on_recompile") if seed else contextlib.nullcontext():
            got = compiled(*args)
            grads = torch.autograd.grad(got, [a for a in args if a.requires_grad])
        expected = fn(*args)
        assert torch.equal(got, expected)
        for g, e in zip(grads, torch.autograd.grad(expected, [a for a in args if a.requires_grad])):
            assert torch.equal(g, e)


# --------------------------------------------------------------------------- registration and compile
def _op_args(inputs, eps=1e-6):
    weights = (inputs[w] for w in WEIGHT_NAMES)
    return (*(inputs[n] for n in NAMES), *weights, inputs["img_freqs"], inputs["txt_freqs"], eps)


def test_opcheck_forward():
    """Schema, fake tensor and autograd registration checks of the custom op."""
    inputs = make_inputs(s_img=5, s_txt=2, heads=2, head_dim=16, none_weights=("txt_k_weight",))
    inputs = {n: t.requires_grad_() if t is not None and n in (*NAMES, *WEIGHT_NAMES) else t for n, t in inputs.items()}
    torch.library.opcheck(torch.ops.qwen_image_omni.joint_qk_norm_rope.default, _op_args(inputs))


def _compiled_pair():
    def fn(img_q, img_k, txt_q, txt_k, w_iq, w_ik, w_tq, img_freqs, txt_freqs):
        q, k = joint_qk_norm_rope_triton(img_q, img_k, txt_q, txt_k, img_q_weight=w_iq, img_k_weight=w_ik,
                                         txt_q_weight=w_tq, txt_k_weight=None, img_freqs=img_freqs, txt_freqs=txt_freqs)
        return q * 2, k + 1  # neighbours to trace around the op

    return fn, torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_compile_fullgraph_equals_eager_forward_and_backward():
    inputs = make_inputs(s_img=9, s_txt=3, heads=2, head_dim=16, layout="fused")
    names = (*NAMES, "img_q_weight", "img_k_weight", "txt_q_weight", "img_freqs", "txt_freqs")
    args = [inputs[n].detach().requires_grad_(inputs[n].dtype != torch.complex64) for n in names]
    eager, compiled = _compiled_pair()
    got, ref = compiled(*args), eager(*args)
    for g, r in zip(got, ref):
        assert torch.equal(g, r)
    grads_got = torch.autograd.grad(sum((o * o).sum() for o in got), args[:7])
    grads_ref = torch.autograd.grad(sum((o * o).sum() for o in ref), args[:7])
    for g, r in zip(grads_got, grads_ref):
        assert torch.equal(g, r)


# --------------------------------------------------------------------------- triton_supports
def _supports(inputs):
    return triton_supports({n: inputs[n] for n in NAMES}, {w: inputs[w] for w in WEIGHT_NAMES})


def test_triton_supports_reasons():
    inputs = make_inputs(s_img=5, s_txt=2, dtype=torch.bfloat16, layout="fused", none_weights=("img_k_weight",))
    assert _supports(inputs) is None
    assert _supports(make_inputs(s_img=5, s_txt=2, dtype=torch.float16, layout="odd", head_dim=48)) is None

    mixed = dict(inputs, txt_k=inputs["txt_k"].float())
    assert _supports(mixed) == (
        "mixed activation dtypes: img_q torch.bfloat16, img_k torch.bfloat16, txt_q torch.bfloat16, txt_k torch.float32"
    )
    fp32_weight = dict(inputs, txt_q_weight=inputs["txt_q_weight"].float())
    assert _supports(fp32_weight) == "txt_q_weight dtype torch.float32 differs from the activations' torch.bfloat16"
    strided = dict(inputs, img_k=torch.randn(1, 5, 3, 128, dtype=torch.bfloat16)[..., ::2])
    assert _supports(strided) == "img_k has last-dim stride 2 (needs 1)"
    strided_weight = dict(inputs, img_q_weight=torch.ones(128, dtype=torch.bfloat16)[::2])
    assert _supports(strided_weight) == "img_q_weight has stride 2 (needs 1)"
    float64 = {n: t.double() if n in NAMES else None for n, t in inputs.items()}
    assert _supports(float64) == "activation dtype torch.float64 (needs float32, float16 or bfloat16)"
    meta = {n: t.to("meta") if n in NAMES else None for n, t in inputs.items()}
    assert _supports(meta).startswith("device meta (needs CUDA")


# --------------------------------------------------------------------------- GPU, Qwen-Image shapes
def _qwen_image_inputs(dtype):
    """One Qwen-Image block at 1024 x 1024: 4096 image + 512 text tokens, 24 heads x 128, on the GPU."""
    inputs = make_inputs(batch=1, s_img=4096, s_txt=512, heads=24, head_dim=128, dtype=dtype)
    return {n: t.cuda() if t is not None else None for n, t in inputs.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_forward_at_qwen_image_shapes(dtype):
    inputs = _qwen_image_inputs(dtype)
    assert _supports(inputs) is None
    compare_with_reference(inputs, dtype, label="cuda ")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_gradients_at_qwen_image_shapes(dtype):
    check_gradients(_qwen_image_inputs(dtype))


@pytest.mark.cuda
def test_cuda_compile_inductor_equals_eager():
    inputs = _qwen_image_inputs(torch.bfloat16)
    names = (*NAMES, "img_q_weight", "img_k_weight", "txt_q_weight", "img_freqs", "txt_freqs")
    args = [inputs[n] for n in names]
    eager, _ = _compiled_pair()
    compiled = torch.compile(eager, fullgraph=True)
    for g, r in zip(compiled(*args), eager(*args)):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_per_sample_and_single_stream_at_qwen_image_shapes(dtype):
    """Qwen-Image 2.1's single stream (4096 + 512 tokens, per-sample table) and the joint op with
    per-sample tables, B=2, forward and gradients, on the GPU."""
    joint = per_sample_tables(make_inputs(batch=2, s_img=4096, s_txt=512, heads=24, head_dim=128, dtype=dtype))
    joint = {n: t.cuda() if t is not None else None for n, t in joint.items()}
    check_forward(joint)
    check_gradients(joint)
    stream = make_stream_inputs(batch=2, seq=4608, heads=24, head_dim=128, dtype=dtype, per_sample=True)
    stream = {n: t.cuda() if t is not None else None for n, t in stream.items()}
    check_single_stream(qk_norm_rope_triton, stream, assert_output=lambda o, e: assert_close_to(o, e, MIN_EXACT[dtype]),
                        assert_input_grad=_assert_input_grad_close)
