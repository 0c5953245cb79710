"""vllm-omni's step execution (``step_execution=True``) of every RL rollout pipeline, and bf16 engine start.

Component tests drive each rollout pipeline (loaded as RL frameworks load it, ``custom_pipeline``) with
vllm-omni's own ``DiffusionModelRunner``: step mode through ``execute_stepwise`` (its state cache,
``InputBatch`` with prompts padded to a common width, per-request ``step_scheduler``, ``post_decode``),
request mode through ``execute_model_batch`` (``forward``) on each request alone. Two requests with
prompts of different lengths are in flight together, the second admitted one engine step later; each
one's output must be request mode's for it alone, field by field (fp32, <= 1e-5).

Full-engine tests (``Omni`` on the CPU platform, ``tests/support/vllm_omni_engine.py``): the FlowGRPO rollout
as verl-omni loads it (``custom_pipeline_args``, ``step_execution=True``), and a bf16 engine in step
mode that must get through its dummy run and serve.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm_omni
pytest.importorskip("vllm_omni", reason="needs vllm-omni (make test-vllm-omni)")

from vllm.config import LoadConfig  # noqa: E402
from vllm_omni.diffusion.model_loader.diffusers_loader import DiffusersPipelineLoader  # noqa: E402
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image import get_qwen_image_post_process_func  # noqa: E402
from vllm_omni.diffusion.request import OmniDiffusionRequest  # noqa: E402
from vllm_omni.diffusion.sched.interface import (  # noqa: E402
    CachedRequestData,
    DiffusionSchedulerOutput,
    NewRequestData,
)
from vllm_omni.diffusion.worker import diffusion_model_runner as model_runner  # noqa: E402
from vllm_omni.diffusion.worker.diffusion_model_runner import DiffusionModelRunner  # noqa: E402
from vllm_omni.inputs.data import OmniDiffusionSamplingParams  # noqa: E402

from qwen_image_omni import QwenImageTransformer2DModel  # noqa: E402
from qwen_image_omni.integrations import vllm_omni as integration  # noqa: E402
from qwen_image_omni.pipelines import VllmOmniPipelineBase  # noqa: E402

from tests.support.vllm_omni_versions import diffusion_worker_vllm_config  # noqa: E402
from .test_pipelines import (  # noqa: E402  (vllm-omni fixtures: a one-rank world on the tiny checkpoint)
    IMAGE_TOKENS,
    SIZE,
    assert_no_text_length,
    od_config,  # noqa: F401
    padded_prompts,
    rollout_pipeline,  # noqa: F401
    transformer_calls,
)
from .test_dual_grpo import dual_pipeline, token_id_prompts  # noqa: E402, F401
from .test_rl_pipelines import CONDITION_SHAPES, TARGET_SHAPE, edit_pipeline, nft_pipeline  # noqa: E402, F401
from tests.support.vllm_omni_engine import OURS, has_cpu_platform, run_engine_job  # noqa: E402

STEPS = 3
TOLERANCE = 1e-5
WINDOW = {"noise_level": 0.7, "sde_type": "sde", "sde_window_size": 2, "sde_window_range": (0, STEPS)}


# ----------------------------------------------------------------------------- vllm-omni's runner


@pytest.fixture(scope="module")
def runner(od_config):  # noqa: F811
    """vllm-omni's diffusion model runner on the CPU; each test puts its pipeline in.

    Without ``VLLM_TARGET_DEVICE=cpu`` (the engine tests' platform) vllm-omni's platform here has no
    memory statistics, which the runner samples around every step: they read 0 bytes.
    """
    vllm_config = diffusion_worker_vllm_config(torch.device("cpu"), od_config)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("reset_peak_memory_stats", "max_memory_reserved", "max_memory_allocated"):
            if getattr(model_runner.current_omni_platform, name, None) is None:
                patch.setattr(model_runner.current_omni_platform, name, lambda *args, **kwargs: 0, raising=False)
        yield DiffusionModelRunner(vllm_config, od_config, torch.device("cpu"))


def scheduler_output(step: int, new: list[OmniDiffusionRequest], running: list[str]) -> DiffusionSchedulerOutput:
    """One scheduler wave: ``new`` requests admitted, ``running`` ones continued."""
    return DiffusionSchedulerOutput(
        step_id=step,
        scheduled_new_reqs=[NewRequestData(request_id=request.request_id, req=request) for request in new],
        scheduled_cached_reqs=CachedRequestData(request_ids=list(running)),
        finished_req_ids=set(),
        num_running_reqs=len(new) + len(running),
        num_waiting_reqs=0,
    )


def run_step_mode(runner, pipe, requests: list[OmniDiffusionRequest]) -> dict:
    """Step execution of ``requests`` on vllm-omni's runner, request ``i`` admitted at engine step ``i``.

    Returns each request's ``DiffusionOutput`` by request id.
    """
    runner.pipeline, runner.input_batch = pipe, None
    runner.state_cache.clear()
    waiting, running, outputs, step = list(requests), [], {}, 0
    while waiting or running:
        new = [waiting.pop(0)] if waiting else []
        result = runner.execute_stepwise(scheduler_output(step, new, running))
        running += [request.request_id for request in new]
        for output in result.runner_outputs:
            if output.finished:
                assert output.result.error is None, output.result.error
                outputs[output.request_id] = output.result
                running.remove(output.request_id)
        step += 1
    assert not runner.state_cache
    return outputs


def run_request_mode(runner, pipe, request: OmniDiffusionRequest):
    """Request mode on ``request`` alone: vllm-omni's runner calls ``forward`` on a one-request batch."""
    runner.pipeline = pipe
    (output,) = runner.execute_model_batch(scheduler_output(0, [request], []), runner.od_config).runner_outputs
    assert output.finished and output.result.error is None, output.result.error
    return output.result


def recorded(output) -> dict:
    """Everything a rollout output records: the trajectory fields and the envelope (image, metadata)."""
    names = ("trajectory_latents", "trajectory_log_probs", "trajectory_timesteps", "output")
    return {name: getattr(output, name) for name in names}


def max_difference(step, request, path: str = "output") -> float:
    """The largest absolute difference between two recorded trees; everything but float values must be equal.

    Step-mode tensors must be on the CPU with request mode's shapes and dtypes.
    """
    if isinstance(request, torch.Tensor):
        assert isinstance(step, torch.Tensor), f"{path}: {type(step).__name__} in step mode"
        assert step.device.type == "cpu", f"{path} is on {step.device}"
        assert (step.shape, step.dtype) == (request.shape, request.dtype), f"{path}: {step.shape} {step.dtype}"
        if not step.is_floating_point():
            assert torch.equal(step, request), path
            return 0.0
        return (step.float() - request.float()).abs().max().item() if step.numel() else 0.0
    if isinstance(request, dict):
        assert isinstance(step, dict) and set(step) == set(request), f"{path}: keys {sorted(step)} != {sorted(request)}"
        return max((max_difference(step[key], request[key], f"{path}.{key}") for key in request), default=0.0)
    if isinstance(request, (list, tuple)):
        assert type(step) is type(request) and len(step) == len(request), path
        return max((max_difference(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(step, request))), default=0.0)
    assert step == request, f"{path}: {step!r} != {request!r}"
    return 0.0


# ----------------------------------------------------------------------------- the six rollout pipelines


def embeds_prompt(valid: int, width: int, seed: int, *, left: bool = False, negative: tuple | None = None) -> dict:
    """A request carrying precomputed prompt embeddings: ``valid`` tokens padded to ``width`` (left or right)."""
    embeds, mask = padded_prompts((valid,), seed=seed, width=width)
    if left:
        embeds, mask = embeds.roll(width - valid, dims=1), mask.roll(width - valid, dims=1)
    prompt = {"prompt_embeds": embeds[0], "prompt_embeds_mask": mask[0]}
    if negative is not None:
        negative_embeds, negative_mask = padded_prompts((negative[0],), seed=seed + 1, width=negative[1])
        prompt |= {"negative_prompt_embeds": negative_embeds[0], "negative_prompt_embeds_mask": negative_mask[0]}
    return prompt


def condition(tokens_shapes: list[tuple[int, int, int]], seed: int) -> dict:
    """Precomputed Edit condition: packed latents for ``tokens_shapes`` and the ``img_shapes`` that go with them."""
    tokens = sum(frames * rows * cols for frames, rows, cols in tokens_shapes)
    latents = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed))
    return {"condition_image_latents": latents, "img_shapes": [[TARGET_SHAPE, *tokens_shapes]]}


