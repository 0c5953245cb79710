"""qwen_image_omni.rope against diffusers' RoPE modules: same bits, no 4096-row cap, cached per device."""

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope, QwenEmbedRope as DiffusersRope

from qwen_image_omni.rope import QwenEmbedRope, normalize_img_shapes

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


def test_normalize_img_shapes_forms_and_errors():
    assert normalize_img_shapes((1, 2, 3)) == [[(1, 2, 3)]]
    assert normalize_img_shapes([(1, 2, 3), (1, 4, 4)]) == [[(1, 2, 3), (1, 4, 4)]]
    assert normalize_img_shapes([[(1, 2, 3)], [(1, 2, 3)]]) == [[(1, 2, 3)], [(1, 2, 3)]]
    with pytest.raises(ValueError, match="img_shapes.*None"):
        normalize_img_shapes(None)
    with pytest.raises(ValueError, match="img_shapes"):
        normalize_img_shapes([[(1, 2)]])
