"""Batches whose samples have different image shapes (same token count): each sample gets what it gets alone.

diffusers gives every sample sample 0's RoPE positions (and Edit-Plus modulation index); ours builds
per-sample tables. Each sample of such a batch must equal that sample run as a batch of one, to 1e-6
relative to the output's scale in fp32 (forward, and the latents' gradient in training mode); run
alone, each sample is diffusers' class on that sample. A batch whose samples share their shapes keeps
diffusers' numbers bit for bit (shared tables).
"""

import pytest
import torch

from tests.support.tiny import make_inputs, make_pair, run

# Per case: model config, per-sample img_shapes (one token count), valid text lengths (None: no mask).
CASES = {
    # transposed grids; the third starts its text positions elsewhere (max_vid_index 6, not 3)
    "plain": ({}, [[(1, 4, 6)], [(1, 6, 4)], [(1, 2, 12)]], [9, 4, 7]),
    "plain_2x4_4x2": ({}, [[(1, 2, 4)], [(1, 4, 2)]], [9, 9]),
    "plain_some_alike": ({}, [[(1, 4, 6)], [(1, 6, 4)], [(1, 4, 6)]], None),
    # Edit: one target, condition images of different grids
    "edit": ({}, [[(1, 4, 4), (1, 2, 6)], [(1, 4, 4), (1, 6, 2)], [(1, 4, 4), (1, 3, 4)]], [9, 2, 6]),
    # Edit-Plus 2511: the first entry's token count differs, so does the modulation index
    "edit_plus": (
        {"zero_cond_t": True},
        [[(1, 4, 4), (1, 2, 4)], [(1, 2, 4), (1, 4, 4)], [(1, 4, 6)]],
        [9, 5, 1],
    ),
    "edit_plus_same_target": ({"zero_cond_t": True}, [[(1, 4, 4), (1, 2, 6)], [(1, 4, 4), (1, 6, 2)]], [3, 9]),
    "layered": (
        {"use_layer3d_rope": True, "use_additional_t_cond": True},
        [[(1, 4, 4), (1, 4, 4), (1, 4, 4)], [(1, 2, 8), (1, 2, 8), (1, 2, 8)]],
        [9, 6],
    ),
}
TEXT_WIDTH = 9
REL = 1e-6


@pytest.fixture(scope="module")
def pairs():
    """One (ours, diffusers') pair per model config, built once."""
    cache = {}

    def get(config: dict):
        key = tuple(sorted(config.items()))
        if key not in cache:
            cache[key] = make_pair(seed=len(cache) + 20, **config)
        return cache[key]

    return get


def case_inputs(name: str, seed: int = 1) -> tuple[dict, dict]:
    """``(config, inputs)`` of a case: masks with right padding and holes, per-sample ``img_shapes``."""
    config, img_shapes, valid = CASES[name]
    batch = len(img_shapes)
    inputs = make_inputs(batch=batch, img_shapes=img_shapes[0], text_width=TEXT_WIDTH, valid=valid, seed=seed)
    inputs["img_shapes"] = img_shapes
    if valid is not None:
        inputs["encoder_hidden_states_mask"][0, [1, 5]] = 0  # holes in a right-padded row
    if config.get("use_additional_t_cond"):
        inputs["additional_t_cond"] = torch.arange(batch) % 2
    return config, inputs


def sample_alone(inputs: dict, index: int) -> dict:
    """Sample ``index`` as a batch of one."""
    alone = {}
    for name, value in inputs.items():
        if name == "img_shapes":
            alone[name] = [value[index]]
        elif isinstance(value, torch.Tensor):
            alone[name] = value[index : index + 1]
        else:
            alone[name] = value
    return alone


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> None:
    """Equal to ``rel`` relative to ``expected``'s scale (its largest magnitude)."""
    torch.testing.assert_close(got, expected, rtol=rel, atol=rel * expected.abs().max().item())


@pytest.mark.parametrize("name", list(CASES))
def test_each_sample_equals_itself_alone(pairs, name):
    config, inputs = case_inputs(name)
    ours, reference = pairs(config)
    batch_output = run(ours, inputs)
    for index in range(len(inputs["img_shapes"])):
        alone = sample_alone(inputs, index)
        expected = run(ours, alone)
        assert_close_relative(batch_output[index : index + 1], expected)
        # alone, a sample is diffusers' class on that sample (bit for bit on the CPU)
        assert torch.equal(expected, run(reference, alone))


def test_diffusers_gives_every_sample_sample_0s_positions(pairs):
    """What the per-sample tables fix: diffusers' batch output of sample 1 is not sample 1 alone."""
    config, inputs = case_inputs("plain_2x4_4x2")
    ours, reference = pairs(config)
    alone = run(reference, sample_alone(inputs, 1))
    assert (run(reference, inputs)[1:] - alone).abs().max() > 1e-3
    assert_close_relative(run(ours, inputs)[1:], alone)


