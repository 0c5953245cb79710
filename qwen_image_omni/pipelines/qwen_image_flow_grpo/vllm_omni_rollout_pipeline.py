"""Qwen-Image FlowGRPO rollout pipeline on vllm-omni (needs vllm-omni; imported when an engine asks for it).

:class:`QwenImagePipelineWithLogProb` is vllm-omni's ``QwenImagePipeline`` with our transformer
(:class:`qwen_image_omni.integrations.vllm_omni.pipelines.QwenImagePipeline`) running the same
:class:`~.rollout.QwenImageRolloutMixin` loop as the diffusers rollout pipeline, so trainer log-probs
equal rollout log-probs. RL frameworks load it with ``load_format="custom_pipeline"`` and
``custom_pipeline_name=VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "flow_grpo")``.

Each request's ``DiffusionOutput`` follows verl-omni main's contract (:mod:`..rollout_output`):
``trajectory_*`` fields plus ``output = {"payload": {"image"}, "metadata": {"prompt_embeddings", "rl"}}``.

Both of vllm-omni's execution modes run the rollout: request batches (``forward``) and step execution
(``step_execution=True``: :class:`VllmOmniStepRolloutMixin`, continuous batching), where each
request's output is what request mode gives it alone.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm_omni.diffusion.data import DiffusionOutput, OmniDiffusionConfig
from vllm_omni.diffusion.request import OmniDiffusionRequest
from vllm_omni.diffusion.worker.input_batch import InputBatch
from vllm_omni.diffusion.worker.request_batch import DiffusionRequestBatch
from vllm_omni.diffusion.worker.utils import StepRequestState

from ...integrations.vllm_omni.pipelines import QwenImagePipeline
from ..qwen_image import PromptBatch, QwenImageRolloutMixin, QwenImageTokenIdPrompts, RolloutRun, sde_scheduler
from ..request_batch import NEGATIVE_TOKEN_ID_KEYS, PROMPT_TOKEN_ID_KEYS, collate_token_ids
from ..rollout_output import per_request_rollouts
from .diffusers_training_adapter import QwenImage

__all__ = [
    "ROLLOUT_OPTIONS",
    "STEP_ROLLOUT_KEY",
    "QwenImagePipelineWithLogProb",
    "VllmOmniStepRolloutMixin",
    "merge_micro_batches",
    "options_from_extra_args",
    "request_of_state",
    "sampling_options",
]


def options_from_extra_args(defaults: dict[str, Any], extra_args: dict[str, Any] | None) -> dict[str, Any]:
    """``defaults`` overridden by the same keys of a request's ``sampling_params.extra_args``; other keys ignored."""
    extra_args = extra_args or {}
    return {name: extra_args.get(name, default) for name, default in defaults.items()}


ROLLOUT_OPTIONS: dict[str, Any] = {
    "noise_level": 0.7,
    "sde_window_size": None,
    "sde_window_range": (0, 5),
    "sde_type": "sde",
    "logprobs": True,
}
"""The rollout options read from ``sampling_params.extra_args``, with their defaults."""


STEP_ROLLOUT_KEY = "qwen_image_omni.rollout"
"""Key of a request's rollout in vllm-omni's ``StepRequestState.extra`` (step execution)."""


@dataclass
class _StepRollout:
    """A request in vllm-omni's step execution: the request alone as a batch, and its rollout in progress."""

    request: DiffusionRequestBatch
    run: RolloutRun


def request_of_state(state: StepRequestState) -> DiffusionRequestBatch:
    """The request behind a step-execution ``state`` as a one-request batch: what ``forward`` gets for it alone.

    It holds the state's own sampling parameters (its generator, latents, ``extra_args``), which the
    request's construction already resolved: ``OmniDiffusionRequest.__post_init__`` runs on a throwaway
    copy, as vllm-omni never resolves a request's parameters twice.
    """
    request = OmniDiffusionRequest(
        prompt=state.prompt, sampling_params=copy.copy(state.sampling), request_id=state.request_id
    )
    request.sampling_params = state.sampling
    return DiffusionRequestBatch(requests=[request])


