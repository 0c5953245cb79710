"""The DiffusionNFT and Edit-Plus FlowGRPO rollout pipelines on a real vllm-omni install (``make test-vllm-omni``).

Each twin is loaded as RL frameworks load it (``load_format="custom_pipeline"``) on the tiny
checkpoint and compared with its diffusers rollout pipeline on the same inputs. The tiny checkpoint
has no ``processor/`` and its byte-level tokenizer has no vision tokens, so vllm-omni's Edit-Plus
prompt encoding with images cannot run here: the Edit requests carry precomputed prompt embeddings,
and their condition either precomputed packed latents or images run through vllm-omni's own
Edit-Plus pre-process function and VAE encode.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.vllm_omni
pytest.importorskip("vllm_omni", reason="needs vllm-omni (make test-vllm-omni)")

import PIL.Image  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import retrieve_latents  # noqa: E402
from vllm.config import LoadConfig  # noqa: E402
from vllm_omni.diffusion.model_loader.diffusers_loader import DiffusersPipelineLoader  # noqa: E402
from vllm_omni.diffusion.models.qwen_image import pipeline_qwen_image_edit_plus  # noqa: E402

from qwen_image_omni.integrations import vllm_omni as integration  # noqa: E402
from qwen_image_omni.pipelines import DiffusionModelConfig, VllmOmniPipelineBase, utils  # noqa: E402
from qwen_image_omni.pipelines.qwen_image_diffusion_nft import (  # noqa: E402
    DiffusersQwenImageDiffusionNFTPipeline as DiffusersNFTPipeline,
)
from qwen_image_omni.pipelines.qwen_image_diffusion_nft.vllm_omni_rollout_pipeline import (  # noqa: E402
    QwenImageDiffusionNFTPipeline,
)
from qwen_image_omni.pipelines.qwen_image_edit_flow_grpo import (  # noqa: E402
    DiffusersQwenImageEditPlusPipelineWithLogProb as DiffusersEditPipeline,
)
from qwen_image_omni.pipelines.qwen_image_edit_flow_grpo.vllm_omni_rollout_pipeline import (  # noqa: E402
    QwenImageEditPlusPipelineWithLogProb,
)
from qwen_image_omni.pipelines.rollout_output import envelope_media  # noqa: E402

from .test_pipelines import (  # noqa: E402  (vllm-omni fixtures: a one-rank world on the tiny checkpoint)
    IMAGE_TOKENS,
    ROLLOUT_EXTRA_ARGS,
    SIZE,
    _ProcessorStandIn,
    assert_no_text_length,
    embeds_prompts,
    od_config,  # noqa: F401
    padded_prompts,
    request_batch,
    rollout_inputs,
    transformer_calls,
)

STEPS = 3
CHANNELS = 16
TARGET_SHAPE = (1, SIZE // 16, SIZE // 16)
CONDITION_SHAPES = [(1, 2, 3), (1, 3, 2)]  # two condition images, 6 tokens each
CONDITION_TOKENS = 12
IMG_SHAPES = [TARGET_SHAPE, *CONDITION_SHAPES]
NFT_PATH = "qwen_image_omni.pipelines.qwen_image_diffusion_nft.vllm_omni_rollout_pipeline.QwenImageDiffusionNFTPipeline"
EDIT_PATH = "qwen_image_omni.pipelines.qwen_image_edit_flow_grpo.vllm_omni_rollout_pipeline.QwenImageEditPlusPipelineWithLogProb"


def stack(outputs, name: str) -> torch.Tensor:
    """One ``DiffusionOutput`` field of every request, concatenated over the requests."""
    return torch.cat([getattr(output, name) for output in outputs])


def rl_field(outputs, key: str) -> torch.Tensor:
    """``metadata["rl"][key]`` of every request, concatenated."""
    return torch.cat([output.output["metadata"]["rl"][key] for output in outputs])


# ----------------------------------------------------------------------------- DiffusionNFT


@pytest.fixture(scope="module")
def nft_pipeline(od_config):  # noqa: F811
    """The DiffusionNFT twin, loaded as a custom pipeline."""
    path = VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "diffusion_nft")
    assert path == NFT_PATH
    pipe = DiffusersPipelineLoader(LoadConfig(), od_config).load_model(
        "cpu", load_format="custom_pipeline", custom_pipeline_name=path
    )
    assert type(pipe) is QwenImageDiffusionNFTPipeline
    return pipe


def diffusers_nft(pipe, checkpoint, **kwargs):
    """The diffusers DiffusionNFT rollout on the twin's transformer and :func:`rollout_inputs`."""
    embeds, mask, negative_embeds, negative_mask, latents, _ = rollout_inputs()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(checkpoint, subfolder="scheduler")
    return DiffusersNFTPipeline(transformer=pipe.transformer, scheduler=scheduler)(
        prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative_embeds,
        negative_prompt_embeds_mask=negative_mask, true_cfg_scale=4.0, height=SIZE, width=SIZE,
        num_inference_steps=STEPS, latents=latents, output_type="latent", **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("return_trajectory", [False, True], ids=["last-step", "trajectory"])
def test_nft_rollout_equals_the_diffusers_nft_rollout(nft_pipeline, checkpoint, return_trajectory):
    """Same ODE: clean latents, training timesteps, images and trajectory; SDE options in extra_args are ignored."""
    embeds, mask, negative_embeds, negative_mask, latents, generator = rollout_inputs()
    extra_args = {**ROLLOUT_EXTRA_ARGS, "return_trajectory": return_trajectory}
    batch = request_batch(
        embeds_prompts(embeds, mask, negative_embeds, negative_mask), latents, true_cfg_scale=4.0,
        generator=generator, extra_args=extra_args,
    )  # fmt: skip
    with transformer_calls(nft_pipeline) as calls:
        outputs = nft_pipeline.forward(batch)
    assert_no_text_length(calls)
    assert len(outputs) == 2
    expected = diffusers_nft(nft_pipeline, checkpoint, return_trajectory=return_trajectory)
    for output in outputs:
        assert set(output.output["metadata"]["rl"]) == {"latents_clean", "train_timesteps"}
        assert output.trajectory_log_probs is None
    torch.testing.assert_close(rl_field(outputs, "latents_clean"), expected.rl["latents_clean"], rtol=0, atol=1e-6)
    torch.testing.assert_close(rl_field(outputs, "train_timesteps"), expected.rl["train_timesteps"], rtol=0, atol=0)
    assert rl_field(outputs, "train_timesteps").shape == (2, STEPS)
    images = torch.cat([envelope_media(output.output) for output in outputs])
    torch.testing.assert_close(images, expected.images, rtol=0, atol=1e-6)
    torch.testing.assert_close(stack(outputs, "trajectory_latents"), expected.all_latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(stack(outputs, "trajectory_timesteps"), expected.all_timesteps, rtol=0, atol=0)
    assert stack(outputs, "trajectory_latents").shape[1] == (STEPS + 1 if return_trajectory else 2)
    torch.testing.assert_close(stack(outputs, "trajectory_latents")[:, -1], rl_field(outputs, "latents_clean"))


def test_nft_rollout_refuses_a_non_bool_return_trajectory(nft_pipeline):
    with pytest.raises(TypeError, match=r"extra_args\['return_trajectory'\]` must be a bool, got str"):
        nft_pipeline.rollout_options({"return_trajectory": "yes"})


# ----------------------------------------------------------------------------- Edit-Plus FlowGRPO


@pytest.fixture(scope="module")
def edit_pipeline(od_config):  # noqa: F811
    """The Edit-Plus FlowGRPO twin, loaded as a custom pipeline on the tiny checkpoint (processor stubbed: it has none)."""
    path = VllmOmniPipelineBase.get_pipeline_path("QwenImageEditPlusPipeline", "flow_grpo")
    assert path == EDIT_PATH
    config = copy.copy(od_config)
    config.model_class_name = "QwenImageEditPlusPipeline"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_qwen_image_edit_plus, "Qwen2VLProcessor", _ProcessorStandIn)
        pipe = DiffusersPipelineLoader(LoadConfig(), config).load_model(
            "cpu", load_format="custom_pipeline", custom_pipeline_name=path
        )
    assert type(pipe) is QwenImageEditPlusPipelineWithLogProb
    return pipe


def condition_latents(batch: int = 2, seed: int = 12) -> torch.Tensor:
    return torch.randn(batch, CONDITION_TOKENS, CHANNELS, generator=torch.Generator().manual_seed(seed))


def edit_prompts(condition: torch.Tensor | None = None) -> list[dict]:
    """Per-request prompt dicts: :func:`rollout_inputs`' padded embeddings plus precomputed condition latents."""
    embeds, mask, negative_embeds, negative_mask, _, _ = rollout_inputs()
    prompts = embeds_prompts(embeds, mask, negative_embeds, negative_mask)
    if condition is not None:
        for row, prompt in enumerate(prompts):
            prompt |= {"condition_image_latents": condition[row], "img_shapes": [list(IMG_SHAPES)]}
    return prompts


def diffusers_edit(pipe, checkpoint, condition, img_shapes, generator):
    """The diffusers Edit rollout on the twin's transformer with the same prompts, condition and noise."""
    embeds, mask, negative_embeds, negative_mask, latents, _ = rollout_inputs()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(checkpoint, subfolder="scheduler")
    return DiffusersEditPipeline(transformer=pipe.transformer, scheduler=scheduler)(
        prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative_embeds,
        negative_prompt_embeds_mask=negative_mask, condition_image_latents=condition, img_shapes=img_shapes,
        true_cfg_scale=4.0, height=SIZE, width=SIZE, num_inference_steps=STEPS, generator=generator,
        latents=latents, output_type="latent", **ROLLOUT_EXTRA_ARGS,
    )  # fmt: skip


@pytest.fixture(scope="module")
def edit_rollout(edit_pipeline) -> list:
    """One Edit rollout of two requests with precomputed embeddings and condition latents."""
    _, _, _, _, latents, generator = rollout_inputs()
    batch = request_batch(
        edit_prompts(condition_latents()), latents, true_cfg_scale=4.0, generator=generator,
        extra_args=ROLLOUT_EXTRA_ARGS,
    )  # fmt: skip
    with transformer_calls(edit_pipeline) as calls:
        outputs = edit_pipeline.forward(batch)
    assert_no_text_length(calls)
    assert all(kwargs["hidden_states"].shape[1] == IMAGE_TOKENS + CONDITION_TOKENS for kwargs in calls)
    return outputs


def test_edit_rollout_equals_the_diffusers_edit_rollout(edit_pipeline, edit_rollout, checkpoint):
    generator = torch.Generator().manual_seed(7)
    expected = diffusers_edit(edit_pipeline, checkpoint, condition_latents(), IMG_SHAPES, [generator, generator])
    assert len(edit_rollout) == 2
    images = torch.cat([envelope_media(output.output) for output in edit_rollout])
    torch.testing.assert_close(images, expected.images, rtol=1e-5, atol=1e-6)
    for name, field in (("trajectory_latents", "all_latents"), ("trajectory_log_probs", "all_log_probs"),
                        ("trajectory_timesteps", "all_timesteps")):  # fmt: skip
        torch.testing.assert_close(stack(edit_rollout, name), getattr(expected, field), rtol=1e-5, atol=1e-6, msg=name)
    assert stack(edit_rollout, "trajectory_log_probs").shape == (2, 2)
    torch.testing.assert_close(rl_field(edit_rollout, "condition_image_latents"), condition_latents(), rtol=0, atol=0)
    for output in edit_rollout:
        rl = output.output["metadata"]["rl"]
        assert set(rl) == {"condition_image_latents", "img_shapes"} and rl["img_shapes"] == [IMG_SHAPES]


def test_trainer_rescores_the_edit_rollout_log_probs(edit_pipeline, edit_rollout, checkpoint):
    """The trainer, with the recorded condition and the prompts re-collated to other widths, gets the rollout's log-probs."""
    all_latents = stack(edit_rollout, "trajectory_latents")
    all_log_probs = stack(edit_rollout, "trajectory_log_probs")
    all_timesteps = stack(edit_rollout, "trajectory_timesteps")
    rl = {
        "condition_image_latents": rl_field(edit_rollout, "condition_image_latents"),
        "img_shapes": [shape for output in edit_rollout for shape in output.output["metadata"]["rl"]["img_shapes"]],
    }
    embeds, mask = padded_prompts((7, 13), seed=4, width=40)
    negative, negative_mask = padded_prompts((3, 5), seed=5, width=9)
    config = DiffusionModelConfig(
        local_path=str(checkpoint),
        architecture="QwenImageEditPlusPipeline",
        algorithm="flow_grpo",
        pipeline={"height": SIZE, "width": SIZE, "num_inference_steps": STEPS, "true_cfg_scale": 4.0},
        algo={"noise_level": 0.7, "sde_type": "sde"},
    )
    micro_batch = {"height": SIZE, "width": SIZE, "vae_scale_factor": edit_pipeline.vae_scale_factor, **rl}
    scheduler = utils.build_scheduler(config)
    scheduler_inputs = {"all_latents": all_latents, "all_timesteps": all_timesteps}
    for step in range(all_log_probs.shape[1]):
        inputs, negative_inputs = utils.prepare_model_inputs(
            edit_pipeline.transformer, config, all_latents, all_timesteps, embeds, mask, negative, negative_mask,
            micro_batch, step,
        )  # fmt: skip
        with torch.no_grad():
            log_prob, *_ = utils.forward_and_sample_previous_step(
                edit_pipeline.transformer, scheduler, config, inputs, negative_inputs, scheduler_inputs, step
            )
        torch.testing.assert_close(log_prob, all_log_probs[:, step], rtol=0, atol=1e-5)


def test_edit_condition_images_go_through_vllm_omni_preprocessing_and_vae(edit_pipeline, od_config, checkpoint):  # noqa: F811
    """Images in ``multi_modal_data`` run through vllm-omni's Edit-Plus pre-process function (as its engine
    does) and the twin's VAE encode; the recorded condition is the packed argmax VAE latent, and the rollout
    is the diffusers Edit rollout with it. (Prompts stay precomputed: the tiny checkpoint cannot encode images.)"""
    _, _, _, _, latents, generator = rollout_inputs()
    pictures = [
        PIL.Image.fromarray(torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(20 + i),
                                          dtype=torch.uint8).numpy())
        for i in range(2)
    ]  # fmt: skip
    prompts = edit_prompts()
    for prompt, picture in zip(prompts, pictures):
        prompt["multi_modal_data"] = {"image": picture}
    batch = request_batch(prompts, latents, true_cfg_scale=4.0, generator=generator, extra_args=ROLLOUT_EXTRA_ARGS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_qwen_image_edit_plus, "VAE_IMAGE_SIZE", SIZE * SIZE)  # a 64 x 64 condition
        pre_process = integration.get_qwen_image_edit_plus_pre_process_func(od_config)
        for request in batch.requests:
            pre_process(request)
    with transformer_calls(edit_pipeline) as calls:
        outputs = edit_pipeline.forward(batch)
    assert_no_text_length(calls)

    vae = edit_pipeline.vae
    expected_condition = []
    for prompt in prompts:
        (vae_image,) = prompt["additional_information"]["vae_images"]
        encoded = retrieve_latents(vae.encode(vae_image), sample_mode="argmax")
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        encoded = (encoded - mean) / std
        expected_condition.append(edit_pipeline._pack_latents(encoded, 1, 4, *encoded.shape[3:]))
    expected_condition = torch.cat(expected_condition)
    assert expected_condition.shape == (2, IMAGE_TOKENS, CHANNELS)
    torch.testing.assert_close(rl_field(outputs, "condition_image_latents"), expected_condition, rtol=0, atol=1e-6)
    img_shapes = [[TARGET_SHAPE, TARGET_SHAPE]]
    assert all(output.output["metadata"]["rl"]["img_shapes"] == img_shapes for output in outputs)

    reference_generator = torch.Generator().manual_seed(7)
    expected = diffusers_edit(
        edit_pipeline, checkpoint, expected_condition, img_shapes * 2, [reference_generator, reference_generator]
    )
    torch.testing.assert_close(stack(outputs, "trajectory_latents"), expected.all_latents, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stack(outputs, "trajectory_log_probs"), expected.all_log_probs, rtol=1e-5, atol=1e-6)


def test_edit_request_without_a_condition_is_refused(edit_pipeline):
    _, _, _, _, latents, _ = rollout_inputs()
    with pytest.raises(ValueError, match=r"request 0: an Edit rollout needs a condition image: `multi_modal_data"):
        edit_pipeline.forward(request_batch(edit_prompts(), latents, extra_args=ROLLOUT_EXTRA_ARGS))


def test_edit_requests_whose_conditions_do_not_batch_are_refused(edit_pipeline):
    _, _, _, _, latents, _ = rollout_inputs()
    prompts = edit_prompts(condition_latents())
    prompts[1]["condition_image_latents"] = prompts[1]["condition_image_latents"][:6]
    prompts[1]["img_shapes"] = [TARGET_SHAPE, CONDITION_SHAPES[0]]
    with pytest.raises(
        ValueError, match=r"one \(tokens, channels\) shape to batch, got \[\(1, 12, 16\), \(1, 6, 16\)\]"
    ):
        edit_pipeline.forward(request_batch(prompts, latents, extra_args=ROLLOUT_EXTRA_ARGS))
