"""verl-omni main's contracts in our pipelines, without verl-omni: output envelope, packed requests,
``algo`` fields, optional adapter hooks, ``external_lib`` and the image-conditioned base."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from qwen_image_omni.pipelines import (
    DiffusionAlgoConfig,
    DiffusionI2IModelBase,
    DiffusionModelBase,
    DiffusionModelConfig,
    forward,
    import_external_libs,
    prepare_model_inputs,
)
from qwen_image_omni.pipelines.qwen_image import sample_sde_windows
from qwen_image_omni.pipelines.qwen_image_flow_grpo import QwenImage
from qwen_image_omni.pipelines.rollout_output import envelope_media, per_request_rollouts, rollout_envelope

from tests.support.rl_tiny import (
    HEIGHT,
    NEGATIVE_LENGTHS,
    PROMPT_LENGTHS,
    STEPS,
    collate,
    make_pipeline,
    model_config,
    prompt_rows,
    recompute_log_probs,
)

TOL = 1e-5


def rollout(pipe, prompt, negative, generator, **options):
    return pipe(
        prompt_embeds=prompt.embeds,
        prompt_embeds_mask=prompt.mask,
        negative_prompt_embeds=negative.embeds,
        negative_prompt_embeds_mask=negative.mask,
        height=HEIGHT,
        width=HEIGHT,
        num_inference_steps=STEPS,
        true_cfg_scale=4.0,
        noise_level=0.7,
        sde_window_size=2,
        sde_window_range=(0, STEPS),
        generator=generator,
        output_type="latent",
        **options,
    )


# -- packed requests: one SDE window per row, from that row's generator ------------------------------


def test_packed_rows_roll_out_what_each_row_would_alone():
    """A batch of two with generators [g0, g1] equals two single rollouts with g0 and g1 (windows included)."""
    pipe = make_pipeline()
    prompt = collate(prompt_rows(PROMPT_LENGTHS, seed=1), width=40)
    negative = collate(prompt_rows(NEGATIVE_LENGTHS, seed=2), width=8)
    seeds = (5, 11)
    with torch.no_grad():
        packed = rollout(pipe, prompt, negative, [torch.Generator().manual_seed(s) for s in seeds])
        alone = [
            rollout(
                pipe,
                type(prompt)(prompt.embeds[i : i + 1], prompt.mask[i : i + 1]),
                type(negative)(negative.embeds[i : i + 1], negative.mask[i : i + 1]),
                torch.Generator().manual_seed(seeds[i]),
            )
            for i in range(2)
        ]
    assert packed.sde_windows == [alone[0].sde_window, alone[1].sde_window]
    assert packed.sde_windows[0] != packed.sde_windows[1]  # these seeds draw different windows
    for i in range(2):
        for name in ("images", "all_latents", "all_log_probs", "all_timesteps"):
            assert torch.allclose(getattr(packed, name)[i], getattr(alone[i], name)[0], atol=TOL), name

    # The trainer rescoring each row's own window gets the rollout's log-probs.
    config = model_config("sde", 4.0)
    trainer = recompute_log_probs(pipe.transformer, config, packed.all_latents, packed.all_timesteps, prompt, negative)
    assert (packed.all_log_probs - trainer).abs().max() <= TOL


def test_one_generator_shares_one_window_and_windows_are_checked():
    generator = torch.Generator().manual_seed(0)
    windows = sample_sde_windows(2, (0, 4), 4, generator, 3)
    assert len(set(windows)) == 1 and len(windows) == 3
    assert sample_sde_windows(None, (0, 4), 4, None, 2) == [(0, 3), (0, 3)]
    with pytest.raises(ValueError, match="one generator per sample"):
        sample_sde_windows(2, (0, 4), 4, [torch.Generator()], 2)


# -- the output envelope ------------------------------------------------------------------------------


def test_rollout_output_carries_trajectories_and_the_metadata_envelope():
    pipe = make_pipeline()
    prompt = collate(prompt_rows(PROMPT_LENGTHS, seed=1))
    negative = collate(prompt_rows(NEGATIVE_LENGTHS, seed=2))
    with torch.no_grad():
        out = rollout(pipe, prompt, negative, torch.Generator().manual_seed(0))
    assert out.trajectory_latents is out.all_latents and out.trajectory_log_probs is out.all_log_probs
    assert out.trajectory_timesteps is out.all_timesteps
    envelope = out.output
    assert envelope["payload"]["image"] is out.images and envelope_media(envelope) is out.images
    embeddings = envelope["metadata"]["prompt_embeddings"]
    assert embeddings["prompt_embeds"] is out.prompt_embeds
    assert torch.equal(embeddings["negative_prompt_embeds_mask"], negative.mask)
    assert "rl" not in envelope["metadata"]  # FlowGRPO has no algorithm-specific tensors


def test_per_request_rollouts_slice_every_batched_field():
    latents = torch.arange(4 * 3).reshape(4, 3).float()
    requests = per_request_rollouts(
        media=torch.zeros(4, 3, 8, 8),
        trajectory_latents=latents,
        trajectory_log_probs=None,
        trajectory_timesteps=torch.ones(4, 2),
        prompt_embeddings={"prompt_embeds": torch.randn(4, 5, 2), "negative_prompt_embeds": None},
        rl={"latents_clean": torch.randn(4, 3), "shared": torch.ones(7)},
        num_requests=2,
        rows_per_request=2,
    )
    assert len(requests) == 2
    second = requests[1]
    assert torch.equal(second["trajectory_latents"], latents[2:]) and second["trajectory_log_probs"] is None
    metadata = second["output"]["metadata"]
    assert metadata["prompt_embeddings"]["prompt_embeds"].shape == (2, 5, 2)
    assert metadata["prompt_embeddings"]["negative_prompt_embeds"] is None
    assert metadata["rl"]["latents_clean"].shape == (2, 3) and metadata["rl"]["shared"].shape == (7,)
    assert second["output"]["payload"]["image"].shape == (2, 3, 8, 8)


def test_envelope_rejects_a_key_in_both_groups_and_unknown_media():
    with pytest.raises(ValueError, match="both 'prompt_embeddings' and 'rl'"):
        rollout_envelope(1, prompt_embeddings={"prompt_embeds": 1}, rl={"prompt_embeds": 2})
    with pytest.raises(ValueError, match="media_key"):
        rollout_envelope(1, media_key="picture")
    with pytest.raises(ValueError, match="no media"):
        envelope_media({"payload": {"text": "x"}})


# -- config: algo fields and external_lib ---------------------------------------------------------------


def test_algo_config_has_verl_omni_main_fields():
    algo = DiffusionAlgoConfig()
    assert (algo.sde_contiguous, algo.sample_strategy, algo.iters_per_group, algo.sde_window_seed) == (
        True,
        "random",
        1,
        0,
    )
    with pytest.raises(ValueError, match="algo.sample_strategy"):
        DiffusionAlgoConfig(sample_strategy="sliding")
    with pytest.raises(ValueError, match="algo.iters_per_group"):
        DiffusionAlgoConfig(iters_per_group=0)
    with pytest.raises(TypeError, match="algo.sde_contiguous"):
        DiffusionAlgoConfig(sde_contiguous="yes")


def test_external_lib_is_imported_and_registers_its_adapter(monkeypatch):
    monkeypatch.setattr(DiffusionModelBase, "_registry", dict(DiffusionModelBase._registry))
    module = types.ModuleType("my_adapters")
    imported = []

    def exec_module():
        imported.append(True)

        @DiffusionModelBase.register("MyPipeline", "flow_grpo")
        class Mine(QwenImage):
            pass

        module.Mine = Mine

    class Finder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "my_adapters":
                return None
            import importlib.machinery

            class Loader:
                def create_module(self, spec):
                    return module

                def exec_module(self, _):
                    exec_module()

            return importlib.machinery.ModuleSpec(name, Loader())

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "my_adapters", raising=False)
    config = DiffusionModelConfig(architecture="MyPipeline", external_lib="my_adapters")
    assert imported == [True]
    assert DiffusionModelBase.get_class(config) is module.Mine
    assert DiffusionModelBase.peek_class("MyPipeline", "dpo") is None
    with pytest.raises(ImportError, match="external_lib='no_such_lib_xyz'"):
        import_external_libs("no_such_lib_xyz")
    with pytest.raises(TypeError, match="external_lib"):
        import_external_libs(3)


def test_optional_hooks_default_to_no_ops():
    assert QwenImage.validate_lora_config(model_config("sde", 1.0)) is None
    assert QwenImage.prepare_processor_files("/nowhere") is None
    assert QwenImage.configure_trainable_params(torch.nn.Linear(1, 1), model_config("sde", 1.0)) is None
    assert QwenImage.configure_train_mode(torch.nn.Linear(1, 1)) is None


def test_build_module_builds_our_transformer_with_the_checkpoint_weights(tmp_path):
    from diffusers import QwenImageTransformer2DModel as DiffusersTransformer

    from qwen_image_omni import QwenImageTransformer2DModel

    from tests.support.tiny import make_pair

    _, reference = make_pair(seed=3)
    reference.save_pretrained(tmp_path / "transformer")
    config = DiffusionModelConfig(architecture="QwenImagePipeline", local_path=str(tmp_path))
    module = QwenImage.build_module(config, torch.float32)
    assert type(module) is QwenImageTransformer2DModel and isinstance(reference, DiffusersTransformer)
    expected = reference.state_dict()
    assert module.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in module.state_dict().items())
    with pytest.raises(ValueError, match="local_path"):
        QwenImage.build_module(DiffusionModelConfig(architecture="QwenImagePipeline"), torch.float32)


# -- the image-conditioned base ------------------------------------------------------------------------------


class Echo(torch.nn.Module):
    """Returns its hidden states doubled, so the slicing is visible."""

    def forward(self, hidden_states, **kwargs):
        return (2 * hidden_states,)


@pytest.fixture
def i2i_adapter(monkeypatch):
    monkeypatch.setattr(DiffusionModelBase, "_registry", dict(DiffusionModelBase._registry))

    @DiffusionModelBase.register("EchoEditPipeline", "flow_grpo")
    class EchoEdit(DiffusionI2IModelBase, QwenImage):
        @classmethod
        def prepare_model_inputs(cls, module, model_config, latents, timesteps, *args, **kwargs):
            return {"hidden_states": latents}, {"hidden_states": latents.clone()}

        @classmethod
        def prepare_condition(cls, micro_batch, latents, step):
            latents = micro_batch.get("condition_image_latents")
            return None if latents is None else {"image_latents": latents}

    return EchoEdit


def test_i2i_dispatch_concatenates_the_condition_and_forward_keeps_target_tokens(i2i_adapter):
    config = DiffusionModelConfig(architecture="EchoEditPipeline")
    target, condition = torch.randn(2, 4, 3), torch.randn(2, 6, 3)
    inputs, negative = prepare_model_inputs(
        Echo(), config, target, None, None, None, None, None, {"condition_image_latents": condition}, 0
    )
    assert inputs["hidden_states"].shape == negative["hidden_states"].shape == (2, 10, 3)
    assert torch.equal(inputs["hidden_states"][:, 4:], condition)
    assert torch.equal(forward(Echo(), config, inputs, negative), 2 * target)
    with pytest.raises(ValueError, match="found no condition in the micro-batch"):
        prepare_model_inputs(Echo(), config, target, None, None, None, None, None, {"image_latents": condition}, 0)


def test_i2i_inject_condition_checks_its_inputs():
    inputs = {"hidden_states": torch.zeros(2, 4, 3)}
    with pytest.raises(ValueError, match="needs condition\\['image_latents'\\]"):
        DiffusionI2IModelBase.inject_condition(inputs, None, {"img_shapes": []})
    with pytest.raises(ValueError, match="batch and channels"):
        DiffusionI2IModelBase.inject_condition(inputs, None, {"image_latents": torch.zeros(3, 4, 3)})
    with pytest.raises(ValueError, match="already hold 'image_latents'"):
        DiffusionI2IModelBase.inject_condition(
            {**inputs, "image_latents": 1}, None, {"image_latents": torch.zeros(2, 1, 3)}
        )
    assert DiffusionI2IModelBase.inject_condition(inputs, None, None) == (inputs, None)


@pytest.mark.skipif(importlib.util.find_spec("verl_omni") is not None, reason="verl-omni is importable here")
def test_the_verl_omni_bridge_without_verl_omni_raises_a_clear_import_error():
    with pytest.raises(ImportError, match="needs verl-omni"):
        importlib.import_module("qwen_image_omni.integrations.verl_omni")


def test_token_ids_of_a_request_batch_are_collated_right_padded():
    from qwen_image_omni.pipelines.request_batch import PROMPT_TOKEN_ID_KEYS, collate_token_ids

    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_ids": torch.tensor([[8, 9]]), "prompt_mask": [0, 1]}]
    ids, mask = collate_token_ids(prompts, PROMPT_TOKEN_ID_KEYS, "cpu")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 0]] and mask.tolist() == [[1, 1, 1], [0, 1, 0]]
    assert collate_token_ids(["text", {"prompt": "x"}], PROMPT_TOKEN_ID_KEYS, "cpu") == (None, None)
    with pytest.raises(ValueError, match=r"requests \[1\] carry no"):
        collate_token_ids([{"prompt_token_ids": [1]}, {"prompt": "x"}], PROMPT_TOKEN_ID_KEYS, "cpu")
    with pytest.raises(ValueError, match="`prompt_mask` has 1 entries for 2 token ids"):
        collate_token_ids([{"prompt_token_ids": [1, 2], "prompt_mask": [1]}], PROMPT_TOKEN_ID_KEYS, "cpu")
