"""qwen-image-omni inside verl-omni main (run by ``make test-verl-omni``).

verl-omni is the snapshot in ``../shared/verl-omni`` (``VERL_OMNI_SRC``) on ``PYTHONPATH``, in its own
pinned environment (verl at its commit, vllm-omni 0.27.0rc1). Everything here goes through verl-omni's own code: its
registries and ``external_lib`` import, its ``verl_omni.pipelines.utils`` dispatchers, its FSDP
engine's ``build_module`` path, its rollout server's reading of rollout outputs. References are
verl-omni's own Qwen-Image adapters and rollout, on the same weights and inputs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.verl_omni, pytest.mark.vllm_omni]
pytest.importorskip("verl_omni", reason="needs the verl-omni source on PYTHONPATH (make test-verl-omni)")

from diffusers import QwenImageTransformer2DModel as DiffusersTransformer  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.import_utils import import_external_libs  # noqa: E402
from verl_omni.pipelines import utils as verl_utils  # noqa: E402
from verl_omni.pipelines.model_base import DiffusionModelBase as VerlDiffusionModelBase  # noqa: E402
from verl_omni.pipelines.model_base import VllmOmniPipelineBase as VerlPipelineBase  # noqa: E402
from verl_omni.pipelines.qwen_image_flow_grpo import diffusers_training_adapter as verl_flow_grpo  # noqa: E402
from verl_omni.pipelines.qwen_image_flow_grpo import vllm_omni_rollout_adapter as verl_flow_grpo_rollout  # noqa: E402
from verl_omni.pipelines.qwen_image_mix_grpo import diffusers_training_adapter as verl_mix_grpo  # noqa: E402
from verl_omni.workers.rollout.vllm_rollout.vllm_omni_async_server import _rollout_metadata_groups  # noqa: E402
from vllm.config import LoadConfig  # noqa: E402
from vllm_omni.diffusion.model_loader.diffusers_loader import DiffusersPipelineLoader  # noqa: E402
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image import get_qwen_image_post_process_func  # noqa: E402
from vllm_omni.diffusion.output_formatter import (  # noqa: E402
    format_diffusion_outputs,
    normalize_diffusion_postprocess_output,
)

from qwen_image_omni import QwenImageTransformer2DModel  # noqa: E402
from qwen_image_omni.pipelines import DiffusionModelBase, DiffusionModelConfig, VllmOmniPipelineBase  # noqa: E402
from qwen_image_omni.pipelines.qwen_image_flow_grpo import QwenImage  # noqa: E402
from qwen_image_omni.pipelines.qwen_image import QWEN_IMAGE_VAE_SCALE_FACTOR  # noqa: E402
from qwen_image_omni.pipelines.rollout_output import envelope_media  # noqa: E402
from qwen_image_omni.pipelines.schedulers import FlowMatchSDEDiscreteScheduler  # noqa: E402

from tests.integrations.vllm_omni.test_pipelines import (  # noqa: E402  (vllm-omni fixtures: a one-rank world on the tiny checkpoint)
    IMAGE_TOKENS,
    SIZE,
    embeds_prompts,
    od_config,  # noqa: F401
    padded_prompts,
    reference,  # noqa: F401
    request_batch,
    rollout_inputs,
)

BRIDGE = "qwen_image_omni.integrations.verl_omni"
TOL = 1e-6
STEPS = 3

# verl-omni's own classes, kept before the bridge replaces their registry entries.
VERL_QWEN_IMAGE = verl_flow_grpo.QwenImage
VERL_MIX_GRPO = verl_mix_grpo.QwenImageMixGRPO
VERL_ROLLOUT = verl_flow_grpo_rollout.QwenImagePipelineWithLogProb

# What verl-omni does with DiffusionModelConfig.external_lib when it builds the config.
import_external_libs(BRIDGE)


def config(checkpoint, algorithm="flow_grpo", true_cfg_scale=1.0, sde_type="sde") -> DiffusionModelConfig:
    """The model config a verl-omni trainer hands the dispatchers, naming the bridge in ``external_lib``."""
    return DiffusionModelConfig(
        algorithm=algorithm,
        local_path=str(checkpoint),
        external_lib=BRIDGE,
        pipeline={"height": SIZE, "width": SIZE, "num_inference_steps": STEPS, "true_cfg_scale": true_cfg_scale},
        algo={"noise_level": 0.7, "sde_type": sde_type},
    )


def micro_batch(batch: int) -> TensorDict:
    """A trainer micro-batch as verl-omni builds it: image metadata as non-tensor data."""
    data = TensorDict({}, batch_size=[batch])
    tu.assign_non_tensor(data, height=SIZE, width=SIZE, vae_scale_factor=QWEN_IMAGE_VAE_SCALE_FACTOR)
    return data


@pytest.fixture(scope="module")
def transformers(checkpoint):
    """Ours (built by verl-omni's engine through the adapter's build_module) and diffusers', same weights."""
    from verl_omni.workers.engine.fsdp.diffusers_impl import DiffusersFSDPEngine

    engine = SimpleNamespace(
        model_config=SimpleNamespace(
            architecture="QwenImagePipeline",
            algorithm="flow_grpo",
            external_lib=BRIDGE,
            local_path=str(checkpoint),
            config_path=None,
            transformer_subfolder="transformer",
            enable_gradient_checkpointing=False,
        )
    )
    ours = DiffusersFSDPEngine._build_module_from_registry(engine, torch.float32)
    theirs = DiffusersTransformer.from_pretrained(checkpoint, subfolder="transformer")
    return ours.eval(), theirs.eval()


