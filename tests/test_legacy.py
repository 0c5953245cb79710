"""The legacy txt_seq_lens emulation is scoped to the calling thread and leaves the model as it was."""

import threading

import pytest
import torch

from qwen_image_omni.legacy import legacy_forward, legacy_text_rope, legacy_txt_seq_len

from .tiny import make_pair, make_inputs, run


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
