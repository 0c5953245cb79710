"""vllm-omni's TeaCache (``cache_backend="tea_cache"``) on our transformer.

Unit level: our extractor (``qwen_image_omni.integrations.vllm_omni.teacache``) splits a forward
into exactly what the forward computes, the dispatcher sends other modules to vllm-omni's own
extractor, and vllm-omni's TeaCache hook on our transformer skips blocks. Engine level (the full
engine on the CPU, ``tests/support/vllm_omni_engine.py``): an engine with our plugin and TeaCache serves our
transformer, its images differ from uncached ones, and equal vllm-omni's own transformer under the
same TeaCache config and diffusers' pipeline running our transformer under vllm-omni's hook.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm_omni
pytest.importorskip("vllm_omni", reason="needs vllm-omni (make test-vllm-omni)")

from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline  # noqa: E402
from vllm_omni.diffusion.cache.teacache import TeaCacheConfig, apply_teacache_hook  # noqa: E402
from vllm_omni.diffusion.cache.teacache import hook as teacache_hook  # noqa: E402
from vllm_omni.diffusion.cache.teacache.extractors import get_extractor  # noqa: E402

from qwen_image_omni import QwenImageTransformer2DModel  # noqa: E402
from qwen_image_omni.integrations.vllm_omni.teacache import (  # noqa: E402
    extract_teacache_context,
    register_teacache_extractor,
    teacache_coefficients,
)

from tests.support.tiny import make_inputs, make_pair, run  # noqa: E402
from tests.support.vllm_omni_engine import OURS, VLLM_OMNI_OWN, has_cpu_platform, run_engine_job  # noqa: E402

TRANSFORMER_TYPE = "QwenImageTransformer2DModel"
STEPS = 6
THRESH = 0.3  # high enough that the tiny checkpoint skips some of its 6 steps (checked below)
SAMPLING = {"height": 64, "width": 64, "num_inference_steps": STEPS, "seed": 0}
PROMPTS = ["a cat", "a red dog sitting on a green mat"]
CFG_PROMPT = {"prompt": "a cat", "negative_prompt": "a blurry dog"}
CFG_SAMPLING = {**SAMPLING, "true_cfg_scale": 4.0}
TEA_CACHE = {"cache_backend": "tea_cache", "cache_config": {"rel_l1_thresh": THRESH}}


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Our extractor registered, as the plugin's ``register()`` does in every vllm-omni process."""
    register_teacache_extractor()


