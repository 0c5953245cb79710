"""qwen-image-omni inside a real vllm-omni install (run by ``make test-vllm-omni``).

The pipeline is loaded the way a vllm-omni diffusion worker loads it: the plugin entry point,
``OmniDiffusionConfig.enrich_config`` on a tiny checkpoint directory (``tests/support/tiny_checkpoint.py``),
then ``DiffusersPipelineLoader.load_model``, in a one-process gloo "distributed" world on the CPU.
References are diffusers' own ``QwenImagePipeline`` / ``QwenImageTransformer2DModel`` on the same weights.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

pytestmark = pytest.mark.vllm_omni
pytest.importorskip("vllm_omni", reason="needs vllm-omni (make test-vllm-omni)")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline  # noqa: E402
from diffusers import QwenImageTransformer2DModel as DiffusersTransformer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from vllm.config import LoadConfig, set_current_vllm_config  # noqa: E402
from vllm_omni.diffusion import registry as omni_registry  # noqa: E402
from vllm_omni.diffusion.data import OmniDiffusionConfig  # noqa: E402
from vllm_omni.diffusion.forward_context import set_forward_context  # noqa: E402
from vllm_omni.diffusion.model_loader.diffusers_loader import DiffusersPipelineLoader  # noqa: E402
from vllm_omni.diffusion.models.qwen_image.cfg_parallel import QwenImageCFGParallelMixin  # noqa: E402
from vllm_omni.diffusion.request import OmniDiffusionRequest  # noqa: E402
from vllm_omni.diffusion.worker.input_batch import InputBatch  # noqa: E402
from vllm_omni.diffusion.worker.request_batch import DiffusionRequestBatch  # noqa: E402
from vllm_omni.diffusion.worker.utils import StepRequestState  # noqa: E402
from vllm_omni.inputs.data import OmniDiffusionSamplingParams  # noqa: E402
from vllm_omni.plugins import load_omni_general_plugins  # noqa: E402

from qwen_image_omni import QwenImageTransformer2DModel  # noqa: E402
from qwen_image_omni.integrations import vllm_omni as integration  # noqa: E402
from qwen_image_omni.pipelines import DiffusionModelConfig, VllmOmniPipelineBase  # noqa: E402
from qwen_image_omni.pipelines.qwen_image_flow_grpo import (  # noqa: E402
    DiffusersQwenImagePipelineWithLogProb as DiffusersRolloutPipeline,
    QwenImage,
)
from qwen_image_omni.pipelines.qwen_image_mix_grpo import QwenImageMixGRPO  # noqa: E402
from qwen_image_omni.pipelines.rollout_output import envelope_media  # noqa: E402

from tests.support.tiny_checkpoint import TEXT_DIM  # noqa: E402
from tests.support.vllm_omni_versions import diffusion_worker_vllm_config  # noqa: E402
from tests.support.vllm_omni_engine import one_rank_vllm_world  # noqa: E402

ARCHITECTURES = ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageLayeredPipeline")
SIZE = 64  # pixels: a 4x4 grid of packed latent tokens
IMAGE_TOKENS = 16
WIDTH = 24  # the fixed width every prompt is padded to, wider than any valid length below


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def od_config(checkpoint) -> Iterator[OmniDiffusionConfig]:
    """vllm-omni's config for the checkpoint, inside a one-rank gloo world and vllm-omni's forward context."""
    load_omni_general_plugins()
    config = OmniDiffusionConfig(model=str(checkpoint), dtype=torch.float32)
    config.enrich_config()
    vllm_config = diffusion_worker_vllm_config(torch.device("cpu"), config)
    with (
        one_rank_vllm_world(),
        set_forward_context(vllm_config=vllm_config, omni_diffusion_config=config),
        set_current_vllm_config(vllm_config),
    ):
        yield config


@pytest.fixture(scope="module")
def pipeline(od_config):
    """The pipeline vllm-omni's loader builds for the checkpoint (weights streamed through ``load_weights``)."""
    return DiffusersPipelineLoader(LoadConfig(), od_config).load_model("cpu")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """diffusers' own pipeline and transformer on the same checkpoint."""
    return DiffusersQwenImagePipeline.from_pretrained(checkpoint, local_files_only=True)


