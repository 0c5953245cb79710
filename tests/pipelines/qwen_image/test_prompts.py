"""PromptBatch and pad_prompt_rows: the prompt tensors a rollout or trainer step reads."""

from __future__ import annotations

import pytest
import torch

from qwen_image_omni.pipelines.qwen_image import PromptBatch, pad_prompt_rows


def _rows(lengths=(3, 5), dim=4):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, dim, generator=generator) for n in lengths]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_prompt_rows_places_valid_tokens_on_the_other_side(side):
    rows = _rows()
    embeds, mask = pad_prompt_rows(rows, width=7, padding_side=side)
    assert embeds.shape == (2, 7, 4) and mask.dtype == torch.long
    for row, sample, valid in zip(rows, embeds, mask):
        assert int(valid.sum()) == row.shape[0]
        assert torch.equal(sample[valid.bool()], row)
        assert (sample[~valid.bool()] == 0).all()
        first_valid = int(valid.argmax())
        assert first_valid == (0 if side == "right" else 7 - row.shape[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 4}, "longest row"),
        ({"padding_side": "middle"}, "padding_side"),
        ({"rows": []}, "non-empty"),
        ({"rows": [torch.zeros(2, 3), torch.zeros(2, 4)]}, "one dim"),
    ],
)
def test_pad_prompt_rows_rejects_bad_input(kwargs, match):
    kwargs = {"rows": _rows(), **kwargs}
    with pytest.raises(ValueError, match=match):
        pad_prompt_rows(**kwargs)


def test_a_single_negative_row_is_repeated_for_every_sample():
    prompts = PromptBatch.from_rows(_rows(), _rows((2,)))
    assert prompts.do_true_cfg and prompts.negative_prompt_embeds.shape[0] == 2
    assert torch.equal(prompts.negative_prompt_embeds[0], prompts.negative_prompt_embeds[1])
    assert prompts.negative_prompt_embeds_mask.shape == (2, 2)
    assert set(prompts.as_dict()) == {
        "prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask"
    }  # fmt: skip
    positive = PromptBatch(prompts.prompt_embeds, prompts.prompt_embeds_mask)
    assert not positive.do_true_cfg and positive.negative == (None, None)
    assert positive.positive[0] is prompts.prompt_embeds


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ((torch.zeros(2, 3),), ValueError, r"`prompt_embeds` must be \(batch, width, dim\)"),
        (([[0.0]],), TypeError, "`prompt_embeds` must be a torch.Tensor"),
        ((torch.zeros(2, 3, 4), torch.ones(2, 4)), ValueError, r"`prompt_embeds_mask` must have shape \(2, 3\)"),
        ((torch.zeros(2, 3, 4), None, torch.zeros(3, 1, 4)), ValueError, "1 or batch=2"),
        ((torch.zeros(2, 3, 4), None, None, torch.ones(2, 1)), ValueError, "without `negative_prompt_embeds`"),
        ((torch.zeros(2, 3, 4), None, torch.zeros(2, 1, 4), torch.ones(2, 2)), ValueError, "negative_prompt_embeds_mask"),
    ],
)  # fmt: skip
def test_prompt_batch_names_the_bad_argument(arguments, error, match):
    with pytest.raises(error, match=match):
        PromptBatch(*arguments)
