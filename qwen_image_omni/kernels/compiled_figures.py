"""What the Triton kernels compile to for sm_90 (H100), measured ahead of time on any machine.

No GPU is needed: a launch record (the kernel, its grid, every argument by name, ``num_warps`` and
``enable_fp_fusion``; tensors may live on the ``meta`` device) is specialised exactly as Triton's
launcher would specialise it (Triton's own binder: ints equal to 1 become constants, ints and
pointers divisible by 16 get ``tt.divisibility = 16``; a tensor's pointer is taken as 16-byte aligned
at its storage offset, as torch's caching allocator aligns allocations), compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, and read back:

* registers and spills from the ``ptxas -v`` log of that compilation, shared memory from Triton's
  metadata (the dynamic shared memory the launch asks for);
* global load/store widths per pointer argument, from the PTX: each ``ld.global`` / ``st.global``
  (and ``cp.async`` global -> shared copy) is traced back through the PTX register dataflow to the
  ``ld.param`` of the pointer argument(s) its address derives from; ``ld.global.v4.b32`` is 16 bytes;
* SASS instructions from ``cuobjdump -sass`` of the cubin (PTX instructions when cuobjdump is
  missing; ``instruction_kind`` says which).

Figures (``LaunchFigures``):

* pointer classes: "qk" loads and "out" stores are accesses of the q/k-path tensors (those shaped
  like the largest tensor argument in their last two dims, ``[..., H, D]``, with at least 3 dims:
  q, k, incoming gradients, joint outputs, dq/dk); "table" is the RoPE table (an argument whose name
  has freq/table/cos/sin/rope); everything else (norm weights, rstd, weight-gradient partials) is
  "other". Widths are reported as the sorted set of byte widths seen for each class.
* steady state: the body of the kernel's outermost loop in SASS (and the matching loop in PTX), or
  the whole kernel when it has no loop. ``elements_per_tile`` = q/k-path elements stored by one
  program in one steady-state pass (the per-thread stored bytes of the q/k-path stores in that PTX
  region, divided by the element size, times the threads of a program; q and k both count).
  ``instructions_per_element`` = steady-state SASS instructions (one thread's, NOPs excluded) times
  the threads of a program, divided by ``elements_per_tile``: thread-instructions issued per output
  element, ignoring predication.
* ``steady_passes`` = q/k-path elements the launch stores / (programs * ``elements_per_tile``), the
  loop trips a program makes; ``barriers_per_program`` = barriers outside the loop plus loop
  barriers times ``steady_passes``.
* ``bytes_read`` / ``bytes_written``: each tensor argument the kernel loads from / stores to counts
  once, in full, except tensors of at least 3 dims (not the table) longer along dim 1 (tokens) than
  the launch's q/k inputs: those count the launch's share of rows (a stream's rows of a joint
  tensor). ``ideal_us`` = (read + written) / 3.0 TB/s.
* ``programs`` against the 132 SMs of an H100 SXM, and ``resident_per_sm``: the programs one SM can
  hold at once given registers, shared memory and warps (sm_90 limits).

The kernels must be real ``JITFunction``s: under ``TRITON_INTERPRET=1`` ``@triton.jit`` gives
interpreted functions, so run ``model_figures_in_subprocess`` (``python -m
qwen_image_omni.kernels.compiled_figures --json`` without ``TRITON_INTERPRET``) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from typing import Any, NamedTuple

import torch

__all__ = [
    "DEFINITIONS",
    "H100_BANDWIDTH",
    "MODEL",
    "LaunchFigures",
    "ModelShapes",
    "launch_figures",
    "model_figures",
    "model_figures_in_subprocess",
    "model_launches",
    "toolchain_missing",
]

H100_BANDWIDTH = 3.0e12  # bytes/s, the HBM3 roofline the ideal times use
_CAPABILITY = 90
_WARP = 32
# sm_90 per-SM limits: registers, warps, resident blocks, shared memory (bytes), reserved shared per block.
_SM_REGISTERS, _SM_WARPS, _SM_BLOCKS, _SM_SHARED, _BLOCK_RESERVED_SHARED = 65536, 64, 32, 233472, 1024
_TABLE_NAME = re.compile(r"freq|table|cos|sin|rope", re.IGNORECASE)
_CLASSES = ("qk", "out", "table", "other")
# What the numerics rest on: fp32 FMAs (none: the rotation rounds each product), the IEEE division of the
# mean, and the float conversions (round-to-nearest-even ones end in .rn).
_FLOAT_OP = re.compile(r"\b(fma\.rn\.f32|div\.rn\.f32|cvt\.[a-z]+\.(?:bf16|f16)(?:x2)?\.f32)\b")


class LaunchFigures(NamedTuple):
    """Compiled figures of one launch for sm_90 (see the module docstring for each definition)."""

    name: str
    kernel: str
    dtype: str  # the q/k-path tensors' dtype
    grid: tuple[int, int, int]
    programs: int
    resident_per_sm: int
    num_warps: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared_bytes: int
    widths: dict  # {"qk": {"load": [16]}, "out": {"store": [16]}, ...}: byte widths per class and kind
    accesses: dict  # {param name: {"load"/"store": {width: count}}}: every global access, per pointer argument
    instructions: int  # whole kernel, one thread
    instruction_kind: str  # "SASS" or "PTX"
    steady_instructions: int
    elements_per_tile: int | None
    instructions_per_element: float | None
    barriers: int  # barrier instructions in the kernel's code
    steady_passes: float | None
    barriers_per_program: float | None
    bytes_read: int
    bytes_written: int
    ideal_us: float
    float_ops: list  # the PTX's fp32 FMAs, divisions and float conversions (e.g. "cvt.rn.bf16.f32"), sorted

    def to_json(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        return {**self._asdict(), "grid": list(self.grid)}

    @classmethod
    def from_json(cls, data: dict) -> LaunchFigures:
        """The inverse of ``to_json`` (JSON turns the width keys of ``accesses`` into strings)."""
        accesses = {p: {k: {int(w): n for w, n in c.items()} for k, c in kinds.items()}
                    for p, kinds in data["accesses"].items()}
        return cls(**{**data, "grid": tuple(data["grid"]), "accesses": accesses})


# --------------------------------------------------------------------------- toolchain
def toolchain_missing() -> str | None:
    """None when Triton's nvidia backend and ptxas are here, else why figures cannot be made."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except ImportError as error:
        return f"triton is not importable ({error})"
    if "nvidia" not in backends:
        return "triton has no nvidia backend here (triton.backends lacks 'nvidia')"
    try:
        path = _ptxas_path()
    except Exception as error:  # knobs raise RuntimeError or others when the binary is absent
        return f"no ptxas for sm_90 ({error})"
    if not path or not os.path.isfile(path):
        return f"no ptxas for sm_90 (looked at {path!r})"
    return None


