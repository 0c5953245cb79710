"""Timing of the q/k RMSNorm + RoPE + ``[text, image]`` concat: diffusers' sequence vs ``joint_qk_norm_rope``.

The diffusers side is exactly what ``QwenDoubleStreamAttnProcessor2_0`` does to q and k:
2 x RMSNorm per stream, 4 x ``apply_rotary_emb_qwen(use_real=False)`` and 2 x ``torch.cat``.

Two tables:

* CPU (always): diffusers' sequence vs our torch backend at one text width, fp32 and bf16, in three
  passes: the forward without autograd (inference, rollout), the forward with inputs and weights
  that require grad (what a trainer step runs), and that forward plus the backward. The two are
  timed in turns (one call each per round) so that load from other processes hits them alike.
* Full (on CUDA, or anywhere with ``--full``): rows diffusers eager, our torch backend,
  ``torch.compile`` of the diffusers sequence and our Triton kernel; the same three passes;
  for each text width of ``--full-txt``. Then the same for the other layouts the models launch:
  "per-sample" (the joint op with one RoPE table per sample, ``[B, S, D/2]``, at
  ``--per-sample-batch`` samples; diffusers has no such tables, so its row loops over the samples)
  and "1-stream" (Qwen-Image 2.1's single stream of S_img + S_txt tokens: diffusers' RMSNorm +
  ``apply_rotary_emb_qwen`` vs ``qk_norm_rope``, also in place). Columns: microseconds
  (``triton.testing.do_bench``, which flushes the L2 cache before every call), the bytes the op
  must move divided by that time, and that as a share of the device's peak HBM bandwidth.

    python benchmarks/bench_qk_norm_rope.py                      # CPU table (+ full table on CUDA)
    python benchmarks/bench_qk_norm_rope.py --full-txt 512 1024  # the widths of the full table
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from qwen_image_omni.kernels import joint_qk_norm_rope, qk_norm_rope

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NAMES = ("img_q", "img_k", "txt_q", "txt_k")
PASSES = ("fwd", "fwd grad", "fwd+bwd")
# Peak HBM bandwidth in GB/s by device-name substring, most specific first (vendor data sheets).
PEAK_HBM_GBPS = (("H100 PCIe", 2000.0), ("H100", 3350.0), ("H200", 4800.0), ("A100", 2039.0), ("B200", 8000.0))


def make_case(args, dtype: torch.dtype, device: str, txt: int | None = None, requires_grad: bool = False,
              batch: int | None = None, per_sample: bool = False) -> dict:
    """Activations as the processor has them (linear outputs viewed as heads), RMSNorms and tables.

    With ``requires_grad`` the linear outputs are leaves that need a gradient, and so are the norm
    weights; ``grad_q`` / ``grad_k`` are then random gradients of the joint outputs for the backward.
    ``per_sample``: ``[B, S, D/2]`` tables, each sample its own.
    """
    txt = args.txt if txt is None else txt
    batch = args.batch if batch is None else batch
    gen = torch.Generator().manual_seed(0)
    heads, head_dim = args.heads, args.head_dim
    case = {}
    for name in NAMES:
        seq = args.img if name.startswith("img") else txt
        _add_projection(case, name, gen, (batch, seq, heads, head_dim), dtype, device, requires_grad)
        case[name] = case[f"{name}_flat"].unflatten(-1, (heads, head_dim))
    for stream, seq in (("img", args.img), ("txt", txt)):
        case[f"{stream}_freqs"] = _table(gen, (batch, seq) if per_sample else (seq,), head_dim, device)
    case["leaves"] = [case[f"{n}_flat"] for n in NAMES] + [case[f"{n}_norm"].weight for n in NAMES]
    if requires_grad:
        case["grads"] = _output_grads(gen, (batch, txt + args.img, heads, head_dim), dtype, device)
    return case


def _add_projection(case: dict, name: str, gen: torch.Generator, shape: tuple, dtype, device, requires_grad: bool):
    """``case[name + "_flat"]``: a linear output ``[B, S, H*D]`` for heads ``shape`` ``[B, S, H, D]``, and
    ``case[name + "_norm"]``: its RMSNorm with weights in [0.5, 1.5); leaves when ``requires_grad``."""
    batch, seq, heads, head_dim = shape
    x = torch.randn(batch, seq, heads * head_dim, generator=gen).to(device=device, dtype=dtype)
    case[f"{name}_flat"] = x.requires_grad_(requires_grad)
    norm = RMSNorm(head_dim, eps=1e-6).to(device=device, dtype=dtype)
    norm.weight.data.copy_(torch.rand(head_dim, generator=gen) + 0.5)
    case[f"{name}_norm"] = norm.requires_grad_(requires_grad)


def _output_grads(gen: torch.Generator, shape: tuple, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random gradients of the two outputs (q's and k's), for the backward."""
    return tuple(torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(2))