@dataclass
class Case:
    """Two requests for one rollout pipeline: their prompts and the sampling parameters they share."""

    fixture: str
    prompts: Callable[[], list]
    sampling: dict = field(default_factory=dict)
    batched_rows: int = 2
    """Most rows in one transformer call: both requests predicted together."""


CASES = {
    # verl-omni's token-id requests, CFG, two images per request (one generator, two windows each).
    "flow_grpo": Case(
        "rollout_pipeline",
        lambda: token_id_prompts(((40, 36), (45, 38))),
        {"true_cfg_scale": 4.0, "num_outputs_per_prompt": 2, "output_type": "pt", "extra_args": WINDOW},
        batched_rows=4,
    ),
    # Precomputed embeddings, one left-padded wider than the other's valid length (the runner must not cut it).
    "mix_grpo": Case(
        "mix_grpo_pipeline",
        lambda: [embeds_prompt(7, 20, seed=4, left=True), embeds_prompt(13, 13, seed=5)],
        {"extra_args": {"sde_window_size": 1, "sde_window_range": (0, STEPS), "sample_strategy": "progressive",
                        "global_steps": 1}},
    ),  # fmt: skip
    # Text prompts through vllm-omni's encode_prompt, CFG.
    "dpo": Case(
        "dpo_pipeline",
        lambda: [
            {"prompt": "a cat", "negative_prompt": " "},
            {"prompt": "a red bicycle by a lake", "negative_prompt": "blur"},
        ],
        {"true_cfg_scale": 4.0, "output_type": "pt", "extra_args": {"noise_level": 0.7}},
    ),
    "diffusion_nft": Case(
        "nft_pipeline",
        lambda: [embeds_prompt(7, 24, seed=4, negative=(3, 9)), embeds_prompt(13, 13, seed=6, negative=(5, 5))],
        {"true_cfg_scale": 4.0, "extra_args": {**WINDOW, "return_trajectory": True}},
    ),
    # Conditions of 12 and 8 tokens: not one forward, so the runner's batch is predicted in two.
    "edit_flow_grpo": Case(
        "edit_pipeline",
        lambda: [
            embeds_prompt(7, 24, seed=4, negative=(3, 9)) | condition(CONDITION_SHAPES, seed=12),
            embeds_prompt(13, 13, seed=6, negative=(5, 5)) | condition([(1, 2, 2), (1, 2, 2)], seed=13),
        ],
        {"true_cfg_scale": 4.0, "extra_args": WINDOW},
        batched_rows=1,
    ),
    "dual_grpo": Case(
        "dual_pipeline",
        lambda: token_id_prompts(((40, 36), (45, 38))),
        {"true_cfg_scale": 4.0, "extra_args": {**WINDOW, "sde_window_size": 1, "max_new_tokens": 4}},
    ),
}