def _ptxas_path() -> str:
    from triton.backends.nvidia import compiler as nvidia

    if hasattr(nvidia, "get_ptxas"):  # triton >= 3.5: sm_90 may use ptxas-blackwell (3.9 does)
        return nvidia.get_ptxas(_CAPABILITY).path
    from triton import knobs

    return knobs.nvidia.ptxas.path


def _cuobjdump_path() -> str | None:
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
    except Exception:
        return None
    return path if path and os.path.isfile(path) else None


# --------------------------------------------------------------------------- compiling
class _Compiled(NamedTuple):
    ptx: str
    cubin: bytes
    ptxas_log: str
    shared: int
    pointer_params: tuple[str, ...]  # PTX param index -> kernel argument name (None for a non-pointer)


def _check_launch(launch: Any) -> None:
    import triton

    for field in ("name", "kernel", "grid", "args", "num_warps", "enable_fp_fusion"):
        if not hasattr(launch, field):
            raise TypeError(f"launch: expected a launch record with .{field} (triton_backend.Launch), got {launch!r}")
    if not isinstance(launch.kernel, triton.runtime.JITFunction):
        raise TypeError(
            f"launch.kernel: expected a triton JITFunction, got {type(launch.kernel).__name__} (under "
            "TRITON_INTERPRET=1 kernels are interpreted: use model_figures_in_subprocess)"
        )
    names = [p.name for p in launch.kernel.params]
    missing, unknown = set(names) - set(launch.args), set(launch.args) - set(names)
    if missing or unknown:
        raise ValueError(
            f"launch.args of {launch.name!r}: missing {sorted(missing)}, unknown {sorted(unknown)} "
            f"(expected every parameter of {launch.kernel.__name__} by name)"
        )
    if len(launch.grid) != 3 or not all(isinstance(g, int) and g >= 1 for g in launch.grid):
        raise ValueError(f"launch.grid of {launch.name!r}: expected three ints >= 1, got {launch.grid!r}")


