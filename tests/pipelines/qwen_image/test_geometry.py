"""ImageGeometry: an image size checked once, and what trainer and rollout derive from it."""

from __future__ import annotations

import pytest

from qwen_image_omni.pipelines.qwen_image import ImageGeometry, build_img_shapes


def test_geometry_derives_the_grid_img_shapes_and_micro_batch():
    geometry = ImageGeometry(64, 96)
    assert (geometry.rows, geometry.cols, geometry.image_seq_len) == (4, 6, 24)
    assert geometry.img_shapes(3) == build_img_shapes(64, 96, 3) == [[(1, 4, 6)]] * 3
    assert geometry.micro_batch() == {"height": 64, "width": 96, "vae_scale_factor": 8}
    assert ImageGeometry(64, 64, vae_scale_factor=16).rows == 2


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [((60, 64), ValueError, "`height`"), ((64, 72.0), TypeError, "`width`"), ((64, 64, 0), ValueError, "vae_scale")],
)
def test_geometry_names_the_bad_size(arguments, error, match):
    with pytest.raises(error, match=match):
        ImageGeometry(*arguments)
