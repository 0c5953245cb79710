"""Our Qwen-Image DiffusionNFT against verl-omni main's own: adapter, engine inputs and loss, fp32.

Runs in ``.venv-verl-omni`` with the verl-omni source on ``PYTHONPATH`` (``make test-verl-omni``).
verl-omni's ``QwenImageDiffusionNFT`` runs diffusers' transformer, ours our transformer with the same
weights; both read one real ``tensordict.TensorDict`` micro-batch with the image geometry as
non-tensor data (verl's ``tensordict_utils``). verl-omni's ``DiffusionNFTLoss`` and its trainer-side
helpers are compared with :mod:`qwen_image_omni.pipelines.losses.diffusion_nft` on the same tensors.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qwen_image_omni.pipelines.config import DiffusionModelConfig
from qwen_image_omni.pipelines.qwen_image_diffusion_nft import (
    ADV_MODES,
    QwenImageDiffusionNFT,
    advantage_to_reward_prob,
    diffusion_nft_loss,
    forward_process_sample,
    group_advantages,
    select_train_timesteps,
)

from tests.support.rl_tiny import HEIGHT, IMAGE_TOKENS, NEGATIVE_LENGTHS, PROMPT_LENGTHS, STEPS, WIDTH, collate, prompt_rows
from tests.support.tiny import TINY_CONFIG, make_pair
from tests.support.verl_omni_support import verl_omni_own_adapters

pytestmark = pytest.mark.verl_omni

TOL = 1e-6
VERL_OMNI_ADAPTER = "verl_omni.pipelines.qwen_image_diffusion_nft.diffusers_training_adapter"
VERL_OMNI_ALGOS = "verl_omni.trainer.diffusion.diffusion_algos"


@pytest.fixture(scope="module")
def verl_omni_nft():
    """verl-omni main's ``QwenImageDiffusionNFT`` class."""
    return importlib.import_module(VERL_OMNI_ADAPTER).QwenImageDiffusionNFT


@pytest.fixture(scope="module")
def verl_omni_loss():
    """verl-omni main's ``DiffusionNFTLoss`` class."""
    return importlib.import_module(VERL_OMNI_ALGOS).DiffusionNFTLoss


@pytest.fixture(scope="module")
def models():
    """(ours, diffusers' reference) with one set of random weights."""
    return make_pair(seed=0)


@pytest.fixture(scope="module")
def rows():
    return prompt_rows(PROMPT_LENGTHS, seed=1), prompt_rows(NEGATIVE_LENGTHS, seed=2)


def verl_omni_config(true_cfg_scale: float = 1.0) -> SimpleNamespace:
    """A stand-in for verl-omni's ``DiffusionModelConfig`` with the fields its NFT adapter and dispatcher read."""
    return SimpleNamespace(
        architecture="QwenImagePipeline",
        algorithm="diffusion_nft",
        external_lib=None,
        pipeline=SimpleNamespace(
            height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, true_cfg_scale=true_cfg_scale, guidance_scale=1.0
        ),
    )