def _specialise(launch: Any):
    """(backend, signature, constexprs, attrs, options) as ``JITFunction.run`` builds them, for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", _CAPABILITY, _WARP))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    options = dict(num_warps=launch.num_warps, enable_fp_fusion=launch.enable_fp_fusion)
    bound, specialization, _ = binder(**launch.args, **options)
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, (kind, spec)) in enumerate(zip(kernel.params, specialization)):
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = bound[param.name]
        elif isinstance(spec, str):
            attrs[(i,)] = backend.parse_attr(spec)
    return backend, signature, constexprs, attrs, backend.parse_options(options)


_COMPILED: dict = {}  # specialisation -> _Compiled: launches that specialise alike compile once per process


def _compile(launch: Any) -> _Compiled:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    backend, signature, constexprs, attrs, options = _specialise(launch)
    key = (launch.kernel, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())), repr(options))
    if key in _COMPILED:
        return _COMPILED[key]
    log = io.StringIO()
    # Triton prints the log of its own ptxas -v run when asked; always_compile makes sure ptxas runs.
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(
            ASTSource(launch.kernel, signature, constexprs, attrs),
            target=GPUTarget("cuda", _CAPABILITY, _WARP),
            options=options.__dict__,
        )
    runtime_params = [name for name, kind in signature.items() if kind != "constexpr"]
    pointers = tuple(name if signature[name].startswith("*") else None for name in runtime_params)
    _COMPILED[key] = _Compiled(compiled.asm["ptx"], compiled.asm["cubin"], log.getvalue(), compiled.metadata.shared,
                               pointers)
    return _COMPILED[key]


def _ptxas_figures(log: str, kernel_name: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of ``kernel_name`` from a ``ptxas -v`` log."""
    section = log.split(f"Function properties for {kernel_name}", 1)
    if len(section) != 2:
        raise RuntimeError(f"no ptxas -v report for {kernel_name} in the compile log:\n{log}")
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", section[1])
    registers = re.search(r"Used (\d+) registers", section[1])
    if not (spills and registers):
        raise RuntimeError(f"unreadable ptxas -v report for {kernel_name}:\n{log}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


# --------------------------------------------------------------------------- PTX
class _Access(NamedTuple):
    kind: str  # "load" or "store"
    width: int  # bytes per thread
    params: frozenset  # pointer argument names the address derives from
    line: int  # statement index


_REGISTER = re.compile(r"%[A-Za-z_][\w.]*")
_PARAM = re.compile(r"_param_(\d+)\b")


def _statements(ptx: str) -> list[str]:
    """The PTX body's statements and labels, one per item, comments and directives dropped."""
    out = []
    for line in ptx.splitlines():
        line = line.split("//", 1)[0].strip()
        if not line or line.startswith("."):
            continue
        for part in line.split(";"):
            part = part.strip().strip("{}").strip()
            if part and not part.startswith("."):
                out.append(part)
    return out


def _split_statement(statement: str) -> tuple[str, list[str]]:
    """(opcode, operands) with any ``@%p`` predicate removed; braces keep a vector operand whole."""
    statement = re.sub(r"^@!?%\w+\s+", "", statement)
    opcode, _, rest = statement.partition(" ")
    operands, depth, current = [], 0, ""
    for ch in rest:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            operands.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        operands.append(current.strip())
    return opcode, operands


def _width(opcode: str) -> int:
    """Bytes one thread moves with a ``ld``/``st`` opcode, e.g. ``ld.global.v4.b32`` -> 16."""
    parts = opcode.split(".")
    vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
    bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p)), None)
    if bits is None:
        raise RuntimeError(f"cannot read the width of PTX {opcode!r}")
    return vector * bits // 8