@pytest.fixture(scope="module")
def checkpoint_tensors(checkpoint) -> dict[str, torch.Tensor]:
    """The transformer's tensors as stored, diffusers-named."""
    return load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")


@contextmanager
def transformer_calls(pipe) -> Iterator[list[dict]]:
    """Inside: the keyword arguments of every call of ``pipe.transformer``."""
    calls: list[dict] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True
    )
    try:
        yield calls
    finally:
        handle.remove()


def padded_prompts(lengths, seed: int, width: int = WIDTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompt embeddings right-padded with zeros to ``width``, and their masks."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.zeros(len(lengths), width, TEXT_DIM)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        embeds[row, :length] = torch.randn(length, TEXT_DIM, generator=generator)
        mask[row, :length] = 1
    return embeds, mask


def request_batch(prompts: list[dict], latents: torch.Tensor, **sampling) -> DiffusionRequestBatch:
    """One vllm-omni request per prompt dict, each with its rows of ``latents``."""
    requests = [
        OmniDiffusionRequest(
            prompt=prompt,
            sampling_params=OmniDiffusionSamplingParams(
                height=SIZE,
                width=SIZE,
                num_inference_steps=3,
                output_type="latent",
                latents=latents[index : index + 1],
                **sampling,
            ),  # fmt: skip
            request_id=f"request-{index}",
        )
        for index, prompt in enumerate(prompts)
    ]
    return DiffusionRequestBatch(requests=requests)


def embeds_prompts(embeds, mask, negative_embeds=None, negative_mask=None) -> list[dict]:
    """Per-request prompt dicts carrying precomputed (padded) embeddings."""
    prompts = []
    for row in range(embeds.shape[0]):
        prompt = {"prompt_embeds": embeds[row], "prompt_embeds_mask": mask[row]}
        if negative_embeds is not None:
            prompt |= {
                "negative_prompt_embeds": negative_embeds[row],
                "negative_prompt_embeds_mask": negative_mask[row],
            }
        prompts.append(prompt)
    return prompts


def assert_no_text_length(calls: list[dict]) -> None:
    assert calls, "the transformer was never called"
    assert all("txt_seq_lens" not in kwargs for kwargs in calls)


# ----------------------------------------------------------------------------- registration


def test_plugin_points_vllm_omni_registry_at_our_pipelines(od_config):
    for architecture in ARCHITECTURES:
        cls = omni_registry.DiffusionModelRegistry._try_load_model_cls(architecture)
        assert cls is getattr(integration, architecture)
        assert issubclass(cls, integration.QwenImageOmniMixin)
        assert issubclass(cls, getattr(cls.vllm_omni_module, architecture))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_vllm_omni_constructors_build_the_transformer_by_the_name_we_rebind(architecture, pipeline):
    """Our pipelines swap the transformer by rebinding this module-level name while vllm-omni's
    constructor runs; a vllm-omni release that builds it another way fails here, not in serving."""
    cls = getattr(integration, architecture)
    upstream = getattr(cls.vllm_omni_module, architecture)
    assert "QwenImageTransformer2DModel(" in inspect.getsource(upstream.__init__)
    assert cls.vllm_omni_module.QwenImageTransformer2DModel.__module__.startswith("vllm_omni.")  # restored


def test_diffuse_takes_vllm_omni_argument_layout_without_the_two_lengths():
    """vllm-omni's Edit/EditPlus/Layered ``forward`` calls ``diffuse`` positionally with the layout of
    ``QwenImageCFGParallelMixin.diffuse``; ours is that layout minus the two text-length slots."""
    upstream = list(inspect.signature(QwenImageCFGParallelMixin.diffuse).parameters)
    ours = list(inspect.signature(integration.QwenImageOmniMixin.diffuse).parameters)
    assert upstream[7:9] == ["txt_seq_lens", "negative_txt_seq_lens"]
    assert ours == upstream[:7] + upstream[9:]
    adapter = list(inspect.signature(integration.QwenImageEditPipeline.diffuse).parameters)
    assert adapter[:9] == upstream[:7] + ["_lengths", "_negative_lengths"]


def test_process_functions_resolve_to_vllm_omni_own(od_config):
    post_process = omni_registry.get_diffusion_post_process_func(od_config)
    assert callable(post_process)
    for table in (omni_registry._DIFFUSION_PRE_PROCESS_FUNCS, omni_registry._DIFFUSION_POST_PROCESS_FUNCS):
        for architecture in ARCHITECTURES:
            if architecture in table:
                name = table[architecture]
                upstream = getattr(getattr(integration, architecture).vllm_omni_module, name)
                assert getattr(integration, name) is upstream


def test_register_is_idempotent(od_config):
    before = {arch: omni_registry._DIFFUSION_MODELS[arch] for arch in ARCHITECTURES}
    integration.register()
    integration.register()
    assert {arch: omni_registry._DIFFUSION_MODELS[arch] for arch in ARCHITECTURES} == before
    assert (
        omni_registry.DiffusionModelRegistry._try_load_model_cls("QwenImagePipeline") is integration.QwenImagePipeline
    )


ROLLOUT_PIPELINES = {
    ("QwenImagePipeline", "flow_grpo"): "qwen_image_flow_grpo.vllm_omni_rollout_pipeline.QwenImagePipelineWithLogProb",
    ("QwenImagePipeline", "mix_grpo"): (
        "qwen_image_mix_grpo.vllm_omni_rollout_pipeline.QwenImageMixGRPOPipelineWithLogProb"
    ),
    ("QwenImagePipeline", "dpo"): "qwen_image_dpo.vllm_omni_rollout_pipeline.QwenImageDPOPipeline",
    ("QwenImagePipeline", "diffusion_nft"): (
        "qwen_image_diffusion_nft.vllm_omni_rollout_pipeline.QwenImageDiffusionNFTPipeline"
    ),
    ("QwenImagePipeline", "dual_grpo"): (
        "qwen_image_dual_grpo.vllm_omni_rollout_pipeline.QwenImagePipelineWithDualLogProb"
    ),
    ("QwenImageEditPlusPipeline", "flow_grpo"): (
        "qwen_image_edit_flow_grpo.vllm_omni_rollout_pipeline.QwenImageEditPlusPipelineWithLogProb"
    ),
}
"""What the RL registry answers with vllm-omni installed (under ``qwen_image_omni.pipelines.``): the
paths verl-omni configs and ``custom_pipeline_name`` name, each the class's own module and name."""


@pytest.mark.parametrize("key", ROLLOUT_PIPELINES, ids="/".join)
def test_rollout_pipeline_reachable_through_the_rl_registry(key):
    path = VllmOmniPipelineBase.get_pipeline_path(*key)
    assert path == f"qwen_image_omni.pipelines.{ROLLOUT_PIPELINES[key]}"
    cls = VllmOmniPipelineBase.get_class(*key)
    assert f"{cls.__module__}.{cls.__qualname__}" == path
    assert issubclass(cls, integration.QwenImageOmniMixin)
    assert getattr(integration, cls.__name__) is cls  # the name this module exported before, still importable


def test_every_rollout_pipeline_is_registered():
    assert set(VllmOmniPipelineBase.registered()) == set(ROLLOUT_PIPELINES)


def test_the_plugin_package_serves_the_names_of_its_pipelines_module():
    from qwen_image_omni.integrations.vllm_omni import pipelines

    for name in integration.__all__:
        if name != "register":
            assert getattr(integration, name) is getattr(pipelines, name), name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        integration.nothing_here  # noqa: B018


# ----------------------------------------------------------------------------- loading


def test_loader_builds_our_transformer_with_the_checkpoint_weights(pipeline, checkpoint_tensors):
    assert type(pipeline) is integration.QwenImagePipeline
    assert type(pipeline.transformer) is QwenImageTransformer2DModel
    state = pipeline.transformer.state_dict()
    assert set(state) == set(checkpoint_tensors)
    for name, tensor in checkpoint_tensors.items():
        assert torch.equal(state[name], tensor), name


def test_load_weights_reports_every_transformer_tensor(pipeline, checkpoint_tensors):
    loaded = pipeline.load_weights((f"transformer.{name}", tensor) for name, tensor in checkpoint_tensors.items())
    assert loaded == {f"transformer.{name}" for name in checkpoint_tensors}
    assert loaded == {name for name, _ in pipeline.named_parameters() if name.startswith("transformer.")}


def test_load_weights_rejects_a_missing_tensor_at_the_checkpoint_load(pipeline, checkpoint_tensors, monkeypatch):
    monkeypatch.setattr(pipeline, "_transformer_weights_loaded", False)
    missing = "transformer_blocks.0.attn.norm_q.weight"
    weights = [(f"transformer.{name}", tensor) for name, tensor in checkpoint_tensors.items() if name != missing]
    with pytest.raises(ValueError, match=rf"missing transformer tensors: transformer\.{missing}$"):
        pipeline.load_weights(weights)


def test_load_weights_after_the_checkpoint_load_takes_a_bucket(pipeline, checkpoint_tensors):
    """RL weight sync sends buckets: a later call may bring any subset of the tensors."""
    name = "transformer_blocks.0.attn.norm_q.weight"
    parameter = dict(pipeline.transformer.named_parameters())[name]
    try:
        assert pipeline.load_weights([(f"transformer.{name}", checkpoint_tensors[name] + 1)]) == {f"transformer.{name}"}
        torch.testing.assert_close(parameter, checkpoint_tensors[name] + 1, rtol=0, atol=0)
    finally:
        pipeline.load_weights([(f"transformer.{name}", checkpoint_tensors[name])])


def test_load_weights_rejects_a_misshaped_tensor(pipeline, checkpoint_tensors):
    weights = [(f"transformer.{name}", tensor) for name, tensor in checkpoint_tensors.items()]
    weights[0] = (weights[0][0], torch.zeros(3, 5))
    with pytest.raises(ValueError, match=rf"'{weights[0][0]}' has shape \(3, 5\), expected"):
        pipeline.load_weights(weights)
    pipeline.load_weights((f"transformer.{name}", tensor) for name, tensor in checkpoint_tensors.items())


def test_load_weights_rejects_an_unknown_tensor(pipeline):
    with pytest.raises(ValueError, match="'transformer.not_a_layer.weight' has no counterpart"):
        pipeline.load_weights([("transformer.not_a_layer.weight", torch.zeros(1))])


def test_quantized_transformer_is_refused(od_config):
    with pytest.raises(ValueError, match="does not support vllm-omni quantization"):
        integration.build_transformer(od_config, quant_config=object())


# ----------------------------------------------------------------------------- denoising


@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "true-cfg"])
def test_forward_with_fixed_width_prompts_matches_diffusers(pipeline, reference, cfg):
    """Two requests whose embeddings are padded to one fixed width, batched by vllm-omni's collation."""
    embeds, mask = padded_prompts((7, 13), seed=1)
    negative_embeds, negative_mask = padded_prompts((3, 5), seed=2) if cfg else (None, None)
    latents = torch.randn(2, IMAGE_TOKENS, 16, generator=torch.Generator().manual_seed(3))
    batch = request_batch(embeds_prompts(embeds, mask, negative_embeds, negative_mask), latents, true_cfg_scale=4.0)
    with transformer_calls(pipeline) as calls:
        outputs = pipeline.forward(batch)

    expected = reference(
        prompt_embeds=embeds, prompt_embeds_mask=mask,
        negative_prompt_embeds=negative_embeds, negative_prompt_embeds_mask=negative_mask,
        true_cfg_scale=4.0, height=SIZE, width=SIZE, num_inference_steps=3, latents=latents, output_type="latent",
    ).images  # fmt: skip
    assert len(outputs) == 2
    torch.testing.assert_close(torch.cat([output.output for output in outputs]), expected, rtol=1e-5, atol=1e-5)
    assert_no_text_length(calls)
    assert all(kwargs["encoder_hidden_states"].shape[1] == WIDTH for kwargs in calls)


