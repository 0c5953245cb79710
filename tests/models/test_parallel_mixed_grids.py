"""Batches whose samples have different image shapes under diffusers' context parallelism, on 2 CPU processes.

The per-sample RoPE tables leave ``pos_embed`` sequence-major (``[S, B * D/2]``), so the ``_cp_plan``'s
dim-0 split of its outputs cuts each sample's table with the tokens; Edit-Plus' per-sample
``modulate_index`` ``(B, S)`` is split along dim 1 as before. One 2-rank run
(``tests/models/mixed_grid_parallel_worker.py``) executes every scenario; each test compares one scenario's
per-rank results with the single-process run here (itself equal to each sample alone:
``tests/models/test_mixed_grid_batches.py``), in fp32. How ring attention and uneven splits run on
CPU/gloo is explained in ``tests/models/test_parallel.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.support.mixed_grid_parallel_worker import (
    EDIT_PLUS_CONFIG,
    MIXED_EDIT_PLUS_IMG_SHAPES,
    UNEVEN_IMG_SHAPES,
    UNEVEN_TEXT_WIDTH,
    WORLD_SIZE,
    launch,
    mixed_inputs,
)
from tests.support.parallel_worker import FORWARD_TOL, GRAD_TOL, LAUNCH_TIMEOUT_S, loss_target, training_loss
from tests.support.tiny import make_pair, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]



@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every scenario's results on each rank, from one bounded 2-process run."""
    return launch(tmp_path_factory.mktemp("parallel-mixed"), LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def single() -> dict:
    """Single-process outputs, and the Edit-Plus model's loss and gradients, on the workers' inputs."""
    ours, _ = make_pair()
    edit_plus, _ = make_pair(**EDIT_PLUS_CONFIG)
    inputs = mixed_inputs(MIXED_EDIT_PLUS_IMG_SHAPES)
    loss = training_loss(edit_plus.train(), inputs, loss_target(inputs))
    loss.backward()
    return {
        "masked": run(ours, mixed_inputs()),
        "unmasked": run(ours, mixed_inputs(masked=False)),
        "uneven": run(ours, mixed_inputs(UNEVEN_IMG_SHAPES, UNEVEN_TEXT_WIDTH)),
        "edit_plus": run(edit_plus.eval(), inputs),
        "loss": loss.detach(),
        "grads": {name: p.grad for name, p in edit_plus.named_parameters() if p.grad is not None},
    }


def result(ranks: list[dict], scenario: str, rank: int) -> dict:
    """One rank's result of ``scenario``; fails the test with the worker's traceback if it raised."""
    value = ranks[rank][scenario]
    if "error" in value:
        pytest.fail(f"{scenario} raised on rank {rank}: {value['error']}\n{value['traceback']}")
    return value


@pytest.mark.parametrize(
    "scenario, expected",
    [
        ("ulysses_mixed", "masked"),
        ("ring_mixed", "masked"),
        ("ring_mixed_unmasked", "unmasked"),
        ("ulysses_edit_plus_mixed", "edit_plus"),
        ("ulysses_anything_uneven_mixed", "uneven"),
    ],
)
def test_context_parallel_forward_gives_the_single_process_output(ranks, single, scenario, expected):
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(result(ranks, scenario, rank)["ours"], single[expected], **FORWARD_TOL)


def test_each_rank_gets_its_share_of_every_samples_tables(ranks):
    """24 image tokens and 8 text positions over 2 ranks: [B=2, 12, D/2] and [2, 4, D/2] per rank."""
    for rank in range(WORLD_SIZE):
        value = result(ranks, "ulysses_mixed", rank)
        assert value["img_freqs_shape"].tolist() == [2, 12, 16] and value["txt_freqs_shape"].tolist() == [2, 4, 16]


@pytest.mark.parametrize("scenario", ["ulysses_training_mixed", "ring_training_mixed"])
def test_context_parallel_training_step_gives_the_single_process_loss_and_grads(ranks, single, scenario):
    for rank in range(WORLD_SIZE):
        value = result(ranks, scenario, rank)
        torch.testing.assert_close(value["loss"], single["loss"], **GRAD_TOL)
        grads = {name[len("grad.") :]: g for name, g in value.items() if name.startswith("grad.")}
        assert sorted(grads) == sorted(single["grads"])
        for name, grad in single["grads"].items():
            torch.testing.assert_close(grads[name], grad, **GRAD_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")
