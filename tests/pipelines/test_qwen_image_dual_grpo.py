"""Qwen-Image Dual-GRPO: FlowGRPO's image rollout plus text sampled from the Qwen2.5-VL text encoder.

The image side is checked against our FlowGRPO rollout on the same inputs, the text log-probs
against a direct ``log_softmax`` of the text encoder's logits, and the trainer-side twin
(:meth:`QwenImageDualGRPO.text_log_probs`, :meth:`QwenImageDualGRPO.forward_and_sample_previous_step`)
on re-collated prompts against the rollout, per step. A tiny random Qwen2.5-VL text encoder
(``tests/support/tiny_checkpoint.py``) decodes greedily (its ``generation_config.do_sample`` is False).
"""

from __future__ import annotations

import pytest
import torch

from qwen_image_omni import QwenImageTransformer2DModel
from qwen_image_omni.pipelines import DiffusionModelBase, DiffusionModelConfig, VllmOmniPipelineBase
from qwen_image_omni.pipelines.qwen_image_dual_grpo import (
    TEXT_SAMPLING_OPTIONS,
    QwenImageDualGRPO,
    QwenImagePipelineWithDualLogProb,
    left_pad_prompts,
    text_sampling_options,
)
from qwen_image_omni.pipelines.qwen_image_dual_grpo.text_sampling import response_mask
from qwen_image_omni.pipelines.qwen_image_flow_grpo import QWEN_IMAGE_SCHEDULER_CONFIG, QwenImage
from qwen_image_omni.pipelines.qwen_image_flow_grpo import QwenImagePipelineWithLogProb
from qwen_image_omni.pipelines.schedulers import FlowMatchSDEDiscreteScheduler

from tests.support.tiny_checkpoint import CHECKPOINT_TRANSFORMER_CONFIG, tiny_text_encoder, tiny_tokenizer

TOL = 1e-5
SIZE = 64  # pixels: a 4x4 grid of packed latent tokens
IMAGE_TOKENS = 16
STEPS = 3
NEW_TOKENS = 5
PROMPT_LENGTHS = (40, 45)  # > prompt_template_encode_start_idx (34) tokens
SDE = {"noise_level": 0.7, "sde_window_size": 2, "sde_window_range": (0, 2), "sde_type": "sde"}
RL_KEYS = {"llm_response_ids", "llm_all_log_probs", "text_encoder_responses", "llm_response_mask"}


@pytest.fixture(scope="module")
def components():
    """Our tiny transformer (text dim 32), the SDE scheduler, a tiny Qwen2.5-VL text encoder and its tokenizer."""
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**CHECKPOINT_TRANSFORMER_CONFIG).eval()
    tokenizer = tiny_tokenizer()
    return {
        "transformer": transformer,
        "scheduler": FlowMatchSDEDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG),
        "text_encoder": tiny_text_encoder(tokenizer),
        "tokenizer": tokenizer,
    }


@pytest.fixture(scope="module")
def pipe(components) -> QwenImagePipelineWithDualLogProb:
    return QwenImagePipelineWithDualLogProb(**components)