def load_rollout_pipeline(od_config, algorithm: str):  # noqa: F811
    """A text-to-image rollout pipeline as RL frameworks load it (``custom_pipeline``)."""
    path = VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", algorithm)
    return DiffusersPipelineLoader(LoadConfig(), od_config).load_model(
        "cpu", load_format="custom_pipeline", custom_pipeline_name=path
    )


@pytest.fixture(scope="module")
def mix_grpo_pipeline(od_config):  # noqa: F811
    return load_rollout_pipeline(od_config, "mix_grpo")


@pytest.fixture(scope="module")
def dpo_pipeline(od_config):  # noqa: F811
    return load_rollout_pipeline(od_config, "dpo")


def make_requests(case: Case) -> list[OmniDiffusionRequest]:
    """Fresh requests of ``case`` (the runner keeps and mutates what it gets), seeds 10 and 11."""
    return [
        OmniDiffusionRequest(
            prompt=prompt,
            sampling_params=OmniDiffusionSamplingParams(
                **{"height": SIZE, "width": SIZE, "num_inference_steps": STEPS, "output_type": "latent",
                   "seed": 10 + index, **copy.deepcopy(case.sampling)},
            ),  # fmt: skip
            request_id=f"request-{index}",
        )
        for index, prompt in enumerate(case.prompts())
    ]


