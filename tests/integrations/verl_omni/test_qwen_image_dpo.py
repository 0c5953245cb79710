"""Our Qwen-Image DPO adapter against verl-omni main's own ``QwenImageDPO``: same weights, same inputs, fp32.

Runs in ``.venv-verl-omni`` with the verl-omni source on ``PYTHONPATH`` (``make test-verl-omni``).
verl-omni's adapter runs diffusers' transformer, ours our transformer with the same weights.

Where the two differ on purpose, the tests pin verl-omni's behaviour down:

- ``set_timesteps``: verl-omni calls ``scheduler.set_timesteps(N)`` without the dynamic shift, which
  diffusers refuses for Qwen-Image's ``use_dynamic_shifting`` scheduler; ours sets diffusers'
  ``QwenImagePipeline`` schedule (tested against diffusers in ``tests/pipelines/test_qwen_image_dpo.py``).
- ``forward`` with ``true_cfg_scale > 1``: verl-omni's adapter applies true CFG only in
  ``forward_and_sample_previous_step``; its ``forward`` (what its DPO engine calls) is the base
  class's un-guided ``module(**model_inputs)[0]``. Ours applies true CFG in both, and equals
  verl-omni's ``forward_and_sample_previous_step``.
"""

from __future__ import annotations

import importlib
import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from qwen_image_omni.pipelines.config import DiffusionModelConfig
from qwen_image_omni.pipelines.qwen_image_dpo import QwenImageDPO, diffusion_dpo_loss
from qwen_image_omni.pipelines.qwen_image_flow_grpo import QWEN_IMAGE_SCHEDULER_CONFIG

from tests.support.rl_tiny import HEIGHT, IMAGE_TOKENS, NEGATIVE_LENGTHS, PROMPT_LENGTHS, STEPS, WIDTH, collate, prompt_rows
from tests.support.tiny import TINY_CONFIG, make_pair

pytestmark = pytest.mark.verl_omni

TOL = 1e-6
VERL_OMNI_ADAPTER = "verl_omni.pipelines.qwen_image_dpo.diffusers_training_adapter"


@pytest.fixture(scope="module")
def verl_omni_dpo():
    """verl-omni main's ``QwenImageDPO`` class."""
    return importlib.import_module(VERL_OMNI_ADAPTER).QwenImageDPO


def verl_omni_config(local_path=None, true_cfg_scale: float = 1.0, guidance_scale: float = 1.0):
    """verl-omni's own ``DiffusionModelConfig`` with the fields its adapter reads (built as its CPU test does)."""
    importlib.import_module(VERL_OMNI_ADAPTER)
    from verl_omni.workers.config.diffusion.model import DiffusionModelConfig as VerlOmniModelConfig
    from verl_omni.workers.config.diffusion.rollout import DiffusionPipelineConfig as VerlOmniPipelineConfig

    config = object.__new__(VerlOmniModelConfig)
    fields = {
        "architecture": "QwenImagePipeline",
        "algorithm": "dpo",
        "external_lib": None,
        "local_path": local_path,
        "pipeline": VerlOmniPipelineConfig(
            height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, true_cfg_scale=true_cfg_scale,
            guidance_scale=guidance_scale,
        ),
    }  # fmt: skip
    for name, value in fields.items():
        object.__setattr__(config, name, value)
    return config


