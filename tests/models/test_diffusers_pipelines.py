"""diffusers' own Qwen-Image pipelines run with our transformer give diffusers' latents.

Every case builds one pipeline twice from the same tiny components (``tests/support/tiny.py``'s ``make_pair``
weights, ``tests/support/tiny_checkpoint.py``'s VAE, text encoder and ControlNet), once with diffusers'
transformer and once with ours, runs both from the same seeds for 2 denoising steps and compares the
latents in fp32. The cases are the inputs that used to break ours: batches where diffusers' pipelines
pass ``img_shapes`` for the prompts only (``num_images_per_prompt > 1``), the flat
``[(f, h, w)] * batch`` list of the ControlNet pipelines, true CFG, several images per sample (Edit,
Edit-Plus, Layered), and prompt embeddings padded wider than diffusers' own. The classic pipelines
and the modular ones (``diffusers.modular_pipelines``) are both covered.

The Edit and Edit-Plus pipelines encode prompts through a ``Qwen2VLProcessor``, which needs
torchvision in transformers 5: they get ``prompt_embeds`` and ``processor=None`` (the modular ones
lose their text-encoder step). Layered encodes plain prompts with the tokenizer alone.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest
import torch
from diffusers import (
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    QwenImageControlNetInpaintPipeline,
    QwenImageControlNetPipeline,
    QwenImageEditInpaintPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    QwenImageLayeredPipeline,
    QwenImageMultiControlNetModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel as DiffusersTransformer,
)
from diffusers.modular_pipelines import (
    QwenImageAutoBlocks,
    QwenImageEditAutoBlocks,
    QwenImageEditPlusAutoBlocks,
    QwenImageLayeredAutoBlocks,
)
from diffusers.modular_pipelines.qwenimage import encoders as modular_encoders
from diffusers.pipelines.qwenimage import (
    pipeline_qwenimage_edit,
    pipeline_qwenimage_edit_inpaint,
    pipeline_qwenimage_edit_plus,
    pipeline_qwenimage_layered,
)
from PIL import Image

from tests.support.tiny import make_pair
from tests.support.tiny_checkpoint import TEXT_DIM, tiny_controlnet, tiny_text_encoder, tiny_tokenizer, tiny_vae

SIZE = dict(height=64, width=64)  # 4x4 image tokens
STEPS = 2
CONDITION_AREA = 64 * 64  # what the Edit / Layered pipelines resize their input images to, in pixels
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
LAYERED_Z_DIM = 8  # not 4: see tiny_vae
PROMPTS = ["a cat", "a red dog on a sofa"]
NEGATIVES = ["", "blurry"]


# ---------------------------------------------------------------------------------------- components


def picture(width: int = 64, height: int = 64, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random-noise PIL image (``mode``: "RGB", "RGBA")."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def mask_picture(width: int = 64, height: int = 64) -> Image.Image:
    """A mask that repaints the left half."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, : width // 2] = 255
    return Image.fromarray(pixels, "L")


