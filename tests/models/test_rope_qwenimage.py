"""qwen_image_omni.models.rope_qwenimage against diffusers' RoPE modules: same bits, no 4096-row cap, cached per device."""

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope, QwenEmbedRope as DiffusersRope

from qwen_image_omni.models.rope_qwenimage import (
    QwenEmbedRope,
    normalize_img_shapes,
    pack_per_sample,
    unpack_per_sample,
)

AXES = [16, 56, 56]
CPU = torch.device("cpu")


@pytest.mark.parametrize("layer3d, reference_class", [(False, DiffusersRope), (True, QwenEmbedLayer3DRope)])
@pytest.mark.parametrize(
    "img_shapes, text_width",
    [
        ([[(1, 32, 32)]], 77),
        ([[(1, 17, 9), (1, 8, 8), (1, 5, 7)]], 300),
        ([(1, 64, 64)], 1),
        ([[(1, 3, 5)]] * 2, 4000),
        ((1, 6, 4), 12),
    ],
)
def test_bit_identical_to_diffusers(layer3d, reference_class, img_shapes, text_width):
    reference = reference_class(10000, AXES, scale_rope=True)
    ours = QwenEmbedRope(10000, AXES, scale_rope=True, layer3d=layer3d)
    expected = reference(img_shapes, max_txt_seq_len=text_width, device=CPU)
    got = ours(img_shapes, max_txt_seq_len=text_width, device=CPU)
    for e, g in zip(expected, got):
        assert g.dtype == torch.complex64 and g.shape == e.shape
        assert torch.equal(g, e)


def test_text_table_extends_past_4096_rows_and_keeps_diffusers_rows():
    reference = DiffusersRope(10000, AXES, scale_rope=True)
    ours = QwenEmbedRope(10000, AXES, scale_rope=True)
    img, txt = ours([(1, 64, 64)], max_txt_seq_len=9000, device=CPU)
    assert txt.shape == (9000, 64)
    start = 32  # max_vid_index of a 64x64 grid with scale_rope
    assert torch.equal(txt[: 4096 - start], reference.pos_freqs[start:])
    _, txt_ref = reference([(1, 64, 64)], max_txt_seq_len=9000, device=CPU)
    assert txt_ref.shape[0] == 4096 - start  # diffusers' fixed table silently comes back short


def test_tables_are_cached_per_device():
    ours = QwenEmbedRope(10000, AXES, scale_rope=True)
    first = ours([(1, 8, 8)], max_txt_seq_len=10, device=CPU)
    second = ours([(1, 8, 8)], max_txt_seq_len=20, device=CPU)
    assert first[0] is second[0]
    assert first[1].untyped_storage().data_ptr() == second[1].untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "img_shapes, expected",
    [
        ((1, 2, 3), [[(1, 2, 3)]]),  # one image, every sample
        ([(1, 2, 3), (1, 4, 4)], [[(1, 2, 3)], [(1, 4, 4)]]),  # flat: one image per sample (ControlNet's form)
        ([[(1, 2, 3)], [(1, 2, 3)]], [[(1, 2, 3)], [(1, 2, 3)]]),  # nested: per sample
        ([[(1, 2, 3), (1, 4, 4)]], [[(1, 2, 3), (1, 4, 4)]]),  # one sample, two images (Edit)
        ([[[1, 2, 3]], (1, 2, 3)], [[(1, 2, 3)], [(1, 2, 3)]]),  # lists for tuples, mixed forms
    ],
)
def test_normalize_img_shapes_reads_diffusers_forms(img_shapes, expected):
    assert normalize_img_shapes(img_shapes) == expected


@pytest.mark.parametrize(
    "img_shapes, message",
    [
        (None, r"img_shapes.*None"),
        ([[(1, 2)]], r"img_shapes` entries"),
        ([], r"non-empty"),
        ([(1, -4, -6)], r"positive.*\(1, -4, -6\)"),
        ([[(1, 4, 4), (0, 2, 2)]], r"positive.*\(0, 2, 2\)"),
        ([(1, True, 3)], r"img_shapes` entries"),
    ],
)
def test_normalize_img_shapes_errors(img_shapes, message):
    with pytest.raises(ValueError, match=message):
        normalize_img_shapes(img_shapes)


@pytest.mark.parametrize("img_shapes", [[(1, 4, 6)] * 3, [[(1, 4, 6)]], (1, 4, 6), [[(1, 4, 6)]] * 5])
def test_flat_nested_short_and_long_lists_give_diffusers_tables(img_shapes):
    """diffusers reads img_shapes[0] for the whole batch, whatever the list's length and form."""
    reference = DiffusersRope(10000, AXES, scale_rope=True)
    ours = QwenEmbedRope(10000, AXES, scale_rope=True)
    for e, g in zip(
        reference(img_shapes, max_txt_seq_len=9, device=CPU), ours(img_shapes, max_txt_seq_len=9, device=CPU)
    ):
        assert torch.equal(g, e)