def _ptx_accesses(statements: list[str], pointer_params: tuple) -> list[_Access]:
    """Every global load/store with the pointer arguments its address derives from."""
    defs: dict[str, list[tuple[str, ...]]] = {}  # register -> sources of each definition ("param:i" for ld.param)
    memory = []
    for index, statement in enumerate(statements):
        if statement.endswith(":"):
            continue
        opcode, operands = _split_statement(statement)
        if not operands:
            continue
        if opcode.startswith("ld.param"):
            param = _PARAM.search(operands[1])
            for reg in _REGISTER.findall(operands[0]):
                defs.setdefault(reg, []).append((f"param:{param.group(1)}",) if param else ())
            continue
        if opcode.startswith(("ld.global", "st.global")):
            address = operands[1] if opcode.startswith("ld") else operands[0]
            memory.append((index, "load" if opcode.startswith("ld") else "store", _width(opcode), address))
        elif opcode.startswith("cp.async.c") and ".global" in opcode and len(operands) >= 3:
            memory.append((index, "load", int(operands[2], 0), operands[1]))  # cp.async.ca/cg [shared], [global], bytes
        if opcode.startswith(("st.", "cp.async", "bar", "bra", "ret", "red.", "prefetch")):
            continue
        dst = _REGISTER.findall(operands[0])
        srcs = tuple(reg for op in operands[1:] for reg in _REGISTER.findall(op))
        for reg in dst:
            defs.setdefault(reg, []).append(srcs)

    @lru_cache(maxsize=None)
    def roots(reg: str) -> frozenset:
        found, seen, todo = set(), {reg}, [reg]
        while todo:
            for sources in defs.get(todo.pop(), ()):
                for src in sources:
                    if src.startswith("param:"):
                        i = int(src[6:])
                        if i < len(pointer_params) and pointer_params[i]:
                            found.add(pointer_params[i])
                    elif src not in seen:
                        seen.add(src)
                        todo.append(src)
        return frozenset(found)

    return [
        _Access(kind, width, frozenset().union(*[roots(r) for r in _REGISTER.findall(address)]), index)
        for index, kind, width, address in memory
    ]


def _outer_loop(starts: dict[str, int], branches: list[tuple[int, str]]) -> tuple[int, int] | None:
    """(first, last) index of the largest backward-branch region, or None when there is no loop."""
    loops = [(starts[target], at) for at, target in branches if target in starts and starts[target] < at]
    return max(loops, key=lambda span: span[1] - span[0]) if loops else None


def _ptx_loop(statements: list[str]) -> tuple[int, int] | None:
    labels = {s[:-1]: i for i, s in enumerate(statements) if s.endswith(":")}
    branches = []
    for i, statement in enumerate(statements):
        opcode, operands = _split_statement(statement)
        if opcode.startswith("bra") and operands:
            branches.append((i, operands[0]))
    return _outer_loop(labels, branches)


# --------------------------------------------------------------------------- SASS
def _sass(cubin: bytes) -> list[tuple[int, str]] | None:
    """(address, instruction) of the cubin's SASS without NOPs, or None without cuobjdump."""
    import tempfile

    tool = _cuobjdump_path()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], check=True, capture_output=True, text=True).stdout
    out = []
    for match in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text):
        instruction = match.group(2).strip()
        if _sass_opcode(instruction) != "NOP":
            out.append((int(match.group(1), 16), instruction))
    return out


def _sass_opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split(" ", 1)[0]


def _sass_loop(sass: list[tuple[int, str]]) -> tuple[int, int] | None:
    starts = {str(address): i for i, (address, _) in enumerate(sass)}
    branches = []
    for i, (address, instruction) in enumerate(sass):
        target = re.search(r"\bBRA\S*\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", instruction)
        if target and target.group(1) and int(target.group(1), 16) != address:  # BRA to itself ends the kernel
            branches.append((i, str(int(target.group(1), 16))))
    return _outer_loop(starts, branches)


# --------------------------------------------------------------------------- figures
def _tensor_classes(args: dict) -> dict[str, str]:
    """Argument name -> "qk" (the q/k path), "table" or "other", for every tensor argument."""
    tensors = {name: t for name, t in args.items() if isinstance(t, torch.Tensor)}
    largest = max(tensors.values(), key=lambda t: t.numel())
    classes = {}
    for name, t in tensors.items():
        if _TABLE_NAME.search(name):
            classes[name] = "table"
        elif t.dim() >= 3 and t.shape[-2:] == largest.shape[-2:]:
            classes[name] = "qk"
        else:
            classes[name] = "other"
    return classes