def our_config(local_path=None, true_cfg_scale: float = 1.0, guidance_scale: float | None = None):
    """Our config with the same values."""
    return DiffusionModelConfig(
        architecture="QwenImagePipeline",
        algorithm="dpo",
        local_path=local_path,
        pipeline={"height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS,
                  "true_cfg_scale": true_cfg_scale, "guidance_scale": guidance_scale},
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A folder with Qwen-Image's ``scheduler/`` (verl-omni's ``build_scheduler`` always loads one)."""
    path = tmp_path_factory.mktemp("qwen-image-dpo")
    FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    return str(path)


@pytest.fixture(scope="module")
def models():
    return make_pair(seed=0)


@pytest.fixture(scope="module")
def batch():
    """A noised (chosen, rejected) pair and CFG prompts right-padded well past their valid tokens."""
    generator = torch.Generator().manual_seed(3)
    clean = torch.randn(2, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=generator)
    noise = torch.randn(1, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=generator).repeat(2, 1, 1)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    timesteps = scheduler.timesteps[torch.tensor([612, 612])]
    return {
        "latents": scheduler.scale_noise(clean, timesteps, noise),
        "clean": clean,
        "noise": noise,
        "timesteps": timesteps,
        "rows": (prompt_rows(PROMPT_LENGTHS, seed=1), prompt_rows(NEGATIVE_LENGTHS, seed=2)),
    }


def _prepare(adapter, module, config, batch, layout, width=64):
    prompt, negative = collate(batch["rows"][0], width, layout), collate(batch["rows"][1], width, layout)
    return adapter.prepare_model_inputs(
        module=module, model_config=config, latents=batch["latents"], timesteps=batch["timesteps"],
        prompt_embeds=prompt.embeds, prompt_embeds_mask=prompt.mask, negative_prompt_embeds=negative.embeds,
        negative_prompt_embeds_mask=negative.mask, micro_batch={}, step=0,
    )  # fmt: skip


def _assert_same_inputs(ours, theirs):
    assert (ours is None) == (theirs is None)
    if ours is None:
        return
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key


def _scheduler_config(scheduler) -> dict:
    """The scheduler's config without the bookkeeping keys (``_class_name``, ``_diffusers_version``) a load adds."""
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}


def test_build_scheduler_is_verl_omni_scheduler(verl_omni_dpo, checkpoint_dir):
    theirs = verl_omni_dpo.build_scheduler(verl_omni_config(checkpoint_dir))
    ours = QwenImageDPO.build_scheduler(our_config(checkpoint_dir))
    assert type(ours) is type(theirs) is FlowMatchEulerDiscreteScheduler
    assert _scheduler_config(ours) == _scheduler_config(theirs)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    # Without a scheduler folder ours falls back to Qwen-Image's config: the same scheduler.
    default = QwenImageDPO.build_scheduler(our_config())
    assert _scheduler_config(default) == _scheduler_config(theirs) and torch.equal(default.timesteps, theirs.timesteps)


def test_verl_omni_set_timesteps_cannot_shift_qwen_image_schedule(verl_omni_dpo, checkpoint_dir):
    """verl-omni's set_timesteps gives no ``mu``: diffusers refuses the dynamic-shifting scheduler; ours sets it."""
    scheduler = verl_omni_dpo.build_scheduler(verl_omni_config(checkpoint_dir))
    with pytest.raises(ValueError, match="mu"):
        verl_omni_dpo.set_timesteps(scheduler, verl_omni_config(checkpoint_dir), "cpu")
    QwenImageDPO.set_timesteps(scheduler, our_config(checkpoint_dir), "cpu")
    assert len(scheduler.timesteps) == STEPS


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("layout", ["right", "left"])
def test_prepare_model_inputs_match(verl_omni_dpo, models, batch, true_cfg_scale, layout):
    ours, reference = models
    mine = _prepare(QwenImageDPO, ours, our_config(true_cfg_scale=true_cfg_scale), batch, layout)
    theirs = _prepare(verl_omni_dpo, reference, verl_omni_config(true_cfg_scale=true_cfg_scale), batch, layout)
    for our_inputs, their_inputs in zip(mine, theirs):
        _assert_same_inputs(our_inputs, their_inputs)
    assert (mine[1] is None) == (true_cfg_scale <= 1)


def test_guidance_embeds_inputs_match(verl_omni_dpo, batch):
    ours, reference = make_pair(seed=0, guidance_embeds=True)
    mine = _prepare(QwenImageDPO, ours, our_config(guidance_scale=3.5), batch, "right")
    theirs = _prepare(verl_omni_dpo, reference, verl_omni_config(guidance_scale=3.5), batch, "right")
    _assert_same_inputs(mine[0], theirs[0])


