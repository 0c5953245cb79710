"""Qwen-Image FlowGRPO training adapter: scheduler, transformer inputs, forward + reverse-SDE step.

The rollout pipelines (:mod:`.rollout`) run their steps through :meth:`QwenImage.prepare_model_inputs`
and :meth:`QwenImage.sample_previous_step` too, so a trainer re-scoring a rollout's transitions
computes exactly what the rollout computed.
"""

from __future__ import annotations

from typing import Any

import torch

from ...models import QwenImageTransformer2DModel
from ..checks import check_int
from ..config import DiffusionModelConfig
from ..model_base import DiffusionModelBase
from ..qwen_image import (
    QWEN_IMAGE_VAE_SCALE_FACTOR,
    apply_true_cfg,
    build_img_shapes,
    check_sde_type,
    load_qwen_image_scheduler,
    micro_batch_value,
    module_dtype,
    select_step,
    set_pipeline_timesteps,
)
from ..schedulers.flow_match_sde import FlowMatchSDEDiscreteScheduler
from ..training_module import prepare_for_trainer
from ..utils import default_device

__all__ = ["QwenImage"]


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
    def build_module(cls, model_config: DiffusionModelConfig, torch_dtype: torch.dtype) -> QwenImageTransformer2DModel:
        """Our transformer from the checkpoint's transformer folder, for the trainer (verl-omni's hook).

        Reads ``<local_path>/<transformer_subfolder>`` (default ``transformer``), or ``config_path``
        when the config sets one, as verl-omni's ``AutoModel`` path does; same config, same
        state-dict keys, so diffusers checkpoints and LoRA names carry over. The module attends with
        the config's ``attn_backend`` and its config saves itself into trainer checkpoints
        (:func:`~qwen_image_omni.pipelines.training_module.prepare_for_trainer`).

        Raises:
            ValueError: the config has no ``local_path`` (nor ``config_path``), or names an
                attention backend that cannot run here.
        """
        config_path = getattr(model_config, "config_path", None)
        local_path = getattr(model_config, "local_path", None)
        if not (config_path or local_path):
            raise ValueError("build_module needs model_config.local_path (a diffusers checkpoint folder), got None")
        subfolder = "" if config_path else getattr(model_config, "transformer_subfolder", "transformer")
        module = QwenImageTransformer2DModel.from_pretrained(
            config_path or local_path, subfolder=subfolder, torch_dtype=torch_dtype
        )
        return prepare_for_trainer(module, model_config)

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
        scheduler = load_qwen_image_scheduler(FlowMatchSDEDiscreteScheduler, getattr(model_config, "local_path", None))
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
        set_pipeline_timesteps(scheduler, model_config.pipeline, device)

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
        prompt embeddings go in at whatever width they have.

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
        hidden_states = select_step(latents, step, 3, "latents")
        timestep = select_step(timesteps, step, 1, "timesteps")
        dtype = module_dtype(module)
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
        model_config: DiffusionModelConfig | None = None,
    ) -> torch.Tensor:
        """Transformer forward (:meth:`forward`, once per prompt), with true CFG (:func:`apply_true_cfg`)
        when ``true_cfg_scale > 1``.

        Raises:
            ValueError: if ``true_cfg_scale > 1`` and ``negative_model_inputs`` is None.
        """
        noise_pred = cls.forward(module, model_config, model_inputs)
        if true_cfg_scale <= 1.0:
            return noise_pred
        if negative_model_inputs is None:
            raise ValueError(
                f"true_cfg_scale={true_cfg_scale} > 1 needs `negative_model_inputs` "
                "(from negative prompt embeddings), got None"
            )
        negative_noise_pred = cls.forward(module, model_config, negative_model_inputs)
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
        noise_level: float | list[float],
        sde_type: str,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_logprobs: bool = True,
        model_config: DiffusionModelConfig | None = None,
    ) -> tuple:
        """One reverse step: :meth:`predict_noise` then the scheduler's ``sample_previous_step``.

        The one implementation of a step: the rollout calls it with ``prev_sample=None`` (draws the
        transition), the trainer with the rollout's ``prev_sample`` (scores it).

        Args:
            module, scheduler, model_inputs, negative_model_inputs: as in :meth:`forward_and_sample_previous_step`.
            sample: ``(B, S, C)`` current latents x_t (cast to float32 for the scheduler).
            timestep: ``(B,)`` scheduler timesteps of this step (values of ``scheduler.timesteps``).
            true_cfg_scale: CFG scale; <= 1 disables CFG.
            noise_level: eta; 0 gives the deterministic Euler step; a list gives one per sample.
            sde_type: ``"sde"``, ``"cps"`` or ``"dance_sde"``.
            prev_sample: ``(B, S, C)`` x_{t-1} to score, or None to draw it.
            generator: random generator for the drawn noise.
            return_logprobs: compute the log-probability.
            model_config: handed to :meth:`forward` (adapters whose prediction depends on it).

        Returns:
            ``(prev_sample, log_prob, prev_sample_mean, std_dev_t, sqrt_dt)``.
        """
        noise_pred = cls.predict_noise(module, model_inputs, negative_model_inputs, true_cfg_scale, model_config)
        return cls.step_from_prediction(
            scheduler,
            noise_pred,
            sample=sample,
            timestep=timestep,
            noise_level=noise_level,
            sde_type=sde_type,
            prev_sample=prev_sample,
            generator=generator,
            return_logprobs=return_logprobs,
        )

    @classmethod
    def step_from_prediction(
        cls,
        scheduler: FlowMatchSDEDiscreteScheduler,
        noise_pred: torch.Tensor,
        *,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        noise_level: float | list[float],
        sde_type: str,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_logprobs: bool = True,
    ) -> tuple:
        """The scheduler half of :meth:`sample_previous_step`, on a prediction already made.

        vllm-omni's step execution predicts a whole continuous batch at once and steps each request
        on its own rows; this is that per-request step. Arguments and result as
        :meth:`sample_previous_step`; ``noise_pred`` is :meth:`predict_noise`'s output for ``sample``.
        """
        levels = noise_level if isinstance(noise_level, (list, tuple)) else [noise_level] * sample.shape[0]
        if len(levels) != sample.shape[0]:
            raise ValueError(f"`noise_level` must be one number or one per sample ({sample.shape[0]}), got {len(levels)}")
        step = {"sde_type": check_sde_type(sde_type), "return_logprobs": return_logprobs, "return_sqrt_dt": True}
        if len(set(levels)) == 1:
            return scheduler.sample_previous_step(
                sample=sample.float(),
                model_output=noise_pred.float(),
                timestep=timestep,
                generator=generator,
                noise_level=levels[0],
                prev_sample=None if prev_sample is None else prev_sample.float(),
                **step,
            )
        # Samples at different noise levels (each inside or outside its own SDE window): one scheduler
        # step per level, each sample with its own generator, then back into batch order.
        results: list[Any] = [None] * 5
        for level in dict.fromkeys(levels):
            rows = [row for row, value in enumerate(levels) if value == level]
            index = torch.tensor(rows, device=sample.device)
            part = scheduler.sample_previous_step(
                sample=sample[index].float(),
                model_output=noise_pred[index].float(),
                timestep=timestep[index] if torch.is_tensor(timestep) and timestep.ndim else timestep,
                generator=[generator[row] for row in rows] if isinstance(generator, (list, tuple)) else generator,
                noise_level=level,
                prev_sample=None if prev_sample is None else prev_sample[index].float(),
                **step,
            )
            for position, value in enumerate(part):
                if value is None:
                    continue
                value = value.expand(len(rows), *value.shape[1:]) if value.shape[0] == 1 else value
                if results[position] is None:
                    results[position] = value.new_zeros((sample.shape[0], *value.shape[1:]))
                results[position][index] = value
        return tuple(results)

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
            model_config=model_config,
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
        height = micro_batch_value(micro_batch, "height")
        width = micro_batch_value(micro_batch, "width")
        vae_scale_factor = micro_batch_value(micro_batch, "vae_scale_factor")
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
