"""Our Qwen-Image-Edit-Plus FlowGRPO adapter against verl-omni main's own ``QwenImageEditPlusFlowGRPO``.

Runs in ``.venv-verl-omni`` with the verl-omni source on ``PYTHONPATH`` (``make test-verl-omni``).
verl-omni's side goes through its own dispatchers (``verl_omni.pipelines.utils.prepare_model_inputs``
and ``forward_and_sample_previous_step``) with diffusers' transformer; ours through ours with our
transformer and the same weights. Both read one TensorDict micro-batch, built as verl-omni's trainer
builds it (condition latents as a tensor, ``img_shapes`` as a ``NonTensorStack``, the image
metadata and ``sp_size`` as ``NonTensorData``). fp32 throughout.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from qwen_image_omni.pipelines import DiffusionModelConfig, utils
from qwen_image_omni.pipelines.qwen_image_edit_flow_grpo import (
    QwenImageEditPlusFlowGRPO,
    QwenImageEditPlusPipelineWithLogProb,
)
from qwen_image_omni.pipelines.qwen_image_flow_grpo import QWEN_IMAGE_SCHEDULER_CONFIG
from qwen_image_omni.pipelines.schedulers import FlowMatchSDEDiscreteScheduler

from tests.support.verl_omni_support import verl_omni_own_adapters
from tests.support.rl_tiny import HEIGHT, IMAGE_TOKENS, NEGATIVE_LENGTHS, PROMPT_LENGTHS, STEPS, WIDTH, collate, prompt_rows
from tests.support.tiny import TINY_CONFIG, make_pair

pytestmark = pytest.mark.verl_omni

ARCH = "QwenImageEditPlusPipeline"
TOL = 1e-6
ROLLOUT_TOL = 1e-5
CHANNELS = TINY_CONFIG["in_channels"]
BATCH = len(PROMPT_LENGTHS)
IMG_SHAPES = [(1, HEIGHT // 16, WIDTH // 16), (1, 2, 3), (1, 3, 2)]
CONDITION_TOKENS = 12
VERL_OMNI_ADAPTER = "verl_omni.pipelines.qwen_image_edit_flow_grpo.diffusers_training_adapter"


@pytest.fixture(scope="module")
def verl_omni():
    """verl-omni main's adapter class, its dispatchers (running its own adapters) and its SDE scheduler class."""
    tensordict = pytest.importorskip("tensordict")
    adapter = importlib.import_module(VERL_OMNI_ADAPTER).QwenImageEditPlusFlowGRPO
    dispatch = importlib.import_module("verl_omni.pipelines.utils")
    schedulers = importlib.import_module("verl_omni.pipelines.schedulers")
    # verl-omni's dispatchers must run verl-omni's adapter, even after another test imported our bridge.
    with verl_omni_own_adapters():
        yield SimpleNamespace(
            adapter=adapter, utils=dispatch, scheduler_cls=schedulers.FlowMatchSDEDiscreteScheduler, tensordict=tensordict
        )


@pytest.fixture(scope="module")
def models():
    """(ours, diffusers' reference) with the same tiny random weights."""
    return make_pair(seed=0)


@pytest.fixture(scope="module")
def rows():
    return prompt_rows(PROMPT_LENGTHS, seed=1), prompt_rows(NEGATIVE_LENGTHS, seed=2)


def _verl_omni_config(sde_type: str, true_cfg_scale: float, noise_level: float = 0.7) -> SimpleNamespace:
    """A stand-in for verl-omni's ``DiffusionModelConfig``: the fields its registry and adapter read."""
    return SimpleNamespace(
        architecture=ARCH,
        algorithm="flow_grpo",
        external_lib=None,
        pipeline=SimpleNamespace(
            height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, true_cfg_scale=true_cfg_scale, guidance_scale=1.0
        ),
        algo=SimpleNamespace(noise_level=noise_level, sde_type=sde_type),
    )