def prompts(lengths=PROMPT_LENGTHS, seed: int = 9, width: int | None = None, layout: str = "right"):
    """Random templated prompt token ids, padded to ``width`` (``layout`` padding), and their mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths) if width is None else width
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        columns = slice(0, length) if layout == "right" else slice(width - length, width)
        ids[row, columns] = torch.randint(3, 200, (length,), generator=generator)
        mask[row, columns] = 1
    return ids, mask


def _inputs(num_images_per_prompt: int = 1) -> dict:
    ids, mask = prompts()
    negative_ids, negative_mask = prompts((36, 38), seed=10)
    rows = len(PROMPT_LENGTHS) * num_images_per_prompt
    latents = torch.randn(rows, IMAGE_TOKENS, 16, generator=torch.Generator().manual_seed(6))
    return {
        "prompt_token_ids": ids, "prompt_mask": mask, "negative_prompt_ids": negative_ids,
        "negative_prompt_mask": negative_mask, "true_cfg_scale": 4.0, "height": SIZE, "width": SIZE,
        "num_inference_steps": STEPS, "latents": latents, "output_type": "latent",
        "num_images_per_prompt": num_images_per_prompt,
        "generator": [torch.Generator().manual_seed(20 + row) for row in range(rows)], **SDE,
    }  # fmt: skip


@pytest.fixture(scope="module")
def rollout(pipe):
    return pipe(**_inputs(), max_new_tokens=NEW_TOKENS)


def direct_log_probs(text_encoder, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` of the text encoder's logits on one unpadded ``[prompt, response]``: ``(T, V)``."""
    with torch.no_grad():
        logits = text_encoder(input_ids=torch.cat([prompt, response])[None]).logits[0]
    return torch.log_softmax(logits[prompt.numel() - 1 : -1].float(), dim=-1)


# -- registry -----------------------------------------------------------------------------------------


def test_registered_for_qwen_image_dual_grpo():
    config = DiffusionModelConfig(architecture="QwenImagePipeline", algorithm="dual_grpo")
    assert DiffusionModelBase.get_class(config) is QwenImageDualGRPO
    assert issubclass(QwenImageDualGRPO, QwenImage)
    for name in ("prepare_model_inputs", "forward_and_sample_previous_step", "sample_previous_step", "build_scheduler"):
        assert getattr(QwenImageDualGRPO, name).__func__ is getattr(QwenImage, name).__func__, name
    assert VllmOmniPipelineBase.get_class("QwenImagePipeline", "dual_grpo") is QwenImagePipelineWithDualLogProb
    assert VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "dual_grpo") == (
        "qwen_image_omni.pipelines.qwen_image_dual_grpo.diffusers_rollout_pipeline.QwenImagePipelineWithDualLogProb"
    )
    assert QwenImagePipelineWithDualLogProb.training_adapter is QwenImageDualGRPO


# -- the rollout ----------------------------------------------------------------------------------------


def test_image_side_is_the_flow_grpo_rollout(components, rollout):
    """Same inputs, same generators: the Dual rollout's image data is FlowGRPO's, bit for bit."""
    expected = QwenImagePipelineWithLogProb(**components)(**_inputs())
    for name in ("images", "all_latents", "all_log_probs", "all_timesteps", "prompt_embeds", "prompt_embeds_mask",
                 "negative_prompt_embeds", "negative_prompt_embeds_mask"):  # fmt: skip
        assert torch.equal(getattr(rollout, name), getattr(expected, name)), name
    assert rollout.sde_windows == expected.sde_windows and expected.rl is None


def test_rollout_records_verl_omni_rl_keys(rollout, components):
    rl = rollout.rl
    assert set(rl) == RL_KEYS
    assert set(rollout.output["metadata"]["rl"]) == RL_KEYS
    vocab = len(components["tokenizer"])
    assert rl["llm_response_ids"].shape == (2, NEW_TOKENS) and rl["llm_response_ids"].dtype == torch.long
    assert rl["llm_all_log_probs"].shape == (2, NEW_TOKENS, vocab) and rl["llm_all_log_probs"].dtype == torch.float32
    assert rl["text_encoder_responses"] == components["tokenizer"].batch_decode(
        rl["llm_response_ids"], skip_special_tokens=True
    )
    assert torch.equal(rl["llm_response_mask"], response_mask(rl["llm_response_ids"], [258]))


def test_text_log_probs_are_a_direct_log_softmax(rollout, components):
    """Each row's full-vocabulary log-probs are the text encoder's on that prompt alone; greedy picks their argmax."""
    ids, mask = prompts()
    rl = rollout.rl
    for row in range(2):
        expected = direct_log_probs(components["text_encoder"], ids[row][mask[row].bool()], rl["llm_response_ids"][row])
        torch.testing.assert_close(rl["llm_all_log_probs"][row], expected, rtol=0, atol=TOL)
        assert torch.equal(rl["llm_response_ids"][row], expected.argmax(dim=-1))