def _table(gen: torch.Generator, rows: tuple, head_dim: int, device: str) -> torch.Tensor:
    angles = torch.rand(*rows, head_dim // 2, generator=gen) * 100
    return torch.polar(torch.ones_like(angles), angles).to(device)


def make_single_case(args, dtype: torch.dtype, device: str, txt: int, requires_grad: bool = False) -> dict:
    """One stream of ``S_img + S_txt`` tokens (Qwen-Image 2.1): q and k as linear outputs viewed as heads,
    their RMSNorms, a per-sample table ``[B, S, D/2]`` (2.1's positions are per sample) and output gradients."""
    gen = torch.Generator().manual_seed(0)
    seq, heads, head_dim = args.img + txt, args.heads, args.head_dim
    shape = (args.batch, seq, heads, head_dim)
    case = {}
    for name in ("q", "k"):
        _add_projection(case, name, gen, shape, dtype, device, requires_grad)
    case["freqs"] = _table(gen, (args.batch, seq), head_dim, device)
    case["leaves"] = [case["q_flat"], case["k_flat"], case["q_norm"].weight, case["k_norm"].weight]
    if requires_grad:
        case["grads"] = _output_grads(gen, shape, dtype, device)
    return case


def diffusers_sequence(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """What diffusers' attention processor does to q and k."""
    out = {}
    for name in NAMES:
        x = case[f"{name}_norm"](case[f"{name}_flat"].unflatten(-1, case[name].shape[-2:]))
        out[name] = apply_rotary_emb_qwen(x, case[f"{name[:3]}_freqs"], use_real=False)
    return torch.cat([out["txt_q"], out["img_q"]], dim=1), torch.cat([out["txt_k"], out["img_k"]], dim=1)


def ours(backend: str):
    """``joint_qk_norm_rope`` with one backend, as a function of a case."""

    def run(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
        weights = {f"{name}_weight": case[f"{name}_norm"].weight for name in NAMES}
        activations = (case[f"{name}_flat"].unflatten(-1, case[name].shape[-2:]) for name in NAMES)
        return joint_qk_norm_rope(
            *activations, **weights, img_freqs=case["img_freqs"], txt_freqs=case["txt_freqs"], backend=backend
        )

    return run


def diffusers_per_sample(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' sequence sample by sample, each with its own tables (it takes one table per call)."""
    outs = []
    for b in range(case["img_q_flat"].shape[0]):
        sample = {n: case[n] for n in case if n.endswith("_norm")}
        sample.update({n: case[n][b : b + 1] for n in case if n.endswith("_flat") or n in NAMES})
        sample.update({n: case[n][b] for n in ("img_freqs", "txt_freqs")})
        outs.append(diffusers_sequence(sample))
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def diffusers_single(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-Image 2.1's q/k sequence with diffusers' modules (RMSNorm, ``apply_rotary_emb_qwen``) on one stream.

    ``apply_rotary_emb_qwen`` takes one ``[S, D/2]`` table for the batch: sample 0's, as diffusers' 2.1
    class lays every sample out (the same work; the per-sample numbers are what ours adds)."""
    head_dim = case["q_norm"].weight.shape[0]
    out = []
    for name in ("q", "k"):
        x = case[f"{name}_norm"](case[f"{name}_flat"].unflatten(-1, (-1, head_dim)))
        out.append(apply_rotary_emb_qwen(x, case["freqs"][0], use_real=False))
    return out[0], out[1]


def ours_single(backend: str, in_place: bool = False):
    """``qk_norm_rope`` with one backend (``in_place``: written over q and k, inference only)."""

    def run(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = (case[f"{n}_flat"].unflatten(-1, (-1, case["q_norm"].weight.shape[0])) for n in ("q", "k"))
        return qk_norm_rope(q, k, q_weight=case["q_norm"].weight, k_weight=case["k_norm"].weight,
                            freqs=case["freqs"], out=(q, k) if in_place else None, backend=backend)

    return run


def bytes_moved(args, dtype: torch.dtype, txt: int, backward: bool, batch: int | None = None,
                per_sample: bool = False) -> int:
    """Bytes the op must move at least: q and k of every token read once, q and k written once, the fp32
    table read once (per sample for per-sample tables); the backward reads the output gradients, q and k
    and the table again and writes the input gradients (weights and the saved fp32 rstd are a rounding
    error and not counted). The same for both layouts: a single stream of S_img + S_txt tokens moves
    what the joint op moves."""
    batch = args.batch if batch is None else batch
    tokens = batch * (args.img + txt)
    tensor = tokens * args.heads * args.head_dim * torch.finfo(dtype).bits // 8
    table = (batch if per_sample else 1) * (args.img + txt) * args.head_dim * 4
    forward = 4 * tensor + table
    return forward + (6 * tensor + table if backward else 0)


def time_in_turns(fns: dict, device: str, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call for each no-argument function, measured in alternating rounds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def bit_exact_fraction(expected, got) -> float:
    """Share of elements equal bit for bit, over all the tensors together."""
    equal = sum((e == g).sum().item() for e, g in zip(expected, got))
    return equal / sum(e.numel() for e in expected)


def results(fn, case: dict, pass_name: str) -> list[torch.Tensor]:
    """What a pass produces: the joint q and k, or for "fwd+bwd" the gradients of every leaf."""
    if pass_name != "fwd+bwd":
        with torch.no_grad():
            return list(fn(case))
    joint_q, joint_k = fn(case)
    return list(torch.autograd.grad((joint_q, joint_k), case["leaves"], case["grads"]))


def cpu_table(args, dtypes: list[str]) -> None:
    """diffusers' sequence vs our torch backend on the CPU, per dtype and pass."""
    candidates = {"diffusers": diffusers_sequence, "torch": ours("torch")}
    print(
        f"CPU: B={args.batch} S_txt={args.txt} S_img={args.img} H={args.heads} D={args.head_dim}, "
        f"median (min) of {args.repeats} in turns, threads={torch.get_num_threads()}; bit-exact: share of the "
        f"outputs (fwd) or of all input and weight gradients (fwd+bwd) equal to diffusers'"
    )
    header = f"{'dtype':<6}{'pass':<15}{'diffusers ms':>20}{'torch ms':>20}{'speed-up':>10}{'bit-exact':>11}"
    print(header)
    print("-" * len(header))
    for dtype_name in dtypes:
        case = make_case(args, DTYPES[dtype_name], "cpu", requires_grad=True)
        for pass_name in PASSES:
            exact = bit_exact_fraction(*(results(fn, case, pass_name) for fn in candidates.values()))
            steps = {name: step(fn, case, pass_name) for name, fn in candidates.items()}
            times = time_in_turns(steps, "cpu", args.repeats, args.warmup)
            med = {name: statistics.median(t) for name, t in times.items()}
            low = {name: min(t) for name, t in times.items()}
            cells = "".join(f"{f'{med[n]:.1f} ({low[n]:.1f})':>20}" for n in candidates)
            speed_up = med["diffusers"] / med["torch"]
            print(f"{dtype_name:<6}{pass_name:<15}{cells}{speed_up:>9.2f}x{exact:>11.6f}", flush=True)


def peak_gbps(device: str, override: float | None) -> float | None:
    """The device's peak HBM bandwidth: ``--peak-gbps``, else looked up by the CUDA device name."""
    if override or device != "cuda":
        return override
    name = torch.cuda.get_device_name()
    return next((gbps for key, gbps in PEAK_HBM_GBPS if key in name), None)


def microseconds(fn, device: str, repeats: int) -> float:
    """Mean time of ``fn()`` in µs: ``do_bench`` (cold L2) on CUDA, wall clock elsewhere."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn) * 1e3
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def step(fn, case: dict, pass_name: str):
    """A no-argument callable running one pass of ``fn`` on ``case`` (``make_case(requires_grad=True)``).

    "fwd": the forward without autograd; "fwd grad": the forward with autograd recording (the graph is
    dropped); "fwd+bwd": that forward and the backward of ``case``'s joint gradients into the leaves.
    """
    if pass_name == "fwd":

        def forward_no_grad():
            with torch.no_grad():
                fn(case)

        return forward_no_grad
    if pass_name == "fwd grad":
        return lambda: fn(case)
    targets = case["leaves"]

    def forward_backward():
        joint_q, joint_k = fn(case)
        torch.autograd.backward((joint_q, joint_k), case["grads"])
        for leaf in targets:
            leaf.grad = None

    return forward_backward


def full_table(args, dtype_name: str, device: str) -> None:
    """µs, GB/s and % of peak HBM for every implementation, forward and forward+backward."""
    dtype = DTYPES[dtype_name]
    peak = peak_gbps(device, args.peak_gbps)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"\n{device_name}: B={args.batch} S_img={args.img} H={args.heads} D={args.head_dim} {dtype_name}; "
        f"peak HBM {f'{peak:.0f} GB/s' if peak else 'unknown (--peak-gbps)'}"
    )
    candidates = {
        "diffusers eager": diffusers_sequence,
        "ours torch": ours("torch"),
        "torch.compile(diffusers)": torch.compile(diffusers_sequence),
        "ours triton": ours("triton"),
    }
    per_sample = {
        "per-sample diffusers loop": diffusers_per_sample,
        "per-sample ours torch": ours("torch"),
        "per-sample ours triton": ours("triton"),
    }
    single = {
        "1-stream diffusers eager": diffusers_single,
        "1-stream ours torch": ours_single("torch"),
        "1-stream torch.compile(diffusers)": torch.compile(diffusers_single),
        "1-stream ours triton": ours_single("triton"),
    }
    header = f"{'S_txt':>6}  {'pass':<10}{'implementation':<36}{'µs':>10}{'GB/s':>10}{'% peak':>8}"
    print(header)
    print("-" * len(header))
    for txt in args.full_txt:
        layouts = (
            (candidates, make_case(args, dtype, device, txt=txt, requires_grad=True), {}),
            (per_sample, make_case(args, dtype, device, txt=txt, requires_grad=True, batch=args.per_sample_batch,
                                   per_sample=True), dict(batch=args.per_sample_batch, per_sample=True)),
            (single, make_single_case(args, dtype, device, txt, requires_grad=True), dict(per_sample=True)),
        )
        for fns, case, sizes in layouts:
            for pass_name in PASSES:
                moved = bytes_moved(args, dtype, txt, backward=pass_name == "fwd+bwd", **sizes)
                rows = dict(fns)
                if fns is single and pass_name == "fwd":
                    rows["1-stream ours triton in place"] = ours_single("triton", in_place=True)
                for name, fn in rows.items():
                    us = microseconds(step(fn, case, pass_name), device, args.repeats)
                    gbps = moved / us / 1e3
                    share = f"{100 * gbps / peak:.0f}" if peak else "-"
                    print(f"{txt:>6}  {pass_name:<10}{name:<36}{us:>10.1f}{gbps:>10.0f}{share:>8}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both", help="CPU table dtypes")
    parser.add_argument("--txt", type=int, default=512, help="text tokens of the CPU table")
    parser.add_argument("--img", type=int, default=4096, help="image tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--per-sample-batch", type=int, default=2, help="samples of the per-sample-table rows")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per candidate on CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU table")
    parser.add_argument("--full", action="store_true", help="print the full table on this device even without CUDA")
    parser.add_argument("--full-txt", type=int, nargs="+", default=[512, 1024], help="text widths of the full table")
    parser.add_argument("--full-dtype", choices=list(DTYPES), default="bf16", help="dtype of the full table")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak HBM bandwidth (default: by GPU name)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    """Print the CPU table, and the full table on CUDA (or with ``--full``)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_cpu:
        cpu_table(args, list(DTYPES) if args.dtype == "both" else [args.dtype])
    if torch.cuda.is_available():
        full_table(args, args.full_dtype, "cuda")
    elif args.full:
        full_table(args, args.full_dtype, "cpu")
    else:
        print("\nno CUDA device: the full table (Triton, torch.compile, GB/s, % of peak) runs on a GPU")


if __name__ == "__main__":
    main()