def trajectory(batch: int, scheduler) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(batch, STEPS, IMAGE_TOKENS, 16, generator=generator)
    timesteps = scheduler.timesteps[:STEPS].reshape(1, -1).expand(batch, -1).clone()
    return {"all_latents": latents, "all_timesteps": timesteps}


# ----------------------------------------------------------------------------- registration


def test_external_lib_puts_our_adapters_and_rollouts_in_verl_omni_registries(checkpoint):
    adapter = VerlDiffusionModelBase.get_class_by_name("QwenImagePipeline", "flow_grpo", external_lib=BRIDGE)
    from qwen_image_omni.integrations import verl_omni as bridge

    assert bridge.registered_keys()  # every Qwen-Image key of ours is bridged
    for architecture, algorithm in bridge.registered_keys():
        entry = VerlDiffusionModelBase.peek_class(architecture, algorithm)
        ours = DiffusionModelBase.peek_class(architecture, algorithm)
        assert entry is bridge.verl_omni_adapter(ours) and issubclass(entry, ours)
        assert issubclass(entry, VerlDiffusionModelBase)
    assert issubclass(adapter, QwenImage) and adapter is not VERL_QWEN_IMAGE
    assert VerlDiffusionModelBase.get_class(config(checkpoint)) is adapter

    rollout = VerlPipelineBase.get_class("QwenImagePipeline", "flow_grpo")
    assert rollout is VllmOmniPipelineBase.get_class("QwenImagePipeline", "flow_grpo")
    assert rollout.supports_request_batch is True and rollout is not VERL_ROLLOUT
    path = VerlPipelineBase.get_pipeline_path("QwenImagePipeline", "flow_grpo")
    assert (
        path == "qwen_image_omni.pipelines.qwen_image_flow_grpo.vllm_omni_rollout_pipeline.QwenImagePipelineWithLogProb"
    )


def test_verl_omni_engine_builds_our_transformer_through_build_module(transformers, checkpoint):
    ours, theirs = transformers
    assert type(ours) is QwenImageTransformer2DModel
    expected = theirs.state_dict()
    assert ours.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in ours.state_dict().items())


# ----------------------------------------------------------------------------- the dispatchers


