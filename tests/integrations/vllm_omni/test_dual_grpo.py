"""The Qwen-Image Dual-GRPO rollout inside a real vllm-omni install (run by ``make test-vllm-omni``).

Loaded as RL frameworks load it (``load_format="custom_pipeline"``) on the tiny checkpoint, fed
verl-omni's token-id requests; the reference is the diffusers Dual-GRPO rollout pipeline on the same
components, and the trainer-side twin :meth:`QwenImageDualGRPO.text_log_probs`.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.vllm_omni
pytest.importorskip("vllm_omni", reason="needs vllm-omni (make test-vllm-omni)")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from vllm.config import LoadConfig  # noqa: E402
from vllm_omni.diffusion.model_loader.diffusers_loader import DiffusersPipelineLoader  # noqa: E402

from qwen_image_omni.pipelines import VllmOmniPipelineBase  # noqa: E402
from qwen_image_omni.pipelines.qwen_image_dual_grpo import QwenImageDualGRPO  # noqa: E402
from qwen_image_omni.pipelines.qwen_image_dual_grpo import (  # noqa: E402
    DiffusersQwenImagePipelineWithDualLogProb as DiffusersDualPipeline,
)
from qwen_image_omni.pipelines.qwen_image_dual_grpo.vllm_omni_rollout_pipeline import (  # noqa: E402
    QwenImagePipelineWithDualLogProb,
)
from qwen_image_omni.pipelines.rollout_output import envelope_media  # noqa: E402

from .test_pipelines import (  # noqa: E402  (vllm-omni fixtures: a one-rank world on the tiny checkpoint)
    IMAGE_TOKENS,
    SIZE,
    assert_no_text_length,
    embeds_prompts,
    od_config,  # noqa: F401
    padded_prompts,
    request_batch,
    transformer_calls,
)

NEW_TOKENS = 4
EXTRA_ARGS = {"noise_level": 0.7, "sde_window_size": 1, "sde_window_range": (0, 2), "max_new_tokens": NEW_TOKENS}
RL_KEYS = {"llm_response_ids", "llm_all_log_probs", "text_encoder_responses", "llm_response_mask"}


@pytest.fixture(scope="module")
def dual_pipeline(od_config):  # noqa: F811
    path = VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "dual_grpo")
    assert path == (
        "qwen_image_omni.pipelines.qwen_image_dual_grpo.vllm_omni_rollout_pipeline.QwenImagePipelineWithDualLogProb"
    )
    return DiffusersPipelineLoader(LoadConfig(), od_config).load_model(
        "cpu", load_format="custom_pipeline", custom_pipeline_name=path
    )


def token_id_prompts(lengths=((40, 36), (45, 38)), seed: int = 9) -> list[dict]:
    """verl-omni's per-request prompts: templated token ids (lists), positive and negative."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {"prompt_token_ids": torch.randint(3, 200, (n,), generator=generator).tolist(),
         "negative_prompt_ids": torch.randint(3, 200, (m,), generator=generator).tolist()}
        for n, m in lengths
    ]  # fmt: skip


def _batch(prompts, latents, **extra):
    requests = request_batch(prompts, latents, true_cfg_scale=4.0, extra_args={**EXTRA_ARGS, **extra})
    for index, request in enumerate(requests.requests):
        request.sampling_params.generator = torch.Generator().manual_seed(20 + index)
    return requests


def _latents():
    return torch.randn(2, IMAGE_TOKENS, 16, generator=torch.Generator().manual_seed(6))


def test_the_registry_loads_the_vllm_omni_dual_rollout(dual_pipeline):
    assert type(dual_pipeline) is QwenImagePipelineWithDualLogProb
    assert dual_pipeline.training_adapter is QwenImageDualGRPO and dual_pipeline.supports_request_batch