class BlockRecorder:
    """Records block 0's inputs and its attention's image input (the modulated input) on each call."""

    def __init__(self, model: QwenImageTransformer2DModel):
        self.blocks: list[dict] = []
        self.attention: list[torch.Tensor] = []
        block = model.transformer_blocks[0]
        self.handles = [
            block.register_forward_pre_hook(lambda m, a, kw: self.blocks.append(kw), with_kwargs=True),
            block.attn.register_forward_pre_hook(
                lambda m, a, kw: self.attention.append(kw["hidden_states"]), with_kwargs=True
            ),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def variant(name: str):
    """``(model, inputs)`` for one transformer variant the extractor must follow."""
    if name == "plain":
        return make_pair(seed=0)[0], make_inputs(valid=[7, 3])
    if name == "edit-plus-zero-cond-t":
        return make_pair(seed=4, zero_cond_t=True)[0], make_inputs(img_shapes=((1, 4, 4), (1, 2, 4)), valid=[7, 2])
    if name == "layered":
        model = make_pair(seed=5, use_layer3d_rope=True, use_additional_t_cond=True)[0]
        inputs = make_inputs(img_shapes=((1, 4, 4), (1, 4, 4)), valid=[7, 5])
        return model, {**inputs, "additional_t_cond": torch.tensor([0, 1])}
    if name == "controlnet":
        model, inputs = make_pair(seed=0)[0], make_inputs(valid=[7, 3])
        residuals = [0.1 * torch.randn(2, 24, model.inner_dim, generator=torch.Generator().manual_seed(3))]
        return model, {**inputs, "controlnet_block_samples": residuals}
    raise ValueError(name)


# ----------------------------------------------------------------------------- extractor


@pytest.mark.parametrize("name", ["plain", "edit-plus-zero-cond-t", "layered", "controlnet"])
def test_extractor_splits_the_forward_into_what_it_computes(name):
    model, inputs = variant(name)
    recorder = BlockRecorder(model)
    expected = run(model, inputs)
    forward_block, forward_modulated = recorder.blocks[0], recorder.attention[0]
    with torch.no_grad():
        ctx = extract_teacache_context(model, **inputs, return_dict=False)
        ctx.validate()
        image, text = ctx.run_transformer_blocks()
        output = ctx.postprocess(image)[0]
    recorder.remove()
    exact = {"rtol": 0, "atol": 0}
    torch.testing.assert_close(ctx.hidden_states, forward_block["hidden_states"], **exact)
    torch.testing.assert_close(ctx.encoder_hidden_states, forward_block["encoder_hidden_states"], **exact)
    torch.testing.assert_close(ctx.temb, forward_block["temb"], **exact)
    torch.testing.assert_close(ctx.modulated_input, forward_modulated, **exact)
    torch.testing.assert_close(output, expected, **exact)
    assert text.shape == ctx.encoder_hidden_states.shape


def test_extractor_returns_as_forward_returns():
    model, inputs = variant("plain")
    with torch.no_grad():
        ctx = extract_teacache_context(model, **inputs)
        output = ctx.postprocess(ctx.run_transformer_blocks()[0])
    torch.testing.assert_close(output.sample, run(model, inputs), rtol=0, atol=0)


def test_extractor_checks_inputs_as_forward_does():
    model, inputs = variant("plain")
    with pytest.raises(ValueError, match="guidance"):
        extract_teacache_context(model, **inputs, guidance=torch.ones(2))
    with pytest.raises(TypeError, match="unexpected keyword"):
        extract_teacache_context(model, **inputs, bogus=1)
    with pytest.raises(NotImplementedError, match="scale"):
        extract_teacache_context(model, **inputs, attention_kwargs={"scale": 0.5})


# ----------------------------------------------------------------------------- registration


def test_registered_extractor_dispatches_by_type():
    extractor = get_extractor(TRANSFORMER_TYPE)
    model, inputs = variant("plain")
    with torch.no_grad():
        ours = extractor(model, **inputs)
        direct = extract_teacache_context(model, **inputs)
    torch.testing.assert_close(ours.modulated_input, direct.modulated_input, rtol=0, atol=0)
    # Anything else reaches vllm-omni's own Qwen-Image extractor, which refuses a module without blocks.
    with pytest.raises(ValueError, match="transformer_blocks"):
        extractor(torch.nn.Linear(2, 2), torch.zeros(1, 1, 2), None, None, 0.5, [(1, 1, 1)], [1])


def test_register_is_idempotent():
    before = get_extractor(TRANSFORMER_TYPE)
    register_teacache_extractor()
    assert get_extractor(TRANSFORMER_TYPE) is before


def test_backend_config_for_our_class_uses_vllm_omni_qwen_image_coefficients():
    config = TeaCacheConfig(transformer_type=QwenImageTransformer2DModel.__name__)
    assert config.coefficients == teacache_coefficients()
    assert len(teacache_coefficients()) == 5


# ----------------------------------------------------------------------------- the hook on our transformer


@pytest.fixture
def one_cfg_rank(monkeypatch):
    """No CFG-parallel group in this process: the hook's true-CFG path sees one rank (both branches here)."""
    monkeypatch.setattr(teacache_hook, "get_classifier_free_guidance_world_size", lambda: 1)


def denoise_with_hook(thresh: float | None, *, cfg: bool = False) -> tuple[list[torch.Tensor], int]:
    """:data:`STEPS` forwards of a 1-block model at falling timesteps (with ``cfg``: positive then
    negative each step) under vllm-omni's TeaCache hook (None: no hook); outputs and block-0 runs."""
    model = make_pair(seed=0, num_layers=1)[0]
    model.do_true_cfg = cfg
    if thresh is not None:
        apply_teacache_hook(model, TeaCacheConfig(rel_l1_thresh=thresh, transformer_type=type(model).__name__))
    recorder = BlockRecorder(model)
    positive = make_inputs(valid=[7, 3], seed=1)
    negative = make_inputs(valid=[5, 6], seed=2)
    outputs = []
    for t in torch.linspace(1.0, 0.1, STEPS):
        for inputs in (positive, negative) if cfg else (positive,):
            outputs.append(run(model, {**inputs, "hidden_states": positive["hidden_states"], "timestep": t.expand(2)}))
    recorder.remove()
    return outputs, len(recorder.blocks)


@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "true-cfg"])
def test_hook_with_a_tiny_threshold_computes_every_step_exactly(cfg, one_cfg_rank):
    reference, reference_runs = denoise_with_hook(None, cfg=cfg)
    cached, runs = denoise_with_hook(1e-9, cfg=cfg)
    assert runs == reference_runs == len(reference)
    for got, want in zip(cached, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "true-cfg"])