def _access_class(access: _Access, classes: dict) -> str:
    kinds = {classes.get(p, "other") for p in access.params}
    if kinds == {"qk"}:
        return "qk" if access.kind == "load" else "out"
    return kinds.pop() if len(kinds) == 1 else "other"


def _launch_tokens(args: dict, classes: dict, loaded: set, stored: set) -> int | None:
    """Tokens (dim 1) of the launch's q/k inputs: the shortest q/k-path tensor it only reads."""
    inputs = [n for n in loaded - stored if classes.get(n) == "qk"] or [n for n in loaded if classes.get(n) == "qk"]
    return min((args[n].shape[1] for n in inputs), default=None)


def _touched_bytes(t: torch.Tensor, cls: str, tokens: int | None) -> int:
    """Bytes of ``t`` a launch over ``tokens`` tokens touches: see the module docstring."""
    share = 1.0
    if tokens and cls != "table" and t.dim() >= 3 and t.shape[1] > tokens:
        share = tokens / t.shape[1]
    return round(t.numel() * t.element_size() * share)


def _resident_per_sm(registers: int, shared: int, num_warps: int) -> int:
    warp_registers = math.ceil(max(registers, 1) * _WARP / 256) * 256  # allocated per warp in 256-register units
    by_registers = (_SM_REGISTERS // warp_registers) // num_warps
    by_shared = _SM_SHARED // (shared + _BLOCK_RESERVED_SHARED)
    return max(0, min(by_registers, by_shared, _SM_WARPS // num_warps, _SM_BLOCKS))


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _width_figures(accesses: list[_Access], classes: dict) -> tuple[dict, dict]:
    """(byte widths per class and kind, width counts per pointer argument and kind)."""
    widths: dict = {}
    per_param: dict = {}
    for access in accesses:
        widths.setdefault(_access_class(access, classes), {}).setdefault(access.kind, set()).add(access.width)
        for param in access.params:
            per_param.setdefault(param, {}).setdefault(access.kind, Counter())[access.width] += 1
    widths = {c: {k: sorted(v) for k, v in sorted(widths[c].items())} for c in _CLASSES if c in widths}
    per_param = {p: {k: dict(sorted(c.items())) for k, c in sorted(kinds.items())}
                 for p, kinds in sorted(per_param.items())}
    return widths, per_param


def _code(statements: list[str], ptx_loop: tuple[int, int] | None, cubin: bytes):
    """(kind, whole-kernel instructions, steady-state instructions, is-a-barrier test): SASS when
    cuobjdump is here and its loop structure matches the PTX's (ptxas may unroll a short loop), else PTX."""
    sass = _sass(cubin)
    if sass is not None:
        loop = _sass_loop(sass)
        if (loop is None) == (ptx_loop is None):
            code = [instruction for _, instruction in sass]
            steady = code[loop[0] : loop[1] + 1] if loop else code
            return "SASS", code, steady, lambda i: _sass_opcode(i).startswith("BAR")
    numbered = [(i, s) for i, s in enumerate(statements) if not s.endswith(":")]
    code = [s for _, s in numbered]
    steady = [s for i, s in numbered if ptx_loop[0] <= i <= ptx_loop[1]] if ptx_loop else code
    return "PTX", code, steady, lambda s: s.startswith(("bar.", "barrier."))


def _figures_of(launch: Any, compiled: _Compiled) -> LaunchFigures:
    """The figures of ``launch`` from its sm_90 compilation."""
    kernel_name = launch.kernel.__name__
    registers, spill_stores, spill_loads = _ptxas_figures(compiled.ptxas_log, kernel_name)
    statements = _statements(compiled.ptx)
    accesses = _ptx_accesses(statements, compiled.pointer_params)
    classes = _tensor_classes(launch.args)
    widths, per_param = _width_figures(accesses, classes)

    threads = launch.num_warps * _WARP
    programs = math.prod(launch.grid)
    ptx_loop = _ptx_loop(statements)
    lo, hi = ptx_loop if ptx_loop else (0, len(statements))
    elements_per_tile = sum(
        a.width * threads // launch.args[next(iter(a.params))].element_size()
        for a in accesses
        if lo <= a.line <= hi and _access_class(a, classes) == "out"
    ) or None
    kind, code, steady, is_barrier = _code(statements, ptx_loop, compiled.cubin)

    loaded = {p for a in accesses if a.kind == "load" for p in a.params}
    stored = {p for a in accesses if a.kind == "store" for p in a.params}
    tokens = _launch_tokens(launch.args, classes, loaded, stored)
    touched = {n: _touched_bytes(launch.args[n], classes[n], tokens) for n in loaded | stored}
    bytes_read, bytes_written = sum(touched[n] for n in loaded), sum(touched[n] for n in stored)
    stored_elements = sum(touched[n] // launch.args[n].element_size() for n in stored if classes[n] == "qk")
    passes = stored_elements / (programs * elements_per_tile) if elements_per_tile else None
    barriers = sum(map(is_barrier, code))
    barriers_per_program = None
    if passes is not None:
        loop_barriers = sum(map(is_barrier, steady)) if ptx_loop else 0
        barriers_per_program = barriers - loop_barriers + loop_barriers * passes
    qk_tensors = [t for n, t in launch.args.items() if classes.get(n) == "qk"]
    return LaunchFigures(
        name=launch.name,
        kernel=kernel_name,
        dtype=_dtype_name(qk_tensors[0].dtype) if qk_tensors else "?",
        grid=tuple(launch.grid),
        programs=programs,
        resident_per_sm=_resident_per_sm(registers, compiled.shared, launch.num_warps),
        num_warps=launch.num_warps,
        registers=registers,
        spill_stores=spill_stores,
        spill_loads=spill_loads,
        shared_bytes=compiled.shared,
        widths=widths,
        accesses=per_param,
        instructions=len(code),
        instruction_kind=kind,
        steady_instructions=len(steady),
        elements_per_tile=elements_per_tile,
        instructions_per_element=len(steady) * threads / elements_per_tile if elements_per_tile else None,
        barriers=barriers,
        steady_passes=passes,
        barriers_per_program=barriers_per_program,
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        ideal_us=(bytes_read + bytes_written) / H100_BANDWIDTH * 1e6,
        float_ops=sorted(set(_FLOAT_OP.findall(compiled.ptx))),
    )


def launch_figures(launch: Any) -> LaunchFigures:
    """Compile ``launch`` (a ``triton_backend.Launch``) for sm_90 and return its figures.

    Raises:
        RuntimeError: the toolchain is missing (``toolchain_missing`` says why) or its output is unreadable.
        TypeError / ValueError: ``launch`` is not a launch record of a real ``JITFunction`` with every argument.
    """
    _check_launch(launch)
    reason = toolchain_missing()
    if reason is not None:
        raise RuntimeError(f"cannot compile for sm_90: {reason}")
    return _figures_of(launch, _compile(launch))


# --------------------------------------------------------------------------- the models' launches
class ModelShapes(NamedTuple):
    """The shapes the figures are taken at."""

    batch: int = 1
    heads: int = 24
    head_dim: int = 128
    img: int = 4096  # image tokens (Qwen-Image 1.x); a single stream (2.1) has img + txt tokens
    txt: int = 1024  # text tokens of the forward and of the single stream
    bwd_txt: tuple[int, ...] = (256, 1024)  # text widths of the joint backward rows


MODEL = ModelShapes()

DEFINITIONS = (
    "Widths: bytes per thread of each global access (16 = ld/st.global.v4.b32), by pointer class: q/k inputs "
    "(and incoming gradients), q/k-path outputs, the RoPE table, others (weights, rstd, partials). "
    "instr/elem: SASS instructions of the steady state (the loop body, or the whole kernel without a loop) x "
    "threads per program / q+k elements one pass stores. passes: loop trips per program. resident/SM: "
    "programs an SM holds at once (registers, shared memory, warps). MB moved: each byte the launch must "
    "read or write once; ideal us at 3.0 TB/s."
)

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def model_launches(dtype: torch.dtype, shapes: ModelShapes = MODEL) -> list:
    """Every launch the models make at ``shapes``, planned on ``meta`` tensors by ``triton_backend``'s planners.

    Qwen-Image 1.x: the joint forward (text, image) at ``shapes.txt`` text tokens and the joint backward
    at each of ``shapes.bwd_txt`` (names get ``(S_txt=...)``); Qwen-Image 2.1: the single-stream forward
    (fresh outputs, and in place) and backward over ``img + txt`` tokens with a per-sample table
    ``[B, S, D/2]``. Every norm weight is present, in ``dtype``.
    """
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype: expected one of {list(_DTYPES.values())}, got {dtype!r}")
    from . import triton_backend as tb

    b, h, d = shapes.batch, shapes.heads, shapes.head_dim

    def meta(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dt)

    def table(*shape: int) -> torch.Tensor:
        return meta(*shape, d // 2, dt=torch.complex64)

    w = meta(d)
    img_q, img_k = meta(b, shapes.img, h, d), meta(b, shapes.img, h, d)
    txt_q, txt_k = meta(b, shapes.txt, h, d), meta(b, shapes.txt, h, d)
    launches, _ = tb.plan_joint_forward(img_q, img_k, txt_q, txt_k, (w,) * 4, table(shapes.img), table(shapes.txt),
                                        1e-6)
    for txt in shapes.bwd_txt:
        rows = shapes.img + txt
        grad, rstd = meta(b, rows, h, d), meta(b, rows, h, dt=torch.float32)
        bwd, _ = tb.plan_joint_backward(grad, grad, img_q, img_k, meta(b, txt, h, d), meta(b, txt, h, d), (w,) * 4,
                                        table(shapes.img), table(txt), rstd, rstd)
        launches += [launch._replace(name=f"{launch.name} (S_txt={txt})") for launch in bwd]
    seq = shapes.img + shapes.txt
    q, k, freqs = meta(b, seq, h, d), meta(b, seq, h, d), table(b, seq)
    launches += tb.plan_single_forward(q, k, (w, w), freqs, 1e-6)[0]
    launches += [l._replace(name=f"{l.name} in place") for l in tb.plan_single_forward(q, k, (w, w), freqs, 1e-6,
                                                                                       out=(q, k))[0]]
    grad, rstd = meta(b, seq, h, d), meta(b, seq, h, dt=torch.float32)
    launches += tb.plan_single_backward(grad, grad, q, k, (w, w), freqs, rstd, rstd)[0]
    return launches


def model_figures(dtypes: tuple[str, ...] = tuple(_DTYPES)) -> list[LaunchFigures]:
    """``launch_figures`` of every ``model_launches`` launch, for each dtype name ("bf16", "fp32")."""
    unknown = [name for name in dtypes if name not in _DTYPES]
    if unknown:
        raise ValueError(f"dtypes: expected names among {list(_DTYPES)}, got {unknown}")
    return [launch_figures(launch) for name in dtypes for launch in model_launches(_DTYPES[name])]


def model_figures_in_subprocess(dtypes: tuple[str, ...] = tuple(_DTYPES), timeout: float = 600) -> list[LaunchFigures]:
    """``model_figures`` run by ``python -m qwen_image_omni.kernels.compiled_figures --json`` without
    ``TRITON_INTERPRET`` (so the kernels are real ``JITFunction``s whatever this process runs), one
    process per dtype, in parallel."""
    unknown = [name for name in dtypes if name not in _DTYPES]
    if unknown:
        raise ValueError(f"dtypes: expected names among {list(_DTYPES)}, got {unknown}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", f"{__package__}.compiled_figures", "--json", "--dtypes"]
    runs = [subprocess.Popen([*command, name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in dtypes]
    try:
        results = [run.communicate(timeout=timeout) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    figures = []
    for name, run, (out, err) in zip(dtypes, runs, results):
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} {name} failed ({run.returncode}):\n{err[-4000:]}")
        figures += [LaunchFigures.from_json(item) for item in json.loads(out)]
    return figures


def main(argv: list[str] | None = None) -> None:
    """``python -m qwen_image_omni.kernels.compiled_figures [--json] [--dtypes bf16 fp32]``."""
    parser = argparse.ArgumentParser(description="sm_90 compiled figures of the models' q/k norm + RoPE launches")
    parser.add_argument("--json", action="store_true", help="print a JSON list of LaunchFigures")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(_DTYPES), default=list(_DTYPES))
    args = parser.parse_args(argv)
    reason = toolchain_missing()
    if reason is not None:
        raise SystemExit(f"compiled_figures: {reason}")
    figures = model_figures(tuple(args.dtypes))
    if args.json:
        print(json.dumps([f.to_json() for f in figures]))
        return
    for f in figures:
        print(f"{f.name} {f.dtype}: {f.registers} regs, spills {f.spill_stores}/{f.spill_loads} B, widths {f.widths}")


if __name__ == "__main__":
    main()
