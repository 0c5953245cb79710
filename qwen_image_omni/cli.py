"""The ``qwen-image-omni`` command line: ``check``, ``generate`` and ``bench``, a thin front end.

``check`` compares ours, diffusers' class and the legacy vllm-omni text RoPE length on padded
prompts (:mod:`qwen_image_omni.check`). ``generate`` makes an image from a prompt with diffusers'
Qwen-Image pipeline running our transformer (:mod:`qwen_image_omni.generate`). ``bench`` runs the
benchmark scripts of a source checkout (``benchmarks/``, not installed with the package).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import torch

from .checkpoint import DTYPES

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's largest seed

BENCHMARKS = {
    "transformer": "bench_transformer.py",
    "qk-norm-rope": "bench_qk_norm_rope.py",
    "rollout-kl": "rollout_trainer_kl.py",
    "kernel-static": "kernel_static.py",
}


def parse_device(name: str | None) -> torch.device:
    """``--device``: the named device, or cuda when available and cpu otherwise.

    Raises:
        ValueError: the name is not a torch device, or it is cuda and no GPU is available.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected a torch device such as cpu or cuda:0, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name!r} requested but torch.cuda.is_available() is False")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device: {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def check(args: argparse.Namespace) -> int:
    """``qwen-image-omni check``: :func:`qwen_image_omni.check.run_check`, or with ``--vllm-omni`` the
    vllm-omni plugin report (:func:`qwen_image_omni.integrations.vllm_omni.check.check_vllm_omni`).
    """
    if args.vllm_omni:
        from .integrations.vllm_omni.check import check_vllm_omni

        return check_vllm_omni()
    # Imported here, so that generate and bench never load the check harness.
    from .check import run_check

    device = parse_device(args.device)
    return run_check(args.model, DTYPES[args.dtype or ("bf16" if args.model else "fp32")], device)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def seed(text: str) -> int:
    """argparse type: a seed ``torch.Generator.manual_seed`` takes, an integer in ``[0, 2**64 - 1]``."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64 - 1], got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` parse as floats but scale nothing)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def generate(args: argparse.Namespace) -> int:
    """``qwen-image-omni generate``: one text-to-image run, see :mod:`qwen_image_omni.generate`."""
    # Imported here, so that check and bench never depend on diffusers' pipeline modules.
    from .generate import run_generate

    device = parse_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    return run_generate(args, device, dtype)


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source checkout this package runs from (an editable install or a clone)."""
    return Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_scripts(name: str) -> list[Path]:
    """The scripts ``bench NAME`` runs, all checked to exist before any runs.

    Raises:
        ValueError: a script is missing: the benchmarks are scripts of the source tree, not part
            of the installed package, and the message says where to run them.
    """
    names = list(BENCHMARKS) if name == "all" else [name]
    scripts = [benchmarks_dir() / BENCHMARKS[n] for n in names]
    missing = [script for script in scripts if not script.is_file()]
    if missing:
        raise ValueError(
            f"benchmark {name!r}: {missing[0]} is missing; the benchmarks are scripts of the source tree "
            f"(benchmarks/ in a clone of qwen-image-omni), not installed with the package: in a clone, run "
            f"`make bench` or `python benchmarks/{missing[0].name}`"
        )
    return scripts


def bench(args: argparse.Namespace) -> int:
    """``qwen-image-omni bench [NAME] [ARGS...]``: run one benchmark script (or all), each in its own process.

    Returns the largest exit status of the scripts run.
    """
    if args.name == "all" and args.args:
        raise ValueError(f"bench: arguments go to one benchmark; name one of {list(BENCHMARKS)}, got 'all'")
    scripts = benchmark_scripts(args.name)
    return max(subprocess.call([sys.executable, str(script), *args.args]) for script in scripts)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qwen-image-omni``."""
    parser = argparse.ArgumentParser(prog="qwen-image-omni", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check_parser = commands.add_parser(
        "check",
        help="compare ours, diffusers and the legacy vllm-omni text RoPE length on padded prompts",
        description="Compare ours, diffusers' class and the legacy vllm-omni text RoPE length on padded "
        "CFG prompts. Without --model, on a tiny random-weight transformer built in code.",
    )
    check_parser.add_argument(
        "--model", metavar="PATH", help="diffusers checkpoint (PATH/transformer, or PATH holding config.json)"
    )
    check_parser.add_argument("--dtype", choices=DTYPES, help="default: fp32 (tiny model), bf16 (--model)")
    check_parser.add_argument("--device", help="default: cuda when available, else cpu")
    check_parser.add_argument(
        "--vllm-omni",
        action="store_true",
        help="instead: is vllm-omni installed, does our plugin load and take every Qwen-Image architecture, "
        "which engine features run on ours (exit 1 when the plugin fails)",
    )
    check_parser.set_defaults(func=check)

    generate_parser = commands.add_parser(
        "generate",
        help="text-to-image with a diffusers Qwen-Image checkpoint, running our transformer",
        description="Text-to-image with diffusers' QwenImagePipeline on a local diffusers Qwen-Image checkpoint "
        "(model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/), its transformer "
        "replaced by ours. Nothing is downloaded.",
    )
    generate_parser.add_argument(
        "--model", metavar="PATH", required=True, help="diffusers Qwen-Image checkpoint directory"
    )
    generate_parser.add_argument("--prompt", metavar="TEXT", required=True)
    generate_parser.add_argument("--out", metavar="FILE.png", required=True, help="where to write the image")
    generate_parser.add_argument(
        "--negative-prompt", metavar="TEXT", help="enables true CFG (Qwen-Image's examples use ' '); default: no CFG"
    )
    size_help = "pixels, a multiple of 16; default: the pipeline's (1024)"
    generate_parser.add_argument("--height", type=positive_int, help=size_help)
    generate_parser.add_argument("--width", type=positive_int, help=size_help)
    generate_parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default: 50)")
    generate_parser.add_argument(
        "--true-cfg-scale", type=finite_float, metavar="SCALE",
        help="CFG scale with --negative-prompt, above 1 (default: 4.0)",
    )  # fmt: skip
    generate_parser.add_argument("--seed", type=seed, help="noise seed in [0, 2**64 - 1] (default: random, printed)")
    generate_parser.add_argument("--dtype", choices=DTYPES, help="default: bf16 on cuda, fp32 on cpu")
    generate_parser.add_argument("--device", help="default: cuda when available, else cpu")
    generate_parser.set_defaults(func=generate)

    bench_parser = commands.add_parser(
        "bench",
        help="run the benchmark scripts of a source checkout",
        description="Run the scripts of benchmarks/ (" + ", ".join(f"{n}: {f}" for n, f in BENCHMARKS.items()) + "); "
        "arguments after NAME go to that script (see `qwen-image-omni bench transformer --help`).",
    )
    bench_parser.add_argument("name", nargs="?", default="all", choices=[*BENCHMARKS, "all"])
    bench_parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench_parser.set_defaults(func=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``qwen-image-omni``; returns the exit status (2 for usage errors).

    A bad argument argparse cannot see (a checkpoint that does not load, a size that does not fit)
    is one line on stderr, ``qwen-image-omni COMMAND: error: ...``, as argparse words its own.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except ValueError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
