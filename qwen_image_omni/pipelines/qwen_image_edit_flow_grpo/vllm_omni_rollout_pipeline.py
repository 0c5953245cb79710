"""Qwen-Image-Edit-Plus FlowGRPO rollout pipeline on vllm-omni (needs vllm-omni; imported when an engine asks for it).

:class:`QwenImageEditPlusPipelineWithLogProb` is vllm-omni's ``QwenImageEditPlusPipeline`` with our
transformer (:class:`qwen_image_omni.integrations.vllm_omni.pipelines.QwenImageEditPlusPipeline`) running the
Qwen-Image rollout loop (:class:`~..qwen_image.rollout.QwenImageRolloutMixin`) with the
condition handling of :class:`~.rollout.QwenImageEditRolloutMixin`, the loop of the diffusers Edit
rollout pipeline, so trainer log-probs equal rollout log-probs. RL frameworks load it with
``load_format="custom_pipeline"`` and
``custom_pipeline_name=VllmOmniPipelineBase.get_pipeline_path("QwenImageEditPlusPipeline", "flow_grpo")``.

Each request (a prompt dict) carries, as verl-omni's Edit rollout server sends it:

- its condition: vllm-omni's own Edit-Plus preprocessing output (``additional_information`` with
  ``condition_images``, ``vae_images``, ``vae_image_sizes``, written by
  ``get_qwen_image_edit_plus_pre_process_func`` from ``multi_modal_data["image"]``), encoded here by
  vllm-omni's ``prepare_latents`` (VAE, normalised, packed); or precomputed packed
  ``condition_image_latents`` ``(S_c, C)`` with their ``img_shapes`` ``[target, *conditions]``;
- its prompt: templated token ids (``prompt_token_ids`` / ``prompt_mask`` / ``negative_prompt_ids`` /
  ``negative_prompt_mask``, image placeholders already expanded, encoded with the condition images'
  pixels as verl-omni does), text (``prompt`` / ``negative_prompt``, vllm-omni's ``encode_prompt``
  with the condition images), or precomputed ``prompt_embeds`` / ``prompt_embeds_mask`` (and negatives).

Each request's ``DiffusionOutput`` follows verl-omni main's contract (:mod:`..rollout_output`):
``trajectory_*`` plus ``output = {"payload": {"image"}, "metadata": {"prompt_embeddings", "rl"}}``
with ``rl = {"condition_image_latents", "img_shapes"}`` (its rows). No text length anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from vllm_omni.diffusion.data import DiffusionOutput, OmniDiffusionConfig
from vllm_omni.diffusion.utils.size_utils import normalize_min_aligned_size
from vllm_omni.diffusion.worker.request_batch import DiffusionRequestBatch

from ...integrations.vllm_omni.pipelines import QwenImageEditPlusPipeline
from ..qwen_image import (
    OUTPUT_TYPES,
    ImageGeometry,
    PromptBatch,
    QwenImageRolloutMixin,
    RolloutRun,
    latent_grid,
    sde_scheduler,
)
from ..qwen_image_flow_grpo.vllm_omni_rollout_pipeline import (
    QwenImagePipelineWithLogProb,
    VllmOmniStepRolloutMixin,
    sampling_options,
)
from ..request_batch import NEGATIVE_TOKEN_ID_KEYS, PROMPT_TOKEN_ID_KEYS, collate_token_ids
from ..rollout_output import PROMPT_EMBEDDING_KEYS, per_request_rollouts
from .diffusers_training_adapter import CONDITION_LATENTS_KEY, IMG_SHAPES_KEY
from .rollout import QwenImageEditRolloutMixin, is_shape

__all__ = ["QwenImageEditPlusPipelineWithLogProb"]


def _pad_rows(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(embeds (b, L_i, D), mask (b, L_i))`` pairs with zeros to the widest and stack them."""
    width = max(embeds.shape[1] for embeds, _ in rows)
    embeds = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, width - e.shape[1])) for e, _ in rows])
    masks = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for _, m in rows])
    return embeds, masks


