"""What an RL trainer expects of the module an adapter's ``build_module`` hands it.

verl-omni builds diffusers' own transformers through diffusers' ``AutoModel`` and then sets them up
for its trainer; a module built by an adapter's ``build_module`` skips that set-up, so
:func:`prepare_for_trainer` does the same two things for ours:

- **the attention backend** the model config names (``attn_backend``, e.g. ``"native"`` or
  ``"_flash_3_varlen_hub"``) through diffusers' ``set_attention_backend``, so the trainer attends
  with the backend the user asked for (and that the rollout is checked against). FA3 from the
  kernels hub falls back to ``"native"`` with a warning where it cannot load, as verl-omni does for
  diffusers' class; any other backend that cannot be set is an error.
- **a config that saves itself**: verl's FSDP checkpoint manager writes the model config with
  ``module.config.save_pretrained(directory)``, as for a transformers model; a diffusers config has
  no such method. Ours writes diffusers' ``config.json`` (``save_config``), which diffusers and
  :class:`~qwen_image_omni.QwenImageTransformer2DModel` load back.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from diffusers import ModelMixin

__all__ = ["FA3_HUB_BACKEND", "FALLBACK_BACKEND", "prepare_for_trainer"]

logger = logging.getLogger(__name__)

FA3_HUB_BACKEND = "_flash_3_varlen_hub"
"""verl-omni's default ``attn_backend``: FlashAttention 3 from the kernels hub."""

FALLBACK_BACKEND = "native"
"""What :data:`FA3_HUB_BACKEND` falls back to where it cannot load (PyTorch's SDPA)."""


def _set_attention_backend(module: ModelMixin, model_config: Any) -> None:
    backend = getattr(model_config, "attn_backend", None)
    if backend is None:
        return
    if not isinstance(backend, str):
        raise TypeError(f"`attn_backend` must be a diffusers attention backend name (str), got {backend!r}")
    try:
        module.set_attention_backend(backend)
    except Exception as error:
        if backend != FA3_HUB_BACKEND:
            raise ValueError(
                f"`attn_backend`={backend!r} cannot be set on {type(module).__name__}: {error}"
            ) from error
        logger.warning(
            "attn_backend %r cannot be loaded (%s); %s attends with %r", backend, error, type(module).__name__,
            FALLBACK_BACKEND,
        )
        # The config records what the trainer really runs, as verl-omni does for diffusers' class.
        object.__setattr__(model_config, "attn_backend", FALLBACK_BACKEND)
        module.set_attention_backend(FALLBACK_BACKEND)


def _make_config_saveable(module: ModelMixin) -> None:
    # FSDP2 gives the module a new class (``FSDP<name>``) once it shards it; the config names the model's.
    class_name = type(module).__name__

    def save_pretrained(save_directory: str | os.PathLike, **kwargs: Any) -> None:
        module.save_config(save_directory)
        path = Path(save_directory) / module.config_name
        config = json.loads(path.read_text())
        config["_class_name"] = class_name
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    # A FrozenDict refuses item assignment but takes attributes, as verl-omni's own patch relies on.
    module.config.save_pretrained = save_pretrained


def prepare_for_trainer(module: ModelMixin, model_config: Any) -> ModelMixin:
    """Set ``module``'s attention backend from ``model_config`` and let its config save itself; returns it.

    Raises:
        TypeError: ``model_config.attn_backend`` is not a string.
        ValueError: the named backend is unknown or cannot run here (other than FA3 from the hub,
            which falls back to ``"native"``).
    """
    _set_attention_backend(module, model_config)
    _make_config_saveable(module)
    return module
