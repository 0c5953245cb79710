"""The Qwen-Image rollout loop, shared by the diffusers and the vllm-omni rollout pipelines.

:class:`QwenImageRolloutMixin` runs every denoising step through the training adapter's own step
functions (:class:`~.diffusers_training_adapter.QwenImage`), so rollout log-probs are the trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch
from diffusers.utils import BaseOutput

from ..checks import check_int
from ..config import DiffusionAlgoConfig, DiffusionModelConfig, DiffusionPipelineConfig
from ..schedulers.flow_match_sde import check_generator
from ..utils import adapter_model_inputs
from ..rollout_output import PROMPT_EMBEDDING_KEYS, rollout_envelope
from .common import (
    _check_rollout_scales,
    _check_sde_type,
    _match_batch,
    build_img_shapes,
    check_sde_windows,
    latent_grid,
    sample_sde_windows,
    set_qwen_image_timesteps,
)
from .diffusers_training_adapter import QwenImage

__all__ = ["QwenImageRolloutMixin", "QwenImageRolloutOutput", "QwenImageTokenIdPrompts", "RolloutRun"]

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
        prompt: ``(embeds (B, L, D), mask (B, L) or None)`` as the steps read them.
        negative_prompt: the negative pair for true CFG, or ``(None, None)``.
        model_config: the config the trainer would hold (what the step functions read).
        micro_batch: the trainer's micro-batch for the steps (image metadata, condition).
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
    prompt: tuple[torch.Tensor, torch.Tensor | None]
    negative_prompt: tuple[torch.Tensor | None, torch.Tensor | None]
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

    Runs every denoising step through :meth:`QwenImage.prepare_model_inputs`,
    :meth:`QwenImage.predict_noise` and :meth:`QwenImage.step_from_prediction` (``training_adapter``;
    together its ``sample_previous_step``), the functions the trainer uses to recompute the
    log-probabilities, so rollout and trainer cannot drift apart. Steps outside the SDE window are
    deterministic Euler steps (noise level 0); steps inside draw from the SDE and record
    ``(latents, log_prob, timestep)``. A rollout is a :class:`RolloutRun`: :meth:`start_rollout`,
    then per step :meth:`rollout_prediction` and :meth:`rollout_step` (:meth:`run_rollout` takes
    them all), so vllm-omni's step execution runs the very same steps.

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
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, list[tuple[int, int]]]:
        """Denoise from noise to final latents with prompt embeddings already encoded.

        :meth:`start_rollout` (keyword arguments as there), then every step (:meth:`run_rollout`).

        Returns:
            ``(latents, all_latents, all_log_probs, all_timesteps, sde_windows)``, one window per sample
            (:func:`sample_sde_windows`: each sample draws its own from its generator when
            ``generator`` is a list, so a packed batch gives what each request alone would).
        """
        run = self.start_rollout(
            prompt_embeds, prompt_embeds_mask, negative_prompt_embeds, negative_prompt_embeds_mask, **kwargs
        )
        self.run_rollout(run)
        return (run.latents, *run.trajectory(), run.windows)

    def start_rollout(
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
    ) -> RolloutRun:
        """Everything before the first step: initial noise, timesteps, SDE windows; a :class:`RolloutRun` at step 0.

        Prepares the initial noise, sets the timesteps (:func:`set_qwen_image_timesteps`, as the
        trainer does, on ``self.scheduler``, which the run steps with) and draws the SDE windows,
        in that order from ``generator``. True CFG runs when ``negative_prompt_embeds`` is given;
        the caller decides that (and ``true_cfg_scale > 1``). Arguments are those of
        :meth:`QwenImagePipelineWithLogProb.forward`.

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

        sde_windows = sample_sde_windows(sde_window_size, sde_window_range, len(timesteps), generator, batch_size)
        return self._new_run(
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
            sde_windows,
            sde_type,
            generator,
            logprobs,
        )

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
        sde_window: tuple[int, int] | list[tuple[int, int]],
        sde_type: str,
        generator: torch.Generator | list[torch.Generator] | None,
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
            sde_window: ``(start, end)`` step indices of the SDE steps (``end`` exclusive), shared by
                the batch, or a list of one window per sample (all of one size).
            sde_type: ``"sde"``, ``"cps"`` or ``"dance_sde"``.
            generator: random generator for the SDE noise, or a list of one per sample.
            logprobs: compute the window's log-probabilities.

        Returns:
            ``(latents, all_latents, all_log_probs, all_timesteps)``: final latents ``(B, S, C)``,
            window states ``(B, W + 1, S, C)`` float32, log-probs ``(B, W)`` or None, timesteps ``(B, W)``.
        """
        run = self._new_run(
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
            generator,
            logprobs,
        )
        self.run_rollout(run)
        return (run.latents, *run.trajectory())

    def _new_run(
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
        sde_window: tuple[int, int] | list[tuple[int, int]],
        sde_type: str,
        generator: torch.Generator | list[torch.Generator] | None,
        logprobs: bool,
    ) -> RolloutRun:
        """A checked :class:`RolloutRun` at step 0 stepping with ``self.scheduler`` (arguments as :meth:`diffuse`)."""
        windows = check_sde_windows(sde_window, len(timesteps), latents.shape[0])
        _check_sde_type(sde_type)
        if do_true_cfg and negative_prompt_embeds is None:
            raise ValueError("do_true_cfg=True needs `negative_prompt_embeds`, got None")
        cfg_scale = true_cfg_scale if do_true_cfg else 1.0
        return RolloutRun(
            latents=latents.float(),
            timesteps=timesteps,
            windows=windows,
            prompt=(prompt_embeds, prompt_embeds_mask),
            negative_prompt=(negative_prompt_embeds, negative_prompt_embeds_mask) if do_true_cfg else (None, None),
            model_config=self._step_config(img_shapes, len(timesteps), guidance, cfg_scale),
            micro_batch=self._micro_batch(img_shapes),
            noise_level=noise_level,
            sde_type=sde_type,
            generator=generator,
            logprobs=logprobs,
            scheduler=self.scheduler,
        )

    def run_rollout(self, run: RolloutRun) -> None:
        """Take every remaining step of ``run``: :meth:`rollout_prediction`, then :meth:`rollout_step`."""
        while not run.done:
            if getattr(self, "_interrupt", False):
                run.step_index += 1
                continue
            self._current_timestep = run.timesteps[run.step_index]
            noise_pred = self.rollout_prediction(
                run.model_config, run.micro_batch, run.latents, run.step_timesteps(), run.prompt, run.negative_prompt
            )
            self.rollout_step(run, noise_pred)
        self._current_timestep = None

    def rollout_prediction(
        self,
        model_config: DiffusionModelConfig,
        micro_batch: dict[str, Any],
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt: tuple[torch.Tensor, torch.Tensor | None],
        negative_prompt: tuple[torch.Tensor | None, torch.Tensor | None],
    ) -> torch.Tensor:
        """The prediction of one step through the trainer's functions (the first half of its ``sample_previous_step``).

        Args:
            model_config: the run's step config (:attr:`RolloutRun.model_config`).
            micro_batch: the run's micro-batch (image metadata, and the condition of image-conditioned adapters).
            latents: ``(B, S, C)`` current latents.
            timesteps: ``(B,)`` the step's scheduler timesteps.
            prompt: ``(embeds (B, L, D), mask (B, L) or None)``.
            negative_prompt: the negative pair for true CFG, or ``(None, None)``.

        Returns:
            ``(B, S, C)`` the (guided) noise prediction.
        """
        adapter = self.training_adapter
        # The trainer's own input path (image-conditioned adapters get their condition injected).
        model_inputs, negative_model_inputs = adapter_model_inputs(
            adapter,
            self.transformer,
            model_config,
            latents,
            timesteps,
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
        return adapter.predict_noise(
            self.transformer,
            model_inputs,
            negative_model_inputs,
            model_config.pipeline.true_cfg_scale,
            model_config,
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



class QwenImageTokenIdPrompts:
    """Prompt embeddings from templated token ids, for rollout pipelines (diffusers' and vllm-omni's).

    RL frameworks send rollouts token ids, not text (verl-omni's rollout server sends each request
    ``prompt_token_ids``, ``prompt_mask`` and ``negative_prompt_ids``). The host pipeline provides
    Qwen-Image's ``text_encoder``, ``prompt_template_encode_start_idx`` and ``_extract_masked_hidden``.
    """

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
        device = self.text_encoder.device
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