def test_step_execution_batch_matches_each_request_alone(pipeline):
    """Continuous batching: two text prompts of different lengths, stepped together and alone."""

    def states():
        prompts = [
            {"prompt": "a cat", "negative_prompt": " "},
            {"prompt": "a red bicycle by a lake", "negative_prompt": " "},
        ]
        made = []
        for index, prompt in enumerate(prompts):
            sampling = OmniDiffusionSamplingParams(
                height=SIZE, width=SIZE, num_inference_steps=3, true_cfg_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(10 + index),
            )  # fmt: skip
            made.append(
                pipeline.prepare_encode(StepRequestState(request_id=f"r{index}", sampling=sampling, prompt=prompt))
            )
        return made

    def run(group):
        while not group[0].denoise_completed:
            batch = InputBatch.make_batch(group)
            noise_pred = pipeline.denoise_step(batch)
            offset = 0
            for state in group:
                rows = state.latents.shape[0]
                pipeline.step_scheduler(state, noise_pred[offset : offset + rows])
                offset += rows
        return torch.cat([state.latents for state in group])

    together = states()
    assert together[0].prompt_embeds.shape[1] != together[1].prompt_embeds.shape[1]
    with transformer_calls(pipeline) as calls:
        batched = run(together)
    alone = torch.cat([run([state]) for state in states()])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    assert_no_text_length(calls)
    assert all(state.txt_seq_lens is None or state.txt_seq_lens == [state.prompt_embeds.shape[1]] for state in together)