@functools.cache
def shared_parts() -> dict:
    """VAEs, tokenizer and text encoder, built once for the module (random weights from seed 0)."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    return dict(
        vae=tiny_vae(),
        rgba_vae=tiny_vae(input_channels=4, z_dim=LAYERED_Z_DIM),
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(tokenizer),
    )


TRANSFORMER_VARIANTS = {
    "base": {},
    "zero_cond_t": dict(zero_cond_t=True),  # Qwen-Image-Edit-2511
    # Qwen-Image-Layered, on the RGBA VAE's latents.
    "layered": dict(
        use_layer3d_rope=True, use_additional_t_cond=True, in_channels=4 * LAYERED_Z_DIM, out_channels=LAYERED_Z_DIM
    ),
}


@functools.cache
def transformers(variant: str) -> dict:
    """``{"ours", "diffusers", "diffusers_copy"}``: one set of random weights in each class."""
    ours, reference = make_pair(joint_attention_dim=TEXT_DIM, **TRANSFORMER_VARIANTS[variant])
    copy = DiffusersTransformer(**reference.config).eval()
    copy.load_state_dict(reference.state_dict())
    return {"ours": ours, "diffusers": reference, "diffusers_copy": copy}


@functools.cache
def controlnet(kind: str | None):
    """None, a single ControlNet, a ControlNet-union wrapped for several conditions, or the inpaint one."""
    if kind is None:
        return None
    if kind == "inpaint":
        return tiny_controlnet(extra_condition_channels=4)
    return {"single": tiny_controlnet, "multi": lambda: QwenImageMultiControlNetModel([tiny_controlnet()])}[kind]()


def build(pipeline_class, transformer, controlnet_kind: str | None = None):
    """``pipeline_class`` around ``transformer``, with the shared components it takes and a fresh scheduler."""
    parts = shared_parts()
    available = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=parts["rgba_vae"] if pipeline_class is QwenImageLayeredPipeline else parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        processor=None,
        transformer=transformer,
        controlnet=controlnet(controlnet_kind),
    )
    names = [name for name in inspect.signature(pipeline_class.__init__).parameters if name != "self"]
    pipeline = pipeline_class(**{name: available[name] for name in names})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline, **kwargs) -> torch.Tensor:
    """The packed latents after the last denoising step (:data:`STEPS` by default) from seed 0."""
    latents = []

    def keep_latents(pipeline, step, timestep, tensors):
        # Read here rather than from output_type="latent": Layered's pipeline fails to return those.
        latents.append(tensors["latents"])
        return {}

    # ControlNet-inpaint samples the VAE posterior from the global RNG, not from `generator`.
    torch.manual_seed(0)
    kwargs = {"num_inference_steps": STEPS, "output_type": "latent", **kwargs}
    pipeline(generator=torch.Generator().manual_seed(0), callback_on_step_end=keep_latents, **kwargs)
    return latents[-1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module on one intra-op thread: on tensors this small, syncing two costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def small_condition_images(monkeypatch):
    """Shrink the area the Edit / Edit-Plus / Layered pipelines resize input images to (1024² or 640²).

    At full size each condition image is thousands of tokens; both runs of a case see the same patch.
    """
    for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_inpaint, pipeline_qwenimage_edit_plus,
                   pipeline_qwenimage_layered, modular_encoders):  # fmt: skip
        original = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions", lambda _, ratio, f=original: f(CONDITION_AREA, ratio))


def text_embeds(batch: int, valid: list[int], width: int | None = None, seed: int = 0):
    """Random prompt embeddings ``[batch, width, TEXT_DIM]`` with ``valid[i]`` leading valid tokens and a mask.

    The columns past each row's valid tokens are random too: a mask must hide them, whatever they hold.
    """
    width = width or max(valid)
    embeds = torch.randn(batch, width, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width)[None, :] < torch.tensor(valid)[:, None]).long()
    return embeds, mask


def embeds_kwargs(batch: int, cfg: bool) -> dict:
    """``prompt_embeds`` (valid lengths 5 and 9) and, with ``cfg``, negative ones (3 valid tokens each)."""
    embeds, mask = text_embeds(batch, [5, 9][:batch], seed=1)
    kwargs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask)
    if cfg:
        negative, negative_mask = text_embeds(batch, [3] * batch, seed=2)
        kwargs.update(negative_prompt_embeds=negative, negative_prompt_embeds_mask=negative_mask, true_cfg_scale=3.0)
    return kwargs


# -------------------------------------------------------------------------------------------- cases


def prompt_cases(extra: dict) -> dict:
    """The batch shapes every pipeline runs: 2 prompts; 1 prompt x 2 images; 2 x 2 with true CFG."""
    return {
        "batch2": dict(prompt=PROMPTS, true_cfg_scale=1.0, **extra),
        "images_per_prompt2": dict(prompt=PROMPTS[0], num_images_per_prompt=2, true_cfg_scale=1.0, **extra),
        "batch2_images_per_prompt2_cfg": dict(
            prompt=PROMPTS, negative_prompt=NEGATIVES, true_cfg_scale=3.0, num_images_per_prompt=2, **extra
        ),
    }


def embeds_cases(extra: dict) -> dict:
    """:func:`prompt_cases` for the pipelines that need a processor to encode text: embeddings instead."""
    return {
        "batch2": dict(**embeds_kwargs(2, cfg=False), true_cfg_scale=1.0, **extra),
        "images_per_prompt2": dict(**embeds_kwargs(1, cfg=False), num_images_per_prompt=2, true_cfg_scale=1.0, **extra),
        "batch2_images_per_prompt2_cfg": dict(**embeds_kwargs(2, cfg=True), num_images_per_prompt=2, **extra),
    }


IMAGE = picture()
WIDE_IMAGE = picture(96, 48, seed=1)  # the Edit pipelines encode it at 96x32: (1, 2, 6) tokens, unlike the output
STRENGTH = dict(strength=0.5, num_inference_steps=2 * STEPS)  # img2img / inpaint denoise the last half
CONTROL = dict(control_image=picture(seed=2), **SIZE)

PIPELINE_CASES = {
    # (pipeline class, transformer variant, controlnet kind): {case id: call kwargs}
    (QwenImagePipeline, "base", None): prompt_cases(SIZE),
    (QwenImageImg2ImgPipeline, "base", None): prompt_cases(dict(image=IMAGE, **STRENGTH, **SIZE)),
    (QwenImageInpaintPipeline, "base", None): prompt_cases(
        dict(image=IMAGE, mask_image=mask_picture(), **STRENGTH, **SIZE)
    ),
    (QwenImageControlNetPipeline, "base", "single"): {
        **prompt_cases(CONTROL),
        "batch2_control_image_per_prompt_images_per_prompt2_cfg": dict(
            prompt=PROMPTS,
            negative_prompt=NEGATIVES,
            true_cfg_scale=3.0,
            num_images_per_prompt=2,
            control_image=[picture(seed=2), picture(seed=3)],
            **SIZE,
        ),  # fmt: skip
    },
    (QwenImageControlNetPipeline, "base", "multi"): {
        "batch2_two_conditions_images_per_prompt2_cfg": dict(
            prompt=PROMPTS,
            negative_prompt=NEGATIVES,
            true_cfg_scale=3.0,
            num_images_per_prompt=2,
            control_image=[picture(seed=2), picture(seed=3)],
            controlnet_conditioning_scale=[1.0, 0.5],
            **SIZE,
        ),  # fmt: skip
    },
    (QwenImageControlNetInpaintPipeline, "base", "inpaint"): prompt_cases(dict(control_mask=mask_picture(), **CONTROL)),
    (QwenImageEditPipeline, "base", None): embeds_cases(dict(image=WIDE_IMAGE, **SIZE)),
    (QwenImageEditInpaintPipeline, "base", None): embeds_cases(
        dict(image=WIDE_IMAGE, mask_image=mask_picture(96, 48), **STRENGTH)
    ),
    # Edit-Plus takes one prompt at a time: images per prompt, and two input images per sample.
    (QwenImageEditPlusPipeline, "base", None): {
        "two_images_images_per_prompt2_cfg": dict(
            image=[WIDE_IMAGE, IMAGE], **embeds_kwargs(1, cfg=True), num_images_per_prompt=2, **SIZE
        ),
    },
    (QwenImageEditPlusPipeline, "zero_cond_t", None): {
        "two_images_images_per_prompt2": dict(
            image=[WIDE_IMAGE, IMAGE],
            **embeds_kwargs(1, cfg=False),
            true_cfg_scale=1.0,
            num_images_per_prompt=2,
            **SIZE,
        ),  # fmt: skip
        "two_images_cfg": dict(image=[WIDE_IMAGE, IMAGE], **embeds_kwargs(1, cfg=True), **SIZE),
    },
    # Layered passes `additional_t_cond` for the prompts only, so diffusers' own transformer needs either
    # one prompt or one image per prompt (it broadcasts a batch of 1). output_type="latent" fails in it.
    (QwenImageLayeredPipeline, "layered", None): {
        "batch2": dict(prompt=PROMPTS, true_cfg_scale=1.0, image=picture(mode="RGBA"), layers=2, output_type="np"),
        "images_per_prompt2_cfg": dict(
            prompt=PROMPTS[0],
            negative_prompt=NEGATIVES[1],
            true_cfg_scale=3.0,
            num_images_per_prompt=2,
            image=picture(mode="RGBA"),
            layers=2,
            output_type="np",
        ),  # fmt: skip
    },
}


def case_params():
    """One ``pytest.param`` per pipeline and case, named ``Pipeline[-variant]-case``."""
    for (pipeline_class, variant, controlnet_kind), cases in PIPELINE_CASES.items():
        name = "-".join(filter(None, [pipeline_class.__name__, variant.replace("base", ""), controlnet_kind]))
        for case, kwargs in cases.items():
            yield pytest.param(pipeline_class, variant, controlnet_kind, kwargs, id=f"{name}-{case}")


def assert_latents_match(pipeline_class, variant, controlnet_kind, kwargs, *, ours_kwargs=None, candidate="ours"):
    """``candidate``'s latents equal diffusers' transformer's in the same pipeline (``ours_kwargs``: its inputs)."""
    models = transformers(variant)
    expected = generate(build(pipeline_class, models["diffusers"], controlnet_kind), **kwargs)
    actual = generate(build(pipeline_class, models[candidate], controlnet_kind), **(ours_kwargs or kwargs))
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOLERANCE)


