"""``qwen-image-omni generate``: text-to-image with diffusers' ``QwenImagePipeline`` running our transformer.

The checkpoint is a local diffusers Qwen-Image directory (``model_index.json``, ``transformer/``,
``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``). Its transformer weights are loaded into
our :class:`~qwen_image_omni.QwenImageTransformer2DModel` (same config and state dict as diffusers'
class); the text encoder, tokenizer, VAE and scheduler are the classes ``model_index.json`` names,
loaded by diffusers and transformers. Nothing is downloaded: every load is ``local_files_only``.

The CLI imports this module only when ``generate`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import diffusers
import torch
from diffusers import QwenImagePipeline
from diffusers.utils import is_accelerate_available
from packaging.version import Version

from .checkpoint import DIFFUSERS_WEIGHTS, check_transformer_folder, check_weights, read_json, summarize
from .models import QwenImageTransformer2DModel

PIPELINE_CLASS = "QwenImagePipeline"
COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
LAYOUT = "model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/"
# QwenImagePipeline.__call__'s default true_cfg_scale (used with a negative prompt).
DEFAULT_TRUE_CFG_SCALE = 4.0
# diffusers' AutoencoderKLQwenImage default: 3 temporal stages, 8x spatial downsampling.
DEFAULT_VAE_STAGES = 3
PATCH_SIZE = 2
# diffusers 0.40 renamed from_pretrained's torch_dtype to dtype (torch_dtype still works, with a FutureWarning).
DTYPE_KWARG = "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"
# What transformers' from_pretrained reads for the text encoder: one of them must be there.
TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_checkpoint(path: str) -> Path:
    """The checkpoint directory, after checking that it holds a diffusers ``QwenImagePipeline``.

    Raises:
        ValueError: ``--model: ...`` when the path is missing or not a directory, has no
            ``model_index.json``, names another pipeline class, lacks a component folder, its
            transformer config is invalid (:func:`~qwen_image_omni.checkpoint.check_transformer_folder`),
            or the transformer, VAE or text encoder has no weights file.
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(
            f"--model: {path!r} does not exist; expected a local diffusers Qwen-Image checkpoint directory "
            f"({LAYOUT}); nothing is downloaded"
        )
    if not root.is_dir():
        raise ValueError(
            f"--model: {path!r} is not a directory; expected a diffusers Qwen-Image checkpoint directory ({LAYOUT})"
        )
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ValueError(
            f"--model: {path!r} holds no model_index.json; expected a diffusers Qwen-Image checkpoint directory "
            f"({LAYOUT})"
        )
    index = read_json(index_path, "--model")
    class_name = index.get("_class_name")
    if class_name != PIPELINE_CLASS:
        raise ValueError(
            f"--model: {index_path} names a {class_name!r} checkpoint; generate is text-to-image and needs a "
            f"diffusers Qwen-Image checkpoint with _class_name {PIPELINE_CLASS!r}"
        )
    missing = [name for name in COMPONENTS if name not in index or not (root / name).is_dir()]
    if missing:
        raise ValueError(
            f"--model: {path!r} lacks {', '.join(name + '/' for name in missing)} (or its model_index.json entry); "
            f"a diffusers Qwen-Image checkpoint holds {LAYOUT}"
        )
    if not (root / "transformer" / "config.json").is_file():
        raise ValueError(f"--model: {path!r} holds no transformer/config.json")
    check_transformer_folder(root / "transformer", "--model")
    check_weights(root / "vae", DIFFUSERS_WEIGHTS, "--model")
    check_weights(root / "text_encoder", TRANSFORMERS_WEIGHTS, "--model")
    return root


def check_out(path: str) -> Path:
    """The output path, after checking that it is a ``.png`` file this process can write.

    The file is opened for appending (and removed again if it was new): only writing tells, for
    every user and file system (``os.access`` says yes to root on a read-only mount, and a folder
    that cannot be searched makes even ``Path.exists`` raise).

    Raises:
        ValueError: ``--out: ...`` when the name does not end in ``.png``, the path is a directory,
            its folder is missing, or the file cannot be written there.
    """
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out: expected a .png file name, got {path!r}")
    try:
        if out.is_dir():
            raise ValueError(f"--out: {path!r} is a directory; expected a .png file name")
        folder = out.parent
        if not folder.is_dir():
            what = "is not a directory" if folder.exists() else "does not exist"
            raise ValueError(f"--out: cannot write {path!r}: {str(folder)!r} {what}")
        existed = out.exists()
        with open(out, "ab"):
            pass
        if not existed:
            out.unlink()
    except OSError as error:
        raise ValueError(f"--out: cannot write {path!r}: {error.strerror or error}") from None
    return out