def test_hook_with_a_high_threshold_skips_blocks(cfg, one_cfg_rank):
    reference, _ = denoise_with_hook(None, cfg=cfg)
    cached, runs = denoise_with_hook(THRESH, cfg=cfg)
    branches = 2 if cfg else 1
    assert branches <= runs < len(reference)  # every branch computes its first step, then some are skipped
    torch.testing.assert_close(cached[0], reference[0], rtol=0, atol=0)
    assert not torch.equal(cached[-1], reference[-1])


# ----------------------------------------------------------------------------- the full engine


engine = pytest.mark.skipif(not has_cpu_platform(), reason="needs the test-support CPU platform")


def tea_cache_job(job_dir, checkpoint, *, plugin: bool) -> dict:
    """One TeaCache engine: probe, two text prompts, one true-CFG prompt."""
    torch.save(CFG_PROMPT, job_dir / "cfg.pt")
    steps = [
        {"rpc": "probe_pipeline"},
        {"generate": PROMPTS, "sampling": SAMPLING},
        {"generate": ["cfg.pt"], "sampling": CFG_SAMPLING},
    ]
    return run_engine_job(job_dir, {"model": str(checkpoint), "engine": TEA_CACHE, "steps": steps}, plugin=plugin)


@pytest.fixture(scope="module")
def tea_ours(checkpoint, tmp_path_factory) -> dict:
    """The TeaCache engine with our plugin."""
    return tea_cache_job(tmp_path_factory.mktemp("tea-ours"), checkpoint, plugin=True)


@pytest.fixture(scope="module")
def tea_own(checkpoint, tmp_path_factory) -> dict:
    """The same engine without our plugin: vllm-omni's own transformer and extractor."""
    return tea_cache_job(tmp_path_factory.mktemp("tea-own"), checkpoint, plugin=False)


def diffusers_images(checkpoint, thresh: float | None) -> tuple[np.ndarray, int]:
    """diffusers' pipeline running our transformer, under vllm-omni's TeaCache hook (None: none).

    Returns the images of :data:`PROMPTS` (one generation each, as the engine seeds them) and the
    number of block runs.
    """
    pipe = DiffusersQwenImagePipeline.from_pretrained(checkpoint, local_files_only=True, torch_dtype=torch.float32)
    transformer = QwenImageTransformer2DModel.from_pretrained(checkpoint / "transformer", torch_dtype=torch.float32)
    pipe.transformer = transformer
    runs = []
    transformer.transformer_blocks[0].register_forward_pre_hook(lambda *args: runs.append(1))
    if thresh is not None:
        apply_teacache_hook(transformer, TeaCacheConfig(rel_l1_thresh=thresh, transformer_type=TRANSFORMER_TYPE))
    images = []
    for prompt in PROMPTS:
        if thresh is not None:  # as the engine's backend refreshes the hook before each request
            transformer._hook_registry.reset_hook("teacache")
        image = pipe(
            prompt=prompt, height=64, width=64, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)
        ).images[0]
        images.append(np.asarray(image.convert("RGB")))
    return np.stack(images), len(runs)


@pytest.mark.vllm_omni_engine
@engine
def test_tea_cache_engine_serves_our_transformer(tea_ours):
    assert tea_ours["steps"][0]["rpc"] == [[OURS]]
    assert "TeaCache applied" in tea_ours["log"]
    assert tea_ours["images"][1].shape == (2, 64, 64, 3)
    assert tea_ours["images"][2].shape == (1, 64, 64, 3)


@pytest.mark.vllm_omni_engine
@engine
def test_tea_cache_engine_without_plugin_serves_vllm_omni_own(tea_own):
    assert tea_own["steps"][0]["rpc"] == [[VLLM_OMNI_OWN]]


@pytest.mark.vllm_omni_engine
@engine
def test_tea_cache_images_equal_vllm_omni_own_transformer(tea_ours, tea_own):
    np.testing.assert_array_equal(tea_ours["images"][1], tea_own["images"][1])
    np.testing.assert_array_equal(tea_ours["images"][2], tea_own["images"][2])


@pytest.mark.vllm_omni_engine
@engine
def test_tea_cache_skips_steps_and_changes_the_images(tea_ours, checkpoint):
    uncached, uncached_runs = diffusers_images(checkpoint, None)
    cached, cached_runs = diffusers_images(checkpoint, THRESH)
    assert uncached_runs == len(PROMPTS) * STEPS
    assert len(PROMPTS) <= cached_runs < uncached_runs
    np.testing.assert_array_equal(tea_ours["images"][1], cached)  # the engine caches as vllm-omni's hook does here
    assert not np.array_equal(tea_ours["images"][1], uncached)
