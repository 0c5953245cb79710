"""Which vllm-omni engine features our transformer supports, and the engines we leave to vllm-omni's own.

Our plugin must never take away a feature vllm-omni has with its own Qwen-Image transformer. Each
:class:`EngineFeature` says how to tell that an engine's ``OmniDiffusionConfig`` asks for the feature
and whether ours supports it. :func:`features_handed_to_vllm_omni` lists the requested features ours
does not support; the plugin's pipelines then build vllm-omni's own pipeline for that engine and log
one line saying why (:mod:`qwen_image_omni.integrations.vllm_omni.pipelines`), and ``qwen-image-omni check
--vllm-omni`` prints the same table.

This module reads only plain attributes of the config, so it imports without vllm-omni.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ENGINE_FEATURES", "EngineFeature", "features_handed_to_vllm_omni"]


def _parallel(od_config: Any, name: str, default: int = 1) -> int:
    """``od_config.parallel_config.<name>`` as an int (``default`` when unset)."""
    value = getattr(getattr(od_config, "parallel_config", None), name, None)
    return default if value is None else int(value)


def _attention_backend_selected(od_config: Any) -> bool:
    """Whether the engine names a diffusion attention backend (a default or per-role spec)."""
    config = getattr(od_config, "diffusion_attention_config", None)
    return getattr(config, "default", None) is not None or bool(getattr(config, "per_role", None))


@dataclass(frozen=True)
class EngineFeature:
    """One vllm-omni feature: how an engine asks for it, and whether our transformer supports it.

    Attributes:
        name: the feature as vllm-omni's docs call it.
        option: the engine option that turns it on, as a user writes it.
        requested: ``requested(od_config)`` is True when the engine asks for the feature.
        native: True when our transformer supports it inside vllm-omni (and tests show it).
        why: for a feature that is not native, the reason, printed when an engine is handed over.
    """

    name: str
    option: str
    requested: Callable[[Any], bool]
    native: bool
    why: str = ""


ENGINE_FEATURES: tuple[EngineFeature, ...] = (
    EngineFeature(
        "TeaCache",
        'cache_backend="tea_cache"',
        lambda c: getattr(c, "cache_backend", None) == "tea_cache",
        native=True,
    ),
    EngineFeature(
        "cache-dit",
        'cache_backend="cache_dit"',
        lambda c: getattr(c, "cache_backend", None) == "cache_dit",
        native=True,
    ),
    EngineFeature("LoRA (static)", "lora_path", lambda c: bool(getattr(c, "lora_path", None)), native=True),
    EngineFeature(
        "LoRA, distill loader",
        'lora_backend="distill"',
        lambda c: str(getattr(c, "lora_backend", "peft")).lower().endswith("distill"),
        native=False,
        why="vllm-omni's distill loader renames to_out.0 to to_out, a module only vllm-omni's transformer has",
    ),
    # A request's LoRARequest is not known at engine start, so it can never hand an engine over.
    EngineFeature("LoRA (per request, updated between requests)", "LoRARequest", lambda c: False, native=True),
    EngineFeature(
        "Layerwise offload",
        "enable_layerwise_offload",
        lambda c: (
            bool(getattr(c, "enable_layerwise_offload", False))
            or bool(getattr(c, "enable_distributed_layerwise_offload", False))
        ),
        native=True,
    ),
    EngineFeature(
        "HSDP",
        "parallel_config.use_hsdp",
        lambda c: bool(getattr(getattr(c, "parallel_config", None), "use_hsdp", False)),
        native=True,
    ),
    EngineFeature(
        "Sequence parallel, Ulysses",
        "ulysses_degree",
        lambda c: _parallel(c, "ulysses_degree") > 1 and _parallel(c, "ring_degree") == 1,
        native=True,
    ),
    EngineFeature(
        "Sequence parallel, ring",
        "ring_degree",
        lambda c: _parallel(c, "ring_degree") > 1,
        native=False,
        why="untested with ours: vllm-omni's ring kernel needs CUDA, so it cannot run in our CPU tests",
    ),
    EngineFeature(
        "Attention backend choice",
        "diffusion_attention_config / attention_backend",
        _attention_backend_selected,
        native=True,
    ),
    EngineFeature(
        "Tensor parallel",
        "tensor_parallel_size",
        lambda c: _parallel(c, "tensor_parallel_size") > 1,
        native=False,
        why="our transformer has no vllm parallel linear layers to shard",
    ),
    EngineFeature(
        "Quantization",
        "quantization_config",
        lambda c: getattr(c, "quantization_config", None) is not None,
        native=False,
        why="our transformer runs unquantized weights only",
    ),
)
"""Every vllm-omni feature the plugin knows, in the order the README's table lists them."""


def features_handed_to_vllm_omni(od_config: Any) -> list[EngineFeature]:
    """The features ``od_config`` asks for that our transformer does not support (empty: serve ours)."""
    return [feature for feature in ENGINE_FEATURES if not feature.native and feature.requested(od_config)]
