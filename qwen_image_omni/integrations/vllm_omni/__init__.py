"""vllm-omni integration: the plugin that serves Qwen-Image with our transformer.

vllm-omni runs :func:`register` in every process through its plugin entry point
(``vllm_omni.general_plugins``: ``qwen_image_omni.integrations.vllm_omni:register``, see
``pyproject.toml``). One job per module:

- :mod:`.pipelines`: vllm-omni's Qwen-Image pipelines with our transformer (what ``register``
  points vllm-omni's registry at), :func:`~.pipelines.build_transformer` and
  :class:`~.pipelines.QwenImageOmniMixin`;
- :mod:`.features`: which engine features ours supports, and the engines handed to vllm-omni's own
  transformer (imports without vllm-omni);
- :mod:`.linear`: vllm's linear layers in our transformer, so vllm-omni's LoRA manager wraps them;
- :mod:`.parallel`: attention through vllm-omni's ``Attention`` layer, and the sequence-parallel plan;
- :mod:`.teacache`: vllm-omni's TeaCache extractor for our transformer;
- :mod:`.check`: ``qwen-image-omni check --vllm-omni`` (imports without vllm-omni).

This package imports nothing at import time: the names of :mod:`.pipelines` are importable from it
(``from qwen_image_omni.integrations.vllm_omni import QwenImagePipeline``) and load that module on
first use. Nothing here imports the RL stack (``qwen_image_omni.pipelines``): the RL rollout
pipelines on vllm-omni live with their algorithms, and an engine imports one when it asks for it by
dotted path (``load_format="custom_pipeline"``,
``custom_pipeline_name=VllmOmniPipelineBase.get_pipeline_path(architecture, algorithm)``).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__all__ = [
    "PIPELINES",
    "TRANSFORMER_PREFIX",
    "QwenImageEditPipeline",
    "QwenImageEditPlusPipeline",
    "QwenImageLayeredPipeline",
    "QwenImageOmniMixin",
    "QwenImagePipeline",
    "build_transformer",
    "get_qwen_image_edit_plus_post_process_func",
    "get_qwen_image_edit_plus_pre_process_func",
    "get_qwen_image_edit_post_process_func",
    "get_qwen_image_edit_pre_process_func",
    "get_qwen_image_layered_pre_process_func",
    "get_qwen_image_post_process_func",
    "register",
]

logger = logging.getLogger(f"vllm.{__name__}")  # under vllm's logger, as vllm's init_logger names them

_PIPELINES_MODULE = f"{__name__}.pipelines"

_ROLLOUT_PIPELINES: dict[str, str] = {
    "QwenImagePipelineWithLogProb": "qwen_image_omni.pipelines.qwen_image_flow_grpo.vllm_omni_rollout_pipeline",
    "QwenImageMixGRPOPipelineWithLogProb": "qwen_image_omni.pipelines.qwen_image_mix_grpo.vllm_omni_rollout_pipeline",
    "QwenImageDPOPipeline": "qwen_image_omni.pipelines.qwen_image_dpo.vllm_omni_rollout_pipeline",
    "QwenImagePipelineWithDualLogProb": "qwen_image_omni.pipelines.qwen_image_dual_grpo.vllm_omni_rollout_pipeline",
    "QwenImageDiffusionNFTPipeline": "qwen_image_omni.pipelines.qwen_image_diffusion_nft.vllm_omni_rollout_pipeline",
    "QwenImageEditPlusPipelineWithLogProb": (
        "qwen_image_omni.pipelines.qwen_image_edit_flow_grpo.vllm_omni_rollout_pipeline"
    ),
}
"""Compatibility: the RL rollout pipelines on vllm-omni, once importable from this module, by the module
that defines each. Looked up only when asked for by name here; :func:`register` never imports them."""


def register() -> None:
    """vllm-omni plugin entry point: serve the Qwen-Image architectures with our pipelines.

    Called by ``vllm_omni.plugins.load_omni_general_plugins`` once in every vllm-omni process.
    Points vllm-omni's diffusion registry at :mod:`.pipelines` for every architecture of
    :data:`~.pipelines.PIPELINES` (with vllm-omni's own pre/post-process functions) and registers
    the TeaCache extractor for our transformer (:mod:`.teacache`). Idempotent: registering again
    rewrites the same registry entries. Imports no RL pipeline.

    vllm-omni catches what fails while it loads a plugin, not what the plugin's function raises; so
    when our pipelines cannot be imported (a vllm-omni whose API they do not fit), the error is
    logged here, as vllm-omni logs a plugin that fails to load, nothing is registered, and vllm-omni
    serves its own transformer. ``qwen-image-omni check --vllm-omni`` reports that failure.
    """
    try:
        from vllm_omni.diffusion import registry as omni_registry

        pipelines = importlib.import_module(_PIPELINES_MODULE)
        teacache = importlib.import_module(f"{__name__}.teacache")
    except Exception:  # noqa: BLE001 - any failure leaves vllm-omni on its own pipelines, as a failed load does
        logger.exception("Failed to load plugin qwen_image_omni: vllm-omni serves its own Qwen-Image transformer")
        return
    for architecture, process_functions in pipelines.PIPELINES.items():
        omni_registry.register_diffusion_model(architecture, pipelines.__name__, architecture, **process_functions)
    teacache.register_teacache_extractor()


def __getattr__(name: str) -> Any:
    """The names of :mod:`.pipelines` (and, for compatibility, the RL rollout pipelines), imported on first use."""
    if name in __all__:
        module = _PIPELINES_MODULE
    elif name in _ROLLOUT_PIPELINES:
        module = _ROLLOUT_PIPELINES[name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_ROLLOUT_PIPELINES})