# -------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("pipeline_class, variant, controlnet_kind, kwargs", list(case_params()))
def test_pipeline_latents_match_diffusers(pipeline_class, variant, controlnet_kind, kwargs):
    assert_latents_match(pipeline_class, variant, controlnet_kind, kwargs)


@pytest.mark.parametrize(
    "pipeline",
    [(QwenImageControlNetInpaintPipeline, "base", "inpaint"), (QwenImageEditInpaintPipeline, "base", None)],
    ids=["QwenImageControlNetInpaintPipeline", "QwenImageEditInpaintPipeline"],
)
def test_harness_reproduces_diffusers_with_a_second_copy(pipeline):
    # The comparison itself: a second diffusers transformer with the same weights, in the pipelines that draw
    # the most random numbers (VAE posterior samples, noise, strength), gives the same latents.
    kwargs = PIPELINE_CASES[pipeline]["batch2_images_per_prompt2_cfg"]
    assert_latents_match(*pipeline, kwargs, candidate="diffusers_copy")


@pytest.mark.parametrize(
    "pipeline_class, extra",
    [
        pytest.param(QwenImagePipeline, SIZE, id="QwenImagePipeline"),
        pytest.param(QwenImageEditPipeline, dict(image=WIDE_IMAGE, **SIZE), id="QwenImageEditPipeline"),
    ],
)
def test_padded_prompt_embeds_match_unpadded(pipeline_class, extra):
    # RL collation: ours gets every prompt padded to 32 columns with a mask, diffusers the pipeline's own
    # width (the longest prompt; the negatives, all valid, have no mask at all).
    unpadded = dict(**embeds_kwargs(2, cfg=True), num_images_per_prompt=2, **extra)
    padded = dict(unpadded)
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        embeds, mask = unpadded[key], unpadded[f"{key}_mask"]
        extra_columns = 32 - embeds.shape[1]
        noise = torch.randn(2, extra_columns, TEXT_DIM, generator=torch.Generator().manual_seed(3))
        padded[key] = torch.cat([embeds, noise], dim=1)
        padded[f"{key}_mask"] = torch.cat([mask, torch.zeros(2, extra_columns, dtype=mask.dtype)], dim=1)
    assert_latents_match(pipeline_class, "base", None, unpadded, ours_kwargs=padded)