def merge_micro_batches(micro_batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One micro-batch for the rows of several runs: tensors and per-row lists concatenated, other values shared.

    Raises:
        ValueError: a value that is neither a tensor nor a list differs between the micro-batches.
    """
    merged: dict[str, Any] = {}
    for key, first in micro_batches[0].items():
        values = [micro_batch[key] for micro_batch in micro_batches]
        if isinstance(first, torch.Tensor):
            merged[key] = torch.cat(values)
        elif isinstance(first, list):
            merged[key] = [item for value in values for item in value]
        elif all(value == first for value in values):
            merged[key] = first
        else:
            raise ValueError(f"micro-batch entry {key!r} differs between requests predicted together: {values!r}")
    return merged


SAMPLING_ARGUMENTS = ("num_inference_steps", "sigmas", "guidance_scale", "generator", "latents", "true_cfg_scale")
"""The request arguments (``request_arguments``) that a rollout's ``start_rollout`` takes as they are."""


def sampling_options(arguments: dict[str, Any]) -> dict[str, Any]:
    """The :data:`SAMPLING_ARGUMENTS` of a request batch's ``arguments``, for ``start_rollout``."""
    return {name: arguments[name] for name in SAMPLING_ARGUMENTS}


def _prediction_key(run: RolloutRun) -> tuple:
    """What requests must share to be predicted in one forward: the step config and the micro-batch layout."""
    pipeline = run.model_config.pipeline

    def entry(value: Any) -> Any:
        """A tensor by its per-row shape, a per-row list by kind, anything else by value."""
        return tuple(value.shape[1:]) if isinstance(value, torch.Tensor) else "rows" if isinstance(value, list) else value

    layout = tuple((key, entry(value)) for key, value in sorted(run.micro_batch.items()))
    return (
        run.model_config.architecture,
        pipeline.height,
        pipeline.width,
        pipeline.true_cfg_scale,
        pipeline.guidance_scale,
        run.prompts.do_true_cfg,
        layout,
    )


def _runner_mask(embeds: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The prompt mask handed to vllm-omni's runner: valid up to each row's last valid token.

    The runner cuts every prompt of a step batch to the longest ``mask.sum()`` in it, which would
    drop valid tokens of a prompt whose padding is not all on the right. With this mask it drops
    padding only; the steps read the prompt's own mask (:func:`_fit_mask`).
    """
    if embeds is None:
        return None
    if mask is None:
        return torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    columns = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    ends = (mask.bool() * columns).amax(dim=1, keepdim=True)
    return columns <= ends


def _fit_mask(embeds: torch.Tensor, mask: torch.Tensor | None, width: int) -> torch.Tensor:
    """The mask of ``embeds`` (None: all valid) zero-padded, or cut, to the ``width`` the runner batched them at.

    A cut drops only columns past every valid token (:func:`_runner_mask`).
    """
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    mask = mask[:, :width]
    return torch.nn.functional.pad(mask, (0, width - mask.shape[1]))


def _step_rollout(state: StepRequestState) -> _StepRollout:
    """The rollout :meth:`VllmOmniStepRolloutMixin.prepare_encode` started for ``state``."""
    step = state.extra.get(STEP_ROLLOUT_KEY)
    if not isinstance(step, _StepRollout):
        raise ValueError(f"request {state.request_id!r} has no rollout in its state: prepare_encode was not run for it")
    return step


class VllmOmniStepRolloutMixin:
    """vllm-omni's step execution (``step_execution=True``) for a rollout pipeline.

    vllm-omni's runner calls :meth:`prepare_encode` once per request, then on every engine step
    :meth:`denoise_step` on the batch it assembles from the requests in flight (latents gathered,
    prompt embeddings right-padded to a common width) and :meth:`step_scheduler` per request on
    its rows of the prediction, and :meth:`post_decode` when a request's steps are done.

    Each request keeps the :class:`RolloutRun` that request mode makes for it alone
    (``start_request_rollout`` on the one-request batch: same rollout options, prompts, noise, SDE
    windows, its own generator) with its own copy of the scheduler; the batched prediction and each
    request's scheduler step are the rollout loop's own (``rollout_prediction``, ``rollout_step``:
    the trainer's step functions), and :meth:`post_decode` returns what request mode's
    ``request_outputs`` gives that request. Our transformer reads the text length from the tensor
    width, so the runner's padding does not change the numbers.

    Put it first among the bases. The host provides ``start_request_rollout(req) -> RolloutRun``,
    ``request_outputs(req, run, to_cpu=...)`` and :class:`QwenImageRolloutMixin`'s steps.
    """

    supports_step_execution: ClassVar[bool] = True

    @torch.no_grad()
    def prepare_encode(self, state: StepRequestState, **kwargs: Any) -> StepRequestState:
        """Start the request's rollout as request mode would for it alone; set what the runner batches.

        Raises:
            ValueError, TypeError: as request mode's ``forward`` for this request.
        """
        del kwargs
        request = request_of_state(state)
        run = self.start_request_rollout(request)
        # Requests in flight may run other schedules (steps, image size): each steps with its own copy.
        run.scheduler = copy.deepcopy(run.scheduler)
        state.extra[STEP_ROLLOUT_KEY] = _StepRollout(request, run)
        state.prompt_embeds, state.negative_prompt_embeds = run.prompts.prompt_embeds, run.prompts.negative_prompt_embeds
        state.prompt_embeds_mask = _runner_mask(*run.prompts.positive)
        state.negative_prompt_embeds_mask = _runner_mask(*run.prompts.negative)
        state.do_true_cfg = run.prompts.do_true_cfg
        state.latents = run.latents
        state.timesteps = run.timesteps
        state.step_index = run.step_index
        state.scheduler = run.scheduler
        state.guidance = None  # the run's step config carries it (Qwen-Image has none)
        return state

    @torch.no_grad()
    def denoise_step(
        self, input_batch: InputBatch, *, states: Sequence[StepRequestState] | None = None, **kwargs: Any
    ) -> torch.Tensor | None:
        """The prediction for every row of the runner's batch (in its order), through the trainer's functions.

        Requests that share a step config and micro-batch layout (:func:`_prediction_key`; in
        practice all of them) are predicted in one forward; the others in one forward per group.

        Args:
            input_batch: vllm-omni's step batch: gathered latents, per-row timesteps, prompt
                embeddings padded to a common width.
            states: the batch's request states in row order (``input_batch.states`` when None).

        Returns:
            ``(rows, S, C)`` noise prediction, or None when interrupted.

        Raises:
            ValueError: a state without a rollout, or states whose rows do not add up to the batch.
        """
        del kwargs
        if getattr(self, "_interrupt", False):
            return None
        self._current_timestep = input_batch.timesteps
        states = list(input_batch.states if states is None else states)
        runs = [_step_rollout(state).run for state in states]
        bounds = list(itertools.accumulate((run.latents.shape[0] for run in runs), initial=0))
        if bounds[-1] != input_batch.latents.shape[0]:
            raise ValueError(
                f"the batch's requests hold {bounds[-1]} rows, but its latents have {input_batch.latents.shape[0]}"
            )
        groups: dict[tuple, list[int]] = {}
        for index, run in enumerate(runs):
            groups.setdefault(_prediction_key(run), []).append(index)
        noise_pred = None
        for members in groups.values():
            rows = torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i in members]).to(input_batch.latents.device)
            prediction = self._predict_rows(input_batch, [runs[i] for i in members], rows)
            if len(groups) == 1:
                return prediction
            if noise_pred is None:
                noise_pred = prediction.new_empty((bounds[-1], *prediction.shape[1:]))
            noise_pred[rows] = prediction
        return noise_pred

    def _predict_rows(self, input_batch: InputBatch, runs: list[RolloutRun], rows: torch.Tensor) -> torch.Tensor:
        """``rollout_prediction`` on ``rows`` of the batch, the rows of ``runs`` (one step config)."""
        prompt_embeds = input_batch.prompt_embeds[rows]
        prompt_mask = torch.cat([_fit_mask(*run.prompts.positive, prompt_embeds.shape[1]) for run in runs])
        negative_embeds = negative_mask = None
        if runs[0].prompts.do_true_cfg:
            negative_embeds = input_batch.negative_prompt_embeds[rows]
            width = negative_embeds.shape[1]
            negative_mask = torch.cat([_fit_mask(*run.prompts.negative, width) for run in runs])
        return self.rollout_prediction(
            runs[0].model_config,
            merge_micro_batches([run.micro_batch for run in runs]),
            input_batch.latents[rows],
            input_batch.timesteps[rows].float(),
            PromptBatch(prompt_embeds, prompt_mask, negative_embeds, negative_mask),
        )

    @torch.no_grad()
    def step_scheduler(self, state: StepRequestState, noise_pred: torch.Tensor, **kwargs: Any) -> None:
        """The request's scheduler step on its rows of the prediction, recorded as request mode records it."""
        del kwargs
        if getattr(self, "_interrupt", False):
            return
        run = _step_rollout(state).run
        run.latents = state.latents
        self.rollout_step(run, noise_pred)
        state.latents = run.latents
        state.step_index = run.step_index

    @torch.no_grad()
    def post_decode(self, state: StepRequestState, **kwargs: Any) -> DiffusionOutput:
        """The request's ``DiffusionOutput``: what request mode returns for it alone, its tensors on the CPU."""
        del kwargs
        self._current_timestep = None
        step = _step_rollout(state)
        (output,) = self.request_outputs(step.request, step.run, to_cpu=True)
        return output


class QwenImagePipelineWithLogProb(
    VllmOmniStepRolloutMixin, QwenImageRolloutMixin, QwenImageTokenIdPrompts, QwenImagePipeline
):
    """FlowGRPO rollout on vllm-omni: images plus the SDE window's latents, log-probs and timesteps.

    Runs :class:`QwenImageRolloutMixin`'s loop, the trainer's own step functions, with
    :class:`~qwen_image_omni.pipelines.schedulers.flow_match_sde.FlowMatchSDEDiscreteScheduler`.
    Sampling parameters come from the request as in :class:`QwenImagePipeline`; the rollout options
    (:data:`ROLLOUT_OPTIONS`) from ``sampling_params.extra_args``. Each request's
    ``DiffusionOutput`` carries its rows of ``trajectory_latents`` ``(n, W + 1, S, C)``,
    ``trajectory_log_probs`` ``(n, W)`` (None without ``logprobs``) and ``trajectory_timesteps`` ``(n, W)``.
    """

    supports_request_batch = True  # verl-omni's flag: forward takes a packed DiffusionRequestBatch
    training_adapter = QwenImage
    algorithm = "flow_grpo"
    hands_engines_to_vllm_omni = False  # vllm-omni has no rollout pipeline with log-probs to hand over to

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        """vllm-omni's pipeline with our transformer and the SDE scheduler."""
        super().__init__(od_config=od_config, prefix=prefix)
        self.scheduler = sde_scheduler(self.scheduler)

    @classmethod
    def rollout_options(cls, extra_args: dict[str, Any] | None) -> dict[str, Any]:
        """:data:`ROLLOUT_OPTIONS` overridden by ``extra_args``; other keys there are ignored.

        Raises:
            ValueError: ``extra_args`` asks for a non-contiguous SDE window (``sde_contiguous=False``):
                a Qwen-Image trajectory is one contiguous window of consecutive states.
        """
        if not (extra_args or {}).get("sde_contiguous", True):
            raise ValueError(
                "sde_contiguous=False is not supported by the Qwen-Image rollout: its trajectory records one "
                "contiguous SDE window (all_latents are consecutive states); set algo.sde_contiguous=true"
            )
        return options_from_extra_args(ROLLOUT_OPTIONS, extra_args)

    @torch.no_grad()
    def forward(self, req: DiffusionRequestBatch) -> list[DiffusionOutput]:
        """Roll out a request batch; one ``DiffusionOutput`` per request with its trajectory."""
        run = self.start_request_rollout(req)
        self.run_rollout(run)
        return self.request_outputs(req, run)

    def start_request_rollout(self, req: DiffusionRequestBatch) -> RolloutRun:
        """Everything before the first step of a request batch's rollout: arguments, options, prompts, noise.

        Request mode starts the whole batch here, step execution each request alone
        (:meth:`VllmOmniStepRolloutMixin.prepare_encode`). The run's ``context`` keeps the batch's
        ``arguments`` (:meth:`request_arguments`) and the ``prompt_embeddings`` the output records.

        Raises:
            ValueError: ``extra_args`` asks for what the rollout does not support
                (:meth:`rollout_options`); and as :meth:`start_rollout`.
        """
        arguments = self.request_arguments(req)
        options = self.rollout_options(req.sampling_params_list[0].extra_args)
        self._attention_kwargs = {}
        self._current_timestep = None
        self._interrupt = False
        prompts = self.rollout_prompts(req, arguments)
        run = self.start_rollout(
            prompts, height=arguments["height"], width=arguments["width"], **sampling_options(arguments), **options
        )
        run.context.update(arguments=arguments, prompt_embeddings=prompts.as_dict())
        return run

    def request_outputs(
        self, req: DiffusionRequestBatch, run: RolloutRun, *, to_cpu: bool = False
    ) -> list[DiffusionOutput]:
        """One ``DiffusionOutput`` per request of a finished run: image, trajectory and envelope (its rows).

        Args:
            req: the request batch the run rolled out (:meth:`start_request_rollout`).
            run: the finished run.
            to_cpu: move the output's tensors to the CPU (``DiffusionOutput(to_cpu=True)``).
        """
        arguments = run.context["arguments"]
        images = self._decode_latents(run.latents, arguments["height"], arguments["width"], arguments["output_type"])
        all_latents, all_log_probs, all_timesteps = run.trajectory()
        requests = per_request_rollouts(
            media=images.output,
            trajectory_latents=all_latents,
            trajectory_log_probs=all_log_probs,
            trajectory_timesteps=all_timesteps,
            prompt_embeddings=run.context["prompt_embeddings"],
            rl=self.rollout_rl(run),
            num_requests=req.num_reqs,
            rows_per_request=arguments["num_images_per_prompt"],
        )
        return [DiffusionOutput(**request, to_cpu=to_cpu) for request in requests]

    def rollout_prompts(
        self, req: DiffusionRequestBatch, arguments: dict[str, Any]
    ) -> PromptBatch:
        """The batch's prompt embeddings and masks (no negative pair without true CFG).

        Requests carry templated token ids (verl-omni's ``prompt_token_ids`` / ``prompt_mask`` /
        ``negative_prompt_ids``: :meth:`encode_prompt_ids`), precomputed embeddings, or text
        (vllm-omni's ``encode_prompt``); the negative prompt is encoded only when
        ``true_cfg_scale > 1``.
        """
        per_prompt, max_length = arguments["num_images_per_prompt"], arguments["max_sequence_length"]
        device = self.text_encoder.device if self.text_encoder is not None else "cpu"
        token_ids, token_mask = collate_token_ids(req.prompts, PROMPT_TOKEN_ID_KEYS, device)
        negative_ids, negative_mask = collate_token_ids(req.prompts, NEGATIVE_TOKEN_ID_KEYS, device)
        use_cfg = arguments["true_cfg_scale"] > 1
        if token_ids is not None:
            embeds, mask = self.encode_prompt_ids(token_ids, token_mask, None, None, per_prompt, max_length, "prompt")
            if use_cfg and negative_ids is not None:
                negative = self.encode_prompt_ids(
                    negative_ids, negative_mask, None, None, per_prompt, max_length, "negative_prompt"
                )
                return PromptBatch(embeds, mask, *negative)
            return PromptBatch(embeds, mask)
        self.check_inputs(
            arguments["prompt"], arguments["height"], arguments["width"], arguments["negative_prompt"],
            arguments["prompt_embeds"], arguments["negative_prompt_embeds"], arguments["prompt_embeds_mask"],
            arguments["negative_prompt_embeds_mask"], None, max_length,
        )  # fmt: skip
        embeds, mask = self.encode_prompt(
            prompt=arguments["prompt"],
            prompt_embeds=arguments["prompt_embeds"],
            prompt_embeds_mask=arguments["prompt_embeds_mask"],
            num_images_per_prompt=per_prompt,
            max_sequence_length=max_length,
        )
        has_negative = arguments["negative_prompt"] is not None or arguments["negative_prompt_embeds"] is not None
        if not (has_negative and use_cfg):
            return PromptBatch(embeds, mask)
        negative = self.encode_prompt(
            prompt=arguments["negative_prompt"],
            prompt_embeds=arguments["negative_prompt_embeds"],
            prompt_embeds_mask=arguments["negative_prompt_embeds_mask"],
            num_images_per_prompt=per_prompt,
            max_sequence_length=max_length,
            prompt_name="negative_prompt",
        )
        return PromptBatch(embeds, mask, *negative)

    def rollout_rl(self, run: RolloutRun) -> dict[str, Any] | None:
        """The algorithm's own tensors for ``metadata["rl"]`` (FlowGRPO: none); algorithms override it.

        Args:
            run: the finished run: final latents ``run.latents`` ``(B, S, C)``, its schedule
                ``run.timesteps``, the batch's arguments ``run.context["arguments"]``.
        """
        return None
