"""Forward-only timing: diffusers' q/k RMSNorm + RoPE + cat vs ``joint_qk_norm_rope``.

The diffusers side is exactly what ``QwenDoubleStreamAttnProcessor2_0`` does to q and k:
2 x RMSNorm per stream, 4 x ``apply_rotary_emb_qwen(use_real=False)`` and 2 x ``torch.cat``.
Runs on CPU, and on CUDA too when a GPU is present. The candidates are timed in turns (one call
each per round) so that load from other processes hits them alike; the table shows medians.

    python benchmarks/bench_qk_norm_rope.py --dtype both --txt 512 --img 4096 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from qwen_image_omni.kernels import joint_qk_norm_rope

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NAMES = ("img_q", "img_k", "txt_q", "txt_k")


def make_case(args, dtype: torch.dtype, device: str) -> dict:
    """Activations as the processor has them (linear outputs viewed as heads), RMSNorms and tables."""
    gen = torch.Generator().manual_seed(0)
    heads, head_dim = args.heads, args.head_dim
    case = {}
    for name in NAMES:
        seq = args.img if name.startswith("img") else args.txt
        x = torch.randn(args.batch, seq, heads * head_dim, generator=gen)
        case[name] = x.to(device=device, dtype=dtype).unflatten(-1, (heads, head_dim))
        norm = RMSNorm(head_dim, eps=1e-6).to(device=device, dtype=dtype)
        norm.weight.data.copy_(torch.rand(head_dim, generator=gen) + 0.5)
        case[f"{name}_norm"] = norm
    for stream, seq in (("img", args.img), ("txt", args.txt)):
        angles = torch.rand(seq, head_dim // 2, generator=gen) * 100
        case[f"{stream}_freqs"] = torch.polar(torch.ones_like(angles), angles).to(device)
    return case


def diffusers_sequence(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """What diffusers' attention processor does to q and k."""
    out = {}
    for name in NAMES:
        x = case[f"{name}_norm"](case[name])
        out[name] = apply_rotary_emb_qwen(x, case[f"{name[:3]}_freqs"], use_real=False)
    return torch.cat([out["txt_q"], out["img_q"]], dim=1), torch.cat([out["txt_k"], out["img_k"]], dim=1)


def torch_backend(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``joint_qk_norm_rope`` with the eager torch backend."""
    weights = {f"{name}_weight": case[f"{name}_norm"].weight for name in NAMES}
    return joint_qk_norm_rope(
        *(case[name] for name in NAMES),
        **weights,
        img_freqs=case["img_freqs"],
        txt_freqs=case["txt_freqs"],
        backend="torch",
    )


def time_in_turns(fns: dict, case: dict, device: str, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call for each function, measured in alternating rounds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn(case)
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(case)
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def bit_exact_fraction(case: dict) -> float:
    """Share of output elements equal bit for bit to diffusers' (q and k together)."""
    expected, got = diffusers_sequence(case), torch_backend(case)
    equal = sum((e == g).sum().item() for e, g in zip(expected, got))
    return equal / sum(e.numel() for e in expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--txt", type=int, default=512, help="text tokens")
    parser.add_argument("--img", type=int, default=4096, help="image tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per candidate (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    candidates = {"diffusers": diffusers_sequence, "torch": torch_backend}

    print(
        f"B={args.batch} S_txt={args.txt} S_img={args.img} H={args.heads} D={args.head_dim}, "
        f"forward only, median (min) of {args.repeats}, CPU threads={torch.get_num_threads()}"
    )
    header = f"{'device':<7}{'dtype':<6}{'diffusers ms':>20}{'torch ms':>20}{'speed-up':>10}{'bit-exact':>11}"
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for device in devices:
            for dtype_name in dtypes:
                case = make_case(args, DTYPES[dtype_name], device)
                exact = bit_exact_fraction(case)
                times = time_in_turns(candidates, case, device, args.repeats, args.warmup)
                med = {name: statistics.median(t) for name, t in times.items()}
                low = {name: min(t) for name, t in times.items()}
                cells = "".join(f"{f'{med[n]:.1f} ({low[n]:.1f})':>20}" for n in candidates)
                print(f"{device:<7}{dtype_name:<6}{cells}{med['diffusers'] / med['torch']:>9.2f}x{exact:>11.6f}")


if __name__ == "__main__":
    main()