def without_text_encoder(blocks_class):
    """``blocks_class`` minus its text-encoder step, which needs a ``Qwen2VLProcessor``: it takes embeddings then."""

    def blocks():
        blocks = blocks_class()
        blocks.sub_blocks.pop("text_encoder")
        return blocks

    return blocks


def guided_embeds(batch: int) -> dict:
    """:func:`embeds_kwargs` with CFG for the modular pipelines, whose guider holds the scale."""
    kwargs = embeds_kwargs(batch, cfg=True)
    del kwargs["true_cfg_scale"]
    return kwargs


MODULAR_CASES = {
    # case id: (blocks, transformer variant, controlnet kind, CFG guidance scale (1: off), call kwargs)
    "text2image-batch2_images_per_prompt2_cfg": (
        QwenImageAutoBlocks, "base", None, 3.0,
        dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_images_per_prompt=2, **SIZE),
    ),
    "image2image-batch2_images_per_prompt2": (
        QwenImageAutoBlocks, "base", None, 1.0,
        dict(prompt=PROMPTS, image=IMAGE, strength=0.5, num_images_per_prompt=2, **SIZE),
    ),
    "inpaint-batch2_images_per_prompt2": (
        QwenImageAutoBlocks, "base", None, 1.0,
        dict(prompt=PROMPTS, image=IMAGE, mask_image=mask_picture(), strength=0.5, num_images_per_prompt=2, **SIZE),
    ),
    "controlnet-batch2_images_per_prompt2_cfg": (
        QwenImageAutoBlocks, "base", "single", 3.0,
        dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_images_per_prompt=2, control_image=picture(seed=2),
             **SIZE),
    ),
    "edit-batch2_images_per_prompt2_cfg": (
        without_text_encoder(QwenImageEditAutoBlocks), "base", None, 3.0,
        dict(image=WIDE_IMAGE, **guided_embeds(2), num_images_per_prompt=2, **SIZE),
    ),
    "edit_plus-zero_cond_t-two_images_images_per_prompt2_cfg": (
        without_text_encoder(QwenImageEditPlusAutoBlocks), "zero_cond_t", None, 3.0,
        dict(image=[WIDE_IMAGE, IMAGE], **guided_embeds(1), num_images_per_prompt=2, **SIZE),
    ),
    "layered-images_per_prompt2_cfg": (
        QwenImageLayeredAutoBlocks, "layered", None, 3.0,
        dict(prompt=PROMPTS[0], negative_prompt=NEGATIVES[1], image=picture(mode="RGBA"), layers=2,
             num_images_per_prompt=2),
    ),
}  # fmt: skip


