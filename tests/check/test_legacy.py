"""The legacy txt_seq_lens emulation is scoped to the calling thread and leaves the model as it was."""

import threading

import pytest
import torch

from diffusers import QwenImageTransformer2DModel as DiffusersTransformer

from qwen_image_omni import QwenImageTransformer2DModel
from qwen_image_omni.check.legacy import legacy_forward, legacy_text_rope, legacy_txt_freqs, legacy_txt_seq_len
from tests.support.check_runs import kwargs_for, run as run_check_forward
from tests.support.tiny import make_inputs, make_pair, run

MODEL_CLASSES = [DiffusersTransformer, QwenImageTransformer2DModel]


@pytest.fixture(scope="module")
def left_padded():
    """A left-padded prompt: the legacy table rotates its valid tokens wrongly (kernel flavour)."""
    inputs = make_inputs(batch=2, text_width=9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, :6] = 0
    inputs["encoder_hidden_states_mask"] = mask
    return inputs


@pytest.mark.parametrize("which", [0, 1])  # ours, diffusers' class
def test_threads_interleaving_legacy_and_plain_calls_each_get_their_own_numbers(left_padded, which):
    model = make_pair()[which]
    expected_plain = run(model, left_padded)
    with torch.no_grad():
        expected_legacy = legacy_forward(model, mode="kernel", **left_padded, return_dict=False)[0]
    assert not torch.equal(expected_plain, expected_legacy)  # the two flavours are told apart

    in_legacy = threading.Barrier(2)
    failures = []

    def legacy_thread():
        with legacy_text_rope(model, legacy_txt_seq_len(left_padded["encoder_hidden_states_mask"]), "kernel"):
            for step in range(6):
                in_legacy.wait()  # the plain thread runs while this one is inside the context
                with torch.no_grad():
                    got = model(**left_padded, return_dict=False)[0]
                if not torch.equal(got, expected_legacy):
                    failures.append(f"legacy call {step}")

    def plain_thread():
        for step in range(6):
            in_legacy.wait()
            if not torch.equal(run(model, left_padded), expected_plain):
                failures.append(f"plain call {step}")

    threads = [threading.Thread(target=legacy_thread), threading.Thread(target=plain_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert not model.pos_embed._forward_hooks and "forward" not in vars(model.pos_embed)
    assert torch.equal(run(model, left_padded), expected_plain)


def test_nested_contexts_restore_the_outer_length(left_padded):
    model = make_pair()[0]
    with legacy_text_rope(model, 3, "kernel"):
        outer = run(model, left_padded)
        with legacy_text_rope(model, 9, "kernel"):
            assert torch.equal(run(model, left_padded), run(make_pair()[0], left_padded))  # full length = ours
        assert torch.equal(run(model, left_padded), outer)
    assert not model.pos_embed._forward_hooks


# ----------------------------------------------------------------------------- on check's inputs


def test_legacy_txt_seq_len_is_max_valid_count():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    assert legacy_txt_seq_len(mask) == 4
    assert legacy_txt_seq_len(mask.bool()) == 4


def test_legacy_rejects_missing_mask_and_unknown_mode():
    with pytest.raises(ValueError, match="encoder_hidden_states_mask"):
        legacy_txt_seq_len(None)
    with pytest.raises(ValueError, match="mode must be one of"):
        legacy_txt_freqs(torch.ones(4, 2, dtype=torch.complex64), 2, "fused")


def test_legacy_txt_freqs_native_truncates_kernel_pads_with_identity():
    table = torch.polar(torch.ones(6, 3), torch.rand(6, 3))
    assert torch.equal(legacy_txt_freqs(table, 2, "native"), table[:2])
    padded = legacy_txt_freqs(table, 2, "kernel")
    assert padded.shape == table.shape
    assert torch.equal(padded[:2], table[:2])
    assert torch.equal(padded[2:], torch.ones(4, 3, dtype=table.dtype))


@pytest.mark.parametrize(
    ("cls", "errors"),
    # diffusers' eager rotary multiply fails to broadcast, as vllm-omni's native path did; ours
    # checks the table's shape before its kernel runs and raises a ValueError instead.
    [(DiffusersTransformer, RuntimeError), (QwenImageTransformer2DModel, (RuntimeError, ValueError))],
    ids=["diffusers", "ours"],
)
def test_legacy_native_raises_on_padded_prompt(source, inputs, cls, errors):
    model = source.load(cls, torch.float32).eval()
    for layout in ("right", "left"):
        with pytest.raises(errors):
            run_check_forward(model, kwargs_for(inputs, layout), mode="native")


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=["diffusers", "ours"])
def test_legacy_kernel_runs_and_differs_from_diffusers_on_padded_prompt(source, inputs, cls):
    model = source.load(cls, torch.float32).eval()
    reference = source.load(DiffusersTransformer, torch.float32).eval()
    # Left padding puts valid tokens past max(mask.sum()): the legacy table leaves them unrotated.
    kwargs = kwargs_for(inputs, "left")
    legacy = run_check_forward(model, kwargs, mode="kernel")
    assert torch.isfinite(legacy).all()
    assert (legacy - run_check_forward(reference, kwargs)).abs().max() > 1e-3
    # Right padding: positions past the table are all masked out of attention, image outputs match.
    kwargs = kwargs_for(inputs, "right")
    torch.testing.assert_close(run_check_forward(model, kwargs, mode="kernel"), run_check_forward(reference, kwargs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["native", "kernel"])
@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=["diffusers", "ours"])
def test_legacy_without_padding_equals_diffusers(source, inputs, cls, mode):
    model = source.load(cls, torch.float32).eval()
    reference = source.load(DiffusersTransformer, torch.float32).eval()
    for prompt in ("pos", "neg"):
        kwargs = kwargs_for(inputs, "unpadded", prompt)
        torch.testing.assert_close(run_check_forward(model, kwargs, mode=mode), run_check_forward(reference, kwargs), rtol=0, atol=1e-6)


def test_legacy_text_rope_restores_pos_embed_after_error(source, inputs):
    model = source.load(DiffusersTransformer, torch.float32).eval()
    kwargs = kwargs_for(inputs, "right")
    with pytest.raises(RuntimeError), legacy_text_rope(model, 37, "native"):
        run_check_forward(model, kwargs)
    assert "forward" not in vars(model.pos_embed)
    assert torch.isfinite(run_check_forward(model, kwargs)).all()
