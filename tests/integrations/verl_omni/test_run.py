"""verl-omni's own trainer, whole, with our bridge (run by ``make test-verl-omni``).

``python -m verl_omni.trainer.main_diffusion`` for FlowGRPO on a tiny random Qwen-Image checkpoint, in
verl-omni main's pinned environment (verl at its commit, vllm 0.27.0, vllm-omni 0.27.0rc1, diffusers
0.38.0): Ray local, verl-omni's FSDP2 engine building our transformer through ``build_module``, its
vllm-omni rollout server serving our rollout pipeline in step execution, LoRA synced to the rollout
each step (``layered_summon``), a reward, checkpoints, validation, and a second process resuming
from the first checkpoint. The same recipe with verl-omni's own Qwen-Image pipeline gives the
reference figures. What stands in for the GPU is listed in ``tests/support/verl_omni_run/launch.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.verl_omni, pytest.mark.vllm_omni, pytest.mark.slow]
pytest.importorskip("verl_omni", reason="needs the verl-omni source on PYTHONPATH (make test-verl-omni)")

from tests.support.verl_omni_run.launch import BRIDGE, PEFT_FIX_ONLY, Run, main_diffusion, recipe_overrides  # noqa: E402
from tests.support.verl_omni_run.run_inputs import write_run_inputs  # noqa: E402

RUN_TIMEOUT_S = 1200
FP32_NOISE_FLOOR = 1e-6
"""|log-prob| differences of fp32 recomputations of the same transition stay below this (seen: <= 1.2e-7)."""
STEP_METRICS = {
    "critic/rewards/mean": dict(rel=1e-5),
    "rollout_corr/rollout_log_ppl": dict(rel=1e-6),
    "rollout_corr/training_log_ppl": dict(rel=1e-6),
    "actor/grad_norm": dict(rel=1e-4),
    "actor/loss": dict(abs=1e-5),
}
"""Step metrics a resumed run must repeat, with how far apart two runs of one step land (the loss is a
mean of normalised advantages, about 1e-6 either side of 0)."""
OUR_ROLLOUT = "qwen_image_omni.pipelines.qwen_image_flow_grpo.vllm_omni_rollout_pipeline.QwenImagePipelineWithLogProb"


def _lora_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a one-rank FSDP2 actor checkpoint (its one shard is the whole tensor)."""
    state = torch.load(checkpoint / "actor" / "model_world_size_1_rank_0.pt", weights_only=False)
    return {name: getattr(value, "to_local", lambda: value)() for name, value in state.items() if "lora_" in name}


def _assert_finished(run: Run, steps: list[int]) -> None:
    assert run.returncode == 0, f"main_diffusion exited with {run.returncode}:\n{run.log_tail()}"
    assert sorted(run.metrics) == steps, f"logged steps {sorted(run.metrics)}, expected {steps}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint (with its chat template) and the prompt data."""
    return write_run_inputs(tmp_path_factory.mktemp("verl-omni-run-inputs"))


@pytest.fixture(scope="module")
def ours(inputs, tmp_path_factory) -> Run:
    """Two steps with our bridge: a checkpoint after each, validation after the last."""
    overrides = recipe_overrides(inputs, BRIDGE, steps=2) + ["trainer.save_freq=1", "trainer.test_freq=2"]
    run = main_diffusion(tmp_path_factory.mktemp("ours"), overrides, RUN_TIMEOUT_S)
    _assert_finished(run, [1, 2])
    return run


@pytest.fixture(scope="module")
def resumed(inputs, ours, tmp_path_factory) -> Run:
    """A new process resuming from ``ours``' step-1 checkpoint and running step 2 again."""
    checkpoint = ours.log.parent / "checkpoints" / "global_step_1"
    overrides = recipe_overrides(inputs, BRIDGE, steps=2) + [
        "trainer.save_freq=1",
        "trainer.test_freq=-1",
        "trainer.resume_mode=resume_path",
        f"trainer.resume_from_path={checkpoint}",
    ]
    run = main_diffusion(tmp_path_factory.mktemp("resumed"), overrides, RUN_TIMEOUT_S)
    _assert_finished(run, [2])
    return run


@pytest.fixture(scope="module")
def verl_omni_own(inputs, tmp_path_factory) -> Run:
    """Step 1 of the same recipe on verl-omni's own Qwen-Image adapter, rollout pipeline and diffusers' class."""
    overrides = recipe_overrides(inputs, PEFT_FIX_ONLY, steps=1) + ["trainer.save_freq=-1", "trainer.test_freq=-1"]
    run = main_diffusion(tmp_path_factory.mktemp("verl-omni-own"), overrides, RUN_TIMEOUT_S)
    _assert_finished(run, [1])
    return run