# ----------------------------------------------------------------------------- Edit, Edit-Plus, Layered

IMAGE_PIPELINES = ARCHITECTURES[1:]


class _ProcessorStandIn:
    """Replaces ``Qwen2VLProcessor`` while the image pipelines are built: transformers 5 builds its
    video processor with torchvision, which cannot load beside the CPU torch wheel. Only prompt
    encoding with an image uses the processor; the denoising tested here does not."""

    @staticmethod
    def from_pretrained(*args, **kwargs):
        return None


@pytest.fixture(scope="module")
def image_pipelines(od_config) -> dict:
    """Our Edit, Edit-Plus and Layered pipelines, built by vllm-omni's loader on the tiny checkpoint."""
    built = {}
    with pytest.MonkeyPatch.context() as patch:
        for architecture in IMAGE_PIPELINES:
            module = getattr(integration, architecture).vllm_omni_module
            patch.setattr(module, "Qwen2VLProcessor", _ProcessorStandIn)
            config = copy.copy(od_config)
            config.model_class_name = architecture
            built[architecture] = DiffusersPipelineLoader(LoadConfig(), config).load_model("cpu")
    return built


class _DropTextLengths(torch.nn.Module):
    """diffusers' transformer behind vllm-omni's call, which still passes ``txt_seq_lens``."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, txt_seq_lens=None, **kwargs):
        return self.transformer(**kwargs)


@pytest.mark.parametrize("architecture", IMAGE_PIPELINES)
def test_image_pipelines_hold_our_transformer(image_pipelines, checkpoint_tensors, architecture):
    pipe = image_pipelines[architecture]
    assert type(pipe) is getattr(integration, architecture)
    assert type(pipe.transformer) is QwenImageTransformer2DModel
    state = pipe.transformer.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in checkpoint_tensors.items())


@pytest.mark.parametrize("architecture", ["QwenImageEditPipeline", "QwenImageEditPlusPipeline"])
def test_edit_denoising_called_as_vllm_omni_forward_calls_it_matches_diffusers(
    image_pipelines, checkpoint, architecture
):
    """``diffuse`` with the positional layout of vllm-omni's Edit ``forward`` (text lengths
    included), an appended condition image and true CFG, against vllm-omni's own loop running
    diffusers' transformer on the same weights."""
    pipe = image_pipelines[architecture]
    pipe._interrupt, pipe._current_timestep = False, None
    embeds, mask = padded_prompts((9,), seed=8)
    negative_embeds, negative_mask = padded_prompts((4,), seed=9)
    generator = torch.Generator().manual_seed(11)
    latents = torch.randn(1, IMAGE_TOKENS, 16, generator=generator)
    image_latents = torch.randn(1, IMAGE_TOKENS, 16, generator=generator)
    img_shapes = [[(1, 4, 4), (1, 4, 4)]]
    timesteps, _ = pipe.prepare_timesteps(3, None, IMAGE_TOKENS)
    arguments = (embeds, mask, negative_embeds, negative_mask, latents, img_shapes, [WIDTH], [WIDTH],
                 timesteps, True, None, 4.0)  # fmt: skip
    options = {"image_latents": image_latents, "cfg_normalize": True,
               "additional_transformer_kwargs": {"return_dict": False, "attention_kwargs": {}}}  # fmt: skip
    with transformer_calls(pipe) as calls:
        ours = pipe.diffuse(*arguments, **options)
    assert_no_text_length(calls)

    pipe.prepare_timesteps(3, None, IMAGE_TOKENS)  # a fresh schedule for the second loop
    ours_transformer = pipe.transformer
    pipe.transformer = _DropTextLengths(DiffusersTransformer.from_pretrained(checkpoint, subfolder="transformer"))
    try:
        expected = QwenImageCFGParallelMixin.diffuse(pipe, *arguments, **options)
    finally:
        pipe.transformer = ours_transformer
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- RL rollout


