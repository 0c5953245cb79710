"""Qwen-Image for FlowGRPO: the trainer-side adapter and the rollout pipeline, one step implementation.

Two callers run the same denoising step:

- the trainer recomputes the log-probability of every recorded transition with
  :meth:`QwenImage.prepare_model_inputs` + :meth:`QwenImage.forward_and_sample_previous_step`;
- the rollout (:class:`QwenImagePipelineWithLogProb`) produces those transitions in
  :meth:`QwenImagePipelineWithLogProb.diffuse`, which calls the very same
  :meth:`QwenImage.prepare_model_inputs` and :meth:`QwenImage.sample_previous_step` (transformer
  forward, true CFG with its norm rescale, :class:`FlowMatchSDEDiscreteScheduler` step).

There is no text-length argument anywhere: the transformer takes the text RoPE length from
``encoder_hidden_states.shape[1]``, so the trainer may re-collate the rollout's prompt embeddings
to any right-padded width and still score the same transitions.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from diffusers.utils import BaseOutput

from ..transformer import QwenImageTransformer2DModel
from .checks import check_image_size, check_int, check_noise_level, check_number, check_step
from .config import DiffusionAlgoConfig, DiffusionModelConfig, DiffusionPipelineConfig
from .model_base import DiffusionModelBase, VllmOmniPipelineBase
from .schedulers.flow_match_sde import SDE_TYPES, FlowMatchSDEDiscreteScheduler, check_generator
from .utils import default_device

__all__ = [
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "QWEN_IMAGE_VAE_SCALE_FACTOR",
    "QwenImage",
    "QwenImagePipelineWithLogProb",
    "QwenImageRolloutOutput",
    "apply_true_cfg",
    "build_img_shapes",
    "full_sde_window",
    "sample_sde_window",
    "set_qwen_image_timesteps",
]

logger = logging.getLogger(__name__)

QWEN_IMAGE_VAE_SCALE_FACTOR = 8
"""Pixels per latent pixel of Qwen-Image's VAE; latents are then packed in 2x2 patches."""

QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
"""Qwen-Image's ``scheduler/scheduler_config.json``, used when the model path has no scheduler folder."""

OUTPUT_TYPES = ("latent", "pt", "pil")


# --------------------------------------------------------------------------------------------------
# Small shared helpers: image geometry, timesteps, CFG, SDE window.
# --------------------------------------------------------------------------------------------------


def latent_grid(height: int, width: int, vae_scale_factor: int = QWEN_IMAGE_VAE_SCALE_FACTOR) -> tuple[int, int]:
    """The packed latent grid ``(rows, cols)`` of an image: ``pixels / vae_scale_factor / 2`` each.

    Raises:
        TypeError: an argument is not an int.
        ValueError: ``height`` or ``width`` is not a positive multiple of ``2 * vae_scale_factor``
            (diffusers would floor it, silently cropping the image).
    """
    height = check_image_size("`height`", height, vae_scale_factor)
    width = check_image_size("`width`", width, vae_scale_factor)
    return height // vae_scale_factor // 2, width // vae_scale_factor // 2


def build_img_shapes(
    height: int, width: int, batch_size: int, vae_scale_factor: int = QWEN_IMAGE_VAE_SCALE_FACTOR
) -> list[list[tuple[int, int, int]]]:
    """``img_shapes`` for the transformer: ``[[(1, rows, cols)]] * batch_size``, as diffusers' pipeline builds it."""
    rows, cols = latent_grid(height, width, vae_scale_factor)
    return [[(1, rows, cols)]] * check_int("`batch_size`", batch_size, 1)


def set_qwen_image_timesteps(
    scheduler: FlowMatchSDEDiscreteScheduler,
    num_inference_steps: int,
    image_seq_len: int,
    device: str | torch.device | None = None,
    sigmas: list[float] | np.ndarray | None = None,
) -> torch.Tensor:
    """Set Qwen-Image's schedule on ``scheduler`` and return ``scheduler.timesteps``.

    As diffusers' ``QwenImagePipeline``: sigmas ``np.linspace(1, 1/N, N)`` unless given, shifted by
    ``mu = calculate_shift(image_seq_len, ...)`` with the scheduler's own config values. Trainer
    (:meth:`QwenImage.set_timesteps`) and rollout (:meth:`QwenImagePipelineWithLogProb.forward`)
    both come here, so they get identical timesteps.

    Args:
        scheduler: the scheduler to configure.
        num_inference_steps: number of denoising steps N.
        image_seq_len: packed latent tokens per image (``rows * cols``), for the dynamic shift.
        device: where the timesteps and sigmas go.
        sigmas: custom sigmas (length N) instead of the linear ones.
    """
    num_inference_steps = check_int("`num_inference_steps`", num_inference_steps, 1)
    image_seq_len = check_int("`image_seq_len`", image_seq_len, 1)
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    elif len(sigmas) != num_inference_steps:
        raise ValueError(f"`sigmas` must have num_inference_steps={num_inference_steps} entries, got {len(sigmas)}")
    config = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
    return scheduler.timesteps


def apply_true_cfg(
    noise_pred: torch.Tensor, negative_noise_pred: torch.Tensor, true_cfg_scale: float
) -> torch.Tensor:
    """Qwen-Image's true CFG: ``comb = neg + scale * (cond - neg)``, rescaled to the norm of ``cond``.

    The rescale is per token over the channel dimension: ``comb * ||cond|| / ||comb||``
    (``torch.norm(..., dim=-1, keepdim=True)``), exactly as diffusers' ``QwenImagePipeline``.
    """
    if noise_pred.shape != negative_noise_pred.shape:
        raise ValueError(
            f"`negative_noise_pred` must have the shape of `noise_pred` {tuple(noise_pred.shape)}, "
            f"got {tuple(negative_noise_pred.shape)}"
        )
    comb_pred = negative_noise_pred + true_cfg_scale * (noise_pred - negative_noise_pred)
    cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
    noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
    return comb_pred * (cond_norm / noise_norm)


def check_sde_window(sde_window: tuple[int, int], num_steps: int) -> tuple[int, int]:
    """Validate ``(start, end)``: ints with ``0 <= start < end <= num_steps``; return it as a tuple."""
    if not isinstance(sde_window, (tuple, list)) or len(sde_window) != 2:
        raise ValueError(f"`sde_window` must be a (start, end) pair, got {sde_window!r}")
    start, end = check_int("`sde_window[0]`", sde_window[0]), check_int("`sde_window[1]`", sde_window[1])
    if not 0 <= start < end <= num_steps:
        raise ValueError(
            f"`sde_window` must satisfy 0 <= start < end <= num_steps={num_steps}, got ({start}, {end})"
        )
    return start, end


