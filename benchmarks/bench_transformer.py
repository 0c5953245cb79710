"""One forward of our QwenImageTransformer2DModel vs diffusers' class on the same weights.

Qwen-Image's full width per layer (24 heads x 128 = 3072 hidden, joint_attention_dim 3584,
in/out channels 64/16) with reduced depth (``--layers``, default 2). Defaults: CUDA with bf16 and
a 1024x1024 image (4096 image tokens) when a GPU is present; otherwise CPU with fp32 and a
512x512 image (1024 image tokens), because a 1024x1024 forward takes tens of seconds per model
on a small CPU. Prints the median time of each, the ratio diffusers/ours and the max |diff|.

    python benchmarks/bench_transformer.py [--layers 2] [--image 1024] [--txt 512] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel as DiffusersTransformer
from torch import nn

from qwen_image_omni import QwenImageTransformer2DModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Qwen-Image's transformer config, except num_layers.
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; unset ones get the device's defaults from :data:`DEFAULTS`."""
    parser = argparse.ArgumentParser(prog="bench_transformer.py", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2; Qwen-Image has 60)")
    parser.add_argument("--image", type=int, help="image side in pixels (default 1024 on CUDA, 512 on CPU)")
    parser.add_argument("--txt", type=int, default=512, help="text tokens, all valid (default 512)")
    parser.add_argument("--dtype", choices=DTYPES, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", help="default cuda when available, else cpu")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per model (default 1)")
    parser.add_argument("--repeats", type=int, help="timed forwards per model (default 20 on CUDA, 3 on CPU)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    image, dtype, repeats = DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"]
    args.image = args.image or image
    args.dtype = args.dtype or dtype
    args.repeats = args.repeats or repeats
    for name in ("layers", "image", "txt", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.image % PIXELS_PER_LATENT_TOKEN:
        parser.error(f"--image must be a multiple of {PIXELS_PER_LATENT_TOKEN} pixels, got {args.image}")
    return args


def build_models(layers: int, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """diffusers' model and ours with the same random weights, on ``device`` in ``dtype``."""
    config = dict(QWEN_IMAGE_CONFIG, num_layers=layers)
    torch.manual_seed(0)
    reference = DiffusersTransformer(**config)
    ours = QwenImageTransformer2DModel(**config)
    ours.load_state_dict(reference.state_dict())
    # nn.Module.to: ModelMixin.to warns about fp32-kept modules on every dtype cast, and there are none.
    return tuple(nn.Module.to(m, device=device, dtype=dtype).eval() for m in (reference, ours))


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


def machine(device: torch.device) -> str:
    """The GPU name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "cpu")
    return f"{name}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; returns 0."""
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    side = args.image // PIXELS_PER_LATENT_TOKEN
    cpu_note = " (CPU default; 1024x1024 on CUDA)" if args.device.type == "cpu" and args.image == 512 else ""
    heads, head_dim = QWEN_IMAGE_CONFIG["num_attention_heads"], QWEN_IMAGE_CONFIG["attention_head_dim"]
    print(
        f"bench_transformer: one forward, Qwen-Image width ({heads} heads x {head_dim} = {heads * head_dim}, "
        f"joint_attention_dim {QWEN_IMAGE_CONFIG['joint_attention_dim']}), num_layers {args.layers}"
    )
    print(f"device: {args.device} ({machine(args.device)}), torch {torch.__version__}, dtype {args.dtype}")
    print(
        f"shape:  image {args.image}x{args.image}{cpu_note} -> img_shapes [[(1, {side}, {side})]] = "
        f"{side * side} image tokens, text {args.txt} tokens (all valid, no mask), batch 1"
    )
    print(f"timing: {args.warmup} warm-up + median of {args.repeats}, the two models alternating", flush=True)

    models = dict(zip(("diffusers", "ours"), build_models(args.layers, dtype, args.device)))
    inputs = make_inputs(args.image, args.txt, dtype, args.device)
    times = {name: [] for name in models}
    outputs = {}
    with torch.inference_mode():
        for step in range(args.warmup + args.repeats):
            for name, model in models.items():
                ms, outputs[name] = timed_forward(model, inputs, args.device)
                if step >= args.warmup:
                    times[name].append(ms)

    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, ms in medians.items():
        print(f"{name:<10} {ms:10.1f} ms")
    print(f"ratio diffusers/ours: {medians['diffusers'] / medians['ours']:.2f}x")
    diff = (outputs["ours"].float() - outputs["diffusers"].float()).abs().max().item()
    print(f"max |diff| ours vs diffusers: {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
