"""The Qwen-Image rollout loop, shared by every algorithm's diffusers and vllm-omni rollout pipelines.

:class:`QwenImageRolloutMixin` runs every denoising step through the training adapter's own step
functions, so rollout log-probs are the trainer's (:func:`~.recompute.recompute_log_probs` re-scores them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch
from diffusers.utils import BaseOutput

from ..config import DiffusionAlgoConfig, DiffusionModelConfig, DiffusionPipelineConfig
from ..rollout_output import PROMPT_EMBEDDING_KEYS, rollout_envelope
from ..schedulers.flow_match_sde import check_generator
from ..utils import adapter_model_inputs
from .geometry import ImageGeometry
from .prompts import PromptBatch
from .scheduling import set_qwen_image_timesteps
from .sde_window import check_rollout_scales, sample_sde_windows

__all__ = ["OUTPUT_TYPES", "QwenImageRolloutMixin", "QwenImageRolloutOutput", "RolloutRun"]

OUTPUT_TYPES = ("latent", "pt", "pil")
"""What a rollout pipeline's ``output_type`` may be: packed latents, tensors in [0, 1] or PIL images."""


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
        sde_window: the ``(start, end)`` step indices of the SDE window (of the first sample when
            the samples drew their own windows; ``sde_windows`` has all of them).
        rl: the algorithm's own tensors for the trainer (``metadata["rl"]`` of :attr:`output`), or None.
        sde_windows: one ``(start, end)`` per sample.

    verl-omni main's contract is :attr:`output` (the envelope with ``prompt_embeddings`` and ``rl``
    metadata) plus the ``trajectory_*`` properties, as on vllm-omni's ``DiffusionOutput``.
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
    rl: dict[str, Any] | None = None
    sde_windows: list[tuple[int, int]] | None = None

    @property
    def trajectory_latents(self) -> torch.Tensor:
        """``all_latents`` under vllm-omni's ``DiffusionOutput`` name."""
        return self.all_latents

    @property
    def trajectory_log_probs(self) -> torch.Tensor | None:
        """``all_log_probs`` under vllm-omni's ``DiffusionOutput`` name."""
        return self.all_log_probs

    @property
    def trajectory_timesteps(self) -> torch.Tensor:
        """``all_timesteps`` under vllm-omni's ``DiffusionOutput`` name."""
        return self.all_timesteps

    @property
    def prompt_embeddings(self) -> dict[str, Any]:
        """The prompt embeddings and masks the rollout used (``metadata["prompt_embeddings"]``)."""
        return {key: getattr(self, key) for key in PROMPT_EMBEDDING_KEYS}

    @property
    def output(self) -> dict[str, Any]:
        """verl-omni's envelope: ``{"payload": {"image"}, "metadata": {"prompt_embeddings", "rl"}}``."""
        return rollout_envelope(self.images, prompt_embeddings=self.prompt_embeddings, rl=self.rl)

    @property
    def custom_output(self) -> dict[str, Any]:
        """The rollout data under the ``custom_output`` keys of verl-omni's earlier interface (verl-omni main reads :attr:`output`)."""
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


