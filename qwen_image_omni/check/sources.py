"""Where ``qwen-image-omni check`` takes its weights from: a tiny random model built in code, or a checkpoint."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel as DiffusersTransformer
from diffusers.utils import is_accelerate_available
from torch import nn

from ..checkpoint import check_transformer_folder, resolve_transformer_dir, summarize

# The embedded default: a small random-weight Qwen-Image transformer, nothing downloaded.
TINY_CONFIG = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "axes_dims_rope": (8, 12, 12),
}
TINY_SEED = 0


@dataclass
class ModelSource:
    """Where the weights of ``check`` come from: a description, the config and a loader.

    ``load(cls, dtype)`` returns a ``cls`` instance (ours or diffusers' class) holding the source's
    weights in ``dtype``, on the CPU.
    """

    description: str
    config: dict
    load: Callable[[type, torch.dtype], nn.Module]


def tiny_source() -> ModelSource:
    """The embedded default: :data:`TINY_CONFIG` with weights drawn from seed :data:`TINY_SEED`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        state = DiffusersTransformer(**TINY_CONFIG).state_dict()

    def load(cls: type, dtype: torch.dtype) -> nn.Module:
        model = cls(**TINY_CONFIG)
        model.load_state_dict(state, strict=True)
        # nn.Module.to: ModelMixin.to warns about fp32-kept modules on every dtype cast, and there are none.
        return nn.Module.to(model, dtype)

    heads, head_dim = TINY_CONFIG["num_attention_heads"], TINY_CONFIG["attention_head_dim"]
    description = (
        f"tiny random Qwen-Image transformer (seed {TINY_SEED}: {TINY_CONFIG['num_layers']} layers, "
        f"{heads} heads x {head_dim}, joint_attention_dim {TINY_CONFIG['joint_attention_dim']}, "
        f"in/out channels {TINY_CONFIG['in_channels']}/{TINY_CONFIG['out_channels']})"
    )
    return ModelSource(description, dict(TINY_CONFIG), load)


def pretrained_source(path: str) -> ModelSource:
    """A checkpoint's transformer in diffusers layout, loaded with ``from_pretrained`` by each class.

    Raises:
        ValueError: ``--model: ...`` for a folder that is no Qwen-Image transformer (see
            :func:`check_transformer_folder`); later, from ``load``, for weights that do not load.
    """
    root, subfolder = resolve_transformer_dir(path)
    location = str(Path(root) / subfolder) if subfolder else root
    config = check_transformer_folder(Path(location), "--model")

    def load(cls: type, dtype: torch.dtype) -> nn.Module:
        # Explicit, so diffusers does not warn on every load when accelerate is missing.
        low_cpu_mem_usage = is_accelerate_available()
        try:
            return cls.from_pretrained(
                root, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=low_cpu_mem_usage
            )
        except (OSError, RuntimeError, ValueError) as error:  # unreadable weights, or weights not fitting the config
            raise ValueError(f"--model: cannot load the transformer in {location}: {summarize(error)}") from None

    description = (
        f"{location} ({config['num_layers']} layers, {config['num_attention_heads']} heads x "
        f"{config['attention_head_dim']}, joint_attention_dim {config['joint_attention_dim']})"
    )
    return ModelSource(description, config, load)


@contextlib.contextmanager
def loaded(source: ModelSource, cls: type, dtype: torch.dtype, device: torch.device) -> Iterator[nn.Module]:
    """Context manager: one model on ``device`` in eval mode, freed on exit.

    Only one model is held at a time so that ``--model`` on a large checkpoint needs the memory of
    one transformer, not three.
    """
    model = source.load(cls, dtype).to(device).eval()
    try:
        yield model
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