@pytest.fixture(scope="module")
def rollout_pipeline(od_config):
    """The FlowGRPO rollout pipeline, loaded as RL frameworks load it (``load_format="custom_pipeline"``)."""
    path = VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "flow_grpo")
    return DiffusersPipelineLoader(LoadConfig(), od_config).load_model(
        "cpu", load_format="custom_pipeline", custom_pipeline_name=path
    )


ROLLOUT_EXTRA_ARGS = {"noise_level": 0.7, "sde_type": "sde", "sde_window_size": 2, "sde_window_range": (0, 2)}


def rollout_inputs():
    """Two prompts padded to :data:`WIDTH` with negative prompts, initial noise, and a fresh generator."""
    embeds, mask = padded_prompts((7, 13), seed=4)
    negative_embeds, negative_mask = padded_prompts((3, 5), seed=5)
    latents = torch.randn(2, IMAGE_TOKENS, 16, generator=torch.Generator().manual_seed(6))
    return embeds, mask, negative_embeds, negative_mask, latents, torch.Generator().manual_seed(7)


@pytest.fixture(scope="module")
def rollout(rollout_pipeline) -> dict[str, torch.Tensor]:
    """One FlowGRPO rollout of :func:`rollout_inputs` on vllm-omni, the trajectories of both requests stacked."""
    embeds, mask, negative_embeds, negative_mask, latents, generator = rollout_inputs()
    batch = request_batch(
        embeds_prompts(embeds, mask, negative_embeds, negative_mask), latents,
        true_cfg_scale=4.0, generator=generator, extra_args=ROLLOUT_EXTRA_ARGS,
    )  # fmt: skip
    with transformer_calls(rollout_pipeline) as calls:
        outputs = rollout_pipeline.forward(batch)
    assert len(outputs) == 2
    assert_no_text_length(calls)
    # verl-omni main's envelope: each request carries its own prompt embeddings for the trainer.
    for index, output in enumerate(outputs):
        embeddings = output.output["metadata"]["prompt_embeddings"]
        assert torch.equal(embeddings["prompt_embeds"], embeds[index : index + 1].to(embeddings["prompt_embeds"].dtype))
        assert torch.equal(embeddings["negative_prompt_embeds_mask"], negative_mask[index : index + 1])
    return {
        "images": torch.cat([envelope_media(output.output) for output in outputs]),
        "all_latents": torch.cat([output.trajectory_latents for output in outputs]),
        "all_log_probs": torch.cat([output.trajectory_log_probs for output in outputs]),
        "all_timesteps": torch.cat([output.trajectory_timesteps for output in outputs]),
    }