@pytest.mark.parametrize("name", ["plain", "edit_plus", "layered"])
def test_latent_gradients_of_each_sample_equal_its_gradients_alone(pairs, name):
    """Training mode: the loss is a sum over samples, so each sample's latent gradient is its gradient alone;
    the weight gradients are the sum of the samples' gradients alone."""
    config, inputs = case_inputs(name, seed=3)
    ours, _ = pairs(config)
    ours.train()
    batch = len(inputs["img_shapes"])
    channels = ours.config.patch_size**2 * ours.out_channels
    weights = torch.randn(batch, inputs["hidden_states"].shape[1], channels, generator=torch.Generator().manual_seed(5))

    def gradients(call_inputs: dict, rows: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents = call_inputs["hidden_states"].clone().requires_grad_(True)
        ours.zero_grad()
        output = ours(**{**call_inputs, "hidden_states": latents}).sample
        (output * weights[rows]).sum().backward()
        return latents.grad, {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    try:
        batch_grad, batch_weight_grads = gradients(inputs, slice(None))
        alone = [gradients(sample_alone(inputs, i), slice(i, i + 1)) for i in range(batch)]
    finally:
        ours.eval()
    for index, (grad, _) in enumerate(alone):
        assert_close_relative(batch_grad[index : index + 1], grad)
    assert batch_weight_grads.keys() == alone[0][1].keys() and batch_weight_grads
    for name_, grad in batch_weight_grads.items():
        assert_close_relative(grad, sum(weight_grads[name_] for _, weight_grads in alone), rel=1e-5)


def _tables_seen_by_block_0(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}

    def hook(module, args, kwargs):
        seen["tables"] = kwargs["image_rotary_emb"]

    handle = model.transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run(model, inputs)
    finally:
        handle.remove()
    return seen["tables"]


@pytest.mark.parametrize(
    "img_shapes",
    [
        [[(1, 4, 6)]] * 3,
        [[(1, 4, 6)]],  # one entry for every row (diffusers' pipelines: one per prompt)
        [[(1, 4, 6)]] * 5,  # longer than the batch
    ],
)
def test_samples_that_share_shapes_keep_shared_tables_and_diffusers_bits(pairs, img_shapes):
    ours, reference = pairs({})
    inputs = make_inputs(batch=3, img_shapes=((1, 4, 6),), text_width=TEXT_WIDTH, valid=[9, 4, 1])
    inputs["img_shapes"] = img_shapes
    img_freqs, txt_freqs = _tables_seen_by_block_0(ours, inputs)
    assert img_freqs.shape == (24, 16) and txt_freqs.shape == (TEXT_WIDTH, 16)
    assert torch.equal(run(ours, inputs), run(reference, inputs))


def test_samples_that_differ_get_per_sample_tables(pairs):
    config, inputs = case_inputs("plain")
    img_freqs, txt_freqs = _tables_seen_by_block_0(pairs(config)[0], inputs)
    assert img_freqs.shape == (3, 24, 16) and txt_freqs.shape == (3, TEXT_WIDTH, 16)
    assert img_freqs.is_contiguous() and txt_freqs.is_contiguous()


@pytest.mark.parametrize(
    "img_shapes, message",
    [
        # a token count that is not hidden_states'
        ([[(1, 4, 6)], [(1, 4, 5)]], r"img_shapes` sample 1 \[\(1, 4, 5\)\] covers 20 image tokens.*24 per sample"),
        ([[(1, 4, 4), (1, 2, 4)], [(1, 4, 4)]], r"img_shapes` sample 1 \[\(1, 4, 4\)\] covers 16 image tokens"),
        # samples that differ need one entry per row
        ([[(1, 4, 6)], [(1, 6, 4)], [(1, 4, 6)]], r"img_shapes` lists 3 samples whose shapes differ.*batch 2"),
        ([[(1, 4, 6)]] * 2 + [[(1, 6, 4)]], r"img_shapes` lists 3 samples whose shapes differ.*batch 2"),
    ],
)
def test_samples_that_differ_are_checked(pairs, img_shapes, message):
    inputs = make_inputs(batch=2, img_shapes=((1, 4, 6),), text_width=TEXT_WIDTH)
    with pytest.raises(ValueError, match=message):
        run(pairs({})[0], {**inputs, "img_shapes": img_shapes})


def test_diffusers_processor_with_samples_that_differ_is_refused():
    """diffusers' processor applies one table to every sample: per-sample tables need ours."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    ours, _ = make_pair(seed=6)
    ours.set_attn_processor(QwenDoubleStreamAttnProcessor2_0())
    _, inputs = case_inputs("plain_2x4_4x2")
    with pytest.raises(ValueError, match=r"img_shapes` differ.*transformer_blocks.0.*QwenDoubleStreamAttnProcessor2_0"):
        run(ours, inputs)
    run(ours, sample_alone(inputs, 1))  # one layout: diffusers' processor is fine


def test_triton_backend_takes_per_sample_tables(pairs, monkeypatch):
    """Forcing the Triton kernels (interpreted on the CPU) gives the torch backend's numbers."""
    from qwen_image_omni.kernels import BACKEND_ENV_VAR

    config, inputs = case_inputs("edit_plus")
    ours, _ = pairs(config)
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    expected = run(ours, inputs)
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    torch.testing.assert_close(run(ours, inputs), expected, rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_with_per_sample_tables(pairs):
    config, inputs = case_inputs("edit", seed=4)
    ours, _ = pairs(config)

    def weight_grads() -> dict[str, torch.Tensor]:
        ours.zero_grad()
        ours(**inputs).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    ours.train()
    try:
        plain = weight_grads()
        ours.enable_gradient_checkpointing()
        checkpointed = weight_grads()
    finally:
        ours.disable_gradient_checkpointing()
        ours.eval()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
