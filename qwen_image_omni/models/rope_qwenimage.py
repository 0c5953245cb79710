"""Rotary position tables for Qwen-Image: 2D/3D image positions and 1D text positions.

The tables are the same complex64 values diffusers' ``QwenEmbedRope`` / ``QwenEmbedLayer3DRope``
produce, bit for bit, but they have no fixed row cap: diffusers (and vllm-omni) slice a
precomputed 4096-row table, so a text width + ``max_vid_index`` above 4096 crashes there.
Every value here is ``exp(i * position * theta^(-2k/dim))`` computed elementwise on the CPU, so a
row does not depend on how long the table is and extending it keeps the rows diffusers has.

Tables are computed once on the CPU (as diffusers does, so CUDA and CPU runs see the same bits)
and cached per device: a forward pass makes no host-to-device copy once its shapes were seen.
Under ``torch.compile`` they are computed inside the graph on the target device instead, so
compiled calls never mutate the caches (no recompiles) and new shapes need no new table.

A batch whose samples have different image shapes (same token count: e.g. 32x64 and 64x32 grids,
or Edit condition images of different grids) gets one table per sample from
:meth:`QwenEmbedRope.per_sample_freqs`; ``forward`` keeps diffusers' reading (sample 0's tables for
the whole batch) unless asked for per-sample tables.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Image shapes are few per process (one per resolution / edit layout); bound the cache anyway.
_IMAGE_CACHE_SIZE = 128
_MIN_TEXT_ROWS = 4096


def rope_params(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Complex rotations ``exp(i * p * theta^(-2k/dim))`` for integer ``positions``.

    Args:
        positions: 1-D integer tensor of token positions (may be negative).
        dim: rotary dimension of this axis (even).
        theta: RoPE base.

    Returns:
        complex64 tensor of shape ``[len(positions), dim // 2]``, computed exactly as diffusers'
        ``QwenEmbedRope.rope_params``.
    """
    if dim % 2:
        raise ValueError(f"rotary axis dimension must be even, got dim={dim}")
    inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))
    angles = torch.outer(positions, inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def _is_dimension(value) -> bool:
    """An integer grid extent: a Python/NumPy int or a symbolic int under ``torch.compile`` (not a bool)."""
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def _is_fhw(entry) -> bool:
    return isinstance(entry, Sequence) and len(entry) == 3 and all(_is_dimension(v) for v in entry)


def _fhw(entry) -> tuple[int, int, int]:
    """One ``(frame, height, width)`` grid, checked positive."""
    shape = tuple(v if isinstance(v, torch.SymInt) else int(v) for v in entry)
    if any(v <= 0 for v in shape):
        raise ValueError(f"`img_shapes` entries must be positive (frame, height, width) grids, got {tuple(entry)}")
    return shape


def normalize_img_shapes(img_shapes) -> list[list[tuple[int, int, int]]]:
    """Per-sample image shapes, read the way diffusers' Qwen-Image RoPE reads ``img_shapes``.

    * ``(f, h, w)``: one image, for every sample.
    * ``[(f, h, w), ...]``: one image per sample (diffusers' ControlNet pipelines pass
      ``[(1, h, w)] * batch``), never one sample with several images.
    * ``[[(f, h, w), ...], ...]``: per sample, the list of its images (Edit: the target first, then
      the condition images; Layered: the layers, then the condition image).

    The list may be shorter or longer than the batch: diffusers' pipelines pass one entry per prompt
    while the latents hold ``prompts x num_images_per_prompt`` rows. Grids must be positive ints.
    """
    if img_shapes is None:
        raise ValueError(
            "`img_shapes` is required: a list of (frame, height, width) latent-grid shapes per sample, got None"
        )
    if _is_fhw(img_shapes):
        return [[_fhw(img_shapes)]]
    if not isinstance(img_shapes, Sequence) or isinstance(img_shapes, str) or len(img_shapes) == 0:
        raise ValueError(f"`img_shapes` must be a non-empty list of (frame, height, width) shapes, got {img_shapes!r}")
    samples = []
    for sample in img_shapes:
        if _is_fhw(sample):
            samples.append([_fhw(sample)])
        elif isinstance(sample, Sequence) and sample and all(_is_fhw(e) for e in sample):
            samples.append([_fhw(e) for e in sample])
        else:
            raise ValueError(
                f"`img_shapes` entries must be (frame, height, width) tuples of ints or lists of them, got {sample!r}"
            )
    return samples


class QwenEmbedRope(nn.Module):
    """Qwen-Image rotary embedding: image (frame, height, width) axes followed by 1-D text positions.

    One module covers both diffusers variants: ``layer3d=False`` is ``QwenEmbedRope`` (several
    images are stacked along the frame axis, as Edit does), ``layer3d=True`` is
    ``QwenEmbedLayer3DRope`` (Qwen-Image-Layered: the last entry is the condition image, placed at
    frame -1). Text positions start after the largest image extent (``max_vid_index``).

    Args:
        theta: RoPE base.
        axes_dim: rotary dimensions of the frame, height and width axes (sum = head dim).
        scale_rope: centre height/width positions on zero (``-(h - h//2) .. h//2 - 1``), as Qwen-Image does.
        layer3d: use the Layered variant's positions.
    """

    def __init__(self, theta: int, axes_dim: Sequence[int], scale_rope: bool = False, layer3d: bool = False):
        super().__init__()
        self.theta = theta
        self.axes_dim = list(axes_dim)
        self.scale_rope = scale_rope
        self.layer3d = layer3d
        # Not buffers: complex buffers lose their imaginary part on dtype casts, and these are derived data.
        self._text_tables: dict[torch.device, torch.Tensor] = {}
        self._image_freqs: dict[tuple, torch.Tensor] = {}

    def _axis_positions(self, extent: int, device: torch.device | None) -> torch.Tensor:
        if self.scale_rope:
            return torch.arange(-(extent - extent // 2), extent // 2, device=device)
        return torch.arange(extent, device=device)

    def _entry_freqs(
        self, index: int, frame: int, height: int, width: int, is_condition: bool, device: torch.device | None = None
    ) -> torch.Tensor:
        """Frequencies of one image entry, ``[frame*height*width, D/2]``, computed on ``device`` (CPU if None)."""
        if is_condition:
            if frame != 1:
                raise ValueError(f"the Layered condition image must have frame=1, got frame={frame}")
            frame_positions = torch.tensor([-1], device=device)
        else:
            frame_positions = torch.arange(index, index + frame, device=device)
        f_dim, h_dim, w_dim = self.axes_dim
        freqs_frame = rope_params(frame_positions, f_dim, self.theta)
        freqs_height = rope_params(self._axis_positions(height, device), h_dim, self.theta)
        freqs_width = rope_params(self._axis_positions(width, device), w_dim, self.theta)
        grid = (frame, height, width)
        freqs = torch.cat(
            [
                freqs_frame.view(frame, 1, 1, -1).expand(*grid, -1),
                freqs_height.view(1, height, 1, -1).expand(*grid, -1),
                freqs_width.view(1, 1, width, -1).expand(*grid, -1),
            ],
            dim=-1,
        )
        return freqs.reshape(frame * height * width, -1)

    def _compute_image_freqs(self, shapes: Sequence[tuple[int, int, int]], device: torch.device | None) -> torch.Tensor:
        last = len(shapes) - 1
        entries = [
            self._entry_freqs(i, f, h, w, is_condition=self.layer3d and i == last, device=device)
            for i, (f, h, w) in enumerate(shapes)
        ]
        return torch.cat(entries, dim=0)

    def _compute_text_freqs(self, start: int, length: int, device: torch.device | None) -> torch.Tensor:
        positions = torch.arange(start, start + length, device=device)
        return torch.cat([rope_params(positions, dim, self.theta) for dim in self.axes_dim], dim=1)

    def image_freqs(self, shapes: tuple[tuple[int, int, int], ...], device: torch.device) -> torch.Tensor:
        """Concatenated frequencies of all image entries of one sample, cached per (shapes, device).

        Under ``torch.compile`` the table is computed in the graph instead (on ``device``): a cache
        filled inside a compiled call would change what dynamo guards on and recompile every call.
        """
        if torch.compiler.is_compiling():
            return self._compute_image_freqs(shapes, device)
        key = (shapes, self.layer3d, device)
        freqs = self._image_freqs.get(key)
        if freqs is None:
            freqs = self._compute_image_freqs(shapes, None).to(device)
            if len(self._image_freqs) >= _IMAGE_CACHE_SIZE:
                self._image_freqs.clear()
            self._image_freqs[key] = freqs
        return freqs

    def text_freqs(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        """Frequencies of text positions ``start .. start + length - 1`` (all three axes), ``[length, D/2]``.

        A view into a per-device table that grows (doubling) when a longer span is asked for; under
        ``torch.compile`` the rows are computed in the graph (see :meth:`image_freqs`).
        """
        if torch.compiler.is_compiling():
            return self._compute_text_freqs(start, length, device)
        needed = start + length
        table = self._text_tables.get(device)
        if table is None or table.shape[0] < needed:
            rows = max(_MIN_TEXT_ROWS, 1 << max(needed - 1, 1).bit_length())
            table = self._compute_text_freqs(0, rows, None).to(device)
            self._text_tables[device] = table
        return table[start:needed]

    def max_vid_index(self, shapes: Sequence[tuple[int, int, int]]) -> int:
        """First text position: the largest (scaled) image extent, and for Layered at least the layer count."""
        extents = [max(h // 2, w // 2) if self.scale_rope else max(h, w) for _, h, w in shapes]
        index = max(extents)
        if self.layer3d:
            index = max(index, len(shapes) - 1)
        return index

    def forward(
        self,
        video_fhw,
        device: torch.device | None = None,
        max_txt_seq_len: int | torch.Tensor | None = None,
        *,
        per_sample: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(img_freqs [S_img, D/2], txt_freqs [max_txt_seq_len, D/2])``, complex64.

        Args:
            video_fhw: image shapes in any form ``normalize_img_shapes`` accepts. Like diffusers, the
                first sample's shapes are used for the whole batch (a warning is logged if they differ).
            device: device of the returned tables (CPU when None).
            max_txt_seq_len: text width, i.e. ``encoder_hidden_states.shape[1]``.
            per_sample: return one table per entry of ``video_fhw`` instead (:meth:`per_sample_freqs`),
                sequence-major: ``[S_img, B * D/2]`` and ``[max_txt_seq_len, B * D/2]``
                (:func:`pack_per_sample`; :func:`unpack_per_sample` gives ``[B, S, D/2]`` back). In this
                layout the context/sequence-parallel plans that split this module's 2-D outputs along
                dim 0 (diffusers' ``_cp_plan``, vllm-omni's ``_sp_plan``) cut every sample's table
                along its tokens, as they cut a shared table.
        """
        if per_sample:
            img_freqs, txt_freqs = self.per_sample_freqs(video_fhw, device, max_txt_seq_len)
            return pack_per_sample(img_freqs), pack_per_sample(txt_freqs)
        length = _text_length(max_txt_seq_len)
        samples = normalize_img_shapes(video_fhw)
        shapes = tuple(samples[0])
        if not torch.compiler.is_compiling() and any(tuple(s) != shapes for s in samples[1:]):
            logger.warning(
                "Batch inference with different image shapes per sample is not supported by "
                "QwenEmbedRope.forward; using the first sample's shapes %s for the whole batch (got %s). "
                "QwenEmbedRope.per_sample_freqs gives one table per sample.",
                shapes,
                samples,
            )
        device = _device(device)
        img_freqs = self.image_freqs(shapes, device)
        txt_freqs = self.text_freqs(self.max_vid_index(shapes), length, device)
        return img_freqs, txt_freqs

    def per_sample_freqs(
        self,
        video_fhw,
        device: torch.device | None = None,
        max_txt_seq_len: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One table per sample: ``(img_freqs [B, S_img, D/2], txt_freqs [B, max_txt_seq_len, D/2])``, complex64.

        Row ``i`` holds, bit for bit, the tables :meth:`forward` gives sample ``i`` alone: its own image
        positions, and text positions from its own ``max_vid_index``. ``B`` is the number of entries
        of ``video_fhw`` (``normalize_img_shapes``), one per sample of the batch.

        Args:
            video_fhw: per-sample image shapes, in any form ``normalize_img_shapes`` accepts.
            device: device of the returned tables (CPU when None).
            max_txt_seq_len: text width, i.e. ``encoder_hidden_states.shape[1]``.

        Raises:
            ValueError: the samples have different image token counts (their tables could not stack).
        """
        length = _text_length(max_txt_seq_len)
        samples = [tuple(sample) for sample in normalize_img_shapes(video_fhw)]
        tokens = [sum(f * h * w for f, h, w in shapes) for shapes in samples]
        if any(count != tokens[0] for count in tokens[1:]):
            raise ValueError(
                f"`img_shapes` samples must have one image token count to batch, got {tokens} tokens for "
                f"{[list(shapes) for shapes in samples]}"
            )
        device = _device(device)
        img_freqs = torch.stack([self.image_freqs(shapes, device) for shapes in samples])
        txt_freqs = torch.stack([self.text_freqs(self.max_vid_index(shapes), length, device) for shapes in samples])
        return img_freqs, txt_freqs


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _text_length(max_txt_seq_len: int | torch.Tensor | None) -> int:
    """The text width as an int; a symbolic width under ``torch.compile`` stays symbolic."""
    if max_txt_seq_len is None:
        raise ValueError("`max_txt_seq_len` must be provided (the text width, encoder_hidden_states.shape[1])")
    # int() of a symbolic width would specialise it under torch.compile; a tensor width is read once.
    return max_txt_seq_len if isinstance(max_txt_seq_len, (int, torch.SymInt)) else int(max_txt_seq_len)


def pack_per_sample(freqs: torch.Tensor) -> torch.Tensor:
    """Per-sample tables ``[B, S, D/2]`` as one sequence-major 2-D table ``[S, B * D/2]``.

    Row ``s`` holds position ``s`` of every sample, so cutting rows cuts every sample's table at the
    same tokens: what a parallel plan splitting a shared ``[S, D/2]`` table along dim 0 does.
    """
    return freqs.transpose(0, 1).flatten(1)


def unpack_per_sample(packed: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The per-sample tables ``[B, S, D/2]`` of a :func:`pack_per_sample` table ``[S, B * D/2]`` (or rows of it).

    Contiguous: a kernel that needs contiguous tables then copies nothing per call.
    """
    return packed.unflatten(1, (batch_size, -1)).transpose(0, 1).contiguous()