def size_multiple(root: Path) -> int:
    """What height and width must be multiples of: the VAE scale factor x the 2x2 latent patches (16)."""
    config = read_json(root / "vae" / "config.json", "--model") if (root / "vae" / "config.json").is_file() else {}
    stages = len(config.get("temperal_downsample") or [None] * DEFAULT_VAE_STAGES)
    return 2**stages * PATCH_SIZE


def check_size(height: int | None, width: int | None, multiple: int) -> None:
    """``ValueError`` (``--height: ...`` / ``--width: ...``) unless each given size is a multiple of ``multiple``."""
    for option, value in (("--height", height), ("--width", width)):
        if value is not None and value % multiple:
            lower = value // multiple * multiple
            suggestion = f"{lower} or {lower + multiple}" if lower else str(multiple)
            raise ValueError(
                f"{option}: must be a multiple of {multiple} (VAE scale factor x 2x2 latent patches), "
                f"got {value}; try {suggestion}"
            )


def true_cfg_scale(negative_prompt: str | None, scale: float | None) -> float:
    """The scale passed to the pipeline: 1 (no CFG) without a negative prompt, else ``scale`` or 4.

    Raises:
        ValueError: ``--true-cfg-scale`` above 1 without ``--negative-prompt``, or at most 1 with
            it: either way diffusers would silently run without guidance.
    """
    if negative_prompt is None:
        if scale is not None and scale > 1:
            raise ValueError(
                "--true-cfg-scale: classifier-free guidance needs --negative-prompt "
                "(Qwen-Image's examples use --negative-prompt ' ')"
            )
        return 1.0
    if scale is not None and scale <= 1:
        raise ValueError(
            f"--true-cfg-scale: must be above 1 with --negative-prompt, got {scale:g}; at or below 1 diffusers "
            "ignores the negative prompt and runs without guidance"
        )
    return DEFAULT_TRUE_CFG_SCALE if scale is None else scale


class _DropOurTransformerTypeWarning(logging.Filter):
    """Drops diffusers' "Expected types for transformer: (diffusers' class), got (ours)" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        ours = f"{QwenImageTransformer2DModel.__module__}.{QwenImageTransformer2DModel.__name__}"
        return not (message.startswith("Expected types for transformer:") and ours in message)


@contextlib.contextmanager
def _our_transformer_accepted() -> Iterator[None]:
    """Context manager: ours is a drop-in for diffusers' class, so its type warning is only noise."""
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    drop = _DropOurTransformerTypeWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load_pipeline(root: Path, dtype: torch.dtype, device: torch.device) -> QwenImagePipeline:
    """diffusers' ``QwenImagePipeline`` from ``root`` in ``dtype`` on ``device``, with our transformer.

    Our transformer takes the checkpoint's ``transformer/`` weights; the other components are the
    classes ``model_index.json`` names. All loads are ``local_files_only``.

    Raises:
        ValueError: ``--model: cannot load ...`` when a component's files do not load (unreadable,
            corrupt, or weights that do not fit the config).
    """
    # Explicit, so diffusers does not warn on every load when accelerate is missing.
    low_cpu_mem_usage = is_accelerate_available()
    options = {DTYPE_KWARG: dtype, "local_files_only": True, "low_cpu_mem_usage": low_cpu_mem_usage}
    try:
        transformer = QwenImageTransformer2DModel.from_pretrained(root, subfolder="transformer", **options)
        with _our_transformer_accepted():
            pipeline = QwenImagePipeline.from_pretrained(root, transformer=transformer, **options)
    except (OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"--model: cannot load {root}: {summarize(error)}") from None
    return pipeline.to(device)


def run_generate(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> int:
    """``qwen-image-omni generate``: write one image to ``args.out``; returns 0.

    Every argument is checked before the (slow) model load. Prints the settings, then diffusers'
    progress bars go to stderr.
    """
    out = check_out(args.out)
    root = check_checkpoint(args.model)
    check_size(args.height, args.width, size_multiple(root))
    cfg_scale = true_cfg_scale(args.negative_prompt, args.true_cfg_scale)
    seed = random.randrange(2**32) if args.seed is None else args.seed

    dtype_label = str(dtype).removeprefix("torch.")
    print(f"qwen-image-omni generate: {root} ({dtype_label} on {device}), seed {seed}", file=sys.stderr)
    pipeline = load_pipeline(root, dtype, device)
    # A CPU generator: the same seed gives the same starting noise on every device.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    image = pipeline(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=cfg_scale,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        generator=generator,
    ).images[0]
    try:
        image.save(out, format="PNG")
    except OSError as error:
        raise ValueError(f"--out: cannot write {args.out!r}: {error}") from None
    cfg = f"true CFG {cfg_scale:g}" if args.negative_prompt is not None else "no CFG"
    print(f"wrote {out} ({image.width}x{image.height}, {args.steps} steps, {cfg}, seed {seed})")
    return 0
