"""Our Qwen-Image Dual-GRPO rollout on vllm-omni against verl-omni main's own ``QwenImagePipelineWithDualLogProb``.

Runs in ``.venv-verl-omni`` with the verl-omni source on ``PYTHONPATH`` (``make test-verl-omni``).
Both pipelines are loaded through vllm-omni's loader on the tiny checkpoint and fed the same
token-id requests; the tiny text encoder decodes greedily (``generation_config.do_sample`` False;
verl-omni passes no ``do_sample`` either), so the two sides compare.

Where the two differ on purpose, the tests pin verl-omni's behaviour down:

- prompts of different lengths: verl-omni hands ``generate`` the right-padded batch (padding between
  a short prompt and its response); ours re-packs the prompts with left padding, so each request
  generates what it would alone. On equal lengths the two agree.
- ``llm_response_mask``: ours only (1 up to and including the first EOS).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.verl_omni, pytest.mark.vllm_omni]
pytest.importorskip("verl_omni", reason="needs the verl-omni source on PYTHONPATH (make test-verl-omni)")

from verl.utils.import_utils import import_external_libs  # noqa: E402
from verl_omni.pipelines.model_base import VllmOmniPipelineBase as VerlPipelineBase  # noqa: E402
from verl_omni.pipelines.qwen_image_dual_grpo import vllm_omni_rollout_adapter as verl_dual_rollout  # noqa: E402
from vllm.config import LoadConfig  # noqa: E402
from vllm_omni.diffusion.model_loader.diffusers_loader import DiffusersPipelineLoader  # noqa: E402

from qwen_image_omni.pipelines.rollout_output import envelope_media  # noqa: E402

from tests.integrations.vllm_omni.test_pipelines import IMAGE_TOKENS, od_config, request_batch  # noqa: E402, F401

BRIDGE = "qwen_image_omni.integrations.verl_omni"
VERL_ROLLOUT = verl_dual_rollout.QwenImagePipelineWithDualLogProb
NEW_TOKENS = 4
EXTRA_ARGS = {"noise_level": 0.7, "sde_window_size": 1, "sde_window_range": (0, 2), "logprobs": True,
              "max_new_tokens": NEW_TOKENS}  # fmt: skip
SHARED_RL_KEYS = ("llm_response_ids", "llm_all_log_probs", "text_encoder_responses")

import_external_libs(BRIDGE)


@pytest.fixture(scope="module")
def ours(od_config):  # noqa: F811
    """Our Dual rollout, loaded as verl-omni's vllm-omni rollout loads it (``custom_pipeline_name`` from its registry)."""
    path = VerlPipelineBase.get_pipeline_path("QwenImagePipeline", "dual_grpo")
    assert path == (
        "qwen_image_omni.pipelines.qwen_image_dual_grpo.vllm_omni_rollout_pipeline.QwenImagePipelineWithDualLogProb"
    )
    return DiffusersPipelineLoader(LoadConfig(), od_config).load_model(
        "cpu", load_format="custom_pipeline", custom_pipeline_name=path
    )


@pytest.fixture(scope="module")
def theirs(od_config):  # noqa: F811
    """verl-omni main's own Dual rollout on the same checkpoint."""
    return DiffusersPipelineLoader(LoadConfig(), od_config).load_model(
        "cpu",
        load_format="custom_pipeline",
        custom_pipeline_name=f"{VERL_ROLLOUT.__module__}.{VERL_ROLLOUT.__qualname__}",
    )