@dataclass
class RolloutRun:
    """One rollout in progress: what its steps read, its current latents and what it has recorded.

    :meth:`QwenImageRolloutMixin.start_rollout` makes one at step 0 and
    :meth:`QwenImageRolloutMixin.rollout_step` advances it. A request batch runs all its steps in one
    call (:meth:`QwenImageRolloutMixin.run_rollout`); vllm-omni's step execution keeps one per request
    and takes one step per engine step, the prediction batched with the other requests in flight.

    Args:
        latents: ``(B, S, C)`` float32 current latents.
        timesteps: ``(N,)`` the schedule (``scheduler.timesteps`` after ``set_timesteps``).
        windows: one ``(start, end)`` SDE window per sample.
        prompts: the prompt batch the steps read (its negative pair only with true CFG).
        model_config: the config the trainer would hold (what the step functions read), built once
            from the image size.
        micro_batch: the trainer's micro-batch for the steps (image size entries, condition).
        noise_level: SDE noise level inside the windows.
        sde_type: ``"sde"``, ``"cps"`` or ``"dance_sde"``.
        generator: the noise generator, or one per sample.
        logprobs: record the window's log-probabilities.
        scheduler: the SDE scheduler, ``timesteps`` set, that steps this run.
        step_index: the next step.
        context: the host pipeline's own data (request arguments, recorded prompt embeddings, ...).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    windows: list[tuple[int, int]]
    prompts: PromptBatch
    model_config: DiffusionModelConfig
    micro_batch: dict[str, Any]
    noise_level: float
    sde_type: str
    generator: torch.Generator | list[torch.Generator] | None
    logprobs: bool
    scheduler: Any
    step_index: int = 0
    context: dict[str, Any] = field(default_factory=dict)
    recorded_latents: list[list[torch.Tensor]] = field(init=False)
    recorded_log_probs: list[list[torch.Tensor | None]] = field(init=False)
    recorded_timesteps: list[list[torch.Tensor]] = field(init=False)

    def __post_init__(self) -> None:
        rows = range(self.latents.shape[0])
        self.recorded_latents = [[] for _ in rows]
        self.recorded_log_probs = [[] for _ in rows]
        self.recorded_timesteps = [[] for _ in rows]

    @property
    def done(self) -> bool:
        """Whether every step of the schedule is taken."""
        return self.step_index >= len(self.timesteps)

    def step_timesteps(self) -> torch.Tensor:
        """``(B,)`` float32 timestep of the current step, one per sample."""
        timestep = self.timesteps[self.step_index]
        return timestep.reshape(1).expand(self.latents.shape[0]).to(device=self.latents.device, dtype=torch.float32)

    def trajectory(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(all_latents (B, W + 1, S, C), all_log_probs (B, W) or None, all_timesteps (B, W))`` recorded so far."""

        def stack(per_row: list[list[torch.Tensor]]) -> torch.Tensor:
            return torch.stack([torch.stack(steps) for steps in per_row])

        log_probs = stack(self.recorded_log_probs) if self.logprobs else None
        return stack(self.recorded_latents), log_probs, stack(self.recorded_timesteps)


