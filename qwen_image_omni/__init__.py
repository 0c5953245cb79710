"""qwen-image-omni: one Qwen-Image transformer for diffusers, vllm-omni and RL trainers.

The text RoPE length is taken from the width of ``encoder_hidden_states``, never from a
length argument, so padded prompts give the same numbers everywhere.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import QwenImageTransformer2DModel

# Top-level names are imported on first access (PEP 562), so that ``qwen_image_omni.kernels``
# imports without diffusers (a GPU image may have torch and triton only).
_LAZY = {"QwenImageTransformer2DModel": ".models"}

__all__ = ["QwenImageTransformer2DModel"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a top-level name from its module on first access, then keep it."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazy ones included."""
    return sorted(set(globals()) | set(_LAZY))