@pytest.mark.parametrize("algorithm", list(CASES))
def test_step_mode_equals_request_mode_on_each_request_alone(request, runner, algorithm):
    """Two requests in flight (the second joins one step later, prompts of other lengths): each output
    (trajectory, log-probs, timesteps, image, prompt embeddings, rl fields) is request mode's for it alone."""
    case = CASES[algorithm]
    pipe = request.getfixturevalue(case.fixture)
    with transformer_calls(pipe) as calls:
        stepped = run_step_mode(runner, pipe, make_requests(case))
    assert_no_text_length(calls)
    assert max(kwargs["hidden_states"].shape[0] for kwargs in calls) == case.batched_rows
    worst = 0.0
    for alone in make_requests(case):
        expected = recorded(run_request_mode(runner, pipe, alone))
        assert expected["trajectory_latents"] is not None and expected["output"]["metadata"]["prompt_embeddings"]
        worst = max(worst, max_difference(recorded(stepped[alone.request_id]), expected))
    print(f"\n{algorithm}: step mode vs request mode alone, max abs difference {worst:.3g}")
    assert worst <= TOLERANCE


def test_edit_requests_of_other_condition_sizes_are_predicted_apart(runner, edit_pipeline):  # noqa: F811
    """The runner batches Edit requests whose conditions differ in size; each gets its own forward."""
    with transformer_calls(edit_pipeline) as calls:
        run_step_mode(runner, edit_pipeline, make_requests(CASES["edit_flow_grpo"]))
    widths = {kwargs["hidden_states"].shape[1] for kwargs in calls}
    assert widths == {IMAGE_TOKENS + 12, IMAGE_TOKENS + 8}


def test_step_mode_keeps_request_mode_option_checks(runner, rollout_pipeline):  # noqa: F811
    """``sde_contiguous=False`` is refused in step mode too: that request ends with the error, the other runs."""
    requests = make_requests(CASES["flow_grpo"])
    requests[0].sampling_params.extra_args = {**WINDOW, "sde_contiguous": False}
    runner.pipeline, runner.input_batch = rollout_pipeline, None
    runner.state_cache.clear()
    try:
        result = runner.execute_stepwise(scheduler_output(0, requests, []))
    except ValueError as error:  # vllm-omni 0.27: a failing prepare_encode fails the whole wave
        message = str(error)
    else:
        outputs = {output.request_id: output for output in result.runner_outputs}
        assert outputs["request-0"].finished and not outputs["request-1"].finished
        message = outputs["request-0"].result.error
    assert "sde_contiguous=False is not supported" in message
    runner.state_cache.clear()


# ----------------------------------------------------------------------------- the full engine

FLOW_GRPO_PATH = VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "flow_grpo")
ENGINE_PROMPTS = [
    {"prompt": "a cat", "negative_prompt": " "},
    {"prompt": "a red bicycle by a lake", "negative_prompt": " "},
]
ENGINE_SAMPLING = {
    "height": SIZE, "width": SIZE, "num_inference_steps": STEPS, "seed": 5, "true_cfg_scale": 4.0,
    "output_type": "pt", "extra_args": {**WINDOW, "sde_window_range": [0, STEPS]},
}  # fmt: skip

engine = pytest.mark.skipif(not has_cpu_platform(), reason="needs the test-support CPU platform")


