"""verl-omni's own Qwen-Image adapters, for tests that compare ours with them in one process.

Once :mod:`qwen_image_omni.integrations.verl_omni` is imported (any test may do so), verl-omni's
registry maps the Qwen-Image keys to our adapters, so verl-omni's dispatchers would run ours on
both sides of a comparison. Inside :func:`verl_omni_own_adapters` they run verl-omni's again.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

VERL_OMNI_ADAPTERS: dict[tuple[str, str], str] = {
    ("QwenImagePipeline", "flow_grpo"): "verl_omni.pipelines.qwen_image_flow_grpo.diffusers_training_adapter.QwenImage",
    (
        "QwenImagePipeline",
        "mix_grpo",
    ): "verl_omni.pipelines.qwen_image_mix_grpo.diffusers_training_adapter.QwenImageMixGRPO",
    ("QwenImagePipeline", "dpo"): "verl_omni.pipelines.qwen_image_dpo.diffusers_training_adapter.QwenImageDPO",
    ("QwenImagePipeline", "diffusion_nft"): (
        "verl_omni.pipelines.qwen_image_diffusion_nft.diffusers_training_adapter.QwenImageDiffusionNFT"
    ),
    ("QwenImageEditPlusPipeline", "flow_grpo"): (
        "verl_omni.pipelines.qwen_image_edit_flow_grpo.diffusers_training_adapter.QwenImageEditPlusFlowGRPO"
    ),
}
"""verl-omni main's built-in Qwen-Image adapter classes, by registry key."""


def verl_omni_adapter_class(key: tuple[str, str]) -> type:
    """verl-omni's own adapter class for ``key`` (its module attribute, whatever the registry holds now)."""
    module, _, name = VERL_OMNI_ADAPTERS[key].rpartition(".")
    return getattr(importlib.import_module(module), name)


@contextmanager
def verl_omni_own_adapters() -> Iterator[None]:
    """Inside, verl-omni's registry holds its own Qwen-Image adapters; restored on exit."""
    from verl_omni.pipelines.model_base import DiffusionModelBase

    registry = DiffusionModelBase._registry
    saved = {key: registry.get(key) for key in VERL_OMNI_ADAPTERS}
    registry.update({key: verl_omni_adapter_class(key) for key in VERL_OMNI_ADAPTERS})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                registry.pop(key, None)
            else:
                registry[key] = value
