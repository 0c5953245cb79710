"""recompute_log_probs: the trainer's rescoring of a recorded trajectory equals the rollout's log-probs."""

from __future__ import annotations

import pytest
import torch

from qwen_image_omni.pipelines.qwen_image import PromptBatch, recompute_log_probs
from tests.support.rl_tiny import (
    MICRO_BATCH,
    NEGATIVE_LENGTHS,
    PROMPT_LENGTHS,
    collate,
    make_pipeline,
    model_config,
    prompt_batch,
    prompt_rows,
    run_diffuse,
)


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no_cfg", "cfg"])
def test_recompute_equals_the_rollout_under_another_collation(cfg):
    pipe = make_pipeline()
    rows = prompt_rows(PROMPT_LENGTHS, seed=1), prompt_rows(NEGATIVE_LENGTHS, seed=2)
    _, all_latents, all_log_probs, all_timesteps = run_diffuse(
        pipe, collate(rows[0], 64), collate(rows[1], 64), "sde", cfg
    )
    # Right padding to other widths (Qwen-Image 1.x positions count from the first column, so a trainer
    # keeps valid tokens first): unpadded positives, negatives padded to 40.
    trainer_prompts = prompt_batch(collate(rows[0]), collate(rows[1], 40) if cfg > 1 else None)
    with torch.no_grad():
        recomputed = recompute_log_probs(
            pipe.transformer, model_config("sde", cfg), all_latents, all_timesteps, trainer_prompts, MICRO_BATCH
        )
    assert recomputed.shape == all_log_probs.shape
    torch.testing.assert_close(recomputed, all_log_probs, rtol=0, atol=1e-5)


def test_recompute_rejects_what_is_not_a_trajectory():
    pipe = make_pipeline()
    prompts = PromptBatch(torch.zeros(2, 3, 24))
    config = model_config("sde", 1.0)
    with pytest.raises(TypeError, match="PromptBatch"):
        recompute_log_probs(pipe.transformer, config, torch.zeros(2, 3, 16, 16), torch.zeros(2, 2), None, MICRO_BATCH)
    with pytest.raises(ValueError, match=r"\(B, W \+ 1"):
        recompute_log_probs(pipe.transformer, config, torch.zeros(2, 2, 16, 16), torch.zeros(2, 2), prompts, MICRO_BATCH)
