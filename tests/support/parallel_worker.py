"""One rank of the 2-process CPU/gloo parallelism checks in ``tests/models/test_parallel.py``.

Run as ``python -m tests.support.parallel_worker OUT_DIR`` with ``RANK``, ``WORLD_SIZE`` and ``INIT_FILE`` set
(``launch`` does this). Every scenario in ``SCENARIOS`` runs in order on both ranks; each rank saves
``{scenario: result}`` to ``OUT_DIR/rank{RANK}.pt``, where a result is a dict of tensors, or
``{"error": "ExcType: message", "traceback": ...}`` when the scenario raised. The single-process references and the
comparisons live in the test, which builds the same models and inputs from the builders here.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import ContextParallelConfig
from diffusers.models import attention_dispatch

from tests.support.tiny import TINY_CONFIG, make_inputs, make_pair

WORLD_SIZE = 2
# What the tests that launch a 2-process run share: its time bound and the tolerances against one process.
LAUNCH_TIMEOUT_S = 180
FORWARD_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)
TEXT_WIDTH = 8  # splits 4 + 4 over 2 ranks
IMG_SHAPE = (1, 4, 6)  # 24 image tokens: 12 + 12
# Right padding that leaves rank 1 only padding text, and holes in both halves of the text.
TEXT_MASK = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 1, 0, 0]], dtype=torch.bool)
UNEVEN_TEXT_WIDTH = 7
UNEVEN_IMG_SHAPE = (1, 5, 5)
SGD_LR = 0.5
GLOO_TIMEOUT_S = 60


def cp_inputs(masked: bool = True, text_width: int = TEXT_WIDTH, img_shape=IMG_SHAPE) -> dict:
    """The batch-2 inputs of the CP/TP scenarios: a padded, masked prompt (or no mask)."""
    inputs = make_inputs(batch=2, img_shapes=(img_shape,), text_width=text_width)
    if masked:
        mask = torch.zeros(2, text_width, dtype=torch.bool)
        width = min(text_width, TEXT_MASK.shape[1])
        mask[:, :width] = TEXT_MASK[:, :width]
        inputs["encoder_hidden_states_mask"] = mask
    return inputs


def loss_target(inputs: dict) -> torch.Tensor:
    """A fixed regression target for the training-step scenarios (the model output's shape)."""
    batch, tokens = inputs["hidden_states"].shape[:2]
    channels = TINY_CONFIG["patch_size"] ** 2 * TINY_CONFIG["out_channels"]
    return torch.randn(batch, tokens, channels, generator=torch.Generator().manual_seed(7))


def training_loss(model, inputs: dict, target: torch.Tensor) -> torch.Tensor:
    """MSE of one forward pass against ``target``: the loss of every training-step scenario."""
    return F.mse_loss(model(**inputs, return_dict=False)[0], target)


def slice_batch(inputs: dict, index: int) -> dict:
    """Sample ``index`` of a batch as a batch of one (one FSDP rank's data-parallel share)."""
    return {name: value[index : index + 1] for name, value in inputs.items()}


def full_grads(model) -> dict[str, torch.Tensor]:
    """Every gradient as a full, unsharded tensor (a collective for DTensor grads).

    Parameters without a gradient are left out: the last block's text-stream output layers, whose
    result the model discards.
    """
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is not None:
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return grads


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter as a full, unsharded tensor."""
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }


@contextlib.contextmanager
def cpu_counts_as_one_device():
    """Let ``enable_parallelism`` run on a CPU-only torch.

    diffusers 0.42 picks each rank's device as ``rank % torch.accelerator.device_count()``, which is
    ``rank % 0`` (ZeroDivisionError) when there is no accelerator; every rank here is the CPU.
    """
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_cp(model, **config):
    """``model.enable_parallelism`` with a ``ContextParallelConfig(**config)``, on the native (SDPA) backend."""
    with cpu_counts_as_one_device():
        model.enable_parallelism(config=ContextParallelConfig(**config))
    return model


def _cpu_lse_forward_op(
    ctx,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    _save_ctx=True,
    _parallel_config=None,
):
    """A forward op for diffusers' templated CP attention that also returns the log-sum-exp, on CPU.

    Forward only (saves nothing for backward). Ring attention merges per-chunk results with the LSE;
    diffusers' native op cannot return one and its LSE-capable ops (cuDNN, flash, sage) need CUDA.
    """
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    out, lse = out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out


@contextlib.contextmanager
def native_attention_with_lse():
    """Give diffusers' native backend the CPU LSE op above while ring attention runs (forward only)."""
    original = attention_dispatch._native_attention_forward_op
    attention_dispatch._native_attention_forward_op = _cpu_lse_forward_op
    try:
        yield
    finally:
        attention_dispatch._native_attention_forward_op = original


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _cp_outputs(masked: bool, use_lse_op: bool = False, with_diffusers: bool = True, **config) -> dict:
    """Ours and (unless ``with_diffusers`` is False) diffusers' class under the same CP config, on the same inputs."""
    ours, reference = make_pair()
    inputs = cp_inputs(masked)
    with native_attention_with_lse() if use_lse_op else contextlib.nullcontext():
        result = {"ours": _forward(enable_cp(ours, **config), inputs)}
        if with_diffusers:
            result["diffusers"] = _forward(enable_cp(reference, **config), inputs)
        return result


def ulysses_masked():
    return _cp_outputs(masked=True, ulysses_degree=WORLD_SIZE)


def ulysses_unmasked():
    return _cp_outputs(masked=False, ulysses_degree=WORLD_SIZE)


def ulysses_uneven_text():
    ours, _ = make_pair()
    return {"ours": _forward(enable_cp(ours, ulysses_degree=WORLD_SIZE), cp_inputs(text_width=UNEVEN_TEXT_WIDTH))}


def ulysses_uneven_image():
    ours, _ = make_pair()
    return {"ours": _forward(enable_cp(ours, ulysses_degree=WORLD_SIZE), cp_inputs(img_shape=UNEVEN_IMG_SHAPE))}


def _gather_uneven(local: torch.Tensor, total: int, dim: int = 1) -> torch.Tensor:
    """All-gather ``tensor_split`` chunks of unequal sizes by padding them to one size (gloo needs equal sizes)."""
    sizes = [len(chunk) for chunk in torch.arange(total).tensor_split(WORLD_SIZE)]
    pad = [0, 0] * (local.ndim - 1 - dim) + [0, max(sizes) - local.shape[dim]]
    chunks = [torch.empty_like(F.pad(local, pad)) for _ in sizes]
    dist.all_gather(chunks, F.pad(local, pad).contiguous())
    return torch.cat([chunk.narrow(dim, 0, size) for chunk, size in zip(chunks, sizes)], dim=dim)


def ulysses_anything_uneven():
    """Ulysses-anything over uneven text and image splits (7 = 4 + 3, 25 = 13 + 12), its own output gather."""
    ours, _ = make_pair()
    inputs = cp_inputs(text_width=UNEVEN_TEXT_WIDTH, img_shape=UNEVEN_IMG_SHAPE)
    plan = {name: spec for name, spec in ours._cp_plan.items() if name != "proj_out"}
    with cpu_counts_as_one_device():
        ours.enable_parallelism(
            config=ContextParallelConfig(ulysses_degree=WORLD_SIZE, ulysses_anything=True), cp_plan=plan
        )
    local = _forward(ours, inputs)  # this rank's chunk of the image tokens
    return {"ours": _gather_uneven(local, total=inputs["hidden_states"].shape[1])}


def ulysses_anything_uneven_gather():
    """The same with the model's own plan, whose output gather is an all_gather of unequal sizes."""
    ours, _ = make_pair()
    inputs = cp_inputs(text_width=UNEVEN_TEXT_WIDTH, img_shape=UNEVEN_IMG_SHAPE)
    return {"ours": _forward(enable_cp(ours, ulysses_degree=WORLD_SIZE, ulysses_anything=True), inputs)}


def ring_native():
    ours, _ = make_pair()
    return {"ours": _forward(enable_cp(ours, ring_degree=WORLD_SIZE), cp_inputs(masked=False))}


def ring_unmasked():
    return _cp_outputs(masked=False, use_lse_op=True, ring_degree=WORLD_SIZE)


def ring_masked():
    # Ours only: diffusers' ring applies each rank's mask to every KV chunk (wrong numbers from 0.39, a shape
    # error before, where its model passes the whole joint mask).
    return _cp_outputs(masked=True, use_lse_op=True, with_diffusers=False, ring_degree=WORLD_SIZE)


def _cp_training(**config) -> dict:
    """Loss and gradients of one CP forward/backward; each rank's grads cover its tokens, so they are summed."""
    ours, _ = make_pair()
    model = enable_cp(ours.train(), **config)
    inputs = cp_inputs()
    loss = training_loss(model, inputs, loss_target(inputs))
    loss.backward()
    grads = full_grads(model)
    for grad in grads.values():
        dist.all_reduce(grad)
    return {"loss": loss.detach(), **{f"grad.{k}": v for k, v in grads.items()}}


def ulysses_training():
    return _cp_training(ulysses_degree=WORLD_SIZE)


def ring_masked_training():
    return _cp_training(ring_degree=WORLD_SIZE)


def fsdp2_training():
    """One FSDP2 step: every block and the root ``fully_shard``-ed, one sample per rank, SGD."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ours, _ = make_pair()
    model = ours.train()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)

    inputs = cp_inputs()
    rank = dist.get_rank()
    loss = training_loss(model, slice_batch(inputs, rank), loss_target(inputs)[rank : rank + 1])
    loss.backward()
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss, op=dist.ReduceOp.AVG)
    grads = full_grads(model)
    optimizer.step()
    return {
        "loss": global_loss,
        **{f"grad.{k}": v for k, v in grads.items()},
        **{f"param.{k}": v for k, v in full_params(model).items()},
    }


def tp_enable_parallelism():
    from diffusers import TensorParallelConfig

    ours, _ = make_pair()
    with cpu_counts_as_one_device():
        ours.enable_parallelism(config=TensorParallelConfig(tp_degree=WORLD_SIZE))
    return {"ours": _forward(ours, cp_inputs())}


def _apply_tp_plan(model, mesh):
    """Shard ``model`` by its ``_tp_plan`` with torch's ``parallelize_module`` (diffusers' styles, any device)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(model, mesh, {path: styles[style]() for path, style in model._tp_plan.items()})
    return model


