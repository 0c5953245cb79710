"""Qwen-Image's image geometry: pixels, the packed latent grid and the transformer's ``img_shapes``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import check_image_size, check_int

QWEN_IMAGE_VAE_SCALE_FACTOR = 8
"""Pixels per latent pixel of Qwen-Image's VAE; latents are then packed in 2x2 patches."""


def latent_grid(height: int, width: int, vae_scale_factor: int = QWEN_IMAGE_VAE_SCALE_FACTOR) -> tuple[int, int]:
    """The packed latent grid ``(rows, cols)`` of an image: ``pixels / vae_scale_factor / 2`` each.

    Raises:
        TypeError: an argument is not an int.
        ValueError: ``height`` or ``width`` is not a positive multiple of ``2 * vae_scale_factor``
            (diffusers would floor it, silently cropping the image).
    """
    height = check_image_size("`height`", height, vae_scale_factor)
    width = check_image_size("`width`", width, vae_scale_factor)
    return height // vae_scale_factor // 2, width // vae_scale_factor // 2


def build_img_shapes(
    height: int, width: int, batch_size: int, vae_scale_factor: int = QWEN_IMAGE_VAE_SCALE_FACTOR
) -> list[list[tuple[int, int, int]]]:
    """``img_shapes`` for the transformer: ``[[(1, rows, cols)]] * batch_size``, as diffusers' pipeline builds it."""
    return ImageGeometry(height, width, vae_scale_factor).img_shapes(batch_size)


@dataclass(frozen=True)
class ImageGeometry:
    """One image size, checked once: pixels, the packed latent grid and what trainer and rollout derive from it.

    Args:
        height: image height in pixels, a positive multiple of ``2 * vae_scale_factor``.
        width: image width in pixels (same rule).
        vae_scale_factor: pixels per latent pixel.

    ``rows`` and ``cols`` (the packed latent grid) are derived from the size.

    Raises:
        TypeError, ValueError: as :func:`latent_grid`.
    """

    height: int
    width: int
    vae_scale_factor: int = QWEN_IMAGE_VAE_SCALE_FACTOR
    rows: int = field(init=False)
    cols: int = field(init=False)

    def __post_init__(self) -> None:
        check_int("`vae_scale_factor`", self.vae_scale_factor, 1)
        rows, cols = latent_grid(self.height, self.width, self.vae_scale_factor)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "cols", cols)

    @property
    def image_seq_len(self) -> int:
        """Packed latent tokens of the image, ``rows * cols`` (what the dynamic timestep shift reads)."""
        return self.rows * self.cols

    def img_shapes(self, batch_size: int) -> list[list[tuple[int, int, int]]]:
        """The transformer's ``img_shapes`` for ``batch_size`` images of this size."""
        return [[(1, self.rows, self.cols)]] * check_int("`batch_size`", batch_size, 1)

    def micro_batch(self) -> dict[str, int]:
        """The image entries of a trainer's micro-batch: ``height``, ``width``, ``vae_scale_factor``."""
        return {"height": self.height, "width": self.width, "vae_scale_factor": self.vae_scale_factor}