def test_dual_rollout_equals_the_diffusers_dual_rollout(dual_pipeline, checkpoint):
    """Token-id requests of two lengths, CFG on: each request's trajectory, embeddings and text are
    those of the diffusers Dual-GRPO pipeline on the same components and inputs."""
    prompts = token_id_prompts()
    with torch.no_grad(), transformer_calls(dual_pipeline) as calls:
        outputs = dual_pipeline.forward(_batch(prompts, _latents()))
    assert_no_text_length(calls)
    width = max(len(prompt["prompt_token_ids"]) for prompt in prompts)
    ids, mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
    negative_width = max(len(prompt["negative_prompt_ids"]) for prompt in prompts)
    negative_ids = torch.zeros(2, negative_width, dtype=torch.long)
    negative_mask = torch.zeros(2, negative_width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt["prompt_token_ids"])] = torch.tensor(prompt["prompt_token_ids"])
        mask[row, : len(prompt["prompt_token_ids"])] = 1
        negative_ids[row, : len(prompt["negative_prompt_ids"])] = torch.tensor(prompt["negative_prompt_ids"])
        negative_mask[row, : len(prompt["negative_prompt_ids"])] = 1
    diffusers_pipe = DiffusersDualPipeline(
        transformer=dual_pipeline.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(checkpoint, subfolder="scheduler"),
        text_encoder=dual_pipeline.text_encoder,
        tokenizer=dual_pipeline.tokenizer,
    )
    expected = diffusers_pipe(
        prompt_token_ids=ids, prompt_mask=mask, negative_prompt_ids=negative_ids, negative_prompt_mask=negative_mask,
        true_cfg_scale=4.0, height=SIZE, width=SIZE, num_inference_steps=3, latents=_latents(),
        generator=[torch.Generator().manual_seed(20 + row) for row in range(2)], output_type="latent",
        noise_level=0.7, sde_window_size=1, sde_window_range=(0, 2), max_new_tokens=NEW_TOKENS,
    )  # fmt: skip
    for row, output in enumerate(outputs):
        rl = output.output["metadata"]["rl"]
        assert set(rl) == RL_KEYS
        assert rl["llm_response_ids"].shape == (1, NEW_TOKENS) and len(rl["text_encoder_responses"]) == 1
        assert torch.equal(rl["llm_response_ids"], expected.rl["llm_response_ids"][row : row + 1])
        assert rl["text_encoder_responses"] == expected.rl["text_encoder_responses"][row : row + 1]
        torch.testing.assert_close(
            rl["llm_all_log_probs"], expected.rl["llm_all_log_probs"][row : row + 1], rtol=0, atol=1e-6
        )
        torch.testing.assert_close(output.trajectory_latents, expected.all_latents[row : row + 1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            output.trajectory_log_probs, expected.all_log_probs[row : row + 1], rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(envelope_media(output.output), expected.images[row : row + 1], rtol=1e-5, atol=1e-6)


def test_trainer_rescores_the_vllm_omni_text_log_probs(dual_pipeline):
    """The trainer's twin on the requests' prompt ids (left-padded to another width) gives the rollout's log-probs."""
    prompts = token_id_prompts()
    with torch.no_grad():
        outputs = dual_pipeline.forward(_batch(prompts, _latents()))
    ids = torch.zeros(2, 50, dtype=torch.long)
    mask = torch.zeros(2, 50, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 50 - len(prompt["prompt_token_ids"]) :] = torch.tensor(prompt["prompt_token_ids"])
        mask[row, 50 - len(prompt["prompt_token_ids"]) :] = 1
    response = torch.cat([output.output["metadata"]["rl"]["llm_response_ids"] for output in outputs])
    recorded = torch.cat([output.output["metadata"]["rl"]["llm_all_log_probs"] for output in outputs])
    with torch.no_grad():
        log_probs = QwenImageDualGRPO.text_log_probs(dual_pipeline.text_encoder, ids, mask, response)
    expected = recorded.gather(-1, response[..., None]).squeeze(-1)
    deltas = (log_probs - expected).abs().amax(dim=0).tolist()
    assert max(deltas) <= 1e-5, f"per-step max |Δ log-prob| {deltas} > 1e-5"


def test_text_options_come_from_extra_args(dual_pipeline):
    with torch.no_grad():
        outputs = dual_pipeline.forward(_batch(token_id_prompts(), _latents(), max_new_tokens=2, llm_logprobs=False))
    for output in outputs:
        rl = output.output["metadata"]["rl"]
        assert rl["llm_all_log_probs"] is None and rl["llm_response_ids"].shape == (1, 2)


def test_requests_without_token_ids_are_refused(dual_pipeline):
    embeds, mask = padded_prompts((7, 13), seed=4)
    with pytest.raises(ValueError, match="every request needs `prompt_token_ids`"):
        dual_pipeline.forward(_batch(embeds_prompts(embeds, mask), _latents()))
    with pytest.raises(ValueError, match=r"`top_p` must be in \(0, 1\], got 2.0"):
        dual_pipeline.forward(_batch(token_id_prompts(), _latents(), top_p=2.0))