def test_rollout_log_probs_equal_the_trainer_recomputation(rollout_pipeline, rollout, checkpoint):
    """The trainer re-collates the prompts to other widths; rescoring gives the rollout's log-probs."""
    all_latents, all_log_probs, all_timesteps = (
        rollout["all_latents"],
        rollout["all_log_probs"],
        rollout["all_timesteps"],
    )
    assert all_latents.shape == (2, 3, IMAGE_TOKENS, 16) and all_log_probs.shape == all_timesteps.shape == (2, 2)

    trainer_embeds, trainer_mask = padded_prompts((7, 13), seed=4, width=40)
    trainer_negative, trainer_negative_mask = padded_prompts((3, 5), seed=5, width=9)
    model_config = DiffusionModelConfig(
        local_path=str(checkpoint),
        algorithm="flow_grpo",
        pipeline={"height": SIZE, "width": SIZE, "num_inference_steps": 3, "true_cfg_scale": 4.0},
        algo={"noise_level": 0.7, "sde_type": "sde"},
    )
    micro_batch = {"height": SIZE, "width": SIZE, "vae_scale_factor": rollout_pipeline.vae_scale_factor}
    scheduler = QwenImage.build_scheduler(model_config)
    for step in range(all_log_probs.shape[1]):
        inputs, negative_inputs = QwenImage.prepare_model_inputs(
            rollout_pipeline.transformer, model_config, all_latents, all_timesteps, trainer_embeds, trainer_mask,
            trainer_negative, trainer_negative_mask, micro_batch, step,
        )  # fmt: skip
        with torch.no_grad():
            log_prob, *_ = QwenImage.forward_and_sample_previous_step(
                rollout_pipeline.transformer, scheduler, model_config, inputs, negative_inputs,
                {"all_latents": all_latents, "all_timesteps": all_timesteps}, step,
            )  # fmt: skip
        torch.testing.assert_close(log_prob, all_log_probs[:, step], rtol=0, atol=1e-5)