def tp_plan():
    """Forward (ours and diffusers') and one backward (ours) with the ``_tp_plan`` applied over 2 ranks.

    diffusers' class has a ``_tp_plan`` from diffusers 0.40 on; before, only ours runs.
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    ours, reference = make_pair()
    inputs = cp_inputs()
    result = {"ours": _forward(_apply_tp_plan(ours, mesh), inputs)}
    if hasattr(reference, "_tp_plan"):
        result["diffusers"] = _forward(_apply_tp_plan(reference, mesh), inputs)
    loss = training_loss(ours.train(), inputs, loss_target(inputs))
    loss.backward()
    result["loss"] = loss.detach()
    result.update({f"grad.{k}": v for k, v in full_grads(ours).items()})
    return result


SCENARIOS = {
    "ulysses_masked": ulysses_masked,
    "ulysses_unmasked": ulysses_unmasked,
    "ulysses_uneven_text": ulysses_uneven_text,
    "ulysses_uneven_image": ulysses_uneven_image,
    "ulysses_anything_uneven": ulysses_anything_uneven,
    "ulysses_anything_uneven_gather": ulysses_anything_uneven_gather,
    "ring_native": ring_native,
    "ring_unmasked": ring_unmasked,
    "ring_masked": ring_masked,
    "ulysses_training": ulysses_training,
    "ring_masked_training": ring_masked_training,
    "fsdp2_training": fsdp2_training,
    "tp_enable_parallelism": tp_enable_parallelism,
    "tp_plan": tp_plan,
}


def _run_all() -> dict:
    results = {}
    for name, scenario in SCENARIOS.items():
        try:
            results[name] = scenario()
        except Exception as error:  # recorded for the test to report; the other scenarios still run
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            results[name] = {"error": f"{type(error).__name__}: {message}", "traceback": traceback.format_exc()}
        dist.barrier()
    return results


def main(out_dir: str) -> None:
    """Join the gloo group, run every scenario, save this rank's results."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.environ['INIT_FILE']}",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
    )
    try:
        torch.save(_run_all(), Path(out_dir) / f"rank{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


def launch(out_dir: Path, timeout_s: float, module: str = __name__) -> list[dict]:
    """Run ``module`` (this one, or a worker that runs its own scenarios through :func:`main`) on
    ``WORLD_SIZE`` CPU processes; return each rank's results.

    Raises ``RuntimeError`` with the ranks' output if any rank fails or the run exceeds ``timeout_s``.
    """
    repo_root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "WORLD_SIZE": str(WORLD_SIZE), "INIT_FILE": str(out_dir / "init"), "OMP_NUM_THREADS": "1"}
    logs = [out_dir / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as handle:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module, str(out_dir)],
                    cwd=repo_root,
                    env={**env, "RANK": str(rank)},
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            )
    failure = None
    deadline = time.monotonic() + timeout_s
    try:
        for rank, proc in enumerate(procs):
            if proc.wait(timeout=max(0.0, deadline - time.monotonic())) != 0:
                failure = f"rank {rank} exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
        failure = f"the {WORLD_SIZE}-process run took more than {timeout_s} s"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failure:
        output = "\n".join(f"--- rank {r} ---\n{log.read_text()[-4000:]}" for r, log in enumerate(logs))
        raise RuntimeError(f"{failure}\n{output}")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


if __name__ == "__main__":
    main(sys.argv[1])