def modular_latents(blocks, transformer, controlnet_kind: str | None, guidance_scale: float, **kwargs):
    """A diffusers modular pipeline of ``blocks`` built from the tiny components; its final latents."""
    parts = shared_parts()
    pipeline = blocks().init_pipeline()
    components = dict(
        vae=parts["rgba_vae"] if transformer.config.use_layer3d_rope else parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )
    if controlnet_kind:
        components["controlnet"] = controlnet(controlnet_kind)
    pipeline.update_components(**components)
    torch.manual_seed(0)
    return pipeline(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output="latents", **kwargs)


@pytest.mark.parametrize("case", MODULAR_CASES)
def test_modular_pipeline_latents_match_diffusers(case):
    blocks, variant, controlnet_kind, guidance_scale, kwargs = MODULAR_CASES[case]
    models = transformers(variant)
    expected = modular_latents(blocks, models["diffusers"], controlnet_kind, guidance_scale, **kwargs)
    actual = modular_latents(blocks, models["ours"], controlnet_kind, guidance_scale, **kwargs)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def test_layered_pipeline_prompt_batch_with_images_per_prompt_is_a_named_error():
    # QwenImageLayeredPipeline passes `additional_t_cond` for the 2 prompts but latents for 2 x 2 images:
    # diffusers' transformer fails to broadcast (a RuntimeError); ours names the argument.
    kwargs = dict(prompt=PROMPTS, num_images_per_prompt=2, true_cfg_scale=1.0, image=picture(mode="RGBA"), layers=2)
    with pytest.raises(ValueError, match="additional_t_cond"):
        generate(build(QwenImageLayeredPipeline, transformers("layered")["ours"]), output_type="np", **kwargs)