@pytest.mark.parametrize("layer3d", [False, True])
def test_compiled_tables_equal_cached_tables(layer3d):
    """Under torch.compile the tables are computed in the graph; they are the cached tables' bits."""
    ours = QwenEmbedRope(10000, AXES, scale_rope=True, layer3d=layer3d)
    shapes = [[(1, 6, 4), (1, 3, 5), (1, 6, 4)]]
    expected = ours(shapes, max_txt_seq_len=21, device=CPU)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    got = compiled(shapes, max_txt_seq_len=21, device=CPU)
    for e, g in zip(expected, got):
        assert torch.equal(g, e)


# --------------------------------------------------------------------------- samples with different shapes

MIXED = [
    [(1, 6, 4)],
    [(1, 4, 6)],
    [(1, 2, 12)],  # another max_vid_index: text positions start elsewhere
    [(1, 6, 4)],
]
MIXED_EDIT = [
    [(1, 4, 4), (1, 2, 6), (1, 4, 4)],
    [(1, 4, 4), (1, 6, 2), (1, 4, 4)],
    [(1, 2, 8), (1, 4, 4), (1, 3, 4)],
]


@pytest.mark.parametrize("layer3d, reference_class", [(False, DiffusersRope), (True, QwenEmbedLayer3DRope)])
@pytest.mark.parametrize("img_shapes", [MIXED, MIXED_EDIT])
def test_per_sample_tables_are_each_samples_own_diffusers_tables(layer3d, reference_class, img_shapes):
    reference = reference_class(10000, AXES, scale_rope=True)
    ours = QwenEmbedRope(10000, AXES, scale_rope=True, layer3d=layer3d)
    img, txt = ours.per_sample_freqs(img_shapes, max_txt_seq_len=37, device=CPU)
    assert img.shape == (len(img_shapes), img.shape[1], 64) and txt.shape == (len(img_shapes), 37, 64)
    for i, shapes in enumerate(img_shapes):
        expected_img, expected_txt = reference([shapes], max_txt_seq_len=37, device=CPU)
        assert torch.equal(img[i], expected_img) and torch.equal(txt[i], expected_txt)


def test_forward_keeps_diffusers_reading_of_samples_that_differ(caplog):
    """diffusers' callers get sample 0's tables for the whole batch, with a warning, as from diffusers' class."""
    reference = DiffusersRope(10000, AXES, scale_rope=True)
    ours = QwenEmbedRope(10000, AXES, scale_rope=True)
    with caplog.at_level("WARNING", logger="qwen_image_omni.models.rope_qwenimage"):
        got = ours(MIXED, max_txt_seq_len=9, device=CPU)
    assert "first sample's shapes" in caplog.text and "per_sample_freqs" in caplog.text
    for e, g in zip(reference(MIXED, max_txt_seq_len=9, device=CPU), got):
        assert torch.equal(g, e)


def test_forward_per_sample_is_sequence_major_and_splits_along_rows():
    """``per_sample=True`` packs ``[B, S, D/2]`` as ``[S, B * D/2]``: its rows unpack to those tokens of each sample."""
    ours = QwenEmbedRope(10000, AXES, scale_rope=True)
    img, txt = ours.per_sample_freqs(MIXED, max_txt_seq_len=10, device=CPU)
    packed_img, packed_txt = ours(MIXED, max_txt_seq_len=10, device=CPU, per_sample=True)
    assert packed_img.shape == (24, 4 * 64) and packed_txt.shape == (10, 4 * 64)
    assert torch.equal(unpack_per_sample(packed_img, 4), img) and torch.equal(unpack_per_sample(packed_txt, 4), txt)
    for rows in (slice(0, 12), slice(12, 24), slice(5, 18)):  # a context-parallel rank's share
        part = unpack_per_sample(packed_img[rows], 4)
        assert part.is_contiguous() and torch.equal(part, img[:, rows])
    assert torch.equal(pack_per_sample(img), packed_img)


@pytest.mark.parametrize(
    "img_shapes, message",
    [
        ([[(1, 4, 6)], [(1, 4, 5)]], r"one image token count.*\[24, 20\]"),
        ([[(1, 4, 4), (1, 2, 2)], [(1, 4, 4)]], r"one image token count.*\[20, 16\]"),
    ],
)
def test_per_sample_tables_need_one_token_count(img_shapes, message):
    with pytest.raises(ValueError, match=message):
        QwenEmbedRope(10000, AXES, scale_rope=True).per_sample_freqs(img_shapes, max_txt_seq_len=4, device=CPU)


@pytest.mark.parametrize("layer3d", [False, True])
def test_compiled_per_sample_tables_equal_eager_tables(layer3d):
    ours = QwenEmbedRope(10000, AXES, scale_rope=True, layer3d=layer3d)
    expected = ours(MIXED_EDIT, max_txt_seq_len=21, device=CPU, per_sample=True)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    got = compiled(MIXED_EDIT, max_txt_seq_len=21, device=CPU, per_sample=True)
    for e, g in zip(expected, got):
        assert torch.equal(g, e)