class QwenImageEditPlusPipelineWithLogProb(
    VllmOmniStepRolloutMixin, QwenImageEditRolloutMixin, QwenImageRolloutMixin, QwenImageEditPlusPipeline
):
    """Edit-Plus FlowGRPO rollout on vllm-omni: edited images plus the SDE window's latents, log-probs and timesteps.

    vllm-omni's Edit-Plus components (our transformer, its Qwen2.5-VL encoder, processor and VAE),
    :class:`~qwen_image_omni.pipelines.schedulers.flow_match_sde.FlowMatchSDEDiscreteScheduler`, and
    the diffusers Edit rollout pipeline's loop. Sampling parameters come from the batch's first
    request as in vllm-omni; the rollout options (FlowGRPO's ``ROLLOUT_OPTIONS``) from
    ``sampling_params.extra_args``. Unlike vllm-omni's Edit-Plus ``forward``, a batch may hold many
    requests; their condition latents must have one token count and their ``img_shapes`` one target.
    vllm-omni's step execution runs it too (:class:`VllmOmniStepRolloutMixin`): requests in flight
    whose conditions have other token counts are predicted in separate forwards.
    """

    supports_request_batch = True  # verl-omni's flag: forward takes a packed DiffusionRequestBatch
    hands_engines_to_vllm_omni = False  # vllm-omni has no rollout pipeline with log-probs to hand over to

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        """vllm-omni's Edit-Plus pipeline with our transformer and the SDE scheduler."""
        super().__init__(od_config=od_config, prefix=prefix)
        self.scheduler = sde_scheduler(self.scheduler)

    @classmethod
    def rollout_options(cls, extra_args: dict[str, Any] | None) -> dict[str, Any]:
        """FlowGRPO's rollout options from ``extra_args`` (:meth:`QwenImagePipelineWithLogProb.rollout_options`)."""
        return QwenImagePipelineWithLogProb.rollout_options(extra_args)

    # -- request batch --------------------------------------------------------------------------------

    def request_arguments(self, req: DiffusionRequestBatch) -> dict[str, Any]:
        """The batch's generation arguments, from its first request's sampling parameters (vllm-omni's defaults).

        ``height`` / ``width`` stay None when the request sets none (the condition decides them).
        """
        sampling = req.sampling_params_list[0]
        height, width = sampling.height, sampling.width
        if height and width:
            height, width = normalize_min_aligned_size(height, width, self.vae_scale_factor * 2)
        output_type = sampling.output_type or "pil"
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        per_prompt = sampling.num_outputs_per_prompt if sampling.num_outputs_per_prompt > 0 else 1
        return {
            "height": height or None,
            "width": width or None,
            "num_inference_steps": sampling.num_inference_steps or 50,
            "sigmas": sampling.sigmas,
            "guidance_scale": sampling.guidance_scale if sampling.guidance_scale_provided else 1.0,
            "num_images_per_prompt": per_prompt,
            "generator": req.collate_request_generators(per_prompt, None),
            "true_cfg_scale": sampling.true_cfg_scale or 4.0,
            "max_sequence_length": sampling.max_sequence_length or self.tokenizer_max_length,
            "latents": req.collate_request_tensors("latents", None),
            "output_type": output_type,
        }

    @torch.no_grad()
    def forward(self, req: DiffusionRequestBatch) -> list[DiffusionOutput]:
        """Roll out an Edit request batch; one ``DiffusionOutput`` per request with its trajectory and condition.

        Raises:
            ValueError: a request without a condition or a prompt, requests whose conditions do not
                batch, and as the diffusers Edit rollout pipeline's ``forward``.
        """
        run = self.start_request_rollout(req)
        self.run_rollout(run)
        return self.request_outputs(req, run)

    def start_request_rollout(self, req: DiffusionRequestBatch) -> RolloutRun:
        """Everything before the first step of an Edit batch's rollout: arguments, condition, prompts, noise.

        Request mode starts the whole batch here, step execution each request alone
        (:meth:`~..qwen_image_flow_grpo.vllm_omni_rollout_pipeline.VllmOmniStepRolloutMixin.prepare_encode`).
        The run's ``context`` keeps ``arguments``, the ``prompt_embeddings`` the output records and
        the repeated condition (``"edit"``, :meth:`start_edit_rollout`).

        Raises:
            ValueError: as :meth:`forward`.
        """
        arguments = self.request_arguments(req)
        options = self.rollout_options(req.sampling_params_list[0].extra_args)
        self._attention_kwargs = {}
        self._guidance_scale = arguments["guidance_scale"]
        self._current_timestep = None
        self._interrupt = False
        condition_latents, img_shapes, condition_images, height, width = self.rollout_condition(req, arguments)
        prompts = self.rollout_prompts(req, arguments, condition_images)
        run = self.start_edit_rollout(
            prompts,
            condition_image_latents=condition_latents,
            img_shapes=img_shapes,
            num_images_per_prompt=arguments["num_images_per_prompt"],
            height=height,
            width=width,
            **sampling_options(arguments),
            **options,
        )
        run.context.update(arguments=arguments, prompt_embeddings=prompts.as_dict())
        return run

    def request_outputs(
        self, req: DiffusionRequestBatch, run: RolloutRun, *, to_cpu: bool = False
    ) -> list[DiffusionOutput]:
        """One ``DiffusionOutput`` per request of a finished run: edited image, trajectory, envelope with the condition.

        Args:
            req: the request batch the run rolled out (:meth:`start_request_rollout`).
            run: the finished run.
            to_cpu: move the output's tensors to the CPU (``DiffusionOutput(to_cpu=True)``).
        """
        arguments, edit = run.context["arguments"], run.context["edit"]
        images = self._decode_edit(run.latents, edit["height"], edit["width"], arguments["output_type"])
        all_latents, all_log_probs, all_timesteps = run.trajectory()
        requests = per_request_rollouts(
            media=images,
            trajectory_latents=all_latents,
            trajectory_log_probs=all_log_probs,
            trajectory_timesteps=all_timesteps,
            prompt_embeddings=run.context["prompt_embeddings"],
            rl={CONDITION_LATENTS_KEY: edit[CONDITION_LATENTS_KEY], IMG_SHAPES_KEY: edit[IMG_SHAPES_KEY]},
            num_requests=req.num_reqs,
            rows_per_request=arguments["num_images_per_prompt"],
        )
        return [DiffusionOutput(**request, to_cpu=to_cpu) for request in requests]

    # -- condition ------------------------------------------------------------------------------------

    def rollout_condition(
        self, req: DiffusionRequestBatch, arguments: dict[str, Any]
    ) -> tuple[torch.Tensor, list[list[tuple[int, int, int]]], list[list[Any] | None], int, int]:
        """The batch's condition: ``(latents (N, S_c, C), img_shapes per prompt, condition images per prompt, height, width)``.

        Per request, precomputed ``condition_image_latents`` + ``img_shapes``, or vllm-omni's Edit-Plus
        preprocessing output in ``additional_information`` (``vae_images`` through vllm-omni's
        ``prepare_latents``: VAE encode, normalise, pack). The target size is the sampling
        parameters', else the precomputed target shape, else vllm-omni's ``calculated_height`` /
        ``calculated_width``.

        Raises:
            ValueError: a request with neither; condition latents that do not batch.
        """
        latents, shapes, images, targets, calculated = [], [], [], [], []
        for index, prompt in enumerate(req.prompts):
            fields = prompt if isinstance(prompt, Mapping) else {}
            info = fields.get("additional_information") or {}
            if fields.get(CONDITION_LATENTS_KEY) is not None:
                condition, sample_shapes = self._precomputed_condition(fields, index)
                targets.append(sample_shapes[0])
            elif info.get("vae_images") is not None:
                condition, sample_shapes = self._encode_condition(info, index)
                calculated.append((info.get("calculated_height"), info.get("calculated_width")))
            else:
                raise ValueError(
                    f"request {index}: an Edit rollout needs a condition image: `multi_modal_data['image']` "
                    "(preprocessed by vllm-omni's Edit-Plus pre-process function into `additional_information`) "
                    f"or precomputed `{CONDITION_LATENTS_KEY}` with `{IMG_SHAPES_KEY}`; got keys {sorted(fields)}"
                )
            latents.append(condition)
            shapes.append(sample_shapes)
            images.append(info.get("condition_images"))
        if len({tuple(condition.shape[1:]) for condition in latents}) != 1:
            raise ValueError(
                "the requests' condition latents must have one (tokens, channels) shape to batch, got "
                f"{[tuple(condition.shape) for condition in latents]}"
            )
        height, width = arguments["height"], arguments["width"]
        if height is None or width is None:
            pixels = 2 * self.vae_scale_factor
            if targets:
                height, width = height or targets[0][1] * pixels, width or targets[0][2] * pixels
            elif calculated and all(calculated[0]):
                size = normalize_min_aligned_size(*calculated[0], pixels)
                height, width = height or size[0], width or size[1]
            else:
                raise ValueError(
                    "the Edit rollout needs `height` and `width` (sampling parameters) or a condition size"
                )
        rows, cols = latent_grid(height, width, self.vae_scale_factor)
        shapes = [sample if sample[0] is not None else [(1, rows, cols), *sample[1:]] for sample in shapes]
        return torch.cat(latents), shapes, images, height, width

    def _precomputed_condition(self, fields: Mapping[str, Any], index: int) -> tuple[torch.Tensor, list]:
        """A request's ``condition_image_latents`` ``(1, S_c, C)`` and its ``[target, *conditions]`` shapes."""
        condition = fields[CONDITION_LATENTS_KEY]
        if not isinstance(condition, torch.Tensor):
            raise TypeError(
                f"request {index}: `{CONDITION_LATENTS_KEY}` must be a torch.Tensor, got {type(condition).__name__}"
            )
        condition = condition.unsqueeze(0) if condition.ndim == 2 else condition
        if condition.ndim != 3 or condition.shape[0] != 1:
            raise ValueError(
                f"request {index}: `{CONDITION_LATENTS_KEY}` must be packed (tokens, channels) or (1, tokens, channels), "
                f"got {tuple(condition.shape)}"
            )
        shapes = fields.get(IMG_SHAPES_KEY)
        if isinstance(shapes, (list, tuple)) and len(shapes) == 1 and not is_shape(shapes[0]):
            shapes = shapes[0]  # verl-omni records one [target, *conditions] list per row
        if not isinstance(shapes, (list, tuple)) or len(shapes) < 2 or not all(is_shape(tuple(s)) for s in shapes):
            raise ValueError(
                f"request {index}: `{IMG_SHAPES_KEY}` must be [(1, rows, cols) of the target, *(1, rows, cols) per "
                f"condition] with precomputed `{CONDITION_LATENTS_KEY}`, got {shapes!r}"
            )
        return condition, [tuple(shape) for shape in shapes]

    def _encode_condition(self, info: Mapping[str, Any], index: int) -> tuple[torch.Tensor, list]:
        """A request's preprocessed ``vae_images`` through vllm-omni's ``prepare_latents``; shapes ``[None, *conditions]``."""
        sizes = info.get("vae_image_sizes")
        vae_images = info["vae_images"]
        if not sizes or len(sizes) != len(vae_images):
            raise ValueError(
                f"request {index}: `additional_information['vae_image_sizes']` must hold one (width, height) per "
                f"vae image ({len(vae_images)}), got {sizes!r}"
            )
        device, dtype = self.vae.device, self.vae.dtype
        # `latents` given: prepare_latents draws no noise and only encodes the condition images.
        _, condition = self.prepare_latents(
            list(vae_images), 1, self.transformer.config.in_channels // 4, 2 * self.vae_scale_factor,
            2 * self.vae_scale_factor, dtype, device, None, torch.zeros(1, device=device),
        )  # fmt: skip
        pixels = 2 * self.vae_scale_factor
        return condition, [None, *[(1, height // pixels, width // pixels) for width, height in sizes]]

    # -- prompts --------------------------------------------------------------------------------------

    def rollout_prompts(
        self, req: DiffusionRequestBatch, arguments: dict[str, Any], condition_images: list[list[Any] | None]
    ) -> PromptBatch:
        """The batch's prompt embeddings and masks, repeated per image (negatives ``None`` without true CFG).

        Token ids and text are encoded with each request's condition images; precomputed
        embeddings are collated as they are. The negative prompt is encoded only when
        ``true_cfg_scale > 1``.

        Raises:
            ValueError: a request with no prompt; token ids or text without condition images.
        """
        per_prompt, max_length = arguments["num_images_per_prompt"], arguments["max_sequence_length"]
        use_cfg = arguments["true_cfg_scale"] > 1
        device = self.text_encoder.device
        token_ids, token_mask = collate_token_ids(req.prompts, PROMPT_TOKEN_ID_KEYS, device)
        embeds = DiffusionRequestBatch.collate_prompt_field_map(req.prompts, dict.fromkeys(PROMPT_EMBEDDING_KEYS))
        if token_ids is not None:
            negative_ids, negative_mask = collate_token_ids(req.prompts, NEGATIVE_TOKEN_ID_KEYS, device)
            positive = self._encode_token_ids(token_ids, token_mask, condition_images, "prompt")
            negative = None
            if use_cfg and negative_ids is not None:
                negative = self._encode_token_ids(negative_ids, negative_mask, condition_images, "negative_prompt")
        elif embeds["prompt_embeds"] is not None:
            positive = self._given_embeds(embeds["prompt_embeds"], embeds["prompt_embeds_mask"], "prompt")
            negative = None
            if use_cfg and embeds["negative_prompt_embeds"] is not None:
                negative = self._given_embeds(
                    embeds["negative_prompt_embeds"], embeds["negative_prompt_embeds_mask"], "negative_prompt"
                )
        else:
            positive = self._encode_texts(req.prompts, "prompt", condition_images, max_length)
            negative = None
            if use_cfg and all(isinstance(p, Mapping) and p.get("negative_prompt") is not None for p in req.prompts):
                negative = self._encode_texts(req.prompts, "negative_prompt", condition_images, max_length)

        def finish(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, mask = pair[0][:, :max_length], pair[1][:, :max_length]
            return embeds.repeat_interleave(per_prompt, dim=0), mask.repeat_interleave(per_prompt, dim=0)

        return PromptBatch(*finish(positive), *(finish(negative) if negative is not None else (None, None)))

    @staticmethod
    def _given_embeds(embeds: torch.Tensor, mask: torch.Tensor | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Collated precomputed ``(N, L, D)`` embeddings with their mask (all ones when None)."""
        if embeds.ndim != 3:
            raise ValueError(f"`{name}_embeds` must be (width, dim) per request, got batch shape {tuple(embeds.shape)}")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(f"`{name}_embeds_mask` must have shape {tuple(embeds.shape[:2])}, got {tuple(mask.shape)}")
        return embeds, mask.to(embeds.device)

    def _encode_texts(
        self, prompts: list[Any], name: str, condition_images: list[list[Any] | None], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's text through vllm-omni's Edit-Plus ``encode_prompt`` with its condition images."""
        rows = []
        for index, (prompt, images) in enumerate(zip(prompts, condition_images)):
            text = prompt if isinstance(prompt, str) and name == "prompt" else None
            if isinstance(prompt, Mapping):
                text = prompt.get(name)
            if text is None:
                raise ValueError(
                    f"request {index}: no {name} (token ids, `{name}_embeds` or text) for the Edit rollout"
                )
            if not images:
                raise ValueError(f"request {index}: a text {name} is encoded with the condition images, got none")
            rows.append(self.encode_prompt(prompt=text, image=images, max_sequence_length=max_length, prompt_name=name))
        return _pad_rows(rows)

    def _encode_token_ids(
        self, token_ids: torch.Tensor, mask: torch.Tensor, condition_images: list[list[Any] | None], name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Templated token ids (image placeholders expanded) through the text encoder with each request's image pixels.

        verl-omni's Edit encoding: the processor's image processor gives ``pixel_values`` and
        ``image_grid_thw``; the last hidden state of the valid tokens, template prefix dropped.
        """
        if self.processor is None:
            raise ValueError(
                f"token ids for the {name} need the checkpoint's `processor/` (Qwen2VLProcessor); this pipeline has none"
            )
        drop = self.prompt_template_encode_start_idx
        rows = []
        for index, images in enumerate(condition_images):
            if not images:
                raise ValueError(f"request {index}: {name} token ids are encoded with the condition images, got none")
            pixels = self.processor.image_processor(images=images, return_tensors="pt")
            row_mask = mask[index : index + 1]
            outputs = self.text_encoder(
                input_ids=token_ids[index : index + 1],
                attention_mask=row_mask,
                pixel_values=pixels["pixel_values"].to(device=token_ids.device, dtype=self.text_encoder.dtype),
                image_grid_thw=pixels["image_grid_thw"].to(token_ids.device),
                output_hidden_states=True,
            )
            (hidden,) = self._extract_masked_hidden(outputs.hidden_states[-1], row_mask)
            hidden = hidden[drop:]
            if hidden.shape[0] == 0:
                raise ValueError(
                    f"request {index}: the {name} must have more than prompt_template_encode_start_idx={drop} valid tokens"
                )
            rows.append((hidden.unsqueeze(0), torch.ones(1, hidden.shape[0], dtype=torch.long, device=hidden.device)))
        return _pad_rows(rows)

    # -- latents and images ---------------------------------------------------------------------------

    def _prepare_noise(
        self,
        batch_size: int,
        num_channels_latents: int,
        geometry: ImageGeometry,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """Packed float32 target noise ``(B, S, C)`` from vllm-omni's Edit-Plus ``prepare_latents`` (no condition image)."""
        noise, _ = self.prepare_latents(
            None, batch_size, num_channels_latents, geometry.height, geometry.width, torch.float32, device, generator,
            latents,
        )  # fmt: skip
        return noise

    def _decode_edit(self, latents: torch.Tensor, height: int, width: int, output_type: str) -> torch.Tensor:
        """Packed latents → decoded image tensor ``(B, 3, H, W)`` as vllm-omni's Edit-Plus ``forward`` returns it
        (its post-process function makes the images), or the latents for ``"latent"``."""
        if output_type == "latent":
            return latents
        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor).to(self.vae.dtype)
        z_dim = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        return self.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
