"""One rank of the 2-process CPU/gloo checks of batches whose samples have different image shapes under
diffusers' context parallelism (``tests/models/test_parallel_mixed_grids.py``).

The set-up is ``tests/support/parallel_worker.py``'s (gloo over a file, CPU counted as one device, a CPU
log-sum-exp op for ring attention, ``tensor_split`` gathers for uneven splits); only the scenarios and the
inputs differ. Run as ``python -m tests.support.mixed_grid_parallel_worker OUT_DIR`` by :func:`launch`; each rank
saves ``{scenario: result}`` to ``OUT_DIR/rank{RANK}.pt`` as the base worker does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

from tests.support import parallel_worker as base
from tests.support.tiny import make_inputs, make_pair

WORLD_SIZE = base.WORLD_SIZE
TEXT_WIDTH = base.TEXT_WIDTH
# Transposed-ish grids of 24 tokens (12 + 12 per rank) whose text positions start at 3 and at 6.
MIXED_IMG_SHAPES = [[(1, 6, 4)], [(1, 2, 12)]]
# Edit-Plus: targets of 16 and 8 tokens, so the rows' modulation indices differ too.
MIXED_EDIT_PLUS_IMG_SHAPES = [[(1, 4, 4), (1, 2, 4)], [(1, 2, 4), (1, 4, 4)]]
# 25 tokens (13 + 12) and a 7-wide text (4 + 3): Ulysses-anything's uneven split.
UNEVEN_IMG_SHAPES = [[(1, 5, 5)], [(1, 1, 25)]]
UNEVEN_TEXT_WIDTH = 7
EDIT_PLUS_CONFIG = {"zero_cond_t": True}


def mixed_inputs(img_shapes=MIXED_IMG_SHAPES, text_width: int = TEXT_WIDTH, masked: bool = True) -> dict:
    """Batch-2 inputs whose samples have ``img_shapes``, with the base worker's masked, padded prompts (or no mask)."""
    inputs = {**make_inputs(batch=2, img_shapes=img_shapes[0], text_width=text_width), "img_shapes": img_shapes}
    if not masked:
        return inputs
    mask = torch.zeros(2, text_width, dtype=torch.bool)
    width = min(text_width, base.TEXT_MASK.shape[1])
    mask[:, :width] = base.TEXT_MASK[:, :width]
    return {**inputs, "encoder_hidden_states_mask": mask}


def _ours(**config):
    return make_pair(**config)[0]


def ulysses_mixed():
    """The output, and the shapes of the RoPE tables block 0 got (this rank's share of each sample's tables)."""
    model = base.enable_cp(_ours(), ulysses_degree=WORLD_SIZE)
    tables = {}

    def record(module, args, kwargs):
        tables.update(zip(("img_freqs_shape", "txt_freqs_shape"), kwargs["image_rotary_emb"]))

    handle = model.transformer_blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        output = base._forward(model, mixed_inputs())
    finally:
        handle.remove()
    return {"ours": output, **{name: torch.tensor(table.shape) for name, table in tables.items()}}


def _ring(masked: bool) -> dict:
    with base.native_attention_with_lse():
        return {"ours": base._forward(base.enable_cp(_ours(), ring_degree=WORLD_SIZE), mixed_inputs(masked=masked))}


def ring_mixed():
    return _ring(masked=True)


def ring_mixed_unmasked():
    return _ring(masked=False)


def ulysses_edit_plus_mixed():
    model = base.enable_cp(_ours(**EDIT_PLUS_CONFIG), ulysses_degree=WORLD_SIZE)
    return {"ours": base._forward(model, mixed_inputs(MIXED_EDIT_PLUS_IMG_SHAPES))}


def ulysses_anything_uneven_mixed():
    """Uneven splits of the tokens and of the per-sample tables; the output gathered here (gloo needs equal sizes)."""
    ours = _ours()
    plan = {name: spec for name, spec in ours._cp_plan.items() if name != "proj_out"}
    with base.cpu_counts_as_one_device():
        ours.enable_parallelism(
            config=ContextParallelConfig(ulysses_degree=WORLD_SIZE, ulysses_anything=True), cp_plan=plan
        )
    inputs = mixed_inputs(UNEVEN_IMG_SHAPES, UNEVEN_TEXT_WIDTH)
    local = base._forward(ours, inputs)
    return {"ours": base._gather_uneven(local, total=inputs["hidden_states"].shape[1])}


def _training(**config) -> dict:
    """Loss and gradients of one CP forward/backward of the Edit-Plus model; grads summed over the ranks."""
    model = base.enable_cp(_ours(**EDIT_PLUS_CONFIG).train(), **config)
    inputs = mixed_inputs(MIXED_EDIT_PLUS_IMG_SHAPES)
    loss = base.training_loss(model, inputs, base.loss_target(inputs))
    loss.backward()
    grads = base.full_grads(model)
    for grad in grads.values():
        dist.all_reduce(grad)
    return {"loss": loss.detach(), **{f"grad.{k}": v for k, v in grads.items()}}


def ulysses_training_mixed():
    return _training(ulysses_degree=WORLD_SIZE)


def ring_training_mixed():
    return _training(ring_degree=WORLD_SIZE)


SCENARIOS = {
    "ulysses_mixed": ulysses_mixed,
    "ring_mixed": ring_mixed,
    "ring_mixed_unmasked": ring_mixed_unmasked,
    "ulysses_edit_plus_mixed": ulysses_edit_plus_mixed,
    "ulysses_anything_uneven_mixed": ulysses_anything_uneven_mixed,
    "ulysses_training_mixed": ulysses_training_mixed,
    "ring_training_mixed": ring_training_mixed,
}


def launch(out_dir: Path, timeout_s: float) -> list[dict]:
    """Run these scenarios on ``WORLD_SIZE`` CPU processes (the base worker's launcher); each rank's results."""
    return base.launch(out_dir, timeout_s, module=__name__)


if __name__ == "__main__":
    # The base worker's process set-up and scenario loop, over these scenarios.
    base.SCENARIOS.clear()
    base.SCENARIOS.update(SCENARIOS)
    base.main(sys.argv[1])