@pytest.mark.parametrize("algorithm, verl_adapter", [("flow_grpo", VERL_QWEN_IMAGE), ("mix_grpo", VERL_MIX_GRPO)])
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0])
def test_verl_omni_dispatchers_run_ours_and_equal_verl_omni_adapters(
    transformers, checkpoint, algorithm, verl_adapter, sde_type, true_cfg_scale
):
    """verl-omni's utils with our adapter equal verl-omni's own adapter on diffusers' transformer (fp32)."""
    ours, theirs = transformers
    model_config = config(checkpoint, algorithm, true_cfg_scale, sde_type)
    scheduler = verl_utils.build_scheduler(model_config)
    assert isinstance(scheduler, FlowMatchSDEDiscreteScheduler)
    # verl-omni's build_scheduler puts the timesteps on verl's device name, "cuda" beside PyPI's torch
    # build even without a GPU; the same scheduler and set_timesteps on the CPU.
    verl_scheduler = verl_flow_grpo.FlowMatchSDEDiscreteScheduler.from_pretrained(checkpoint, subfolder="scheduler")
    verl_adapter.set_timesteps(verl_scheduler, model_config, "cpu")
    assert torch.equal(scheduler.timesteps, verl_scheduler.timesteps)

    embeds, mask = padded_prompts((7, 13), seed=4)
    negative, negative_mask = padded_prompts((3, 5), seed=5)
    data = trajectory(2, scheduler)
    arguments = (data["all_latents"], data["all_timesteps"], embeds, mask, negative, negative_mask, micro_batch(2))
    for step in range(STEPS - 1):
        inputs, negative_inputs = verl_utils.prepare_model_inputs(ours, model_config, *arguments, step)
        assert "txt_seq_lens" not in inputs
        with torch.no_grad():
            got = verl_utils.forward_and_sample_previous_step(
                ours, scheduler, model_config, inputs, negative_inputs, data, step
            )
            want_inputs, want_negative = verl_adapter.prepare_model_inputs(theirs, model_config, *arguments, step)
            want = verl_adapter.forward_and_sample_previous_step(
                theirs, verl_scheduler, model_config, want_inputs, want_negative, data, step
            )
        for name, a, b in zip(("log_prob", "prev_sample_mean", "std_dev_t", "sqrt_dt"), got, want):
            assert (a - b.reshape(a.shape)).abs().max() <= TOL, name
        single = verl_utils.forward(ours, model_config, inputs, None)
        assert single.shape == (2, IMAGE_TOKENS, 16)


# ----------------------------------------------------------------------------- rollout outputs


@pytest.fixture(scope="module")
def rollout_pipeline(od_config):  # noqa: F811
    """Our rollout, loaded as verl-omni's vllm-omni rollout loads it (``custom_pipeline_name`` from its registry)."""
    path = VerlPipelineBase.get_pipeline_path("QwenImagePipeline", "flow_grpo")
    return DiffusersPipelineLoader(LoadConfig(), od_config).load_model(
        "cpu", load_format="custom_pipeline", custom_pipeline_name=path
    )


def engine_outputs(pipeline, od_config, batch, outputs):  # noqa: F811
    """vllm-omni's own post-processing and output formatting of each request (the engine's path)."""
    post_process = get_qwen_image_post_process_func(od_config)
    formatted = []
    for request, output in zip(batch.requests, outputs):
        processed = normalize_diffusion_postprocess_output(post_process(output.output))
        formatted.extend(
            format_diffusion_outputs(
                request=request,
                od_config=od_config,
                diffusion_output=output,
                output_data=output.output,
                postprocess_output=processed,
            )
        )
    return formatted


def test_verl_omni_server_finds_our_prompt_embeddings_and_trajectories(rollout_pipeline, od_config):  # noqa: F811
    embeds, mask, negative_embeds, negative_mask, latents, generator = rollout_inputs()
    batch = request_batch(
        embeds_prompts(embeds, mask, negative_embeds, negative_mask), latents, true_cfg_scale=4.0,
        generator=generator, extra_args={"noise_level": 0.7, "sde_window_size": 2, "sde_window_range": (0, 2)},
    )  # fmt: skip
    for request in batch.requests:
        request.sampling_params.output_type = "pt"  # decoded images, as a rollout server asks for
    with torch.no_grad():
        outputs = rollout_pipeline.forward(batch)
    for index, result in enumerate(engine_outputs(rollout_pipeline, od_config, batch, outputs)):
        # What verl-omni's vLLMOmniHttpServer copies into the sample's extra_fields.
        fields = {}
        for group in _rollout_metadata_groups(result.multimodal_output):
            fields.update(group)
        assert torch.equal(fields["prompt_embeds"][0], embeds[index])
        assert torch.equal(fields["prompt_embeds_mask"][0], mask[index])
        assert torch.equal(fields["negative_prompt_embeds_mask"][0], negative_mask[index])
        assert result.trajectory_latents.shape == (1, 3, IMAGE_TOKENS, 16)
        assert torch.equal(result.trajectory_latents, outputs[index].trajectory_latents)
        assert torch.equal(result.trajectory_log_probs, outputs[index].trajectory_log_probs)
        assert torch.equal(result.trajectory_timesteps, outputs[index].trajectory_timesteps)