@engine
@pytest.mark.slow
@pytest.mark.vllm_omni_engine
def test_engine_step_execution_rollout_as_verl_omni_loads_it(
    checkpoint, tmp_path, runner, rollout_pipeline  # noqa: F811
):
    """verl-omni's engine set-up (``custom_pipeline_args``, ``step_execution=True``, two requests in flight):
    every output carries the trajectory and the envelope, equal to request mode on each request alone."""
    job = {
        "model": str(checkpoint),
        "engine": {
            "step_execution": True,
            "max_num_seqs": 2,
            "custom_pipeline_args": {"pipeline_class": FLOW_GRPO_PATH},
            "worker_extension_cls": None,  # vllm-omni's own, which loads the custom pipeline
        },
        "steps": [{"generate": ENGINE_PROMPTS, "sampling": ENGINE_SAMPLING, "rollout": True}],
    }
    result = run_engine_job(tmp_path / "job", job)
    outputs = torch.load(tmp_path / "job" / "step0.pt", weights_only=False)
    assert len(outputs) == 2 and "Dummy run failed" not in result["log"]
    post_process = get_qwen_image_post_process_func(runner.od_config)
    for index, output in enumerate(outputs):
        sampling = OmniDiffusionSamplingParams(**copy.deepcopy(ENGINE_SAMPLING))
        alone = OmniDiffusionRequest(
            prompt=ENGINE_PROMPTS[index], sampling_params=sampling, request_id=f"alone-{index}"
        )
        expected = run_request_mode(runner, rollout_pipeline, alone)
        worst = max(
            max_difference(output[name], getattr(expected, name), name)
            for name in ("trajectory_latents", "trajectory_log_probs", "trajectory_timesteps")
        )
        metadata = output["multimodal_output"]["metadata"]
        worst = max(worst, max_difference(metadata, expected.output["metadata"], "metadata"))
        print(f"\nengine request {index}: step mode vs request mode alone, max abs difference {worst:.3g}")
        assert worst <= TOLERANCE
        image = np.asarray(post_process(expected.output)["payload"]["image"][0].convert("RGB"))
        np.testing.assert_array_equal(output["images"][0], image)


def test_denoise_inputs_take_the_transformer_dtype(checkpoint):
    """Inside vllm-omni our pipelines hand the transformer latents in its own dtype, whatever dtype vllm-omni
    made them in (the prompt embeddings'); our transformer alone still refuses another dtype."""
    transformer = QwenImageTransformer2DModel.from_pretrained(
        checkpoint, subfolder="transformer", torch_dtype=torch.bfloat16
    )
    latents = torch.randn(1, IMAGE_TOKENS, 16)
    embeds, mask = padded_prompts((5,), seed=3)
    positive, _, _ = integration.QwenImageOmniMixin._build_denoise_kwargs(
        SimpleNamespace(transformer=transformer), latents, torch.tensor(500.0), None, embeds, mask,
        [[(1, SIZE // 16, SIZE // 16)]], False, None, None, extra_transformer_kwargs={"return_dict": False},
    )  # fmt: skip
    assert positive["hidden_states"].dtype == torch.bfloat16
    assert transformer(**positive)[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="`hidden_states` must have the model's dtype torch.bfloat16"):
        transformer(**{**positive, "hidden_states": latents})


@engine
@pytest.mark.slow
@pytest.mark.vllm_omni_engine
@pytest.mark.parametrize("pipeline_class", [None, FLOW_GRPO_PATH], ids=["serving", "flow_grpo-rollout"])
def test_bf16_engine_in_step_mode_starts_and_serves(checkpoint, tmp_path, pipeline_class):
    """bf16 + ``step_execution=True``: the dummy run at engine start and two requests go through our
    transformer (the tiny checkpoint's text encoder loads in float32, so its prompts come in float32)."""
    engine_options = {"dtype": "bfloat16", "step_execution": True, "max_num_seqs": 2}
    steps = [{"rpc": "probe_pipeline"}]
    if pipeline_class is not None:  # as verl-omni loads a rollout pipeline; vllm-omni's own worker extension
        engine_options |= {"custom_pipeline_args": {"pipeline_class": pipeline_class}, "worker_extension_cls": None}
        steps = []
    sampling = {"height": SIZE, "width": SIZE, "num_inference_steps": 2, "seed": 0, "output_type": "pt"}
    steps.append({"generate": ["a cat", "a red bicycle by a lake"], "sampling": sampling})
    result = run_engine_job(tmp_path / "job", {"model": str(checkpoint), "engine": engine_options, "steps": steps})
    if pipeline_class is None:
        assert result["steps"][0]["rpc"] == [[OURS]]
    images = result["images"][len(steps) - 1]
    assert images.shape == (2, SIZE, SIZE, 3) and images.std() > 0