def our_config(true_cfg_scale: float = 1.0) -> DiffusionModelConfig:
    """Our config with the same values."""
    return DiffusionModelConfig(
        architecture="QwenImagePipeline",
        algorithm="diffusion_nft",
        pipeline={"height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS, "true_cfg_scale": true_cfg_scale},
    )


def micro_batch(tensors: dict[str, torch.Tensor] | None = None, batch: int = 2):
    """A real TensorDict micro-batch; the image geometry is non-tensor data, as verl-omni's trainer stores it."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    data = TensorDict(tensors or {}, batch_size=[batch])
    tu.assign_non_tensor(data, height=HEIGHT, width=WIDTH, vae_scale_factor=8)
    return data


def _noised(seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(2, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=generator)
    return x_t, torch.tensor([743.1313, 250.0])


def _prediction(adapter, module, config, x_t, timesteps, prompt, negative, batch, step=0):
    inputs, negative_inputs = adapter.prepare_model_inputs(
        module, config, x_t, timesteps, prompt.embeds, prompt.mask,
        None if negative is None else negative.embeds, None if negative is None else negative.mask, batch, step,
    )  # fmt: skip
    with torch.no_grad():
        return adapter.forward(module, config, inputs, negative_inputs), inputs, negative_inputs


# -- adapter ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("timestep_dtype", [torch.float32, torch.long], ids=["float_t", "long_t"])
@pytest.mark.parametrize(
    ("cfg_scale", "with_negative"), [(4.0, True), (1.0, True), (4.0, False)], ids=["cfg", "scale1", "no_negative"]
)
def test_adapter_equals_verl_omni(verl_omni_nft, models, rows, cfg_scale, with_negative, timestep_dtype):
    ours, reference = models
    prompt, negative = collate(rows[0]), collate(rows[1]) if with_negative else None
    x_t, timesteps = _noised()
    timesteps = timesteps.to(timestep_dtype)
    batch = micro_batch()
    theirs, their_inputs, their_negative = _prediction(
        verl_omni_nft, reference, verl_omni_config(cfg_scale), x_t, timesteps, prompt, negative, batch, step=2
    )
    mine, my_inputs, my_negative = _prediction(
        QwenImageDiffusionNFT, ours, our_config(cfg_scale), x_t, timesteps, prompt, negative, batch, step=2
    )
    assert (mine - theirs).abs().max() <= TOL
    # The inputs are the same too (verl-omni passes no text length either).
    assert my_inputs.keys() == their_inputs.keys()
    for key, value in their_inputs.items():
        assert torch.equal(my_inputs[key], value) if isinstance(value, torch.Tensor) else my_inputs[key] == value
    assert (my_negative is None) == (their_negative is None)
    # One module through both adapters: the adapters' own logic is identical, bit for bit.
    same, _, _ = _prediction(
        verl_omni_nft, ours, verl_omni_config(cfg_scale), x_t, timesteps, prompt, negative, batch, step=2
    )
    assert torch.equal(mine, same)


def test_our_wide_prompts_equal_verl_omni_on_tight_ones(verl_omni_nft, models, rows):
    """Ours on right-padded width 512 / 96 (no length anywhere) = verl-omni's on the tight collation."""
    ours, reference = models
    x_t, timesteps = _noised()
    batch = micro_batch()
    theirs, _, _ = _prediction(
        verl_omni_nft, reference, verl_omni_config(4.0), x_t, timesteps, collate(rows[0]), collate(rows[1]), batch
    )
    mine, _, _ = _prediction(
        QwenImageDiffusionNFT, ours, our_config(4.0), x_t, timesteps, collate(rows[0], 512), collate(rows[1], 96), batch
    )
    assert (mine - theirs).abs().max() <= 1e-5


def test_engine_inputs_equal_verl_omni_nft_engine(models, rows):
    """verl-omni's NFT engine's ``prepare_model_inputs`` (x0 -> x_t, t) = forward_process_sample + our adapter."""
    try:
        engine_module = importlib.import_module("verl_omni.workers.engine.fsdp.diffusers_impl")
    except ImportError as error:  # the FSDP engine module may need pieces a CPU install lacks
        pytest.skip(f"verl-omni's FSDP engine module does not import here: {error}")
    ours, reference = models
    generator = torch.Generator().manual_seed(9)
    x0 = torch.randn(2, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=generator)
    noise = torch.randn(2, 3, IMAGE_TOKENS, TINY_CONFIG["in_channels"], generator=generator)
    prompt, negative = collate(rows[0]), collate(rows[1])
    train_timesteps = select_train_timesteps(torch.tensor([[1000.0, 743.13, 400.5, 100.9]] * 2), 0.75, seed=3)
    batch = micro_batch(
        {
            "latents_clean": x0,
            "train_timesteps": train_timesteps,
            "forward_noise": noise,
            "prompt_embeds": prompt.embeds,
            "prompt_embeds_mask": prompt.mask,
            "negative_prompt_embeds": negative.embeds,
            "negative_prompt_embeds_mask": negative.mask,
        }
    )
    engine = SimpleNamespace(use_ulysses_sp=False, module=reference, model_config=verl_omni_config(4.0))
    for step in range(train_timesteps.shape[1]):
        with verl_omni_own_adapters():
            their_inputs, their_negative, their_x0, their_xt, their_t = (
                engine_module.NFTDiffusersFSDPEngine.prepare_model_inputs(engine, batch, step)
            )
        xt, t = forward_process_sample(x0, train_timesteps[:, step], noise[:, step])
        assert torch.equal(xt, their_xt) and torch.equal(t, their_t) and torch.equal(x0, their_x0)
        inputs, negative_inputs = QwenImageDiffusionNFT.prepare_model_inputs(
            ours, our_config(4.0), xt, train_timesteps[:, step], prompt.embeds, prompt.mask, negative.embeds,
            negative.mask, batch, step,
        )  # fmt: skip
        with torch.no_grad():
            mine = QwenImageDiffusionNFT.forward(ours, our_config(4.0), inputs, negative_inputs)
            theirs = importlib.import_module(VERL_OMNI_ADAPTER).QwenImageDiffusionNFT.forward(
                reference, verl_omni_config(4.0), their_inputs, their_negative
            )
        assert (mine - theirs).abs().max() <= TOL


# -- loss -------------------------------------------------------------------------------------------------------


def _loss_inputs(seed: int, batch: int = 3, reward_shape: tuple[int, ...] = (3,)):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    x0 = randn(batch, IMAGE_TOKENS, 16)
    t = torch.rand(batch, generator=generator).view(-1, 1, 1)
    xt = (1 - t) * x0 + t * randn(batch, IMAGE_TOKENS, 16)
    old = randn(batch, IMAGE_TOKENS, 16)
    return {
        "forward_prediction": old + 0.1 * randn(batch, IMAGE_TOKENS, 16),
        "old_prediction": old,
        "ref_forward_prediction": old + 0.2 * randn(batch, IMAGE_TOKENS, 16),
        "x0": x0,
        "xt": xt,
        "t_expanded": t,
        "reward_prob": torch.rand(*reward_shape, generator=generator),
    }


LOSS_SETTINGS = [
    {"mix_beta": 0.5, "adv_clip_max": 5.0, "ref_kl_coef": 0.0, "adaptive_weight_min": 1e-5},
    {"mix_beta": 1.0, "adv_clip_max": 2.0, "ref_kl_coef": 0.3, "adaptive_weight_min": 1e-5},
    {"mix_beta": 0.1, "adv_clip_max": 1.0, "ref_kl_coef": 1.0, "adaptive_weight_min": 2.0},  # weights clipped
]


@pytest.mark.parametrize("reward_shape", [(3,), (3, 2)], ids=["per_sample", "per_sample_and_step"])
@pytest.mark.parametrize("settings", LOSS_SETTINGS, ids=["default", "beta1_kl", "clipped_weights"])
def test_loss_equals_verl_omni(verl_omni_loss, settings, reward_shape):
    from tensordict import TensorDict

    inputs = _loss_inputs(seed=len(reward_shape) + int(10 * settings["mix_beta"]), reward_shape=reward_shape)
    theirs_prediction = inputs["forward_prediction"].clone().requires_grad_()
    mine_prediction = inputs["forward_prediction"].clone().requires_grad_()
    config = SimpleNamespace(diffusion_loss=SimpleNamespace(**settings))
    their_loss, their_metrics = verl_omni_loss.compute_loss(
        **{**inputs, "forward_prediction": theirs_prediction}, config=config
    )
    my_loss, my_metrics = diffusion_nft_loss(**{**inputs, "forward_prediction": mine_prediction}, **settings)
    assert abs(my_loss.item() - their_loss.item()) <= TOL * max(1.0, abs(their_loss.item()))
    assert my_metrics.keys() == their_metrics.keys()
    for key, value in their_metrics.items():
        assert my_metrics[key] == pytest.approx(value, rel=TOL, abs=TOL), key
    their_loss.backward()
    my_loss.backward()
    assert (mine_prediction.grad - theirs_prediction.grad).abs().max() <= TOL

    # verl-omni's batch entry point (model_output + a TensorDict with reward_prob) gives the same loss.
    model_output = {key: value for key, value in inputs.items() if key != "reward_prob"}
    data = TensorDict({"reward_prob": inputs["reward_prob"]}, batch_size=[3])
    result = verl_omni_loss()(config=config, model_output=model_output, data=data)
    assert abs(result.loss.item() - my_loss.item()) <= TOL * max(1.0, abs(my_loss.item()))


@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_equal_verl_omni(verl_omni_loss, norm_by_std, global_std):
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8])
    uid = np.array(["p0", "p0", "p0", "p1", "p1", "p2", "p3"], dtype=object)
    theirs = verl_omni_loss._compute_group_advantages(rewards, uid, norm_by_std=norm_by_std, global_std=global_std)
    mine = group_advantages(rewards, uid, norm_by_std=norm_by_std, global_std=global_std)
    assert (mine - theirs).abs().max() <= TOL


@pytest.mark.parametrize("adv_mode", ADV_MODES)
def test_reward_prob_equals_verl_omni(verl_omni_loss, adv_mode):
    advantages = torch.linspace(-8, 8, 17)
    theirs = verl_omni_loss._advantage_to_reward_prob(advantages, adv_clip_max=5.0, adv_mode=adv_mode)
    assert torch.equal(advantage_to_reward_prob(advantages, 5.0, adv_mode), theirs)


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.3, 0.01])
def test_train_timesteps_equal_verl_omni(verl_omni_loss, fraction):
    schedule = torch.tensor([[1000.0, 900.5, 743.13, 600.0, 400.5, 100.9]] * 4)
    theirs = verl_omni_loss._select_train_timesteps(schedule, timestep_fraction=fraction, seed=42)
    mine = select_train_timesteps(schedule, fraction, seed=42)
    assert mine.dtype == theirs.dtype == torch.long and torch.equal(mine, theirs)