def test_verl_omni_diffusers_rollout_envelope_is_read_the_same(checkpoint):
    from tests.support.rl_tiny import collate, make_pipeline, prompt_rows

    pipe = make_pipeline()
    prompt = collate(prompt_rows((5, 3), seed=1), width=9)
    with torch.no_grad():
        out = pipe(prompt_embeds=prompt.embeds, prompt_embeds_mask=prompt.mask, height=64, width=64,
                   num_inference_steps=STEPS, true_cfg_scale=1.0, output_type="latent")  # fmt: skip
    groups = _rollout_metadata_groups(out.output)
    assert len(groups) == 1 and torch.equal(groups[0]["prompt_embeds_mask"], prompt.mask)


# ----------------------------------------------------------------------------- verl-omni's mask.sum() forward


def left_padded(lengths, seed):
    """Prompt embeddings with their valid tokens last (left padding) in every row."""
    embeds, mask = padded_prompts(lengths, seed)
    return embeds.flip(1), mask.flip(1)


def test_verl_omni_mask_sum_rollout_differs_on_left_padded_prompts_and_ours_does_not(
    rollout_pipeline,
    od_config,  # noqa: F811
    reference,  # noqa: F811
):
    """verl-omni's own FlowGRPO rollout loop fed the text lengths its ``forward`` computes
    (``prompt_embeds_mask.sum(dim=1)``) for prompts collated to a fixed width with left padding,
    against ours on the same embeddings: diffusers' ``QwenImagePipeline`` is the reference (it
    takes the length from the width)."""
    embeds, mask = left_padded((7, 13), seed=4)
    latents = torch.randn(2, IMAGE_TOKENS, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reference(
            prompt_embeds=embeds, prompt_embeds_mask=mask, latents=latents, height=SIZE, width=SIZE,
            num_inference_steps=STEPS, true_cfg_scale=1.0, output_type="latent",
        ).images  # fmt: skip

    verl_pipeline = DiffusersPipelineLoader(LoadConfig(), od_config).load_model(
        "cpu",
        load_format="custom_pipeline",
        custom_pipeline_name=f"{VERL_ROLLOUT.__module__}.{VERL_ROLLOUT.__qualname__}",
    )
    txt_seq_lens = mask.sum(dim=1).tolist()  # what verl-omni's forward hands its diffuse
    assert max(txt_seq_lens) < embeds.shape[1]
    timesteps, _ = verl_pipeline.prepare_timesteps(STEPS, None, IMAGE_TOKENS)
    verl_pipeline._interrupt, verl_pipeline._attention_kwargs = False, {}  # what its forward sets first
    img_shapes = [[(1, SIZE // 16, SIZE // 16)]] * 2
    try:
        with torch.no_grad():
            verl_latents = verl_pipeline.diffuse(
                embeds, mask, None, None, latents.clone(), img_shapes, txt_seq_lens, None, timesteps,
                False, None, 1.0, 0.0, (0, 1), "sde", torch.Generator().manual_seed(0), False,
            )[0]  # fmt: skip
    except RuntimeError as error:  # the RoPE table is shorter than the text: a shape error
        verl_outcome = f"raised: {error}"
    else:
        assert not torch.allclose(verl_latents, expected, atol=1e-3)
        verl_outcome = "differs"
    assert verl_outcome

    extra_args = {"noise_level": 0.0, "sde_window_size": 1, "sde_window_range": (0, 1)}
    batch = request_batch(
        embeds_prompts(embeds, mask), latents, true_cfg_scale=1.0, generator=torch.Generator().manual_seed(7),
        extra_args=extra_args,
    )  # fmt: skip
    with torch.no_grad():
        ours = rollout_pipeline.forward(batch)
    got = torch.cat([envelope_media(output.output) for output in ours])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- verl-omni's requests


def token_id_prompts(lengths, negative_lengths, seed):
    """Per-request prompts as verl-omni's rollout server builds them: templated token ids (lists)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for length, negative_length in zip(lengths, negative_lengths):
        prompts.append(
            {
                "prompt_token_ids": torch.randint(3, 200, (length,), generator=generator).tolist(),
                "negative_prompt_ids": torch.randint(3, 200, (negative_length,), generator=generator).tolist(),
            }
        )
    return prompts


def test_our_rollout_equals_verl_omni_own_rollout_on_its_token_id_requests(rollout_pipeline, od_config):  # noqa: F811
    """A packed batch of verl-omni's token-id requests, each with its own generator, CFG on: our
    rollout gives verl-omni's own FlowGRPO rollout (same weights, vllm-omni's transformer there)."""
    prompts = token_id_prompts((40, 45), (36, 38), seed=9)  # > prompt_template_encode_start_idx (34) tokens
    latents = torch.randn(2, IMAGE_TOKENS, 16, generator=torch.Generator().manual_seed(6))
    extra_args = {"noise_level": 0.7, "sde_window_size": 1, "sde_window_range": (0, 2), "logprobs": True}

    def batch():
        requests = request_batch(prompts, latents, true_cfg_scale=4.0, extra_args=dict(extra_args))
        for index, request in enumerate(requests.requests):
            request.sampling_params.generator = torch.Generator().manual_seed(20 + index)
        return requests

    verl_pipeline = DiffusersPipelineLoader(LoadConfig(), od_config).load_model(
        "cpu",
        load_format="custom_pipeline",
        custom_pipeline_name=f"{VERL_ROLLOUT.__module__}.{VERL_ROLLOUT.__qualname__}",
    )
    with torch.no_grad():
        ours = rollout_pipeline.forward(batch())
        theirs = verl_pipeline.forward(batch())
    for mine, their in zip(ours, theirs):
        for name in ("trajectory_latents", "trajectory_log_probs", "trajectory_timesteps"):
            torch.testing.assert_close(getattr(mine, name), getattr(their, name), rtol=1e-5, atol=1e-5)
        mine_embeddings = mine.output["metadata"]["prompt_embeddings"]
        their_embeddings = their.output["metadata"]["prompt_embeddings"]
        for key in ("prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask"):
            torch.testing.assert_close(mine_embeddings[key], their_embeddings[key], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(envelope_media(mine.output), envelope_media(their.output), rtol=1e-5, atol=1e-5)


def test_our_nft_rollout_equals_verl_omni_own_nft_rollout_on_a_token_id_request(od_config):  # noqa: F811
    """DiffusionNFT's ODE rollout: one verl-omni token-id request with CFG; clean latents, train
    timesteps and prompt embeddings equal verl-omni's own NFT rollout (its loop on vllm-omni's transformer)."""
    from verl_omni.pipelines.qwen_image_diffusion_nft import vllm_omni_rollout_adapter as verl_nft

    loader = DiffusersPipelineLoader(LoadConfig(), od_config)
    ours = loader.load_model(
        "cpu",
        load_format="custom_pipeline",
        custom_pipeline_name=VerlPipelineBase.get_pipeline_path("QwenImagePipeline", "diffusion_nft"),
    )
    theirs_cls = verl_nft.QwenImageDiffusionNFTPipeline
    theirs = loader.load_model(
        "cpu", load_format="custom_pipeline", custom_pipeline_name=f"{theirs_cls.__module__}.{theirs_cls.__qualname__}"
    )
    prompts = token_id_prompts((40,), (36,), seed=11)
    latents = torch.randn(1, IMAGE_TOKENS, 16, generator=torch.Generator().manual_seed(6))

    def batch():
        # verl-omni's NFT forward reads no request latents: both draw the noise from the request's generator.
        requests = request_batch(prompts, latents, true_cfg_scale=4.0, extra_args={})
        for request in requests.requests:
            request.sampling_params.latents = None
            request.sampling_params.generator = torch.Generator().manual_seed(21)
        return requests

    with torch.no_grad():
        mine = ours.forward(batch())[0]
        their = theirs.forward(batch())
    mine_rl, their_rl = mine.output["metadata"]["rl"], their.output["metadata"]["rl"]
    for key in ("prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask"):
        torch.testing.assert_close(
            mine.output["metadata"]["prompt_embeddings"][key], their.output["metadata"]["prompt_embeddings"][key]
        )
    torch.testing.assert_close(mine_rl["train_timesteps"].float(), their_rl["train_timesteps"].float())
    torch.testing.assert_close(mine_rl["latents_clean"], their_rl["latents_clean"], rtol=1e-5, atol=1e-5)
