"""The public op ``joint_qk_norm_rope``: argument checks, backend choice, and tracing by ``torch.compile``.

What the backends compute is tested in ``test_torch_backend.py`` and ``test_triton_backend.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from qwen_image_omni.kernels import BACKEND_ENV_VAR, joint_qk_norm_rope, qk_norm_rope

from tests.support.kernel_testing import NAMES, call, call_single, make_inputs, make_stream_inputs, single_reference


def ours(inputs, **kwargs):
    return call(joint_qk_norm_rope, inputs, **kwargs)


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
    (dict(img_freqs=torch.ones(36, 32, dtype=C64)), r"img_freqs: expected shape \[S, D/2\] = \[37, 32\] \(shared by the batch\) or \[B, S, D/2\] = \[1, 37, 32\] "
     r"\(one table per sample\), got \[36, 32\]"),
    (dict(img_freqs=torch.ones(2, 37, 32, dtype=C64)), r"img_freqs: expected shape .* got \[2, 37, 32\]"),
    (dict(txt_freqs=torch.ones(13, 64, dtype=C64)), r"txt_freqs: expected shape \[S, D/2\] = \[13, 32\] .* got \[13, 64\]"),
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


SINGLE_VALIDATION_CASES = [
    (dict(q=torch.randn(2, 29, 3)), r"q: expected a 4-D tensor \[B, S, H, D\], got shape \(2, 29, 3\)"),
    (dict(k=torch.randn(2, 28, 3, 64)), r"k: expected shape \[B, S, H, D\] = \[2, 29, 3, 64\].*got \[2, 28, 3, 64\]"),
    (dict(freqs=torch.ones(3, 29, 32, dtype=C64)),
     r"freqs: expected shape \[S, D/2\] = \[29, 32\] \(shared by the batch\) or \[B, S, D/2\] = \[2, 29, 32\]"),
    (dict(k_weight=torch.ones(63)), r"k_weight: expected shape \[D\] = \[64\] or None, got \[63\]"),
    (dict(out=torch.empty(2, 29, 3, 64)), r"out: expected None or a pair \(out_q, out_k\) of tensors, got Tensor"),
    (dict(out=(torch.empty(2, 29, 3, 64), torch.empty(2, 29, 3, 64, dtype=torch.bfloat16))),
     r"out\[1\]: expected a torch.float32 tensor of shape \[2, 29, 3, 64\] .*got torch.bfloat16 \[2, 29, 3, 64\]"),
    (dict(out=(torch.empty(2, 29, 3, 64), torch.empty(2, 29, 3, 64, device="meta"))),
     r"out\[1\]: expected device cpu \(the device of q\), got meta"),
]


@pytest.mark.parametrize("changes, message", SINGLE_VALIDATION_CASES,
                         ids=[f"{i}-{m.split(':')[0]}" for i, (_, m) in enumerate(SINGLE_VALIDATION_CASES)])
def test_single_stream_validation_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        call_single(qk_norm_rope, {**make_stream_inputs(), **changes})


def test_single_stream_out_is_refused_under_autograd():
    inputs = make_stream_inputs()
    inputs["q_weight"].requires_grad_()
    out = (torch.empty_like(inputs["q"]), torch.empty_like(inputs["k"]))
    with pytest.raises(ValueError, match=r"out: writing into given buffers is for inference, but autograd is recording"):
        call_single(qk_norm_rope, inputs, out=out)
    with torch.no_grad():
        got = call_single(qk_norm_rope, inputs, out=out)
    for g, e in zip(got, single_reference(inputs)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_single_stream_backends_agree(backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = make_stream_inputs(per_sample=True)
    for g, e in zip(call_single(qk_norm_rope, inputs, backend=backend), single_reference(inputs)):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


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
    from qwen_image_omni.kernels import triton_backend

    inputs = make_inputs(s_img=5, s_txt=2)
    calls = []
    real = triton_backend.joint_qk_norm_rope_triton
    monkeypatch.setattr(triton_backend, "joint_qk_norm_rope_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
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


# --------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_traces_with_grad():
    """The checks, the backend choice and the torch backend trace without graph breaks, and the
    compiled op (the reference, inside) equals the eager one (the autograd.Function)."""

    def fn(img_q, img_k, txt_q, txt_k, w_iq, w_ik, w_tq, img_freqs, txt_freqs):
        return joint_qk_norm_rope(img_q, img_k, txt_q, txt_k, img_q_weight=w_iq, img_k_weight=w_ik,
                                  txt_q_weight=w_tq, txt_k_weight=None, img_freqs=img_freqs, txt_freqs=txt_freqs)

    inputs = make_inputs(s_img=9, s_txt=3, heads=2, head_dim=16)
    names = (*NAMES, "img_q_weight", "img_k_weight", "txt_q_weight", "img_freqs", "txt_freqs")
    args = [inputs[n].detach().clone().requires_grad_(inputs[n].dtype != torch.complex64) for n in names]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, ref in zip(compiled(*args), fn(*args)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    sum(t.sum() for t in compiled(*args)).backward()
    assert all(a.grad is not None for a in args[:7])
