"""Helpers that dispatch to the adapter registered for a model config.

Trainers and agent loops call these rather than touching the registry: each looks up
``DiffusionModelBase.get_class(model_config)`` and forwards its arguments by keyword. Signatures are
those of verl-omni's ``verl_omni.pipelines.utils``; none takes a text length.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .model_base import DiffusionI2IModelBase, DiffusionModelBase

if TYPE_CHECKING:
    from diffusers import ModelMixin, SchedulerMixin

    from .config import DiffusionModelConfig


def default_device() -> str:
    """Return ``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_scheduler(model_config: DiffusionModelConfig) -> SchedulerMixin:
    """Build the scheduler of the model's adapter, timesteps and sigmas already set.

    Args:
        model_config: the configuration of the diffusion model.
    """
    return DiffusionModelBase.get_class(model_config).build_scheduler(model_config)


def set_timesteps(
    scheduler: SchedulerMixin, model_config: DiffusionModelConfig, device: str | torch.device | None = None
) -> None:
    """Set the adapter's timesteps and sigmas on ``scheduler``.

    Args:
        scheduler: the scheduler used for the diffusion process.
        model_config: the configuration of the diffusion model.
        device: where the timesteps go; ``None`` (the seed's behaviour) means :func:`default_device`.
    """
    adapter = DiffusionModelBase.get_class(model_config)
    adapter.set_timesteps(scheduler, model_config, default_device() if device is None else device)


def prepare_model_inputs(
    module: ModelMixin,
    model_config: DiffusionModelConfig,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_embeds_mask: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    negative_prompt_embeds_mask: torch.Tensor | None,
    micro_batch: Mapping[str, Any],
    step: int,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Build the transformer inputs with the adapter registered for ``model_config``.

    Arguments as :meth:`DiffusionModelBase.prepare_model_inputs`; see :func:`adapter_model_inputs`.

    Returns:
        ``(model_inputs, negative_model_inputs)``; the second is ``None`` without guidance.
    """
    return adapter_model_inputs(
        DiffusionModelBase.get_class(model_config),
        module,
        model_config,
        latents,
        timesteps,
        prompt_embeds,
        prompt_embeds_mask,
        negative_prompt_embeds,
        negative_prompt_embeds_mask,
        micro_batch,
        step,
    )


def adapter_model_inputs(
    adapter: type[DiffusionModelBase],
    module: ModelMixin,
    model_config: DiffusionModelConfig,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_embeds_mask: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    negative_prompt_embeds_mask: torch.Tensor | None,
    micro_batch: Mapping[str, Any],
    step: int,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``adapter``'s transformer inputs: its :meth:`~DiffusionModelBase.prepare_model_inputs`, then, for
    image-conditioned adapters (:class:`DiffusionI2IModelBase`), the condition from the micro-batch.

    The trainer (through :func:`prepare_model_inputs`) and the rollout pipelines both come here.

    Raises:
        ValueError: an image-conditioned adapter finds no condition in ``micro_batch``.
        TypeError: its ``prepare_condition`` returns something other than a dict.
    """
    model_inputs, negative_model_inputs = adapter.prepare_model_inputs(
        module=module,
        model_config=model_config,
        latents=latents,
        timesteps=timesteps,
        prompt_embeds=prompt_embeds,
        prompt_embeds_mask=prompt_embeds_mask,
        negative_prompt_embeds=negative_prompt_embeds,
        negative_prompt_embeds_mask=negative_prompt_embeds_mask,
        micro_batch=micro_batch,
        step=step,
    )
    if issubclass(adapter, DiffusionI2IModelBase):
        condition = adapter.prepare_condition(micro_batch, latents, step)
        if not condition:
            keys = sorted(str(key) for key in micro_batch.keys()) if micro_batch is not None else []
            raise ValueError(
                f"{adapter.__name__}.prepare_condition found no condition in the micro-batch (keys: {keys}); "
                "an image-conditioned adapter needs the condition fields its rollout records"
            )
        if not isinstance(condition, Mapping):
            raise TypeError(f"{adapter.__name__}.prepare_condition must return a dict, got {type(condition).__name__}")
        model_inputs, negative_model_inputs = adapter.inject_condition(model_inputs, negative_model_inputs, condition)
    return model_inputs, negative_model_inputs


def forward(
    module: ModelMixin,
    model_config: DiffusionModelConfig,
    model_inputs: dict[str, Any],
    negative_model_inputs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """One model prediction with the adapter registered for ``model_config`` (forward-process objectives).

    Arguments as :meth:`DiffusionModelBase.forward`.
    """
    return DiffusionModelBase.get_class(model_config).forward(module, model_config, model_inputs, negative_model_inputs)


def forward_and_sample_previous_step(
    module: ModelMixin,
    scheduler: SchedulerMixin,
    model_config: DiffusionModelConfig,
    model_inputs: dict[str, Any],
    negative_model_inputs: dict[str, Any] | None,
    scheduler_inputs: Mapping[str, torch.Tensor] | None,
    step: int,
) -> tuple:
    """Forward the model and recompute the reverse step with the adapter registered for ``model_config``.

    Arguments as :meth:`DiffusionModelBase.forward_and_sample_previous_step`.

    Returns:
        ``(log_prob, prev_sample_mean, std_dev_t, sqrt_dt)``.
    """
    return DiffusionModelBase.get_class(model_config).forward_and_sample_previous_step(
        module=module,
        scheduler=scheduler,
        model_config=model_config,
        model_inputs=model_inputs,
        negative_model_inputs=negative_model_inputs,
        scheduler_inputs=scheduler_inputs,
        step=step,
    )
