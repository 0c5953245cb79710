"""One forward of our QwenImageTransformer2DModel vs diffusers' class on the same weights.

Qwen-Image's full width per layer (24 heads x 128 = 3072 hidden, joint_attention_dim 3584,
in/out channels 64/16) with reduced depth (``--layers``, default 2). Defaults: CUDA with bf16 and
a 1024x1024 image (4096 image tokens) when a GPU is present; otherwise CPU with fp32 and a
512x512 image (1024 image tokens), because a 1024x1024 forward takes tens of seconds per model
on a small CPU. Prints the median time of each, the ratio diffusers/ours and the max |diff|.

With ``--compile regional`` (or ``full``) both models are then compiled in place and timed again:
the compiled medians, eager/compiled speed-ups and each compiled output's max |diff| from the eager
diffusers output are printed too. ``--json PATH`` also writes every figure to a JSON file.

    python benchmarks/bench_transformer.py [--layers 2] [--image 1024] [--txt 512] [--dtype bf16]
    python benchmarks/bench_transformer.py --device cuda --layers 8 --compile regional --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel as DiffusersTransformer
from torch import nn

from qwen_image_omni import QwenImageTransformer2DModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Qwen-Image's transformer config, except num_layers (and num_attention_heads with --heads).
QWEN_IMAGE_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "axes_dims_rope": (16, 56, 56),
}
PIXELS_PER_LATENT_TOKEN = 16  # 8x VAE downsampling, 2x2 patches
DEFAULTS = {  # device type -> (image side in pixels, dtype, timed repeats)
    "cuda": (1024, "bf16", 20),
    "cpu": (512, "fp32", 3),
}
COMPILE_MODES = {  # --compile -> what is compiled, as the output says it
    "none": "nothing",
    "regional": "regional: compile_repeated_blocks(fullgraph=True), each transformer block compiled, the rest eager",
    "full": "full: the whole model, torch.compile(fullgraph=True)",
}
MODELS = ("diffusers", "ours")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; unset ones get the device's defaults from :data:`DEFAULTS`."""
    parser = argparse.ArgumentParser(prog="bench_transformer.py", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2; Qwen-Image has 60)")
    parser.add_argument("--image", type=int, help="image side in pixels (default 1024 on CUDA, 512 on CPU)")
    parser.add_argument("--txt", type=int, default=512, help="text tokens, all valid (default 512)")
    parser.add_argument("--dtype", choices=DTYPES, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", help="default cuda when available, else cpu")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per model and mode (default 1)")
    parser.add_argument("--repeats", type=int, help="timed forwards per model (default 20 on CUDA, 3 on CPU)")
    parser.add_argument(
        "--heads",
        type=int,
        default=QWEN_IMAGE_CONFIG["num_attention_heads"],
        help=f"heads of {QWEN_IMAGE_CONFIG['attention_head_dim']} (default Qwen-Image's; fewer for a quick run)",
    )
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none", help="also time compiled models")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    image, dtype, repeats = DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"]
    args.image = args.image or image
    args.dtype = args.dtype or dtype
    args.repeats = args.repeats or repeats
    for name in ("layers", "image", "txt", "repeats", "heads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.compile != "none" and args.warmup < 1:
        parser.error("--compile needs --warmup >= 1, so that compiling is not timed")
    if args.image % PIXELS_PER_LATENT_TOKEN:
        parser.error(f"--image must be a multiple of {PIXELS_PER_LATENT_TOKEN} pixels, got {args.image}")
    return args


def model_config(layers: int, heads: int) -> dict:
    """Qwen-Image's config with ``layers`` blocks of ``heads`` heads."""
    return dict(QWEN_IMAGE_CONFIG, num_layers=layers, num_attention_heads=heads)


def build_models(config: dict, dtype: torch.dtype, device: torch.device) -> dict[str, nn.Module]:
    """diffusers' model and ours with the same random weights, on ``device`` in ``dtype``."""
    # Built on the device: initialising billions of parameters on the host takes seconds per layer.
    with torch.device(device):
        torch.manual_seed(0)
        reference = DiffusersTransformer(**config)
        ours = QwenImageTransformer2DModel(**config)
    ours.load_state_dict(reference.state_dict())
    # nn.Module.to: ModelMixin.to warns about fp32-kept modules on every dtype cast, and there are none.
    return {name: nn.Module.to(m, device=device, dtype=dtype).eval() for name, m in zip(MODELS, (reference, ours))}


def make_inputs(image: int, txt: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Forward kwargs: one image, one prompt with every token valid (the pipeline then passes no mask)."""
    side = image // PIXELS_PER_LATENT_TOKEN
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, side * side, QWEN_IMAGE_CONFIG["in_channels"], generator=generator)
    text = torch.randn(1, txt, QWEN_IMAGE_CONFIG["joint_attention_dim"], generator=generator)
    return {
        "hidden_states": hidden.to(device, dtype),
        "encoder_hidden_states": text.to(device, dtype),
        "encoder_hidden_states_mask": None,
        "timestep": torch.tensor([0.5], device=device),
        "img_shapes": [[(1, side, side)]],
        "return_dict": False,
    }


def timed_forward(model: nn.Module, inputs: dict, device: torch.device) -> tuple[float, torch.Tensor]:
    """Milliseconds of one forward (synchronised on CUDA) and its output."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    output = model(**inputs)[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3, output


def measure(models: dict, inputs: dict, device: torch.device, warmup: int, repeats: int) -> dict:
    """Per model: the first call's and the median timed call's milliseconds, and the last output.

    The models alternate call by call, so that load from other processes hits them alike. The
    first call of a freshly compiled model includes its compilation.
    """
    times = {name: [] for name in models}
    outputs = {}
    with torch.inference_mode():
        for _ in range(warmup + repeats):
            for name, model in models.items():
                ms, outputs[name] = timed_forward(model, inputs, device)
                times[name].append(ms)
    return {
        name: {"first_ms": values[0], "median_ms": statistics.median(values[warmup:]), "output": outputs[name]}
        for name, values in times.items()
    }


def compile_in_place(model: nn.Module, mode: str) -> None:
    """Compile ``model`` as ``--compile`` says (see :data:`COMPILE_MODES`)."""
    if mode == "regional":
        model.compile_repeated_blocks(fullgraph=True)
    else:
        model.compile(fullgraph=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute elementwise difference, computed in fp32."""
    return (a.float() - b.float()).abs().max().item()


def machine(device: torch.device) -> str:
    """The GPU name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "cpu")
    return f"{name}, {torch.get_num_threads()} threads"


def summarise(runs: dict) -> dict:
    """JSON-ready figures per mode: medians, diffusers/ours, max |diff| vs eager diffusers, speed-ups."""
    reference = runs["eager"]["diffusers"]["output"]
    figures = {}
    for mode, run in runs.items():
        row = {f"{name}_{key}": run[name][key] for name in MODELS for key in ("median_ms", "first_ms")}
        row["diffusers_over_ours"] = run["diffusers"]["median_ms"] / run["ours"]["median_ms"]
        row["max_diff_ours_vs_diffusers"] = max_diff(run["ours"]["output"], run["diffusers"]["output"])
        for name in MODELS:
            row[f"{name}_max_diff_vs_eager_diffusers"] = max_diff(run[name]["output"], reference)
            row[f"{name}_eager_over_this"] = runs["eager"][name]["median_ms"] / run[name]["median_ms"]
        figures[mode] = row
    return figures


def print_header(args: argparse.Namespace, config: dict) -> None:
    """What is measured: model width, device, shape and timing."""
    side = args.image // PIXELS_PER_LATENT_TOKEN
    cpu_note = " (CPU default; 1024x1024 on CUDA)" if args.device.type == "cpu" and args.image == 512 else ""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    print(
        f"bench_transformer: one forward, Qwen-Image width ({heads} heads x {head_dim} = {heads * head_dim}, "
        f"joint_attention_dim {config['joint_attention_dim']}), num_layers {args.layers}"
    )
    print(f"device: {args.device} ({machine(args.device)}), torch {torch.__version__}, dtype {args.dtype}")
    print(
        f"shape:  image {args.image}x{args.image}{cpu_note} -> img_shapes [[(1, {side}, {side})]] = "
        f"{side * side} image tokens, text {args.txt} tokens (all valid, no mask), batch 1"
    )
    print(f"timing: {args.warmup} warm-up + median of {args.repeats}, the two models alternating", flush=True)


def print_eager(row: dict) -> None:
    """The eager medians, their ratio and the max |diff| between the two models."""
    for name in MODELS:
        print(f"{name:<10} {row[f'{name}_median_ms']:10.1f} ms")
    print(f"ratio diffusers/ours: {row['diffusers_over_ours']:.2f}x")
    print(f"max |diff| ours vs diffusers: {row['max_diff_ours_vs_diffusers']:.1e}")


def print_compiled(mode: str, row: dict) -> None:
    """The compiled medians with their speed-ups over eager and their max |diff| from eager diffusers."""
    print(f"\ncompiled ({COMPILE_MODES[mode]}):")
    for name in MODELS:
        print(
            f"{name:<10} {row[f'{name}_median_ms']:10.1f} ms   eager/compiled {row[f'{name}_eager_over_this']:.2f}x   "
            f"max |diff| vs eager diffusers {row[f'{name}_max_diff_vs_eager_diffusers']:.1e}   "
            f"first call (compiling) {row[f'{name}_first_ms'] / 1e3:.1f} s"
        )
    print(f"ratio diffusers/ours (compiled): {row['diffusers_over_ours']:.2f}x")
    print(f"max |diff| ours vs diffusers (compiled): {row['max_diff_ours_vs_diffusers']:.1e}")


def write_json(path: Path, args: argparse.Namespace, config: dict, figures: dict) -> None:
    """The run's settings and figures as JSON (read by benchmarks/gpu_check.py)."""
    side = args.image // PIXELS_PER_LATENT_TOKEN
    record = {
        "device": str(args.device),
        "machine": machine(args.device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "layers": args.layers,
        "heads": config["num_attention_heads"],
        "head_dim": config["attention_head_dim"],
        "image_tokens": side * side,
        "text_tokens": args.txt,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "compile": COMPILE_MODES[args.compile],
        "modes": figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the results; returns 0."""
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    config = model_config(args.layers, args.heads)
    print_header(args, config)

    models = build_models(config, dtype, args.device)
    inputs = make_inputs(args.image, args.txt, dtype, args.device)
    runs = {"eager": measure(models, inputs, args.device, args.warmup, args.repeats)}
    if args.compile != "none":
        for model in models.values():
            compile_in_place(model, args.compile)
        runs[args.compile] = measure(models, inputs, args.device, args.warmup, args.repeats)

    figures = summarise(runs)
    print_eager(figures["eager"])
    if args.compile != "none":
        print_compiled(args.compile, figures[args.compile])
    if args.json:
        write_json(args.json, args, config, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