def test_batched_rows_are_each_prompt_alone(pipe, rollout):
    """Right-padded rows are re-packed left: the short prompt generates what it does alone."""
    ids, mask = prompts()
    with torch.no_grad():
        alone = pipe.sample_text_responses(ids[0, : PROMPT_LENGTHS[0]], max_new_tokens=NEW_TOKENS)
    assert torch.equal(alone["llm_response_ids"][0], rollout.rl["llm_response_ids"][0])
    torch.testing.assert_close(alone["llm_all_log_probs"][0], rollout.rl["llm_all_log_probs"][0], rtol=0, atol=TOL)


def test_responses_follow_the_images_prompt_major(pipe):
    out = pipe(**_inputs(num_images_per_prompt=2), max_new_tokens=NEW_TOKENS)
    rl = out.rl
    assert out.all_latents.shape[0] == 4 and rl["llm_response_ids"].shape == (4, NEW_TOKENS)
    assert len(rl["text_encoder_responses"]) == 4 and rl["llm_all_log_probs"].shape[0] == 4
    # Greedy: both responses of a prompt are the same, and rows 0-1 / 2-3 are prompts 0 / 1.
    assert torch.equal(rl["llm_response_ids"][0], rl["llm_response_ids"][1])
    assert torch.equal(rl["llm_response_ids"][2], rl["llm_response_ids"][3])
    assert not torch.equal(rl["llm_response_ids"][1], rl["llm_response_ids"][2])


def test_no_llm_logprobs(pipe):
    out = pipe(**_inputs(), max_new_tokens=2, llm_logprobs=False)
    assert out.rl["llm_all_log_probs"] is None and out.rl["llm_response_ids"].shape == (2, 2)


