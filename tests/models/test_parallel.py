"""Scale-out on 2 CPU processes (gloo): diffusers' context parallelism, FSDP2 and the tensor-parallel plan.

One 2-rank run (``tests/support/parallel_worker.py``, bounded by ``LAUNCH_TIMEOUT_S``) executes every scenario;
each test compares one scenario's per-rank results with the single-process run here, in fp32.

What cannot run on CPU/gloo as such, and how it is tested instead:

* ``enable_parallelism`` picks devices as ``rank % torch.accelerator.device_count()``: ``rank % 0`` on a
  CPU-only torch. The worker counts the CPU as one device while it is called.
* Ring attention needs an attention op that returns the log-sum-exp; diffusers' only CPU backend with
  context parallelism (native SDPA) has none, so its ring runs here with a CPU LSE op (forward only).
* Ulysses-anything's output gather is an ``all_gather`` of unequal sizes, which gloo refuses; the
  uneven split is checked with the output gathered by the worker instead.
* diffusers' tensor parallelism refuses device type 'cpu'; the ``_tp_plan`` is applied with torch's
  ``parallelize_module``, which is what diffusers does on a GPU.

diffusers before 0.40 has no tensor parallelism (``TensorParallelConfig``) and no ``_tp_plan`` on its
class: those two checks are skipped there, and ours is still sharded by its plan. diffusers' own class
gives wrong masked Ulysses numbers before 0.39 (it passes the whole ``[text, image]`` mask, while the
keys after the all-to-all come rank by rank): its masked Ulysses checks are skipped there; ours is checked.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
import torch.distributed as dist
from diffusers import QwenImageTransformer2DModel as DiffusersQwenImageTransformer2DModel

from tests.support.parallel_worker import (
    FORWARD_TOL,
    GRAD_TOL,
    LAUNCH_TIMEOUT_S,
    SGD_LR,
    UNEVEN_IMG_SHAPE,
    UNEVEN_TEXT_WIDTH,
    WORLD_SIZE,
    cp_inputs,
    launch,
    loss_target,
    training_loss,
)
from tests.support.tiny import make_pair, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]


# diffusers 0.39 splits the text mask with the sequence (in its _cp_plan) so that Ulysses can gather it.
DIFFUSERS_MASKED_ULYSSES = "encoder_hidden_states_mask" in DiffusersQwenImageTransformer2DModel._cp_plan.get(
    "transformer_blocks.*", {}
)
NO_DIFFUSERS_MASKED_ULYSSES = (
    "diffusers' QwenImageTransformer2DModel splits encoder_hidden_states_mask for masked Ulysses context "
    "parallelism from diffusers 0.39 on (before, wrong numbers)"
)
needs_diffusers_tp = pytest.mark.skipif(
    not hasattr(diffusers, "TensorParallelConfig"),
    reason="diffusers tensor parallelism (TensorParallelConfig) needs diffusers >= 0.40",
)
needs_diffusers_tp_plan = pytest.mark.skipif(
    not hasattr(DiffusersQwenImageTransformer2DModel, "_tp_plan"),
    reason="diffusers' QwenImageTransformer2DModel has a _tp_plan from diffusers 0.40 on",
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every scenario's results on each rank, from one bounded 2-process run."""
    return launch(tmp_path_factory.mktemp("parallel"), LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def single() -> dict:
    """Single-process outputs and one training step's loss and gradients, on the workers' inputs."""
    ours, _ = make_pair()
    expected = {
        "masked": run(ours, cp_inputs(masked=True)),
        "unmasked": run(ours, cp_inputs(masked=False)),
        "uneven": run(ours, cp_inputs(text_width=UNEVEN_TEXT_WIDTH, img_shape=UNEVEN_IMG_SHAPE)),
    }
    inputs = cp_inputs()
    loss = training_loss(ours.train(), inputs, loss_target(inputs))
    loss.backward()
    expected["loss"] = loss.detach()
    expected["grads"] = {name: p.grad for name, p in ours.named_parameters() if p.grad is not None}
    with torch.no_grad():  # one SGD step
        expected["stepped"] = {
            name: p if p.grad is None else p - SGD_LR * p.grad for name, p in ours.named_parameters()
        }
    return expected


def result(ranks: list[dict], scenario: str, rank: int) -> dict:
    """One rank's result of ``scenario``; fails the test with the worker's traceback if it raised."""
    value = ranks[rank][scenario]
    if "error" in value:
        pytest.fail(f"{scenario} raised on rank {rank}: {value['error']}\n{value['traceback']}")
    return value


def assert_raised(ranks: list[dict], scenario: str, message: str) -> None:
    """``scenario`` raised on every rank, with ``message`` in the error."""
    for rank in range(WORLD_SIZE):
        got = ranks[rank][scenario].get("error")
        assert got is not None, f"{scenario} was expected to raise on rank {rank}, but ran"
        assert message in got, f"rank {rank}: {got}"


def grads_of(value: dict) -> dict[str, torch.Tensor]:
    return {name[len("grad.") :]: g for name, g in value.items() if name.startswith("grad.")}


def assert_grads_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, **GRAD_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_the_mask_changes_the_output(single):
    # Without this the masked comparisons below would not show that CP applies the mask.
    assert (single["masked"] - single["unmasked"]).abs().max() > 1e-3


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("model", ["ours", "diffusers"])
def test_ulysses_gives_the_single_process_output(ranks, single, masked, model):
    if model == "diffusers" and masked and not DIFFUSERS_MASKED_ULYSSES:
        pytest.skip(NO_DIFFUSERS_MASKED_ULYSSES)
    scenario = "ulysses_masked" if masked else "ulysses_unmasked"
    expected = single["masked" if masked else "unmasked"]
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(result(ranks, scenario, rank)[model], expected, **FORWARD_TOL)


@pytest.mark.parametrize("scenario", ["ulysses_masked", "ulysses_unmasked", "ring_unmasked"])
def test_ours_matches_diffusers_under_context_parallelism(ranks, scenario):
    if scenario == "ulysses_masked" and not DIFFUSERS_MASKED_ULYSSES:
        pytest.skip(NO_DIFFUSERS_MASKED_ULYSSES)
    for rank in range(WORLD_SIZE):
        value = result(ranks, scenario, rank)
        torch.testing.assert_close(value["ours"], value["diffusers"], **FORWARD_TOL)


@pytest.mark.parametrize("scenario", ["ulysses_uneven_text", "ulysses_uneven_image"])
def test_a_sequence_that_does_not_split_evenly_raises(ranks, scenario):
    # Text width 7 or 25 image tokens cannot be cut into 2 equal parts.
    assert_raised(ranks, scenario, "divisible")


def test_ulysses_anything_splits_uneven_sequences_exactly(ranks, single):
    for rank in range(WORLD_SIZE):
        got = result(ranks, "ulysses_anything_uneven", rank)["ours"]
        torch.testing.assert_close(got, single["uneven"], **FORWARD_TOL)


def test_ulysses_anything_output_gather_matches_or_is_refused_by_gloo(ranks, single):
    # gloo's all_gather needs equal sizes; a backend that takes unequal ones must give the exact output.
    if "error" in ranks[0]["ulysses_anything_uneven_gather"]:
        assert_raised(ranks, "ulysses_anything_uneven_gather", "ProcessGroupGloo::allgather: invalid tensor size")
    else:
        for rank in range(WORLD_SIZE):
            value = result(ranks, "ulysses_anything_uneven_gather", rank)
            torch.testing.assert_close(value["ours"], single["uneven"], **FORWARD_TOL)


def test_ring_on_the_native_backend_needs_a_log_sum_exp(ranks):
    assert_raised(ranks, "ring_native", "does not support return_lse=True")


@pytest.mark.parametrize("model", ["ours", "diffusers"])
def test_ring_gives_the_single_process_output_unmasked(ranks, single, model):
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(result(ranks, "ring_unmasked", rank)[model], single["unmasked"], **FORWARD_TOL)


def test_ring_gives_the_single_process_output_masked(ranks, single):
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(result(ranks, "ring_masked", rank)["ours"], single["masked"], **FORWARD_TOL)


@pytest.mark.parametrize("scenario", ["ring_masked_training", "ulysses_training", "fsdp2_training"])
def test_training_step_gives_the_single_process_loss_and_grads(ranks, single, scenario):
    """Masked ring and Ulysses context parallelism, and FSDP2 (fully_shard on every block and the root)."""
    for rank in range(WORLD_SIZE):
        value = result(ranks, scenario, rank)
        torch.testing.assert_close(value["loss"], single["loss"], **GRAD_TOL)
        assert_grads_close(grads_of(value), single["grads"])


def test_fsdp2_sgd_step_gives_the_single_process_weights(ranks, single):
    for rank in range(WORLD_SIZE):
        value = result(ranks, "fsdp2_training", rank)
        for name, param in single["stepped"].items():
            torch.testing.assert_close(value[f"param.{name}"], param, **GRAD_TOL)


@needs_diffusers_tp
def test_diffusers_tensor_parallelism_refuses_cpu(ranks):
    assert_raised(ranks, "tp_enable_parallelism", "Tensor parallelism is not supported on device type 'cpu'")


@pytest.mark.parametrize("model", ["ours", pytest.param("diffusers", marks=needs_diffusers_tp_plan)])
def test_tp_plan_gives_the_single_process_output(ranks, single, model):
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(result(ranks, "tp_plan", rank)[model], single["masked"], **FORWARD_TOL)


def test_tp_plan_gives_the_single_process_loss_and_grads(ranks, single):
    """Sharded grads are whole once gathered; the replicated q/k-norm weights act on each rank's heads
    only, so their grads are per-rank partial sums that a TP trainer must all-reduce."""
    values = [result(ranks, "tp_plan", rank) for rank in range(WORLD_SIZE)]
    for value in values:
        torch.testing.assert_close(value["loss"], single["loss"], **GRAD_TOL)
    per_rank = [grads_of(value) for value in values]
    for grads in per_rank:
        assert sorted(grads) == sorted(single["grads"])
    for name, grad in single["grads"].items():
        if ".attn.norm_" in name:
            torch.testing.assert_close(sum(grads[name] for grads in per_rank), grad, **GRAD_TOL)
        else:
            for grads in per_rank:
                torch.testing.assert_close(grads[name], grad, **GRAD_TOL)
