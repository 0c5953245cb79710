"""Compiled figures for sm_90 (H100) of every q/k RMSNorm + RoPE launch the models make: not timings.

Each launch is compiled ahead of time with Triton's own compiler for ``GPUTarget("cuda", 90, 32)``,
specialised as Triton's launcher would (``qwen_image_omni.kernels.compiled_figures``), at the models'
shapes: 24 heads x 128 head dim, batch 1, bf16 and fp32; Qwen-Image 1.x joint launches at 4096 image
+ 1024 text tokens (forward and backward, text and image streams; the backward at text widths 256
and 1024 too), and Qwen-Image 2.1's single-stream launches over 4096 + 1024 tokens with a
per-sample table ``[B, S, D/2]``. No GPU is needed; Triton's nvidia backend and ptxas are.

Two tables, one after the other: "before" (the kernels of ``--before REV``, default 8541401, whose
``triton_backend.py`` is loaded from git into a temporary module and launched exactly as its custom
ops launch them, with a recording stand-in for each kernel), then "now" (this checkout's planners).

    python benchmarks/kernel_static.py                  # both tables
    python benchmarks/kernel_static.py --only now       # this checkout only
    python benchmarks/kernel_static.py --before HEAD~3  # another "before"
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton loads: compile real JITFunctions, not interpreted ones

import argparse  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import torch  # noqa: E402

from qwen_image_omni.kernels import compiled_figures  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BACKEND_PATH = "qwen_image_omni/kernels/triton_backend.py"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class BeforeLaunch(NamedTuple):
    """A launch record shaped like ``triton_backend.Launch`` (which older revisions lack)."""

    name: str
    kernel: object
    grid: tuple[int, int, int]
    args: dict
    num_warps: int
    enable_fp_fusion: bool


# --------------------------------------------------------------------------- "before": an old triton_backend.py
def load_backend(rev: str) -> types.ModuleType:
    """``triton_backend.py`` at ``rev`` as a fresh module (its custom ops renamed so they do not clash)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{rev}:{BACKEND_PATH}"], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        raise SystemExit(f"--before {rev}: git show failed: {(getattr(error, 'stderr', '') or str(error)).strip()}") from None
    source = source.replace('"qwen_image_omni::', '"qwen_image_omni_before::')
    name = "_kernel_static_before_" + re.sub(r"\W", "_", rev)
    module = types.ModuleType(name)
    # @triton.jit reads each kernel's source back with inspect when it decorates: a real file, while exec runs.
    with tempfile.TemporaryDirectory(prefix="kernel_static_") as folder:
        path = Path(folder) / f"{name}.py"
        path.write_text(source)
        module.__file__ = str(path)
        sys.modules[name] = module
        exec(compile(source, str(path), "exec"), module.__dict__)
    return module


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records a launch instead of running."""

    def __init__(self, kernel, names: list[str], launches: list):
        self.kernel, self.names, self.launches = kernel, names, launches

    def __getitem__(self, grid):
        def record(*args, num_warps, enable_fp_fusion, **kwargs):
            bound = self.kernel.signature.bind(*args, **kwargs)
            name = self.names[len([l for l in self.launches if l.kernel is self.kernel])]
            self.launches.append(BeforeLaunch(name, self.kernel, tuple(grid), dict(bound.arguments),
                                              num_warps, enable_fp_fusion))

        return record


def before_launches(module: types.ModuleType, dtype: torch.dtype, txt: int, backward: bool) -> list[BeforeLaunch]:
    """The launches the old module's forward (or backward) custom op makes at the model shapes."""
    launches: list = []
    fwd, bwd = module.joint_qk_norm_rope_fwd_kernel, module.joint_qk_norm_rope_bwd_kernel
    streams = ("txt", "img")
    module.joint_qk_norm_rope_fwd_kernel = _Recorder(fwd, [f"joint fwd {s}" for s in streams], launches)
    module.joint_qk_norm_rope_bwd_kernel = _Recorder(bwd, [f"joint bwd {s} (S_txt={txt})" for s in streams], launches)
    try:
        t = joint_tensors(dtype, txt)
        weights = (t["img_q_weight"], t["img_k_weight"], t["txt_q_weight"], t["txt_k_weight"])
        acts = (t["img_q"], t["img_k"], t["txt_q"], t["txt_k"])
        # The ops' own Python bodies (custom_op keeps the undecorated function as _init_fn): called with
        # meta tensors they allocate meta outputs and launch the recorders.
        op = module._joint_qk_norm_rope_backward_op if backward else module._joint_qk_norm_rope_op
        body = getattr(op, "_init_fn", None)
        if body is None:
            raise SystemExit("kernel_static: this torch's custom_op keeps no _init_fn; cannot replay the old ops")
        if backward:
            joint = (t["img_q"].shape[0], txt + t["img_q"].shape[1], *t["img_q"].shape[2:])
            rstd = torch.empty(joint[:3], device="meta", dtype=torch.float32)
            grad = torch.empty(joint, device="meta", dtype=dtype)
            body(grad, grad, *acts, *weights, t["img_freqs"], t["txt_freqs"], rstd, rstd)
        else:
            body(*acts, *weights, t["img_freqs"], t["txt_freqs"], 1e-6)
    finally:
        module.joint_qk_norm_rope_fwd_kernel, module.joint_qk_norm_rope_bwd_kernel = fwd, bwd
    return launches