def test_trainer_builds_our_transformer_and_the_rollout_serves_our_pipeline(ours):
    log = ours.log.read_text(errors="replace")
    # verl-omni logs this for a module that an adapter's build_module returned (diffusers' class goes
    # through AutoModel and never reaches that line).
    assert "Built QwenImageTransformer2DModel via DiffusionModelBase custom loader" in log
    assert f"qwen-image-omni: {OUR_ROLLOUT} serves" in log
    assert "step_execution" in log


def test_two_steps_train_with_rewards_and_validate_once(ours):
    for step in (1, 2):
        metrics = ours.metrics[step]
        assert 0.0 < metrics["critic/rewards/mean"] < 1.0
        assert metrics["actor/grad_norm"] > 0.0 and math.isfinite(metrics["actor/grad_norm"])
    validation = [key for key in ours.metrics[2] if key.startswith("val-core/")]
    assert validation, "no validation metrics at the last step"
    assert not any(key.startswith("val-core/") for key in ours.metrics[1])


def test_each_step_saves_a_checkpoint_whose_model_config_diffusers_loads(ours):
    from diffusers import QwenImageTransformer2DModel as DiffusersTransformer

    checkpoints = ours.log.parent / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    for step in (1, 2):
        config_dir = checkpoints / f"global_step_{step}" / "actor" / "huggingface"
        config = json.loads((config_dir / "config.json").read_text())
        assert config["_class_name"] == "QwenImageTransformer2DModel"
        assert DiffusersTransformer.load_config(config_dir)["num_layers"] == config["num_layers"]


def test_step_one_rollout_and_trainer_log_probs_agree_to_the_fp32_noise_floor(ours):
    metrics = ours.metrics[1]
    assert metrics["rollout_corr/logprob_abs_diff_max"] <= FP32_NOISE_FLOOR, metrics
    assert abs(metrics["actor/ppo_kl"]) <= FP32_NOISE_FLOOR, metrics


def test_lora_weights_synced_to_the_rollout_keep_step_two_at_the_noise_floor(ours):
    # After step 1's update the rollout only matches the trainer if the new LoRA weights reached it.
    assert ours.metrics[2]["rollout_corr/logprob_abs_diff_max"] <= FP32_NOISE_FLOOR, ours.metrics[2]


def test_resumed_run_repeats_step_two(ours, resumed):
    checkpoint = ours.log.parent / "checkpoints" / "global_step_1"
    assert f"Resuming from {checkpoint}" in resumed.log.read_text(errors="replace")
    for name, tolerance in STEP_METRICS.items():
        assert resumed.metrics[2][name] == pytest.approx(ours.metrics[2][name], **tolerance), name
    # Step 2's update starts from the restored weights and optimizer moments, so the two updates agree
    # to a small part of their size (Adam without its step-1 moments moves every weight by about lr).
    # Adapters the loss does not reach (the last block's text-side projections) never move in either run.
    before = _lora_weights(checkpoint)
    after = [_lora_weights(run.log.parent / "checkpoints" / "global_step_2") for run in (ours, resumed)]
    assert sorted(after[0]) == sorted(after[1]) == sorted(before)
    updates = {name: (weight - before[name]).abs().max() for name, weight in after[0].items()}
    assert sum(update > 0 for update in updates.values()) >= len(updates) // 2, updates
    for name, weight in after[0].items():
        assert (after[1][name] - weight).abs().max() <= 1e-2 * updates[name], name


def test_verl_omni_own_pipeline_runs_the_same_recipe(verl_omni_own, ours):
    log = verl_omni_own.log.read_text(errors="replace")
    assert "Built QwenImageTransformer2DModel via DiffusionModelBase custom loader" not in log
    assert "qwen-image-omni:" not in log
    keys = ("rollout_corr/logprob_abs_diff_mean", "rollout_corr/logprob_abs_diff_max", "actor/ppo_kl")
    figures = {
        name: {key: run.metrics[1][key] for key in keys}
        for name, run in (("qwen-image-omni", ours), ("verl-omni's own", verl_omni_own))
    }
    print("step-1 rollout/trainer consistency:", json.dumps(figures, indent=2))
    for key in figures["verl-omni's own"]:
        assert math.isfinite(figures["verl-omni's own"][key])
