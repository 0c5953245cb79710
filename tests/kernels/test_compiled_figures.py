"""sm_90 compiled figures of the current kernels at the models' shapes (``kernels.compiled_figures``).

Every launch the models make (Qwen-Image 1.x joint forward and backward, both streams, text widths
256 and 1024; Qwen-Image 2.1's single stream), bf16 and fp32, is compiled for sm_90 with Triton's own
compiler and checked for what the kernels are built to keep: no register spills, and 16-byte global
loads of q/k (and of the incoming gradients) and 16-byte stores of the outputs. No GPU is needed;
Triton's nvidia backend and ptxas are (the tests skip without them). The compiling runs in a
subprocess without ``TRITON_INTERPRET`` (here kernels are interpreted functions, which cannot be
compiled), one per dtype, once per test session.
"""

from __future__ import annotations

import pytest
import torch

from qwen_image_omni.kernels import compiled_figures


@pytest.fixture(scope="session")
def figures() -> list[compiled_figures.LaunchFigures]:
    reason = compiled_figures.toolchain_missing()
    if reason is not None:
        pytest.skip(f"cannot compile for sm_90 here: {reason}")
    return compiled_figures.model_figures_in_subprocess(("bf16", "fp32"))


def test_every_model_launch_is_compiled(figures):
    names = {(f.name, f.dtype) for f in figures}
    for dtype in ("bf16", "fp32"):
        for name in ("joint fwd txt", "joint fwd img", "single fwd", "single fwd in place", "single bwd"):
            assert (name, dtype) in names
        for txt in compiled_figures.MODEL.bwd_txt:
            assert (f"joint bwd txt (S_txt={txt})", dtype) in names
            assert (f"joint bwd img (S_txt={txt})", dtype) in names


def test_no_register_spills(figures):
    spilling = [(f.name, f.dtype, f.spill_stores, f.spill_loads) for f in figures if f.spill_stores or f.spill_loads]
    assert spilling == [], "spill store/load bytes on sm_90"


def test_q_k_loads_and_output_stores_are_16_bytes(figures):
    for f in figures:
        assert f.widths.get("qk") == {"load": [16]}, (f.name, f.dtype, f.accesses)
        assert f.widths.get("out") == {"store": [16]}, (f.name, f.dtype, f.accesses)


def test_rounding_contract_survives_compilation(figures):
    """The interpreter runs kernels as Python, so only the GPU compiler's output shows these: no fp32 FMA
    (the rotation keeps its separate roundings), an IEEE division for the mean, and bf16 outputs by the
    compiler's round-to-nearest-even conversion."""
    for f in figures:
        assert "fma.rn.f32" not in f.float_ops, (f.name, f.dtype)
        conversions = [op for op in f.float_ops if op.startswith("cvt.")]
        assert all(op.startswith("cvt.rn.") for op in conversions), (f.name, f.dtype, conversions)
        assert bool(conversions) == (f.dtype == "bf16"), (f.name, f.dtype, conversions)
        assert "div.rn.f32" in f.float_ops, (f.name, f.dtype)


def test_figures_are_consistent(figures):
    for f in figures:
        assert f.instruction_kind in ("SASS", "PTX")
        assert 0 < f.registers <= 255 and f.resident_per_sm >= 1
        assert f.elements_per_tile and f.steady_passes >= 1 and f.steady_passes == int(f.steady_passes), f
        assert f.bytes_read > 0 and f.bytes_written > 0


# --------------------------------------------------------------------------- the PTX reading itself
PTX = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2
)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	ld.param.b32 	%r1, [k_param_2];
	mul.wide.s32 	%rd3, %r1, 2;
	add.s64 	%rd4, %rd1, %rd3;
$L__BB0_1:
	// begin inline asm
	mov.u32 %r2, 0x0;
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
	// end inline asm
	add.s64 	%rd5, %rd2, %rd3;
	@%p1 st.global.b16 [ %rd5 + 0 ], { %rs1 };
	@%p2 bra 	$L__BB0_1;
	ret;
}
"""


def test_ptx_accesses_trace_addresses_to_pointer_arguments():
    statements = compiled_figures._statements(PTX)
    accesses = compiled_figures._ptx_accesses(statements, ("x_ptr", "out_ptr", None))
    assert [(a.kind, a.width, sorted(a.params)) for a in accesses] == [
        ("load", 16, ["x_ptr"]),
        ("store", 2, ["out_ptr"]),
    ]
    first, last = compiled_figures._ptx_loop(statements)
    assert all(first <= a.line <= last for a in accesses)


def test_interpreted_kernels_are_refused_in_process():
    triton = pytest.importorskip("triton")
    from qwen_image_omni.kernels import triton_backend

    if isinstance(triton_backend.qk_norm_rope_fwd_kernel, triton.runtime.JITFunction):
        pytest.skip("kernels are compiled here (no TRITON_INTERPRET)")
    q = torch.empty(1, 16, 2, 8, device="meta")
    freqs = torch.empty(16, 4, device="meta", dtype=torch.complex64)
    (launch,), _ = triton_backend.plan_single_forward(q, q, (None, None), freqs, 1e-6)
    with pytest.raises(TypeError, match="TRITON_INTERPRET"):
        compiled_figures.launch_figures(launch)