def full_sde_window(num_steps: int) -> tuple[int, int]:
    """The window used when no ``sde_window_size`` is given: every step but the last, ``(0, N - 1)``.

    The last step lands on sigma = 0, where ``"cps"`` has zero noise (no density to train on); this
    is verl-omni's default as well.
    """
    num_steps = check_int("`num_steps`", num_steps, 1)
    return (0, max(1, num_steps - 1))


def sample_sde_window(
    sde_window_size: int,
    sde_window_range: tuple[int, int],
    num_steps: int,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Draw the SDE window: ``start ~ U{range[0], ..., range[1] - size}``, ``end = start + size``.

    Args:
        sde_window_size: number of SDE steps W.
        sde_window_range: ``(low, high)`` envelope the whole window must lie in (``high`` exclusive,
            at most ``num_steps``).
        num_steps: number of denoising steps; the window must end at or before it.
        generator: random generator for the draw (the rollout passes its SDE generator).

    Raises:
        ValueError: a size or range that does not fit, whatever the draw would give.
        TypeError: a non-int size, bound or step count.
    """
    size = check_int("`sde_window_size`", sde_window_size, 1)
    low, high = _check_window_range(sde_window_range, size, check_int("`num_steps`", num_steps, 1))
    device = generator.device if generator is not None else "cpu"
    start = int(torch.randint(low, high - size + 1, (1,), generator=generator, device=device).item())
    return check_sde_window((start, start + size), num_steps)


def _check_window_range(sde_window_range: tuple[int, int], size: int, num_steps: int) -> tuple[int, int]:
    """``(low, high)`` with room for a window of ``size`` steps inside ``[0, num_steps)``."""
    if not isinstance(sde_window_range, (tuple, list)) or len(sde_window_range) != 2:
        raise ValueError(f"`sde_window_range` must be a (low, high) pair, got {sde_window_range!r}")
    low = check_int("`sde_window_range[0]`", sde_window_range[0])
    high = check_int("`sde_window_range[1]`", sde_window_range[1])
    if low < 0 or high - low < size:
        raise ValueError(
            f"`sde_window_range` (low, high) must have 0 <= low and high - low >= sde_window_size={size}, "
            f"got ({low}, {high})"
        )
    # Checked here, not on the drawn window, so a range past the end fails on every call, not on some draws.
    if high > num_steps:
        raise ValueError(
            f"`sde_window_range` ({low}, {high}) ends past the trajectory's num_inference_steps={num_steps}; "
            f"pass a range with high <= {num_steps}"
        )
    return low, high


def _check_sde_type(sde_type: str) -> str:
    if sde_type not in SDE_TYPES:
        raise ValueError(f"`sde_type` must be one of {SDE_TYPES}, got {sde_type!r}")
    return sde_type


def _check_rollout_scales(true_cfg_scale: Any, guidance_scale: Any, noise_level: Any, sde_type: str) -> None:
    """A rollout's scales must be finite numbers >= 0: a NaN would silently turn CFG off or give NaN log-probs."""
    _check_sde_type(sde_type)
    check_number("`true_cfg_scale`", true_cfg_scale, 0.0)
    check_number("`guidance_scale`", guidance_scale, 0.0)
    check_noise_level("`noise_level`", noise_level, sde_type)


def _micro_batch_value(micro_batch: Any, key: str) -> Any:
    """``micro_batch[key]`` as a Python scalar, or None: from a dict or a TensorDict (tensor or non-tensor data)."""
    if micro_batch is None:
        return None
    value = micro_batch.get(key, None)
    if type(value).__name__.startswith("NonTensor"):  # tensordict's NonTensorData / NonTensorStack
        value = value.tolist()
    if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
        values = set(torch.as_tensor(value).reshape(-1).tolist())
        if len(values) != 1:
            raise ValueError(
                f"micro_batch[{key!r}] must hold one value for the whole micro-batch, got {sorted(values)}"
            )
        value = values.pop()
    return value.item() if isinstance(value, np.generic) else value


def _select_step(tensor: torch.Tensor, step: int, selected_ndim: int, name: str) -> torch.Tensor:
    """``tensor[:, step]`` for a trajectory (``selected_ndim + 1`` dims), ``tensor`` itself if already selected."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim == selected_ndim + 1:
        return tensor[:, check_step(step, tensor, name)]
    if tensor.ndim == selected_ndim:
        return tensor
    raise ValueError(
        f"`{name}` must have {selected_ndim + 1} dims (a trajectory) or {selected_ndim} (one step), "
        f"got shape {tuple(tensor.shape)}"
    )


def _match_batch(
    negative_embeds: torch.Tensor, negative_mask: torch.Tensor | None, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Repeat a single negative prompt for every sample; any other batch must equal the prompt's."""
    if negative_embeds.shape[0] == batch_size:
        return negative_embeds, negative_mask
    if negative_embeds.shape[0] == 1:
        expanded_mask = None if negative_mask is None else negative_mask.expand(batch_size, -1)
        return negative_embeds.expand(batch_size, -1, -1), expanded_mask
    raise ValueError(
        f"the negative prompt must have 1 or batch={batch_size} samples (as the prompt), got {negative_embeds.shape[0]}"
    )


def sde_scheduler(scheduler: Any) -> FlowMatchSDEDiscreteScheduler:
    """``scheduler`` as our SDE scheduler: kept if it is one, rebuilt from a flow-match Euler scheduler's config."""
    if isinstance(scheduler, FlowMatchSDEDiscreteScheduler):
        return scheduler
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchSDEDiscreteScheduler.from_config(scheduler.config)
    raise TypeError(
        "`scheduler` must be a FlowMatchSDEDiscreteScheduler (or a FlowMatchEulerDiscreteScheduler to convert), "
        f"got {type(scheduler).__name__}"
    )


def _module_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating parameter (what its input projections expect)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


# --------------------------------------------------------------------------------------------------
# Trainer-side adapter.
# --------------------------------------------------------------------------------------------------


@DiffusionModelBase.register("QwenImagePipeline", algorithm="flow_grpo")
class QwenImage(DiffusionModelBase):
    """Training adapter for the Qwen-Image diffusion model (FlowGRPO).

    Implements :class:`~qwen_image_omni.pipelines.model_base.DiffusionModelBase` for the
    ``QwenImagePipeline`` architecture: scheduler set-up, transformer inputs for one step, and the
    forward + reverse-SDE step that scores a rollout's transition. A class of classmethods, never
    instantiated. The rollout pipeline :class:`QwenImagePipelineWithLogProb` runs its steps through
    :meth:`prepare_model_inputs` and :meth:`sample_previous_step` of this class too.
    """

    @classmethod
    def build_scheduler(cls, model_config: DiffusionModelConfig) -> FlowMatchSDEDiscreteScheduler:
        """Build the SDE scheduler and set its timesteps for ``model_config.pipeline``.

        Loads ``<local_path>/scheduler`` when that folder exists, else Qwen-Image's default
        scheduler config (:data:`QWEN_IMAGE_SCHEDULER_CONFIG`).

        Args:
            model_config: the diffusion model configuration (``local_path`` and ``pipeline``).

        Returns:
            FlowMatchSDEDiscreteScheduler: with timesteps and sigmas set on the default device.
        """
        local_path = getattr(model_config, "local_path", None)
        if local_path and os.path.isdir(os.path.join(local_path, "scheduler")):
            scheduler = FlowMatchSDEDiscreteScheduler.from_pretrained(local_path, subfolder="scheduler")
        else:
            scheduler = FlowMatchSDEDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
        cls.set_timesteps(scheduler, model_config, default_device())
        return scheduler

    @classmethod
    def set_timesteps(
        cls, scheduler: FlowMatchSDEDiscreteScheduler, model_config: DiffusionModelConfig, device: str
    ) -> None:
        """Set Qwen-Image's timesteps (linear sigmas 1 → 1/N, dynamic shift from the latent size).

        Args:
            scheduler: the scheduler to configure.
            model_config: provides ``pipeline.height``, ``pipeline.width`` and ``pipeline.num_inference_steps``.
            device: where the timesteps and sigmas go.
        """
        pipeline = model_config.pipeline
        rows, cols = latent_grid(pipeline.height, pipeline.width, QWEN_IMAGE_VAE_SCALE_FACTOR)
        set_qwen_image_timesteps(scheduler, pipeline.num_inference_steps, rows * cols, device)

    @classmethod
    def prepare_model_inputs(
        cls,
        module: QwenImageTransformer2DModel,
        model_config: DiffusionModelConfig,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_embeds_mask: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds_mask: torch.Tensor | None,
        micro_batch: Any,
        step: int,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Build the transformer keyword arguments for step ``step`` (and those of the negative prompt).

        ``hidden_states = latents[:, step]`` and ``timestep = timesteps[:, step] / 1000`` for a
        trajectory; an already selected ``(B, S, C)`` latent / ``(B,)`` timestep is used as is. The
        prompt embeddings go in at whatever width they have: the transformer takes the text RoPE
        length from that width, so no length is passed.

        Args:
            module: the Qwen-Image transformer (its dtype is applied to the float inputs).
            model_config: provides ``pipeline.height`` / ``width`` / ``guidance_scale`` fallbacks.
            latents: ``(B, T, S, C)`` trajectory or ``(B, S, C)`` packed latents.
            timesteps: ``(B, T)`` trajectory or ``(B,)`` scheduler timesteps (0..1000).
            prompt_embeds: ``(B, L, D)`` positive prompt embeddings.
            prompt_embeds_mask: ``(B, L)`` 1 for valid tokens, or None (all valid).
            negative_prompt_embeds: ``(B, L', D)`` negative prompt embeddings, or None (no CFG).
            negative_prompt_embeds_mask: ``(B, L')`` mask of the negative embeddings, or None.
            micro_batch: mapping (dict / TensorDict) with optional ``height``, ``width`` and
                ``vae_scale_factor`` (else ``model_config.pipeline.height`` / ``width`` and 8).
            step: the denoising step index (an int) into ``latents`` / ``timesteps``.

        Returns:
            ``(model_inputs, negative_model_inputs)``; the second is None without negative embeddings.
        """
        step = check_int("`step`", step, 0)
        hidden_states = _select_step(latents, step, 3, "latents")
        timestep = _select_step(timesteps, step, 1, "timesteps")
        dtype = _module_dtype(module)
        if dtype is not None:
            hidden_states = hidden_states.to(dtype)
        common = {
            "hidden_states": hidden_states,
            "timestep": timestep / 1000.0,
            "guidance": cls._guidance(module, model_config, hidden_states),
            "img_shapes": cls._img_shapes(model_config, micro_batch, hidden_states),
            "return_dict": False,
        }
        model_inputs = {**common, **cls._text_inputs(prompt_embeds, prompt_embeds_mask, dtype, "prompt_embeds")}
        if negative_prompt_embeds is None:
            return model_inputs, None
        negative = cls._text_inputs(
            negative_prompt_embeds, negative_prompt_embeds_mask, dtype, "negative_prompt_embeds"
        )
        return model_inputs, {**common, **negative}

    @classmethod
    def predict_noise(
        cls,
        module: QwenImageTransformer2DModel,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None,
        true_cfg_scale: float,
    ) -> torch.Tensor:
        """Transformer forward, with true CFG (:func:`apply_true_cfg`) when ``true_cfg_scale > 1``.

        Raises:
            ValueError: if ``true_cfg_scale > 1`` and ``negative_model_inputs`` is None.
        """
        # Call the module (not .forward) so FSDP / hooks see the call.
        noise_pred = module(**model_inputs)[0]
        if true_cfg_scale <= 1.0:
            return noise_pred
        if negative_model_inputs is None:
            raise ValueError(
                f"true_cfg_scale={true_cfg_scale} > 1 needs `negative_model_inputs` "
                "(from negative prompt embeddings), got None"
            )
        negative_noise_pred = module(**negative_model_inputs)[0]
        return apply_true_cfg(noise_pred, negative_noise_pred, true_cfg_scale)

    @classmethod
    def sample_previous_step(
        cls,
        module: QwenImageTransformer2DModel,
        scheduler: FlowMatchSDEDiscreteScheduler,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None,
        *,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        true_cfg_scale: float,
        noise_level: float,
        sde_type: str,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_logprobs: bool = True,
    ) -> tuple:
        """One reverse step: :meth:`predict_noise` then the scheduler's ``sample_previous_step``.

        The one implementation of a step: the rollout calls it with ``prev_sample=None`` (draws the
        transition), the trainer with the rollout's ``prev_sample`` (scores it).

        Args:
            module, scheduler, model_inputs, negative_model_inputs: as in :meth:`forward_and_sample_previous_step`.
            sample: ``(B, S, C)`` current latents x_t (cast to float32 for the scheduler).
            timestep: ``(B,)`` scheduler timesteps of this step (values of ``scheduler.timesteps``).
            true_cfg_scale: CFG scale; <= 1 disables CFG.
            noise_level: eta; 0 gives the deterministic Euler step.
            sde_type: ``"sde"``, ``"cps"`` or ``"dance_sde"``.
            prev_sample: ``(B, S, C)`` x_{t-1} to score, or None to draw it.
            generator: random generator for the drawn noise.
            return_logprobs: compute the log-probability.

        Returns:
            ``(prev_sample, log_prob, prev_sample_mean, std_dev_t, sqrt_dt)``.
        """
        noise_pred = cls.predict_noise(module, model_inputs, negative_model_inputs, true_cfg_scale)
        return scheduler.sample_previous_step(
            sample=sample.float(),
            model_output=noise_pred.float(),
            timestep=timestep,
            generator=generator,
            noise_level=noise_level,
            prev_sample=None if prev_sample is None else prev_sample.float(),
            sde_type=_check_sde_type(sde_type),
            return_logprobs=return_logprobs,
            return_sqrt_dt=True,
        )

    @classmethod
    def forward_and_sample_previous_step(
        cls,
        module: QwenImageTransformer2DModel,
        scheduler: FlowMatchSDEDiscreteScheduler,
        model_config: DiffusionModelConfig,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None,
        scheduler_inputs: Any,
        step: int,
    ) -> tuple:
        """Run the transformer and score the rollout's transition ``all_latents[:, step] -> [:, step + 1]``.

        Applies true CFG when ``model_config.pipeline.true_cfg_scale > 1``; the noise level and SDE
        type come from ``model_config.algo``.

        Args:
            module: the Qwen-Image transformer.
            scheduler: the SDE scheduler, timesteps set (:meth:`build_scheduler`).
            model_config: provides ``pipeline.true_cfg_scale``, ``algo.noise_level``, ``algo.sde_type``.
            model_inputs: positive inputs from :meth:`prepare_model_inputs`.
            negative_model_inputs: negative inputs, or None without CFG.
            scheduler_inputs: mapping with ``"all_latents"`` ``(B, W+1, S, C)`` and ``"all_timesteps"`` ``(B, W)``.
            step: index of the transition in the window.

        Returns:
            ``(log_prob, prev_sample_mean, std_dev_t, sqrt_dt)``.
        """
        latents, timesteps = cls._trajectory(scheduler_inputs)
        step = check_int("`step`", step, 0)
        if step >= timesteps.shape[1] or step + 1 >= latents.shape[1]:
            raise ValueError(
                f"`step` must be in [0, {timesteps.shape[1]}) with all_latents of {latents.shape[1]} states, got {step}"
            )
        _, log_prob, prev_sample_mean, std_dev_t, sqrt_dt = cls.sample_previous_step(
            module,
            scheduler,
            model_inputs,
            negative_model_inputs,
            sample=latents[:, step],
            timestep=timesteps[:, step],
            true_cfg_scale=model_config.pipeline.true_cfg_scale,
            noise_level=model_config.algo.noise_level,
            sde_type=model_config.algo.sde_type,
            prev_sample=latents[:, step + 1],
        )
        return log_prob, prev_sample_mean, std_dev_t, sqrt_dt

    # -- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _trajectory(scheduler_inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if scheduler_inputs is None:
            raise ValueError("`scheduler_inputs` must hold 'all_latents' and 'all_timesteps', got None")
        missing = [key for key in ("all_latents", "all_timesteps") if key not in scheduler_inputs.keys()]
        if missing:
            raise ValueError(f"`scheduler_inputs` must hold 'all_latents' and 'all_timesteps', missing {missing}")
        return scheduler_inputs["all_latents"], scheduler_inputs["all_timesteps"]

    @staticmethod
    def _text_inputs(
        embeds: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype | None, name: str
    ) -> dict[str, Any]:
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"`{name}` must be a (batch, width, dim) tensor, got {shape}")
        if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(
                f"`{name}_mask` must have shape {tuple(embeds.shape[:2])} (batch, width), got {tuple(mask.shape)}"
            )
        return {
            "encoder_hidden_states": embeds if dtype is None else embeds.to(dtype),
            "encoder_hidden_states_mask": mask,
        }

    @staticmethod
    def _img_shapes(model_config: DiffusionModelConfig, micro_batch: Any, hidden_states: torch.Tensor) -> list:
        height = _micro_batch_value(micro_batch, "height")
        width = _micro_batch_value(micro_batch, "width")
        vae_scale_factor = _micro_batch_value(micro_batch, "vae_scale_factor")
        # `is None`, not `or`: a height of 0 in the micro-batch is an error, not "use the config's".
        height = model_config.pipeline.height if height is None else height
        width = model_config.pipeline.width if width is None else width
        vae_scale_factor = QWEN_IMAGE_VAE_SCALE_FACTOR if vae_scale_factor is None else vae_scale_factor
        img_shapes = build_img_shapes(height, width, hidden_states.shape[0], vae_scale_factor)
        _, rows, cols = img_shapes[0][0]
        if rows * cols != hidden_states.shape[1]:
            raise ValueError(
                f"image {height}x{width} (vae_scale_factor={vae_scale_factor}) packs into {rows}x{cols}={rows * cols} "
                f"latent tokens, but latents have {hidden_states.shape[1]}"
            )
        return img_shapes

    @staticmethod
    def _guidance(
        module: Any, model_config: DiffusionModelConfig, hidden_states: torch.Tensor
    ) -> torch.Tensor | None:
        """Guidance-distilled checkpoints only (``guidance_embeds``); Qwen-Image itself has none."""
        if not getattr(getattr(module, "config", None), "guidance_embeds", False):
            return None
        scale = model_config.pipeline.guidance_scale
        if scale is None:
            raise ValueError("a guidance_embeds transformer needs model_config.pipeline.guidance_scale, got None")
        return torch.full((hidden_states.shape[0],), float(scale), device=hidden_states.device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Rollout pipeline.
# --------------------------------------------------------------------------------------------------


@dataclass
class QwenImageRolloutOutput(BaseOutput):
    """What a rollout returns: the images and the data the trainer needs to score them.

    Args:
        images: ``"latent"``: packed latents ``(B, S, C)``; ``"pt"``: ``(B, 3, H, W)`` in [0, 1];
            ``"pil"``: a list of PIL images.
        all_latents: ``(B, W + 1, S, C)`` float32 states of the SDE window (its entry state first).
        all_log_probs: ``(B, W)`` log-probability of each window transition, or None.
        all_timesteps: ``(B, W)`` scheduler timesteps of the window steps.
        prompt_embeds: ``(B, L, D)`` positive prompt embeddings used.
        prompt_embeds_mask: ``(B, L)`` their mask.
        negative_prompt_embeds: ``(B, L', D)`` negative embeddings, or None without CFG.
        negative_prompt_embeds_mask: ``(B, L')`` their mask, or None.
        sde_window: the ``(start, end)`` step indices of the SDE window.
    """

    images: torch.Tensor | list[PIL.Image.Image]
    all_latents: torch.Tensor
    all_log_probs: torch.Tensor | None
    all_timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_embeds_mask: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    negative_prompt_embeds_mask: torch.Tensor | None
    sde_window: tuple[int, int]

    @property
    def custom_output(self) -> dict[str, Any]:
        """The rollout data under the keys of vllm-omni's ``DiffusionOutput.custom_output``."""
        keys = (
            "all_latents",
            "all_log_probs",
            "all_timesteps",
            "prompt_embeds",
            "prompt_embeds_mask",
            "negative_prompt_embeds",
            "negative_prompt_embeds_mask",
        )
        return {key: getattr(self, key) for key in keys}


class QwenImageRolloutMixin:
    """The rollout loop, shared by every Qwen-Image rollout pipeline (diffusers' and vllm-omni's).

    Runs every denoising step through :meth:`QwenImage.prepare_model_inputs` and
    :meth:`QwenImage.sample_previous_step` (``training_adapter``), the functions the trainer uses to
    recompute the log-probabilities, so rollout and trainer cannot drift apart. Steps outside the
    SDE window are deterministic Euler steps (noise level 0); steps inside draw from the SDE and
    record ``(latents, log_prob, timestep)``.

    The host pipeline provides ``transformer`` (ours), ``scheduler``
    (:class:`FlowMatchSDEDiscreteScheduler`), ``vae_scale_factor`` and Qwen-Image's
    ``prepare_latents(batch_size, num_channels_latents, height, width, dtype, device, generator, latents)``,
    which diffusers' and vllm-omni's ``QwenImagePipeline`` both have.
    """

    training_adapter: type[QwenImage] = QwenImage
    """The trainer-side adapter whose step functions the rollout runs."""

    algorithm: str = "flow_grpo"
    """The registry algorithm of this pipeline (``DiffusionModelConfig.algorithm``)."""

    def rollout(
        self,
        prompt_embeds: torch.Tensor,
        prompt_embeds_mask: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds_mask: torch.Tensor | None,
        *,
        height: int,
        width: int,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        true_cfg_scale: float = 4.0,
        noise_level: float = 0.7,
        sde_window_size: int | None = None,
        sde_window_range: tuple[int, int] = (0, 5),
        sde_type: str = "sde",
        logprobs: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, tuple[int, int]]:
        """Denoise from noise to final latents with prompt embeddings already encoded.

        Prepares the initial noise, sets the timesteps (:func:`set_qwen_image_timesteps`, as the
        trainer does), draws the SDE window and runs :meth:`diffuse`. True CFG runs when
        ``negative_prompt_embeds`` is given; the caller decides that (and ``true_cfg_scale > 1``).
        Arguments are those of :meth:`QwenImagePipelineWithLogProb.forward`.

        Returns:
            ``(latents, all_latents, all_log_probs, all_timesteps, sde_window)``.

        Raises:
            ValueError: a size that is not a multiple of ``2 * vae_scale_factor``; a NaN, infinite or
                negative scale or noise level; an SDE window that does not fit the steps; a generator
                list whose length is not the batch; mismatched shapes.
            TypeError: an argument of the wrong type.
        """
        _check_rollout_scales(true_cfg_scale, guidance_scale, noise_level, sde_type)
        do_true_cfg = negative_prompt_embeds is not None
        if do_true_cfg:
            negative_prompt_embeds, negative_prompt_embeds_mask = _match_batch(
                negative_prompt_embeds, negative_prompt_embeds_mask, prompt_embeds.shape[0]
            )
        device = prompt_embeds.device
        batch_size = prompt_embeds.shape[0]
        generator = check_generator(generator, batch_size)
        latents = self._initial_latents(batch_size, height, width, device, generator, latents)
        img_shapes = build_img_shapes(height, width, batch_size, self.vae_scale_factor)
        timesteps = set_qwen_image_timesteps(self.scheduler, num_inference_steps, latents.shape[1], device, sigmas)
        guidance = None
        if getattr(self.transformer.config, "guidance_embeds", False):
            guidance = torch.full((batch_size,), float(guidance_scale), device=device, dtype=torch.float32)

        sde_generator = generator[0] if isinstance(generator, list) else generator
        if sde_window_size is None:
            sde_window = full_sde_window(len(timesteps))
        else:
            sde_window = sample_sde_window(sde_window_size, sde_window_range, len(timesteps), sde_generator)

        latents, all_latents, all_log_probs, all_timesteps = self.diffuse(
            prompt_embeds,
            prompt_embeds_mask,
            negative_prompt_embeds,
            negative_prompt_embeds_mask,
            latents,
            img_shapes,
            timesteps,
            do_true_cfg,
            guidance,
            true_cfg_scale,
            noise_level,
            sde_window,
            sde_type,
            sde_generator,
            logprobs,
        )
        return latents, all_latents, all_log_probs, all_timesteps, sde_window

    # -- latents ------------------------------------------------------------------------------------

    def _initial_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """Packed float32 noise ``(B, rows * cols, in_channels)``, or the given ``latents`` after a shape check."""
        rows, cols = latent_grid(height, width, self.vae_scale_factor)
        in_channels = self.transformer.config.in_channels
        expected = (batch_size, rows * cols, in_channels)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(
                f"`latents` must have shape {expected} (batch, image tokens, in_channels), got {tuple(latents.shape)}"
            )
        return self.prepare_latents(
            batch_size, in_channels // 4, height, width, torch.float32, device, generator, latents
        )

    # -- the denoising loop -------------------------------------------------------------------------

    def diffuse(
        self,
        prompt_embeds: torch.Tensor,
        prompt_embeds_mask: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds_mask: torch.Tensor | None,
        latents: torch.Tensor,
        img_shapes: list,
        timesteps: torch.Tensor,
        do_true_cfg: bool,
        guidance: torch.Tensor | None,
        true_cfg_scale: float,
        noise_level: float,
        sde_window: tuple[int, int],
        sde_type: str,
        generator: torch.Generator | None,
        logprobs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Run the whole denoising loop and collect the SDE window's rollout data.

        Args:
            prompt_embeds: ``(B, L, D)`` positive prompt embeddings (any padded width).
            prompt_embeds_mask: ``(B, L)`` their mask, or None.
            negative_prompt_embeds: ``(B, L', D)`` negative embeddings for true CFG, or None.
            negative_prompt_embeds_mask: ``(B, L')`` their mask, or None.
            latents: ``(B, S, C)`` initial packed noise.
            img_shapes: per-sample image shapes for the transformer.
            timesteps: the scheduler's timesteps (``scheduler.timesteps``).
            do_true_cfg: apply true CFG with the negative embeddings.
            guidance: guidance-distillation scale ``(B,)`` or None (Qwen-Image: None).
            true_cfg_scale: CFG scale.
            noise_level: SDE noise level inside the window.
            sde_window: ``(start, end)`` step indices of the SDE steps (``end`` exclusive).
            sde_type: ``"sde"``, ``"cps"`` or ``"dance_sde"``.
            generator: random generator for the SDE noise.
            logprobs: compute the window's log-probabilities.

        Returns:
            ``(latents, all_latents, all_log_probs, all_timesteps)``: final latents ``(B, S, C)``,
            window states ``(B, W + 1, S, C)`` float32, log-probs ``(B, W)`` or None, timesteps ``(B, W)``.
        """
        start, end = check_sde_window(sde_window, len(timesteps))
        _check_sde_type(sde_type)
        if do_true_cfg and negative_prompt_embeds is None:
            raise ValueError("do_true_cfg=True needs `negative_prompt_embeds`, got None")
        model_config = self._step_config(img_shapes, len(timesteps), guidance, true_cfg_scale if do_true_cfg else 1.0)
        micro_batch = self._micro_batch(img_shapes)
        latents = latents.float()
        batch_size = latents.shape[0]
        all_latents, all_log_probs, all_timesteps = [], [], []
        for index, timestep in enumerate(timesteps):
            if getattr(self, "_interrupt", False):
                continue
            self._current_timestep = timestep
            in_window = start <= index < end
            if index == start:
                all_latents.append(latents)
            step_timesteps = timestep.reshape(1).expand(batch_size).to(device=latents.device, dtype=torch.float32)
            latents, log_prob = self._denoise_step(
                latents,
                step_timesteps,
                (prompt_embeds, prompt_embeds_mask),
                (negative_prompt_embeds, negative_prompt_embeds_mask) if do_true_cfg else (None, None),
                model_config,
                micro_batch,
                noise_level if in_window else 0.0,
                sde_type,
                generator,
                logprobs and in_window,
            )
            if in_window:
                all_latents.append(latents)
                all_log_probs.append(log_prob)
                all_timesteps.append(step_timesteps)
        self._current_timestep = None
        stacked_log_probs = torch.stack(all_log_probs, dim=1) if logprobs else None
        return latents, torch.stack(all_latents, dim=1), stacked_log_probs, torch.stack(all_timesteps, dim=1)

    def _denoise_step(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt: tuple[torch.Tensor, torch.Tensor | None],
        negative_prompt: tuple[torch.Tensor | None, torch.Tensor | None],
        model_config: DiffusionModelConfig,
        micro_batch: dict[str, Any],
        noise_level: float,
        sde_type: str,
        generator: torch.Generator | None,
        return_logprobs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One rollout step through the trainer's functions; returns ``(prev_latents, log_prob)``."""
        adapter = self.training_adapter
        model_inputs, negative_model_inputs = adapter.prepare_model_inputs(
            self.transformer,
            model_config,
            latents,
            timestep,
            prompt[0],
            prompt[1],
            negative_prompt[0],
            negative_prompt[1],
            micro_batch,
            0,
        )
        attention_kwargs = getattr(self, "_attention_kwargs", None)
        if attention_kwargs:
            model_inputs["attention_kwargs"] = attention_kwargs
            if negative_model_inputs is not None:
                negative_model_inputs["attention_kwargs"] = attention_kwargs
        prev_latents, log_prob, _, _, _ = adapter.sample_previous_step(
            self.transformer,
            self.scheduler,
            model_inputs,
            negative_model_inputs,
            sample=latents,
            timestep=timestep,
            true_cfg_scale=model_config.pipeline.true_cfg_scale,
            noise_level=noise_level,
            sde_type=sde_type,
            generator=generator,
            return_logprobs=return_logprobs,
        )
        return prev_latents, log_prob

    def _image_size(self, img_shapes: list) -> tuple[int, int]:
        """``(height, width)`` in pixels of text-to-image ``img_shapes`` ``[[(1, rows, cols)]] * B``."""
        shapes = {tuple(tuple(shape) for shape in sample) for sample in img_shapes}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1 or next(iter(shapes))[0][0] != 1:
            raise ValueError(f"`img_shapes` must be [[(1, rows, cols)]] for every sample, got {img_shapes!r}")
        _, rows, cols = next(iter(shapes))[0]
        return rows * 2 * self.vae_scale_factor, cols * 2 * self.vae_scale_factor

    def _micro_batch(self, img_shapes: list) -> dict[str, int]:
        """The image metadata the trainer's micro-batch carries: ``height``, ``width``, ``vae_scale_factor``."""
        height, width = self._image_size(img_shapes)
        return {"height": height, "width": width, "vae_scale_factor": self.vae_scale_factor}

    def _step_config(
        self, img_shapes: list, num_steps: int, guidance: torch.Tensor | None, true_cfg_scale: float
    ) -> DiffusionModelConfig:
        """The model config the trainer would hold for this rollout (what the step functions read)."""
        height, width = self._image_size(img_shapes)
        return DiffusionModelConfig(
            architecture="QwenImagePipeline",
            algorithm=self.algorithm,
            pipeline=DiffusionPipelineConfig(
                height=height,
                width=width,
                num_inference_steps=num_steps,
                true_cfg_scale=float(true_cfg_scale),
                guidance_scale=None if guidance is None else float(guidance.reshape(-1)[0]),
            ),
            algo=DiffusionAlgoConfig(),
        )


@VllmOmniPipelineBase.register("QwenImagePipeline", algorithm="flow_grpo")
class QwenImagePipelineWithLogProb(QwenImageRolloutMixin, QwenImagePipeline):
    """Rollout pipeline for Qwen-Image that records the SDE window's latents and log-probabilities.

    A diffusers ``QwenImagePipeline`` (so ``DiffusionPipeline``: ``register_modules``,
    ``from_pretrained``, ``to``) with :class:`FlowMatchSDEDiscreteScheduler` and our transformer;
    the text encoder, tokenizer and VAE are optional (precomputed embeddings in, latents out).
    Runs without vllm-omni; with vllm-omni installed, ``VllmOmniPipelineBase`` maps
    ``("QwenImagePipeline", "flow_grpo")`` to the vllm-omni twin in
    ``qwen_image_omni.integrations.vllm_omni``, which runs the same :class:`QwenImageRolloutMixin` loop.
    """

    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        transformer: QwenImageTransformer2DModel,
        scheduler: FlowMatchSDEDiscreteScheduler,
        vae: ModelMixin | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
    ):
        """Register the components; a plain flow-match Euler scheduler (a stock Qwen-Image
        ``scheduler/`` folder) is rebuilt as :class:`FlowMatchSDEDiscreteScheduler` from its config.

        Raises:
            TypeError: ``scheduler`` is neither a FlowMatchSDEDiscreteScheduler nor a
                FlowMatchEulerDiscreteScheduler.
        """
        scheduler = sde_scheduler(scheduler)
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )

    # -- end to end ---------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> QwenImageRolloutOutput:
        """Same as :meth:`forward`."""
        return self.forward(*args, **kwargs)

    @torch.no_grad()
    def forward(
        self,
        prompt_token_ids: torch.Tensor | list[int] | None = None,
        prompt_mask: torch.Tensor | None = None,
        negative_prompt_ids: torch.Tensor | list[int] | None = None,
        negative_prompt_mask: torch.Tensor | None = None,
        true_cfg_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        attention_kwargs: dict[str, Any] | None = None,
        max_sequence_length: int = 512,
        noise_level: float = 0.7,
        sde_window_size: int | None = None,
        sde_window_range: tuple[int, int] = (0, 5),
        sde_type: str = "sde",
        logprobs: bool = True,
    ) -> QwenImageRolloutOutput:
        """End-to-end generation with rollout data collection.

        Encodes the prompt token ids (or takes ``prompt_embeds``), runs :meth:`rollout` (initial
        noise, :func:`set_qwen_image_timesteps`, the SDE window, :meth:`diffuse`) and decodes the
        final latents.

        Args:
            prompt_token_ids: ``(B, N)`` or ``(N,)`` token ids of the templated prompt (the first
                ``prompt_template_encode_start_idx`` encoded tokens are dropped, as in diffusers).
            prompt_mask: attention mask for ``prompt_token_ids`` (all ones when None).
            negative_prompt_ids: token ids of the negative prompt for true CFG.
            negative_prompt_mask: attention mask for ``negative_prompt_ids``.
            true_cfg_scale: CFG scale, a finite number >= 0; CFG runs when it is > 1 and a negative
                prompt is given.
            height: image height in pixels, a multiple of ``2 * vae_scale_factor`` (16; default
                ``default_sample_size * vae_scale_factor``).
            width: image width in pixels (same rule and default).
            num_inference_steps: number of denoising steps.
            sigmas: custom sigmas instead of ``linspace(1, 1/N, N)``.
            guidance_scale: distilled guidance scale, used only by ``guidance_embeds`` checkpoints.
            num_images_per_prompt: images per prompt (embeddings repeated per sample).
            generator: a random generator, or a list of one per sample; the first one also drives
                the SDE noise and window.
            latents: ``(B, S, C)`` initial packed noise; drawn when None.
            prompt_embeds: ``(B, L, D)`` precomputed prompt embeddings (any padded width).
            prompt_embeds_mask: ``(B, L)`` their mask (all ones when None).
            negative_prompt_embeds: precomputed negative embeddings.
            negative_prompt_embeds_mask: their mask.
            output_type: ``"latent"``, ``"pt"`` or ``"pil"`` (the last two need a VAE).
            attention_kwargs: passed to the transformer's attention (e.g. LoRA ``scale``).
            max_sequence_length: prompt embeddings are cut to this width.
            noise_level: SDE noise level inside the window.
            sde_window_size: number of SDE steps; None: every step but the last (:func:`full_sde_window`).
            sde_window_range: ``(low, high)`` envelope the window is drawn in, ``high <= num_inference_steps``
                (:func:`sample_sde_window`).
            sde_type: ``"sde"``, ``"cps"`` or ``"dance_sde"``.
            logprobs: compute per-step log-probabilities.

        Raises:
            ValueError, TypeError: as :meth:`rollout`, and for a bad ``output_type`` or prompt.

        Returns:
            QwenImageRolloutOutput: images plus ``all_latents``, ``all_log_probs``, ``all_timesteps``,
            the prompt embeddings and masks, and the SDE window.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type != "latent" and self.vae is None:
            raise ValueError(f"output_type={output_type!r} needs a `vae`; this pipeline has none (use 'latent')")
        _check_rollout_scales(true_cfg_scale, guidance_scale, noise_level, sde_type)
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        self._attention_kwargs = attention_kwargs or {}
        self._current_timestep = None
        self._interrupt = False

        prompt_embeds, prompt_embeds_mask = self.encode_prompt_ids(
            prompt_token_ids, prompt_mask, prompt_embeds, prompt_embeds_mask,
            num_images_per_prompt, max_sequence_length, name="prompt",
        )  # fmt: skip
        do_true_cfg = self._do_true_cfg(true_cfg_scale, negative_prompt_ids, negative_prompt_embeds)
        if do_true_cfg:
            negative_prompt_embeds, negative_prompt_embeds_mask = self.encode_prompt_ids(
                negative_prompt_ids, negative_prompt_mask, negative_prompt_embeds, negative_prompt_embeds_mask,
                num_images_per_prompt, max_sequence_length, name="negative_prompt",
            )  # fmt: skip
        else:
            negative_prompt_embeds = negative_prompt_embeds_mask = None

        latents, all_latents, all_log_probs, all_timesteps, sde_window = self.rollout(
            prompt_embeds,
            prompt_embeds_mask,
            negative_prompt_embeds,
            negative_prompt_embeds_mask,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            generator=generator,
            latents=latents,
            true_cfg_scale=true_cfg_scale,
            noise_level=noise_level,
            sde_window_size=sde_window_size,
            sde_window_range=sde_window_range,
            sde_type=sde_type,
            logprobs=logprobs,
        )
        images = self._decode(latents, height, width, output_type)
        self.maybe_free_model_hooks()
        return QwenImageRolloutOutput(
            images=images,
            all_latents=all_latents,
            all_log_probs=all_log_probs,
            all_timesteps=all_timesteps,
            prompt_embeds=prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_embeds_mask=negative_prompt_embeds_mask,
            sde_window=sde_window,
        )

    # -- prompts ------------------------------------------------------------------------------------

    def encode_prompt_ids(
        self,
        prompt_ids: torch.Tensor | list[int] | None,
        attention_mask: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 512,
        name: str = "prompt",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings and mask from token ids (or from precomputed embeddings).

        Embeddings are right-padded to the longest prompt, cut to ``max_sequence_length`` and
        repeated ``num_images_per_prompt`` times per sample. The mask is always returned (all ones
        when none was given), so the trainer gets the same tensors the rollout used.

        Args:
            prompt_ids: token ids ``(B, N)`` / ``(N,)``; ignored when ``prompt_embeds`` is given.
            attention_mask: mask of ``prompt_ids``.
            prompt_embeds: precomputed ``(B, L, D)`` embeddings.
            prompt_embeds_mask: their ``(B, L)`` mask.
            num_images_per_prompt: repeats per sample.
            max_sequence_length: maximum width kept.
            name: the argument family named in error messages (``"prompt"`` / ``"negative_prompt"``).
        """
        if prompt_embeds is None:
            if prompt_ids is None:
                raise ValueError(f"pass `{name}_embeds` or token ids for the {name}, got neither")
            prompt_embeds, prompt_embeds_mask = self._embed_token_ids(prompt_ids, attention_mask, name)
        if prompt_embeds.ndim != 3:
            raise ValueError(f"`{name}_embeds` must be (batch, width, dim), got shape {tuple(prompt_embeds.shape)}")
        if prompt_embeds_mask is None:
            prompt_embeds_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        if tuple(prompt_embeds_mask.shape) != tuple(prompt_embeds.shape[:2]):
            raise ValueError(
                f"`{name}_embeds_mask` must have shape {tuple(prompt_embeds.shape[:2])}, "
                f"got {tuple(prompt_embeds_mask.shape)}"
            )
        max_sequence_length = check_int("`max_sequence_length`", max_sequence_length, 1)
        prompt_embeds = prompt_embeds[:, :max_sequence_length]
        prompt_embeds_mask = prompt_embeds_mask[:, :max_sequence_length]
        repeats = check_int("`num_images_per_prompt`", num_images_per_prompt, 1)
        return prompt_embeds.repeat_interleave(repeats, dim=0), prompt_embeds_mask.repeat_interleave(repeats, dim=0)

    def _embed_token_ids(
        self, prompt_ids: torch.Tensor | list[int], attention_mask: torch.Tensor | None, name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the text encoder on templated token ids; keep the last hidden state of the valid tokens."""
        if self.text_encoder is None:
            raise ValueError(f"token ids for the {name} need a `text_encoder`; pass `{name}_embeds` instead")
        device = self._execution_device
        prompt_ids = torch.as_tensor(prompt_ids, device=device)
        prompt_ids = prompt_ids.unsqueeze(0) if prompt_ids.ndim == 1 else prompt_ids
        if prompt_ids.ndim != 2:
            raise ValueError(
                f"token ids for the {name} must be (batch, tokens) or (tokens,), got {tuple(prompt_ids.shape)}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(prompt_ids)
        attention_mask = attention_mask.to(device).reshape(prompt_ids.shape)
        outputs = self.text_encoder(input_ids=prompt_ids, attention_mask=attention_mask, output_hidden_states=True)
        drop = self.prompt_template_encode_start_idx
        rows = [row[drop:] for row in self._extract_masked_hidden(outputs.hidden_states[-1], attention_mask)]
        if min(row.shape[0] for row in rows) == 0:
            raise ValueError(
                f"every {name} must have more than prompt_template_encode_start_idx={drop} valid tokens "
                "(the chat template prefix that is dropped)"
            )
        width = max(row.shape[0] for row in rows)
        embeds = torch.stack([torch.cat([row, row.new_zeros(width - row.shape[0], row.shape[1])]) for row in rows])
        mask = torch.stack(
            [torch.arange(width, device=device) < row.shape[0] for row in rows]
        ).to(torch.long)
        return embeds.to(self.text_encoder.dtype), mask

    @staticmethod
    def _do_true_cfg(true_cfg_scale: float, negative_prompt_ids: Any, negative_prompt_embeds: Any) -> bool:
        has_negative = negative_prompt_ids is not None or negative_prompt_embeds is not None
        if true_cfg_scale > 1 and not has_negative:
            logger.warning("true_cfg_scale=%s > 1 but no negative prompt is given: CFG is off", true_cfg_scale)
        elif true_cfg_scale <= 1 and has_negative:
            logger.warning("a negative prompt is given but true_cfg_scale=%s <= 1: CFG is off", true_cfg_scale)
        return true_cfg_scale > 1 and has_negative

    # -- images -------------------------------------------------------------------------------------

    def _decode(self, latents: torch.Tensor, height: int, width: int, output_type: str) -> Any:
        """Packed latents → images (diffusers' Qwen-Image VAE decode), or the latents for ``"latent"``."""
        if output_type == "latent":
            return latents
        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor).to(self.vae.dtype)
        z_dim = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        image = self.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return self.image_processor.postprocess(image, output_type=output_type)