def test_rollout_equals_the_diffusers_rollout_pipeline(rollout_pipeline, rollout, checkpoint):
    """vllm-omni's rollout and the diffusers rollout pipeline run one loop: same trajectories."""
    embeds, mask, negative_embeds, negative_mask, latents, generator = rollout_inputs()
    diffusers_rollout = DiffusersRolloutPipeline(
        transformer=rollout_pipeline.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(checkpoint, subfolder="scheduler"),
    )
    expected = diffusers_rollout(
        prompt_embeds=embeds, prompt_embeds_mask=mask,
        negative_prompt_embeds=negative_embeds, negative_prompt_embeds_mask=negative_mask,
        true_cfg_scale=4.0, height=SIZE, width=SIZE, num_inference_steps=3, generator=[generator, generator],
        latents=latents, output_type="latent", **ROLLOUT_EXTRA_ARGS,
    )  # fmt: skip
    for name in ("images", "all_latents", "all_log_probs", "all_timesteps"):
        torch.testing.assert_close(rollout[name], getattr(expected, name), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("global_steps", [0, 1, 2])
def test_mix_grpo_rollout_uses_the_trainer_window(od_config, global_steps):
    """The MixGRPO rollout records exactly the window ``QwenImageMixGRPO.sde_window`` gives the trainer."""
    path = VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "mix_grpo")
    assert path == "qwen_image_omni.pipelines.qwen_image_mix_grpo.vllm_omni_rollout_pipeline.QwenImageMixGRPOPipelineWithLogProb"
    pipe = DiffusersPipelineLoader(LoadConfig(), od_config).load_model(
        "cpu", load_format="custom_pipeline", custom_pipeline_name=path
    )
    embeds, mask, _, _, latents, generator = rollout_inputs()
    extra = {
        "sde_window_size": 1,
        "sde_window_range": (0, 3),
        "sample_strategy": "progressive",
        "global_steps": global_steps,
    }
    outputs = pipe.forward(request_batch(embeds_prompts(embeds, mask), latents, generator=generator, extra_args=extra))
    config = DiffusionModelConfig(
        architecture="QwenImagePipeline",
        algorithm="mix_grpo",
        pipeline={"height": SIZE, "width": SIZE, "num_inference_steps": 3},
        algo={"sde_window_size": 1, "sde_window_range": (0, 3)},
    )
    start, end = QwenImageMixGRPO.sde_window(config, global_steps, "progressive")
    assert (start, end) == (global_steps, global_steps + 1)
    for output in outputs:
        torch.testing.assert_close(output.trajectory_timesteps, pipe.scheduler.timesteps[start:end].reshape(1, -1))