def _our_config(sde_type: str, true_cfg_scale: float, noise_level: float = 0.7) -> DiffusionModelConfig:
    return DiffusionModelConfig(
        architecture=ARCH,
        algorithm="flow_grpo",
        pipeline={"height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS, "true_cfg_scale": true_cfg_scale},
        algo={"noise_level": noise_level, "sde_type": sde_type},
    )


def _micro_batch(verl_omni, condition: torch.Tensor, img_shapes: list):
    """The trainer's TensorDict micro-batch."""
    from tensordict.tensorclass import NonTensorData, NonTensorStack

    return verl_omni.tensordict.TensorDict(
        {
            "condition_image_latents": condition,
            "img_shapes": NonTensorStack.from_list([NonTensorData(shapes) for shapes in img_shapes]),
            "height": NonTensorData(HEIGHT),
            "width": NonTensorData(WIDTH),
            "vae_scale_factor": NonTensorData(8),
            "sp_size": NonTensorData(1),
        },
        batch_size=[condition.shape[0]],
    )


def _score(dispatch, module, scheduler, config, trajectory, prompt, negative, micro_batch, step):
    """One transition scored through a side's own dispatchers: ``(log_prob, mean, std, sqrt_dt)``."""
    all_latents, all_timesteps = trajectory
    model_inputs, negative_inputs = dispatch.prepare_model_inputs(
        module=module,
        model_config=config,
        latents=all_latents,
        timesteps=all_timesteps,
        prompt_embeds=prompt.embeds,
        prompt_embeds_mask=prompt.mask,
        negative_prompt_embeds=None if negative is None else negative.embeds,
        negative_prompt_embeds_mask=None if negative is None else negative.mask,
        micro_batch=micro_batch,
        step=step,
    )
    with torch.no_grad():
        return dispatch.forward_and_sample_previous_step(
            module=module,
            scheduler=scheduler,
            model_config=config,
            model_inputs=model_inputs,
            negative_model_inputs=negative_inputs,
            scheduler_inputs={"all_latents": all_latents, "all_timesteps": all_timesteps},
            step=step,
        )


def _schedulers(verl_omni, sde_type, cfg):
    theirs_config = _verl_omni_config(sde_type, cfg)
    theirs = verl_omni.scheduler_cls.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    verl_omni.adapter.set_timesteps(theirs, theirs_config, "cpu")
    ours_config = _our_config(sde_type, cfg)
    ours = QwenImageEditPlusFlowGRPO.build_scheduler(ours_config)
    torch.testing.assert_close(ours.timesteps.cpu(), theirs.timesteps.cpu(), atol=0, rtol=0)
    return (theirs, theirs_config), (ours, ours_config)


def test_registries_select_the_edit_adapters(verl_omni):
    assert verl_omni.utils.DiffusionModelBase.get_class(_verl_omni_config("sde", 1.0)) is verl_omni.adapter
    assert utils.DiffusionModelBase.get_class(_our_config("sde", 1.0)) is QwenImageEditPlusFlowGRPO


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("sde_type", ["sde", "cps", "dance_sde"])
def test_adapter_equals_verl_omni(verl_omni, models, rows, sde_type, cfg):
    ours_model, reference = models
    (their_scheduler, their_config), (our_scheduler, our_config) = _schedulers(verl_omni, sde_type, cfg)
    generator = torch.Generator().manual_seed(4)
    all_latents = torch.randn(BATCH, 3, IMAGE_TOKENS, CHANNELS, generator=generator)
    all_timesteps = our_scheduler.timesteps[:2].float().expand(BATCH, 2).clone()
    condition = torch.randn(BATCH, CONDITION_TOKENS, CHANNELS, generator=generator)
    micro_batch = _micro_batch(verl_omni, condition, [IMG_SHAPES] * BATCH)
    prompt = collate(rows[0], 64)
    negative = collate(rows[1], 64) if cfg > 1 else None
    for step in range(2):
        theirs = _score(
            verl_omni.utils, reference, their_scheduler, their_config, (all_latents, all_timesteps),
            prompt, negative, micro_batch, step,
        )  # fmt: skip
        ours = _score(
            utils, ours_model, our_scheduler, our_config, (all_latents, all_timesteps),
            prompt, negative, micro_batch, step,
        )  # fmt: skip
        for name, mine, other in zip(("log_prob", "prev_sample_mean", "std_dev_t", "sqrt_dt"), ours, theirs):
            mine, other = torch.as_tensor(mine).float(), torch.as_tensor(other).float()
            assert mine.shape == other.shape, name
            assert (mine - other).abs().max() <= TOL, f"{name} step {step}: max |Δ| {(mine - other).abs().max()}"


def test_model_inputs_equal_verl_omni(verl_omni, models, rows):
    ours_model, reference = models
    all_latents = torch.randn(BATCH, 2, IMAGE_TOKENS, CHANNELS, generator=torch.Generator().manual_seed(6))
    all_timesteps = torch.full((BATCH, 1), 1000.0)
    condition = torch.randn(BATCH, CONDITION_TOKENS, CHANNELS, generator=torch.Generator().manual_seed(7))
    micro_batch = _micro_batch(verl_omni, condition, [IMG_SHAPES] * BATCH)
    prompt, negative = collate(rows[0], 64), collate(rows[1], 16)
    arguments = dict(
        latents=all_latents, timesteps=all_timesteps, prompt_embeds=prompt.embeds, prompt_embeds_mask=prompt.mask,
        negative_prompt_embeds=negative.embeds, negative_prompt_embeds_mask=negative.mask,
        micro_batch=micro_batch, step=0,
    )  # fmt: skip
    theirs = verl_omni.utils.prepare_model_inputs(
        module=reference, model_config=_verl_omni_config("sde", 4.0), **arguments
    )
    ours = utils.prepare_model_inputs(module=ours_model, model_config=_our_config("sde", 4.0), **arguments)
    for mine, other in zip(ours, theirs):
        assert set(mine) == set(other)
        for key in ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_mask"):
            assert torch.equal(mine[key], other[key]), key
        assert mine["_target_seq_len"] == other["_target_seq_len"] == IMAGE_TOKENS
        assert [[tuple(shape) for shape in sample] for sample in other["img_shapes"]] == mine["img_shapes"]


def test_both_reject_the_image_latents_key(verl_omni):
    micro_batch = verl_omni.tensordict.TensorDict({"image_latents": torch.zeros(1, 4, CHANNELS)}, batch_size=[1])
    for adapter in (verl_omni.adapter, QwenImageEditPlusFlowGRPO):
        with pytest.raises(ValueError, match="wrong key"):
            adapter.prepare_condition(micro_batch, torch.zeros(1, 1, 4, CHANNELS), 0)


def test_verl_omni_trainer_scores_our_edit_rollout(verl_omni, models, rows):
    """Rollout on our pipeline (prompts padded to 64), verl-omni's trainer re-scores it on unpadded prompts."""
    ours_model, reference = models
    pipe = QwenImageEditPlusPipelineWithLogProb(
        transformer=ours_model, scheduler=FlowMatchSDEDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    )
    prompt, negative = collate(rows[0], 64), collate(rows[1], 64)
    condition = torch.randn(BATCH, CONDITION_TOKENS, CHANNELS, generator=torch.Generator().manual_seed(8))
    out = pipe(
        prompt_embeds=prompt.embeds,
        prompt_embeds_mask=prompt.mask,
        negative_prompt_embeds=negative.embeds,
        negative_prompt_embeds_mask=negative.mask,
        condition_image_latents=condition,
        img_shapes=IMG_SHAPES,
        true_cfg_scale=4.0,
        num_inference_steps=STEPS,
        noise_level=0.7,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    )
    (their_scheduler, their_config), _ = _schedulers(verl_omni, "sde", 4.0)
    micro_batch = _micro_batch(verl_omni, out.rl["condition_image_latents"], out.rl["img_shapes"])
    trainer_prompt, trainer_negative = collate(rows[0]), collate(rows[1])
    for step in range(out.all_timesteps.shape[1]):
        log_prob, _, _, _ = _score(
            verl_omni.utils, reference, their_scheduler, their_config, (out.all_latents, out.all_timesteps),
            trainer_prompt, trainer_negative, micro_batch, step,
        )  # fmt: skip
        delta = (log_prob - out.all_log_probs[:, step]).abs().max()
        assert delta <= ROLLOUT_TOL, f"step {step}: max |Δ log-prob| {delta}"