def test_response_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 258, 256, 256], [5, 6, 7, 8], [258, 9, 258, 1]])
    assert response_mask(ids, [258]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert response_mask(ids, []).tolist() == [[1] * 4] * 3


def test_left_pad_prompts_any_layout_gives_the_same_rows():
    right = prompts(width=50)
    left = prompts(width=60, layout="left")
    packed = left_pad_prompts(*right, pad_token_id=256)
    assert all(torch.equal(a, b) for a, b in zip(packed, left_pad_prompts(*left, pad_token_id=256)))
    assert packed[0].shape == (2, 45) and packed[1][0].tolist() == [0] * 5 + [1] * 40
    assert (packed[0][0, :5] == 256).all()


# -- rollout / trainer --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["right", "left"])
def test_trainer_reproduces_the_rollout_text_log_probs(rollout, components, layout):
    """The trainer re-collates the prompt ids (another width, another padding side) and rescoring the
    recorded responses gives the rollout's log-probs, position by position."""
    ids, mask = prompts(width=64, layout=layout)
    rl = rollout.rl
    with torch.no_grad():
        token_log_probs, all_log_probs = QwenImageDualGRPO.text_log_probs(
            components["text_encoder"], ids, mask, rl["llm_response_ids"], return_all=True
        )
    expected = rl["llm_all_log_probs"].gather(-1, rl["llm_response_ids"][..., None]).squeeze(-1)
    deltas = (token_log_probs - expected).abs().amax(dim=0).tolist()
    assert max(deltas) <= TOL, f"per-step max |Δ log-prob| {deltas} > {TOL}"
    torch.testing.assert_close(all_log_probs, rl["llm_all_log_probs"], rtol=0, atol=TOL)


def test_trainer_text_log_probs_have_grad(components, rollout):
    ids, mask = prompts()
    log_probs = QwenImageDualGRPO.text_log_probs(components["text_encoder"], ids, mask, rollout.rl["llm_response_ids"])
    log_probs.sum().backward()
    grad = components["text_encoder"].lm_head.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    components["text_encoder"].zero_grad(set_to_none=True)


def test_sampled_text_log_probs_match_the_trainer_at_the_temperature(pipe, components, monkeypatch):
    """With sampling on (``do_sample``) the recorded scores are the logits over the temperature; the twin matches."""
    monkeypatch.setattr(components["text_encoder"].generation_config, "do_sample", True)
    ids, mask = prompts()
    torch.manual_seed(3)
    with torch.no_grad():
        rl = pipe.sample_text_responses(ids, mask, max_new_tokens=NEW_TOKENS, temperature=0.7)
        token_log_probs = QwenImageDualGRPO.text_log_probs(
            components["text_encoder"], ids, mask, rl["llm_response_ids"], temperature=0.7
        )
    expected = rl["llm_all_log_probs"].gather(-1, rl["llm_response_ids"][..., None]).squeeze(-1)
    torch.testing.assert_close(token_log_probs, expected, rtol=0, atol=TOL)


def test_trainer_reproduces_the_rollout_image_log_probs(pipe, rollout):
    """The image side is FlowGRPO's: the Dual adapter on re-collated (wider) prompt embeddings rescores each step."""
    config = DiffusionModelConfig(
        architecture="QwenImagePipeline", algorithm="dual_grpo",
        pipeline={"height": SIZE, "width": SIZE, "num_inference_steps": STEPS, "true_cfg_scale": 4.0},
        algo={"noise_level": 0.7, "sde_type": "sde"},
    )  # fmt: skip

    def widen(embeds, mask, width):
        wide = torch.full((embeds.shape[0], width, embeds.shape[2]), float("nan"))
        wide_mask = torch.zeros(embeds.shape[0], width, dtype=torch.long)
        for row in range(embeds.shape[0]):
            valid = embeds[row][mask[row].bool()]
            wide[row, : valid.shape[0]], wide_mask[row, : valid.shape[0]] = valid, 1
        return wide, wide_mask

    prompt = widen(rollout.prompt_embeds, rollout.prompt_embeds_mask, 40)
    negative = widen(rollout.negative_prompt_embeds, rollout.negative_prompt_embeds_mask, 17)
    scheduler = QwenImageDualGRPO.build_scheduler(config)
    QwenImageDualGRPO.set_timesteps(scheduler, config, "cpu")
    micro_batch = {"height": SIZE, "width": SIZE, "vae_scale_factor": 8}
    deltas = []
    transformer = pipe.transformer
    for step in range(rollout.all_log_probs.shape[1]):
        inputs, negative_inputs = QwenImageDualGRPO.prepare_model_inputs(
            transformer, config, rollout.all_latents, rollout.all_timesteps, *prompt, *negative, micro_batch, step
        )
        with torch.no_grad():
            log_prob, *_ = QwenImageDualGRPO.forward_and_sample_previous_step(
                transformer, scheduler, config, inputs, negative_inputs,
                {"all_latents": rollout.all_latents, "all_timesteps": rollout.all_timesteps}, step,
            )  # fmt: skip
        deltas.append(float((log_prob - rollout.all_log_probs[:, step]).abs().max()))
    assert max(deltas) <= TOL, f"per-step max |Δ log-prob| {deltas} > {TOL}"


# -- bad input ----------------------------------------------------------------------------------------------


def test_text_sampling_options_defaults_and_overrides():
    assert text_sampling_options(None) == TEXT_SAMPLING_OPTIONS
    assert text_sampling_options({"temperature": 0.5, "top_k": None, "noise_level": 0.1})["temperature"] == 0.5
    assert text_sampling_options({"top_k": None})["top_k"] == 0
    with pytest.raises(TypeError, match="`extra_args` must be a dict"):
        text_sampling_options([("temperature", 1.0)])
    with pytest.raises(ValueError, match=r"`top_p` must be in \(0, 1\], got 0.0"):
        text_sampling_options({"top_p": 0.0})


def test_bad_text_option_fails_before_the_image_rollout(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "rollout", lambda *args, **kwargs: pytest.fail("the image rollout ran"))
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        pipe(**_inputs(), temperature=0.0)


def test_rollout_needs_prompt_token_ids(pipe):
    embeds = torch.randn(2, 8, CHECKPOINT_TRANSFORMER_CONFIG["joint_attention_dim"])
    with pytest.raises(ValueError, match="`prompt_token_ids` are required, got None"):
        pipe(prompt_embeds=embeds, true_cfg_scale=1.0, height=SIZE, width=SIZE, num_inference_steps=STEPS,
             output_type="latent")  # fmt: skip


def test_rollout_needs_text_encoder_and_tokenizer(components):
    no_tokenizer = QwenImagePipelineWithDualLogProb(**{**components, "tokenizer": None})
    ids, mask = prompts()
    with pytest.raises(ValueError, match=r"needs \['tokenizer'\], got None"):
        no_tokenizer.sample_text_responses(ids, mask)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, "`temperature` must be > 0"),
        ({"temperature": float("nan")}, ValueError, "`temperature` must be a finite number"),
        ({"top_p": 1.5}, ValueError, r"`top_p` must be in \(0, 1\], got 1.5"),
        ({"top_k": -1}, ValueError, "`top_k` must be >= 0, got -1"),
        ({"max_new_tokens": 0}, ValueError, "`max_new_tokens` must be >= 1, got 0"),
        ({"max_new_tokens": 2.0}, TypeError, "`max_new_tokens` must be an int, got float"),
        ({"llm_logprobs": "yes"}, TypeError, "`llm_logprobs` must be a bool, got str"),
        ({"repetition_penalty": 0.0}, ValueError, "`repetition_penalty` must be > 0"),
        ({"num_responses_per_prompt": 0}, ValueError, "`num_responses_per_prompt` must be >= 1, got 0"),
    ],
)
def test_bad_text_options_raise(pipe, options, error, match):
    ids, mask = prompts()
    with pytest.raises(error, match=match):
        pipe.sample_text_responses(ids, mask, **options)