class QwenImageRolloutMixin:
    """The rollout loop, shared by every Qwen-Image rollout pipeline (diffusers' and vllm-omni's).

    Runs every denoising step through the training adapter's ``prepare_model_inputs``,
    ``predict_noise`` and ``step_from_prediction`` (together its ``sample_previous_step``), the
    functions the trainer uses to recompute the log-probabilities, so rollout and trainer cannot drift
    apart. Steps outside the SDE window are deterministic Euler steps (noise level 0); steps inside
    draw from the SDE and record ``(latents, log_prob, timestep)``. A rollout is a :class:`RolloutRun`:
    :meth:`start_rollout`, then per step :meth:`rollout_prediction` and :meth:`rollout_step`
    (:meth:`run_rollout` takes them all), so vllm-omni's step execution runs the very same steps.

    A pipeline class sets :attr:`training_adapter` and :attr:`algorithm`. The host pipeline provides
    ``transformer`` (ours), ``scheduler`` (:class:`FlowMatchSDEDiscreteScheduler`), ``vae_scale_factor``
    and Qwen-Image's ``prepare_latents(batch_size, num_channels_latents, height, width, dtype, device,
    generator, latents)``, which diffusers' and vllm-omni's ``QwenImagePipeline`` both have.
    """

    training_adapter: type
    """The trainer-side adapter (a ``QwenImage`` subclass) whose step functions the rollout runs."""

    algorithm: str
    """The registry algorithm of this pipeline (``DiffusionModelConfig.algorithm``)."""

    architecture: str = "QwenImagePipeline"
    """The registry architecture of this pipeline (``DiffusionModelConfig.architecture``)."""

    def rollout(
        self, prompts: PromptBatch, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, list[tuple[int, int]]]:
        """Denoise from noise to final latents with prompt embeddings already encoded.

        :meth:`start_rollout` (arguments as there), then every step (:meth:`run_rollout`).

        Returns:
            ``(latents, all_latents, all_log_probs, all_timesteps, sde_windows)``: final latents
            ``(B, S, C)``, window states ``(B, W + 1, S, C)`` float32, log-probs ``(B, W)`` or None,
            timesteps ``(B, W)``, one window per sample (:func:`sample_sde_windows`: each sample draws
            its own from its generator when ``generator`` is a list, so a packed batch gives what each
            request alone would).
        """
        run = self.start_rollout(prompts, **kwargs)
        self.run_rollout(run)
        return (run.latents, *run.trajectory(), run.windows)

    def start_rollout(
        self,
        prompts: PromptBatch,
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
        condition: dict[str, Any] | None = None,
    ) -> RolloutRun:
        """Everything before the first step: initial noise, timesteps, SDE windows; a :class:`RolloutRun` at step 0.

        Prepares the initial noise, sets the timesteps (:func:`set_qwen_image_timesteps`, as the
        trainer does, on ``self.scheduler``, which the run steps with) and draws the SDE windows,
        in that order from ``generator``. True CFG runs when ``prompts`` has a negative pair; the
        caller decides that (and ``true_cfg_scale > 1``).

        Args:
            prompts: the encoded prompts (:class:`PromptBatch`).
            height: image height in pixels, a multiple of ``2 * vae_scale_factor``.
            width: image width in pixels (same rule).
            num_inference_steps: number of denoising steps N.
            sigmas: custom sigmas instead of ``linspace(1, 1/N, N)``.
            guidance_scale: distilled guidance scale, used only by ``guidance_embeds`` checkpoints.
            generator: a random generator, or one per sample.
            latents: ``(B, S, C)`` initial packed noise; drawn when None.
            true_cfg_scale: CFG scale (used when ``prompts`` has a negative pair).
            noise_level: SDE noise level inside the window.
            sde_window_size: number of SDE steps; None: every step but the last.
            sde_window_range: ``(low, high)`` envelope the window is drawn in.
            sde_type: ``"sde"``, ``"cps"`` or ``"dance_sde"``.
            logprobs: record the window's log-probabilities.
            condition: extra micro-batch entries every step reads (an Edit rollout's condition latents
                and ``img_shapes``), or None.

        Raises:
            ValueError: a size that is not a multiple of ``2 * vae_scale_factor``; a NaN, infinite or
                negative scale or noise level; an SDE window that does not fit the steps; a generator
                list whose length is not the batch; mismatched shapes.
            TypeError: an argument of the wrong type.
        """
        if not isinstance(prompts, PromptBatch):
            raise TypeError(f"`prompts` must be a PromptBatch, got {type(prompts).__name__}")
        check_rollout_scales(true_cfg_scale, guidance_scale, noise_level, sde_type)
        geometry = ImageGeometry(height, width, self.vae_scale_factor)
        batch_size, device = prompts.batch_size, prompts.prompt_embeds.device
        generator = check_generator(generator, batch_size)
        latents = self._initial_latents(batch_size, geometry, device, generator, latents)
        timesteps = set_qwen_image_timesteps(self.scheduler, num_inference_steps, geometry.image_seq_len, device, sigmas)
        windows = sample_sde_windows(sde_window_size, sde_window_range, len(timesteps), generator, batch_size)
        guidance = float(guidance_scale) if getattr(self.transformer.config, "guidance_embeds", False) else None
        cfg_scale = float(true_cfg_scale) if prompts.do_true_cfg else 1.0
        return RolloutRun(
            latents=latents.float(),
            timesteps=timesteps,
            windows=windows,
            prompts=prompts,
            model_config=self._step_config(geometry, len(timesteps), guidance, cfg_scale),
            micro_batch={**geometry.micro_batch(), **(condition or {})},
            noise_level=noise_level,
            sde_type=sde_type,
            generator=generator,
            logprobs=logprobs,
            scheduler=self.scheduler,
        )

    def _initial_latents(
        self,
        batch_size: int,
        geometry: ImageGeometry,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """Packed float32 noise ``(B, rows * cols, in_channels)``, or the given ``latents`` after a shape check."""
        in_channels = self.transformer.config.in_channels
        expected = (batch_size, geometry.image_seq_len, in_channels)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(
                f"`latents` must have shape {expected} (batch, image tokens, in_channels), got {tuple(latents.shape)}"
            )
        return self._prepare_noise(batch_size, in_channels // 4, geometry, device, generator, latents)

    def _prepare_noise(
        self,
        batch_size: int,
        num_channels_latents: int,
        geometry: ImageGeometry,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """The host's ``prepare_latents`` in float32 (a host whose ``prepare_latents`` differs overrides this)."""
        return self.prepare_latents(
            batch_size, num_channels_latents, geometry.height, geometry.width, torch.float32, device, generator, latents
        )

    def _step_config(
        self, geometry: ImageGeometry, num_steps: int, guidance_scale: float | None, true_cfg_scale: float
    ) -> DiffusionModelConfig:
        """The model config the trainer would hold for this rollout (what the step functions read)."""
        return DiffusionModelConfig(
            architecture=self.architecture,
            algorithm=self.algorithm,
            pipeline=DiffusionPipelineConfig(
                height=geometry.height,
                width=geometry.width,
                num_inference_steps=num_steps,
                true_cfg_scale=true_cfg_scale,
                guidance_scale=guidance_scale,
            ),
            algo=DiffusionAlgoConfig(),
        )

    # -- the denoising loop -------------------------------------------------------------------------

    def run_rollout(self, run: RolloutRun) -> None:
        """Take every remaining step of ``run``: :meth:`rollout_prediction`, then :meth:`rollout_step`."""
        while not run.done:
            if getattr(self, "_interrupt", False):
                run.step_index += 1
                continue
            self._current_timestep = run.timesteps[run.step_index]
            noise_pred = self.rollout_prediction(
                run.model_config, run.micro_batch, run.latents, run.step_timesteps(), run.prompts
            )
            self.rollout_step(run, noise_pred)
        self._current_timestep = None

    def rollout_prediction(
        self,
        model_config: DiffusionModelConfig,
        micro_batch: dict[str, Any],
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompts: PromptBatch,
    ) -> torch.Tensor:
        """The prediction of one step through the trainer's functions (the first half of its ``sample_previous_step``).

        Args:
            model_config: the run's step config (:attr:`RolloutRun.model_config`).
            micro_batch: the run's micro-batch (image metadata, and the condition of image-conditioned adapters).
            latents: ``(B, S, C)`` current latents.
            timesteps: ``(B,)`` the step's scheduler timesteps.
            prompts: the prompt batch (true CFG when it has a negative pair).

        Returns:
            ``(B, S, C)`` the (guided) noise prediction.
        """
        adapter = self.training_adapter
        # The trainer's own input path (image-conditioned adapters get their condition injected).
        model_inputs, negative_model_inputs = adapter_model_inputs(
            adapter, self.transformer, model_config, latents, timesteps, *prompts.positive, *prompts.negative,
            micro_batch, 0,
        )  # fmt: skip
        attention_kwargs = getattr(self, "_attention_kwargs", None)
        if attention_kwargs:
            model_inputs["attention_kwargs"] = attention_kwargs
            if negative_model_inputs is not None:
                negative_model_inputs["attention_kwargs"] = attention_kwargs
        return adapter.predict_noise(
            self.transformer, model_inputs, negative_model_inputs, model_config.pipeline.true_cfg_scale, model_config
        )

    def rollout_step(self, run: RolloutRun, noise_pred: torch.Tensor) -> None:
        """The scheduler step of ``run``'s current step on ``noise_pred``, recorded when inside a sample's window.

        Samples inside their SDE window draw from the SDE at ``run.noise_level`` and record
        ``(latents, log_prob, timestep)``; the others take the deterministic Euler step (noise level 0).
        Advances ``run.latents`` and ``run.step_index``.
        """
        index = run.step_index
        in_window = [start <= index < end for start, end in run.windows]
        for row, (start, _) in enumerate(run.windows):
            if index == start:
                run.recorded_latents[row].append(run.latents[row])
        timesteps = run.step_timesteps()
        latents, log_prob, *_ = self.training_adapter.step_from_prediction(
            run.scheduler,
            noise_pred,
            sample=run.latents,
            timestep=timesteps,
            noise_level=[run.noise_level if inside else 0.0 for inside in in_window],
            sde_type=run.sde_type,
            generator=run.generator,
            return_logprobs=run.logprobs and any(in_window),
        )
        for row, inside in enumerate(in_window):
            if inside:
                run.recorded_latents[row].append(latents[row])
                run.recorded_log_probs[row].append(None if log_prob is None else log_prob[row])
                run.recorded_timesteps[row].append(timesteps[row])
        run.latents = latents
        run.step_index += 1