def test_dpo_rollout_records_the_diffusers_clean_latents(od_config, checkpoint):
    """The DPO rollout on vllm-omni (custom pipeline) records the diffusers DPO rollout's clean latents."""
    from qwen_image_omni.pipelines.qwen_image_dpo import DiffusersQwenImageDPOPipeline as DiffusersDPOPipeline

    path = VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "dpo")
    assert path == "qwen_image_omni.pipelines.qwen_image_dpo.vllm_omni_rollout_pipeline.QwenImageDPOPipeline"
    pipe = DiffusersPipelineLoader(LoadConfig(), od_config).load_model(
        "cpu", load_format="custom_pipeline", custom_pipeline_name=path
    )
    embeds, mask, negative_embeds, negative_mask, latents, generator = rollout_inputs()
    batch = request_batch(
        embeds_prompts(embeds, mask, negative_embeds, negative_mask), latents, true_cfg_scale=4.0,
        generator=generator, extra_args={"noise_level": 0.7},
    )  # fmt: skip
    with transformer_calls(pipe) as calls:
        outputs = pipe.forward(batch)
    assert_no_text_length(calls)
    clean = torch.cat([output.output["metadata"]["rl"]["latents_clean"] for output in outputs])
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(checkpoint, subfolder="scheduler")
    expected = DiffusersDPOPipeline(transformer=pipe.transformer, scheduler=scheduler)(
        prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative_embeds,
        negative_prompt_embeds_mask=negative_mask, true_cfg_scale=4.0, height=SIZE, width=SIZE,
        num_inference_steps=3, latents=latents, output_type="latent",
    )  # fmt: skip
    torch.testing.assert_close(clean, expected.rl["latents_clean"], rtol=0, atol=1e-6)


def test_token_id_requests_roll_out_as_the_diffusers_pipeline_encodes_them(rollout_pipeline):
    """verl-omni's rollout server sends token ids (``prompt_token_ids`` / ``negative_prompt_ids``):
    the vllm-omni rollout encodes them as the diffusers rollout pipeline does."""
    generator = torch.Generator().manual_seed(9)
    prompts = [
        {"prompt_token_ids": torch.randint(3, 200, (n,), generator=generator).tolist(),
         "negative_prompt_ids": torch.randint(3, 200, (m,), generator=generator).tolist()}
        for n, m in ((40, 36), (45, 38))
    ]  # fmt: skip
    latents = torch.randn(2, IMAGE_TOKENS, 16, generator=torch.Generator().manual_seed(6))
    batch = request_batch(prompts, latents, true_cfg_scale=4.0, extra_args={"noise_level": 0.0})
    with torch.no_grad(), transformer_calls(rollout_pipeline) as calls:
        outputs = rollout_pipeline.forward(batch)
    assert_no_text_length(calls)
    ids, ids_mask = (torch.zeros(2, 45, dtype=torch.long), torch.zeros(2, 45, dtype=torch.long))
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt["prompt_token_ids"])] = torch.tensor(prompt["prompt_token_ids"])
        ids_mask[row, : len(prompt["prompt_token_ids"])] = 1
    embeds, mask = rollout_pipeline.encode_prompt_ids(ids, ids_mask)
    for row, output in enumerate(outputs):
        embeddings = output.output["metadata"]["prompt_embeddings"]
        torch.testing.assert_close(embeddings["prompt_embeds"], embeds[row : row + 1])
        assert torch.equal(embeddings["prompt_embeds_mask"], mask[row : row + 1])
        assert embeddings["negative_prompt_embeds"] is not None
