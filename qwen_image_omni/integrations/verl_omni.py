"""verl-omni bridge: our Qwen-Image adapters and rollout pipelines inside verl-omni's registries.

A verl-omni user adds one line to the model config::

    actor_rollout_ref:
      model:
        external_lib: qwen_image_omni.integrations.verl_omni

verl-omni imports that library when it builds its ``DiffusionModelConfig``; importing it runs
:func:`register`, which puts, for every Qwen-Image ``(architecture, algorithm)`` we implement,

- our training adapter into verl-omni's ``DiffusionModelBase`` registry, so verl-omni's own
  ``verl_omni.pipelines.utils`` (``build_scheduler``, ``prepare_model_inputs``,
  ``forward_and_sample_previous_step``, ``forward``) dispatch to it and its trainer builds our
  transformer through the adapter's ``build_module``;
- our rollout pipeline into verl-omni's ``VllmOmniPipelineBase`` registry, so its vllm-omni rollout
  loads ours (``custom_pipeline_name``).

They replace verl-omni's built-ins for those keys. Each adapter registered there is a thin class
that puts ours first in the method order and verl-omni's base (``DiffusionModelBase`` or
``DiffusionI2IModelBase``) after it, so verl-omni's ``issubclass`` checks hold and our code runs.
Nothing of ours passes a text length; verl-omni's own Qwen-Image rollout ``forward`` does
(``mask.sum()``), which is what this bridge takes away.

Importing this module needs verl-omni (and the verl and vllm-omni it imports); the rest of the
package never does.
"""

from __future__ import annotations

import logging

try:
    from verl_omni.pipelines import model_base as verl_omni_model_base
except ImportError as error:  # pragma: no cover - exercised only without verl-omni
    raise ImportError(
        "qwen_image_omni.integrations.verl_omni needs verl-omni (with the verl it pins and vllm-omni): "
        "put a verl-omni checkout on PYTHONPATH; verl-omni is not on the package registry"
    ) from error

from ..pipelines.model_base import DiffusionI2IModelBase, DiffusionModelBase, VllmOmniPipelineBase
from . import verl_omni_lora_sync
from .vllm_omni.pipelines import QwenImageOmniMixin

__all__ = ["QWEN_IMAGE_ARCHITECTURES", "register", "registered_keys", "verl_omni_adapter"]

logger = logging.getLogger(__name__)

QWEN_IMAGE_ARCHITECTURES: tuple[str, ...] = (
    "QwenImagePipeline",
    "QwenImageEditPipeline",
    "QwenImageEditPlusPipeline",
    "QwenImageLayeredPipeline",
)
"""The ``model_index.json`` ``_class_name`` values whose keys this bridge takes over."""

_bridged: dict[type, type] = {}


def verl_omni_adapter(adapter: type[DiffusionModelBase]) -> type:
    """The class registered in verl-omni for our ``adapter``: ours first, verl-omni's base after it.

    Image-conditioned adapters (:class:`DiffusionI2IModelBase`) get verl-omni's
    ``DiffusionI2IModelBase`` so verl-omni's dispatcher injects their condition; the rest get its
    ``DiffusionModelBase``. The same class comes back for the same adapter.
    """
    if adapter not in _bridged:
        is_i2i = issubclass(adapter, DiffusionI2IModelBase)
        base = verl_omni_model_base.DiffusionI2IModelBase if is_i2i else verl_omni_model_base.DiffusionModelBase
        namespace = {
            "__module__": __name__,
            "__qualname__": adapter.__qualname__,
            "__doc__": f"verl-omni registry entry for :class:`{adapter.__module__}.{adapter.__qualname__}`.",
        }
        _bridged[adapter] = type(adapter.__name__, (adapter, base), namespace)
    return _bridged[adapter]


def registered_keys() -> list[tuple[str, str]]:
    """Our Qwen-Image ``(architecture, algorithm)`` keys: the ones :func:`register` puts into verl-omni."""
    return [key for key in DiffusionModelBase.registered() if key[0] in QWEN_IMAGE_ARCHITECTURES]


def register() -> None:
    """Register our Qwen-Image adapters and rollout pipelines in verl-omni's registries (idempotent).

    Rollout pipelines are our vllm-omni ones from :class:`~qwen_image_omni.pipelines.VllmOmniPipelineBase`;
    a key where ours is only a diffusers pipeline (or none) keeps verl-omni's, which vllm-omni can load.
    Also makes verl-omni's FSDP LoRA weight sync work with peft >= 0.21
    (:mod:`~qwen_image_omni.integrations.verl_omni_lora_sync`).
    """
    verl_adapters = verl_omni_model_base.DiffusionModelBase._registry
    verl_pipelines = verl_omni_model_base.VllmOmniPipelineBase._registry
    for architecture, algorithm in registered_keys():
        adapter = DiffusionModelBase.peek_class(architecture, algorithm)
        verl_adapters[(architecture, algorithm)] = verl_omni_adapter(adapter)
        pipeline = VllmOmniPipelineBase.get_class(architecture, algorithm)
        if pipeline is not None and issubclass(pipeline, QwenImageOmniMixin):
            # verl-omni packs requests into one call only for pipelines that declare they take a batch
            # (ours on vllm-omni do); verl-omni's own register() sets the same default.
            if not hasattr(pipeline, "supports_request_batch"):
                pipeline.supports_request_batch = False
            verl_pipelines[(architecture, algorithm)] = pipeline
    verl_omni_lora_sync.install()
    logger.info("qwen-image-omni registered in verl-omni: %s", registered_keys())


register()