def token_id_prompts(lengths, negative_lengths, seed):
    """Per-request prompts as verl-omni's rollout server builds them: templated token ids (lists)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {"prompt_token_ids": torch.randint(3, 200, (n,), generator=generator).tolist(),
         "negative_prompt_ids": torch.randint(3, 200, (m,), generator=generator).tolist()}
        for n, m in zip(lengths, negative_lengths)
    ]  # fmt: skip


def batch(prompts, latents):
    """A packed batch of the requests, each with its own generator, CFG on."""
    requests = request_batch(prompts, latents, true_cfg_scale=4.0, extra_args=dict(EXTRA_ARGS))
    for index, request in enumerate(requests.requests):
        request.sampling_params.generator = torch.Generator().manual_seed(20 + index)
    return requests


def _latents(rows=2):
    return torch.randn(rows, IMAGE_TOKENS, 16, generator=torch.Generator().manual_seed(6))


def test_our_dual_rollout_equals_verl_omni_own_on_its_token_id_requests(ours, theirs):
    """Equal-length token-id requests (no padding to disagree on): same trajectories, embeddings, image and text."""
    prompts = token_id_prompts((42, 42), (36, 38), seed=9)
    with torch.no_grad():
        mine = ours.forward(batch(prompts, _latents()))
        their = theirs.forward(batch(prompts, _latents()))
    assert len(mine) == len(their) == 2
    for our_output, their_output in zip(mine, their):
        for name in ("trajectory_latents", "trajectory_log_probs", "trajectory_timesteps"):
            torch.testing.assert_close(getattr(our_output, name), getattr(their_output, name), rtol=1e-5, atol=1e-5)
        our_embeddings = our_output.output["metadata"]["prompt_embeddings"]
        their_embeddings = their_output.output["metadata"]["prompt_embeddings"]
        for key in ("prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask"):
            torch.testing.assert_close(our_embeddings[key], their_embeddings[key], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            envelope_media(our_output.output), envelope_media(their_output.output), rtol=1e-5, atol=1e-5
        )
        our_rl, their_rl = our_output.output["metadata"]["rl"], their_output.output["metadata"]["rl"]
        assert set(their_rl) == set(SHARED_RL_KEYS) and set(our_rl) == {*SHARED_RL_KEYS, "llm_response_mask"}
        assert torch.equal(our_rl["llm_response_ids"], their_rl["llm_response_ids"].to(our_rl["llm_response_ids"]))
        assert our_rl["llm_response_ids"].shape == (1, NEW_TOKENS)
        assert our_rl["text_encoder_responses"] == their_rl["text_encoder_responses"]
        torch.testing.assert_close(our_rl["llm_all_log_probs"], their_rl["llm_all_log_probs"], rtol=1e-5, atol=1e-5)


def test_prompts_of_different_lengths_verl_omni_generates_after_the_padding(ours, theirs):
    """A 40-token and a 45-token request in one batch: ours gives the short one what it generates alone;
    verl-omni's right-padded ``generate`` does not (its first log-probs come from a padding position)."""
    prompts = token_id_prompts((40, 45), (36, 38), seed=9)
    with torch.no_grad():
        mine = ours.forward(batch(prompts, _latents()))
        their = theirs.forward(batch(prompts, _latents()))
        mine_alone = ours.forward(batch(prompts[:1], _latents(1)))
        their_alone = theirs.forward(batch(prompts[:1], _latents(1)))

    def rl(outputs, index=0):
        return outputs[index].output["metadata"]["rl"]

    # Alone (no padding) both agree.
    torch.testing.assert_close(
        rl(mine_alone)["llm_all_log_probs"], rl(their_alone)["llm_all_log_probs"], rtol=1e-5, atol=1e-5
    )
    # Batched, ours is still the request alone; verl-omni's short request is not.
    torch.testing.assert_close(rl(mine)["llm_all_log_probs"], rl(mine_alone)["llm_all_log_probs"], rtol=0, atol=1e-5)
    assert (rl(their)["llm_all_log_probs"] - rl(their_alone)["llm_all_log_probs"]).abs().max() > 1e-3
    # The long request has no padding: both agree on it.
    torch.testing.assert_close(
        rl(mine, 1)["llm_all_log_probs"], rl(their, 1)["llm_all_log_probs"], rtol=1e-5, atol=1e-5
    )