def joint_tensors(dtype: torch.dtype, txt: int) -> dict:
    """Meta activations, weights and complex64 tables of one Qwen-Image 1.x block (the model's shapes)."""
    m = compiled_figures.MODEL
    tensors = {}
    for stream, seq in (("img", m.img), ("txt", txt)):
        for x in ("q", "k"):
            tensors[f"{stream}_{x}"] = torch.empty(m.batch, seq, m.heads, m.head_dim, device="meta", dtype=dtype)
            tensors[f"{stream}_{x}_weight"] = torch.empty(m.head_dim, device="meta", dtype=dtype)
        tensors[f"{stream}_freqs"] = torch.empty(seq, m.head_dim // 2, device="meta", dtype=torch.complex64)
    return tensors


def all_before_launches(module: types.ModuleType, dtype: torch.dtype) -> list[BeforeLaunch]:
    """Every launch of the old kernels at the model shapes: the forward at MODEL.txt text tokens, the
    backward at each of MODEL.bwd_txt."""
    launches = before_launches(module, dtype, compiled_figures.MODEL.txt, backward=False)
    for txt in compiled_figures.MODEL.bwd_txt:
        launches += before_launches(module, dtype, txt, backward=True)
    return launches


# --------------------------------------------------------------------------- table
def _widths(figures, cls: str) -> str:
    kinds = figures.widths.get(cls, {})
    return " / ".join(f"{kind[:2]} {','.join(map(str, w))}" for kind, w in sorted(kinds.items())) or "-"


def _number(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows: list) -> str:
    """A markdown table of ``LaunchFigures``."""
    from qwen_image_omni.kernels.triton_backend import H100_SMS  # the SM count the launches are sized for

    head = ("launch", "dtype", "grid", "programs", f"/{H100_SMS} SMs", "resident/SM", "warps", "regs", "spill st/ld B",
            "smem B", "q/k ld B", "out st B", "table ld B", "other B", "SASS instr", "steady instr", "instr/elem",
            "passes", "barriers static/program", "MB moved", "ideal us @3 TB/s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in rows:
        cells = (
            f.name, f.dtype, "x".join(map(str, f.grid)), f.programs, _number(f.programs / H100_SMS),
            f.resident_per_sm, f.num_warps, f.registers, f"{f.spill_stores}/{f.spill_loads}", f.shared_bytes,
            _widths(f, "qk"), _widths(f, "out"), _widths(f, "table"), _widths(f, "other"),
            f"{f.instructions} {f.instruction_kind}", f.steady_instructions, _number(f.instructions_per_element),
            _number(f.steady_passes, 0), f"{f.barriers}/{_number(f.barriers_per_program, 0)}",
            _number((f.bytes_read + f.bytes_written) / 1e6), _number(f.ideal_us),
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the tables (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="8541401", help="the git revision of the 'before' kernels")
    parser.add_argument("--only", choices=("both", "before", "now"), default="both")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    args = parser.parse_args(argv)
    reason = compiled_figures.toolchain_missing()
    if reason is not None:
        print(f"kernel_static: SKIPPED: {reason}")
        return
    import triton

    m = compiled_figures.MODEL
    print(f"## compiled figures for sm_90 (not timings): triton {triton.__version__}, {m.heads} heads x "
          f"{m.head_dim}, batch {m.batch}, {m.img} image + {m.txt} text tokens (backward also at "
          f"{', '.join(map(str, m.bwd_txt))}); single stream {m.img + m.txt} tokens\n")
    print(compiled_figures.DEFINITIONS + "\n")
    if args.only in ("both", "before"):
        try:
            module = load_backend(args.before)
        except SystemExit as error:  # no git history (an unpacked release): the "now" table still stands
            if args.only == "before":
                raise
            print(f"### before: not available ({error})\n")
            args.only = "now"
    if args.only in ("both", "before"):
        launches = [l for d in args.dtypes for l in all_before_launches(module, DTYPES[d])]
        print(f"### before: the kernels of {args.before}\n")
        print(table([compiled_figures.launch_figures(l) for l in launches]) + "\n")
    if args.only in ("both", "now"):
        launches = [l for d in args.dtypes for l in compiled_figures.model_launches(DTYPES[d])]
        print("### now: this checkout's planners\n")
        print(table([compiled_figures.launch_figures(l) for l in launches]) + "\n")


if __name__ == "__main__":
    main()
