"""A diffusers checkpoint's transformer folder, checked before any (slow) load; the dtype names the CLI takes.

Shared by ``qwen-image-omni check --model`` and ``qwen-image-omni generate``: every error is a
``ValueError`` naming the command-line option it concerns.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# What from_pretrained reads, in the order it looks: one of them must be in the component's folder.
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)
TRANSFORMER_CLASS = "QwenImageTransformer2DModel"
# Config keys without which from_pretrained would silently build diffusers' default (a 60-layer model).
REQUIRED_CONFIG_KEYS = ("in_channels", "num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim")


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` / ``bf16`` / ``fp16``."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def resolve_transformer_dir(path: str) -> tuple[str, str | None]:
    """``(root, subfolder)`` for ``from_pretrained``: ``PATH/transformer`` or PATH itself.

    Raises:
        ValueError: neither ``PATH/transformer/config.json`` nor ``PATH/config.json`` exists.
    """
    root = Path(path)
    if (root / "transformer" / "config.json").is_file():
        return str(root), "transformer"
    if (root / "config.json").is_file():
        return str(root), None
    raise ValueError(
        f"--model: expected a diffusers checkpoint directory holding transformer/config.json "
        f"or config.json, got {path!r}"
    )


def read_json(path: Path, option: str) -> dict:
    """A JSON object from ``path``; ``ValueError`` naming ``option`` when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{option}: cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{option}: {path} is not a JSON object")
    return data


def check_weights(folder: Path, names: tuple[str, ...], option: str) -> None:
    """``ValueError`` naming ``option`` unless ``folder`` holds one of the weight files ``names``."""
    if not any((folder / name).is_file() for name in names):
        raise ValueError(f"{option}: {folder} holds no weights; expected one of {', '.join(names)}")


def check_transformer_folder(folder: Path, option: str) -> dict:
    """The config of a Qwen-Image transformer folder, checked before any (slow) load.

    Raises:
        ValueError: naming ``option``: ``config.json`` unreadable or not a JSON object, naming
            another class, lacking a size or holding one that is not a positive int; no weights.
    """
    config_path = folder / "config.json"
    config = read_json(config_path, option)
    class_name = config.get("_class_name", TRANSFORMER_CLASS)
    if class_name != TRANSFORMER_CLASS:
        raise ValueError(f"{option}: {config_path} is the config of a {class_name!r}, not of a {TRANSFORMER_CLASS}")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"{option}: {config_path} lacks {', '.join(missing)}; not a {TRANSFORMER_CLASS} config")
    for key in REQUIRED_CONFIG_KEYS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{option}: {config_path}: {key} must be a positive int, got {value!r}")
    check_weights(folder, DIFFUSERS_WEIGHTS, option)
    return config


def summarize(error: BaseException, lines: int = 2) -> str:
    """The first ``lines`` lines of an error message on one line (a state-dict error lists every tensor)."""
    text = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    more = f" (and {len(text) - lines} more lines)" if len(text) > lines else ""
    return " ".join(text[:lines]) + more