def test_bad_prompt_ids_raise(pipe):
    ids, mask = prompts()
    with pytest.raises(TypeError, match="`prompt_ids` must hold integer token ids, got dtype torch.float32"):
        pipe.sample_text_responses(ids.float(), mask)
    with pytest.raises(ValueError, match=r"`prompt_mask` must have the shape of `prompt_ids` \(2, 45\), got \(2, 44\)"):
        pipe.sample_text_responses(ids, mask[:, :-1])
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] of `prompt_ids` have no valid token"):
        pipe.sample_text_responses(ids, empty)
    with pytest.raises(ValueError, match=r"`prompt_ids` must be \(batch, tokens\) or \(tokens,\)"):
        pipe.sample_text_responses(ids[None], mask[None])


def test_text_log_probs_bad_input_raises(components, rollout):
    ids, mask = prompts()
    response = rollout.rl["llm_response_ids"]
    encoder = components["text_encoder"]
    with pytest.raises(ValueError, match=r"`response_ids` must be \(batch=2, tokens > 0\).*got shape \(1, 5\)"):
        QwenImageDualGRPO.text_log_probs(encoder, ids, mask, response[:1])
    with pytest.raises(TypeError, match="`response_ids` must hold integer token ids, got dtype torch.float32"):
        QwenImageDualGRPO.text_log_probs(encoder, ids, mask, response.float())
    with pytest.raises(TypeError, match="`response_ids` must be a torch.Tensor, got list"):
        QwenImageDualGRPO.text_log_probs(encoder, ids, mask, response.tolist())
    with pytest.raises(ValueError, match="`temperature` must be > 0, got 0.0"):
        QwenImageDualGRPO.text_log_probs(encoder, ids, mask, response, temperature=0.0)
