"""qwen_image_omni.models.rope_qwenimage against diffusers' RoPE modules: same bits, no 4096-row cap, cached per device."""

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope, QwenEmbedRope as DiffusersRope

from qwen_image_omni.models.rope_qwenimage import QwenEmbedRope, normalize_img_shapes

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