def test_error_cases_match(verl_omni_dpo, models, batch):
    """Both refuse a missing mask, and true CFG without negative inputs."""
    ours, reference = models
    prompt = collate(batch["rows"][0])
    for adapter, module, config in (
        (QwenImageDPO, ours, our_config(true_cfg_scale=4.0)),
        (verl_omni_dpo, reference, verl_omni_config(true_cfg_scale=4.0)),
    ):
        common = {"module": module, "model_config": config, "latents": batch["latents"],
                  "timesteps": batch["timesteps"], "prompt_embeds": prompt.embeds, "negative_prompt_embeds": None,
                  "negative_prompt_embeds_mask": None, "micro_batch": {}, "step": 0}  # fmt: skip
        with pytest.raises(ValueError, match="prompt_embeds_mask"):
            adapter.prepare_model_inputs(prompt_embeds_mask=None, **common)
        with pytest.raises(ValueError, match="(?i)negative"):
            adapter.prepare_model_inputs(prompt_embeds_mask=prompt.mask, **common)


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("layout", ["right", "left"])
def test_prediction_matches_verl_omni(verl_omni_dpo, models, batch, true_cfg_scale, layout):
    ours, reference = models
    our_cfg, their_cfg = our_config(true_cfg_scale=true_cfg_scale), verl_omni_config(true_cfg_scale=true_cfg_scale)
    mine = _prepare(QwenImageDPO, ours, our_cfg, batch, layout)
    theirs = _prepare(verl_omni_dpo, reference, their_cfg, batch, layout)
    with torch.no_grad():
        our_prediction = QwenImageDPO.forward(ours, our_cfg, *mine)
        our_sampled = QwenImageDPO.forward_and_sample_previous_step(ours, None, our_cfg, *mine, None, 0)
        their_sampled = verl_omni_dpo.forward_and_sample_previous_step(reference, None, their_cfg, *theirs, None, 0)
        their_forward = verl_omni_dpo.forward(reference, their_cfg, *theirs)
    assert torch.equal(our_sampled, our_prediction)
    torch.testing.assert_close(our_prediction, their_sampled, rtol=0, atol=TOL)
    if true_cfg_scale <= 1:
        torch.testing.assert_close(our_prediction, their_forward, rtol=0, atol=TOL)
    else:
        # verl-omni's forward (what its DPO engine calls) drops the negative inputs: the un-guided prediction.
        with torch.no_grad():
            unguided = QwenImageDPO.forward(ours, our_config(true_cfg_scale=1.0), mine[0], None)
        torch.testing.assert_close(their_forward, unguided, rtol=0, atol=TOL)
        assert (their_forward - our_prediction).abs().max() > 1e-3


def test_dpo_loss_matches_verl_omni(verl_omni_dpo, models, batch):
    """Our loss on our predictions equals verl-omni's ``DPOLoss.compute_loss`` on theirs."""
    try:
        algos = importlib.import_module("verl_omni.trainer.diffusion.diffusion_algos")
        actor = importlib.import_module("verl_omni.workers.config")
    except ImportError as error:
        pytest.skip(f"verl-omni's trainer cannot be imported in this venv: {error}")
    ours, reference = models
    ref_ours, ref_reference = make_pair(seed=5)
    our_cfg, their_cfg = our_config(), verl_omni_config()
    mine = _prepare(QwenImageDPO, ours, our_cfg, batch, "right")
    theirs = _prepare(verl_omni_dpo, reference, their_cfg, batch, "right")
    with torch.no_grad():
        prediction, ref_prediction = (QwenImageDPO.forward(m, our_cfg, *mine) for m in (ours, ref_ours))
        their_prediction, their_ref = (verl_omni_dpo.forward(m, their_cfg, *theirs) for m in (reference, ref_reference))
    loss, _ = diffusion_dpo_loss(prediction, ref_prediction, batch["noise"] - batch["clean"], beta=2500.0)
    actor_config = object.__new__(actor.DiffusionActorConfig)
    object.__setattr__(actor_config, "diffusion_loss", types.SimpleNamespace(dpo_beta=2500.0))
    their_loss, _ = algos.DPOLoss.compute_loss(
        noise=batch["noise"], latent=batch["clean"], model_noise_pred=their_prediction, ref_noise_pred=their_ref,
        sample_level_rewards=torch.tensor([1.0, 0.0]), config=actor_config,
    )  # fmt: skip
    torch.testing.assert_close(loss, their_loss, rtol=0, atol=TOL)
