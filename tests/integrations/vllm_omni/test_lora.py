"""LoRA with our transformer inside vllm-omni: static ``lora_path`` and per-request ``LoRARequest``.

Inside vllm-omni our transformer's ``nn.Linear`` layers are vllm ``ReplicatedLinear`` layers
(``qwen_image_omni.integrations.vllm_omni.linear``), which vllm-omni's LoRA manager wraps. The unit
tests check the swap changes nothing (bitwise, fp32); the engine tests run vllm-omni's full engine on
the CPU (``tests/support/vllm_omni_engine.py``) with small PEFT adapters built here, against the same engine
on vllm-omni's own transformer and against diffusers' pipeline in this process.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm_omni
pytest.importorskip("vllm_omni", reason="needs vllm-omni (make test-vllm-omni)")

from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from vllm.model_executor.layers.linear import ReplicatedLinear  # noqa: E402
from vllm_omni.lora.utils import stable_lora_int_id  # noqa: E402

from qwen_image_omni.integrations.vllm_omni.linear import (  # noqa: E402
    diffusers_parameter_name,
    use_vllm_linear_layers,
)

from tests.support.tiny import make_inputs, make_pair  # noqa: E402
from tests.support.vllm_omni_engine import has_cpu_platform, one_rank_vllm_world, run_engine_job  # noqa: E402

PROMPTS = ["a red dog sitting on a green mat"]
SAMPLING = {"height": 64, "width": 64, "num_inference_steps": 2, "seed": 0}
RANK = 4

# Modules both transformers can take a LoRA on (vllm-omni's own fuses to_q/k/v and add_q/k/v and
# names diffusers' to_out.0 "to_out", so its adapters must not name to_out.0).
SHARED_TARGETS = [
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "img_mod.1", "txt_mod.1",
    "img_mlp.net.2", "txt_mlp.net.0.proj", "img_in", "txt_in", "proj_out", "norm_out.linear", "linear_1",
]  # fmt: skip
# A typical diffusers Qwen-Image LoRA's targets (every attention and MLP projection, modulation).
DIFFUSERS_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
]  # fmt: skip


# ----------------------------------------------------------------------------- unit: the linear swap


@pytest.fixture(scope="module")
def vllm_world():
    """A one-rank gloo world with vllm's model-parallel groups (vllm parameters read the TP rank)."""
    with one_rank_vllm_world():
        yield


def test_vllm_linear_transformer_equals_the_plain_one_bitwise_and_keeps_state_dict_keys(vllm_world):
    ours, reference = make_pair()
    swapped = copy.deepcopy(ours)
    img_in_weight = swapped.img_in.weight
    replaced = use_vllm_linear_layers(swapped)

    assert replaced == sum(type(m) is torch.nn.Linear for m in ours.modules()) > 0
    assert not any(isinstance(m, torch.nn.Linear) for m in swapped.modules())
    assert type(swapped.transformer_blocks[0].attn.to_out[0]) is ReplicatedLinear
    plain_state, swapped_state = ours.state_dict(), swapped.state_dict()
    assert list(swapped_state) == list(plain_state)
    for name, tensor in plain_state.items():
        assert torch.equal(swapped_state[name], tensor), name
    # The swap shares the tensors: no copy of the weights is made.
    assert swapped.img_in.weight.data_ptr() == img_in_weight.data_ptr()

    inputs = make_inputs(valid=[5, 7])
    with torch.no_grad():
        plain = ours(**inputs, return_dict=False)[0]
        vllm = swapped(**inputs, return_dict=False)[0]
        diffusers = reference(**inputs, return_dict=False)[0]
    assert torch.equal(vllm, plain)
    torch.testing.assert_close(vllm, diffusers)


def test_diffusers_parameter_name_drops_lora_wrapper_components():
    assert diffusers_parameter_name("transformer_blocks.0.attn.to_q.base_layer.weight") == (
        "transformer_blocks.0.attn.to_q.weight"
    )
    assert diffusers_parameter_name("transformer_blocks.0.attn.to_out.0.base_layer.bias") == (
        "transformer_blocks.0.attn.to_out.0.bias"
    )
    assert diffusers_parameter_name("img_in.weight") == "img_in.weight"


# ----------------------------------------------------------------------------- adapters


def write_adapter(
    path: Path, checkpoint: Path, targets: list[str], *, seed: int, prefix: str, strength: float = 0.3
) -> Path:
    """A PEFT LoRA adapter directory for the checkpoint's transformer: rank 4, alpha 8, seeded weights.

    Args:
        path: the directory to write (``adapter_config.json`` and ``adapter_model.safetensors``).
        checkpoint: the diffusers checkpoint; its transformer's linear weights give the modules and shapes.
        targets: PEFT ``target_modules``: module-name suffixes (``to_q``, ``to_out.0``, ``img_mod.1``, ...).
        seed: seeds the LoRA weights.
        prefix: the key prefix: ``"base_model.model."`` (PEFT ``save_pretrained``) or ``"transformer."``
            (diffusers ``save_lora_weights``).
        strength: the standard deviation of ``lora_B`` (``lora_A`` has unit-norm-ish rows).
    """
    tensors = load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    for name, weight in sorted(tensors.items()):
        module = name.removesuffix(".weight")
        if name == module or weight.ndim != 2 or not any(module == t or module.endswith("." + t) for t in targets):
            continue
        out_features, in_features = weight.shape
        lora[f"{prefix}{module}.lora_A.weight"] = torch.randn(RANK, in_features, generator=generator) / in_features**0.5
        lora[f"{prefix}{module}.lora_B.weight"] = strength * torch.randn(out_features, RANK, generator=generator)
    assert lora, f"no module of the checkpoint matches {targets}"
    path.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": targets, "bias": "none"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def adapter_modules(path: Path) -> set[str]:
    """The pipeline module names (``transformer.<diffusers module>``) an adapter directory holds LoRA weights for."""
    names = {key.rsplit(".lora_", 1)[0] for key in load_file(path / "adapter_model.safetensors")}
    return {"transformer." + name.removeprefix("base_model.model.").removeprefix("transformer.") for name in names}


def updated_transformer_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's transformer tensors after a pretend trainer step (seeded noise on every one)."""
    generator = torch.Generator().manual_seed(3)
    tensors = load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")
    return {name: t + 0.05 * torch.randn(t.shape, generator=generator) for name, t in sorted(tensors.items())}


def diffusers_images(
    checkpoint: Path,
    transformer_weights: dict[str, torch.Tensor] | None = None,
    adapter: Path | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """diffusers' own pipeline on :data:`PROMPTS` with :data:`SAMPLING`: uint8 ``(N, 64, 64, 3)``.

    Args:
        checkpoint: the diffusers checkpoint.
        transformer_weights: transformer tensors to load over the checkpoint's, or None.
        adapter: a diffusers-keyed adapter directory (:func:`write_adapter`) applied through
            diffusers' PEFT integration at vllm-omni's ``lora_scale`` ``scale``, or None.
    """
    pipe = DiffusersQwenImagePipeline.from_pretrained(checkpoint, local_files_only=True, torch_dtype=torch.float32)
    if transformer_weights is not None:
        pipe.transformer.load_state_dict(transformer_weights, strict=True)
    if adapter is not None:
        pipe.load_lora_weights(adapter, weight_name="adapter_model.safetensors", adapter_name="adapter")
        # diffusers reads no alpha from the file (its scaling is 1); vllm scales by lora_alpha / r.
        config = json.loads((adapter / "adapter_config.json").read_text())
        pipe.set_adapters(["adapter"], adapter_weights=[scale * config["lora_alpha"] / config["r"]])
    images = [
        pipe(prompt=prompt, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        .images[0]
        .convert("RGB")
        for prompt in PROMPTS
    ]
    return np.stack([np.asarray(image) for image in images])


# ----------------------------------------------------------------------------- engine jobs

needs_engine = pytest.mark.skipif(not has_cpu_platform(), reason="needs the test-support CPU platform (tests/support)")


def lora(name: str, int_id: int, path: Path, scale: float = 1.0) -> dict:
    """A step's ``lora`` entry: ``LoRARequest`` fields plus the scale."""
    return {"lora_name": name, "lora_int_id": int_id, "lora_path": str(path), "scale": scale}


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """``shared``: PEFT keys on modules both transformers have; ``diffusers``: diffusers keys, typical targets."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "shared": write_adapter(root / "shared", checkpoint, SHARED_TARGETS, seed=11, prefix="base_model.model."),
        "diffusers": write_adapter(
            root / "diffusers", checkpoint, DIFFUSERS_TARGETS, seed=12, prefix="transformer.", strength=1.0
        ),
    }


@pytest.fixture(scope="module")
def updated_weights(checkpoint, tmp_path_factory) -> Path:
    """:func:`updated_transformer_weights` saved as a diffusers-named safetensors file."""
    path = tmp_path_factory.mktemp("weights") / "transformer.safetensors"
    save_file(updated_transformer_weights(checkpoint), str(path))
    return path


def static_and_request_steps(adapters: dict[str, Path]) -> list[dict]:
    """Steps 0-4 of both engines: classes, LoRA state after start, the static adapter, base, per-request."""
    shared = adapters["shared"]
    return [
        {"rpc": "probe_pipeline"},
        {"rpc": "probe_lora"},
        {"generate": PROMPTS, "sampling": SAMPLING, "lora": lora("static", stable_lora_int_id(str(shared)), shared)},
        {"generate": PROMPTS, "sampling": SAMPLING},
        {"generate": PROMPTS, "sampling": SAMPLING, "lora": lora("shared", 1, shared)},
    ]


@pytest.fixture(scope="module")
def ours(checkpoint, adapters, updated_weights, tmp_path_factory) -> dict:
    """One engine with our plugin and a static LoRA, then per-request adapters, an in-place update, a weight sync."""
    job_dir = tmp_path_factory.mktemp("ours")
    live = job_dir / "live"  # the adapter directory a trainer rewrites each step
    shutil.copytree(adapters["shared"], live)
    shutil.copytree(adapters["diffusers"], job_dir / "next")
    steps = [
        *static_and_request_steps(adapters),
        {"generate": PROMPTS, "sampling": SAMPLING},  # 5: no LoRA after a LoRA
        {"generate": PROMPTS, "sampling": SAMPLING, "lora": lora("diffusers", 2, adapters["diffusers"])},  # 6
        {"generate": PROMPTS, "sampling": SAMPLING, "lora": lora("shared", 1, adapters["shared"])},  # 7: back
        {"generate": PROMPTS, "sampling": SAMPLING, "lora": lora("live", 3, live)},  # 8: live = shared
        {"copy": ["next", "live"]},  # 9: the trainer overwrites the adapter
        {"generate": PROMPTS, "sampling": SAMPLING, "lora": lora("live", 4, live)},  # 10: live = diffusers
        {"generate": PROMPTS, "sampling": SAMPLING, "lora": lora("diffusers", 2, adapters["diffusers"], 0.5)},  # 11
        {"rpc": "probe_lora"},  # 12
        {"rpc": "probe_load_transformer_weights", "args": [str(updated_weights)]},  # 13: RL weight sync
        {"generate": PROMPTS, "sampling": SAMPLING},  # 14
        {"generate": PROMPTS, "sampling": SAMPLING, "lora": lora("diffusers", 2, adapters["diffusers"])},  # 15
    ]
    job = {"model": str(checkpoint), "engine": {"lora_path": str(adapters["shared"])}, "steps": steps}
    return run_engine_job(job_dir, job)


@pytest.fixture(scope="module")
def own(checkpoint, adapters, tmp_path_factory) -> dict:
    """The same engine start and first steps on vllm-omni's own transformer."""
    job = {
        "model": str(checkpoint),
        "engine": {"lora_path": str(adapters["shared"])},
        "steps": static_and_request_steps(adapters),
    }
    return run_engine_job(tmp_path_factory.mktemp("own"), job, plugin=False)


@pytest.mark.vllm_omni_engine
@needs_engine
def test_static_lora_engine_starts_on_our_transformer_with_the_adapter_loaded(ours, own, adapters):
    assert ours["steps"][0]["rpc"][0][0]["transformer"] == "qwen_image_omni.models.transformer_qwenimage.QwenImageTransformer2DModel"
    assert own["steps"][0]["rpc"][0][0]["transformer"].startswith("vllm_omni.")
    static_id = stable_lora_int_id(str(adapters["shared"]))
    # vllm-omni loads the static adapter at start; the engine's start-up run (no LoRARequest) then
    # suspends it, as any request without one does, and a request naming it re-arms it (step 2).
    (state,) = ours["steps"][1]["rpc"][0]
    assert state["registered"] == [static_id] and state["suspended"] == static_id and state["active"] is None
    # Exactly the linears the adapter names are wrapped, blocks and outside them.
    assert set(state["wrapped"]) == adapter_modules(adapters["shared"])
    assert "transformer.transformer_blocks.0.attn.to_q" in state["wrapped"]
    (own_state,) = own["steps"][1]["rpc"][0]
    assert own_state["registered"] == [static_id] and own_state["suspended"] == static_id


@pytest.mark.vllm_omni_engine
@needs_engine
def test_no_lora_request_gives_diffusers_base_image_and_vllm_omni_own(ours, own, checkpoint):
    base = diffusers_images(checkpoint)
    np.testing.assert_array_equal(ours["images"][3], base)
    np.testing.assert_array_equal(own["images"][3], base)
    np.testing.assert_array_equal(ours["images"][5], base)  # after a LoRA request


@pytest.mark.vllm_omni_engine
@needs_engine
def test_per_request_lora_changes_the_image_and_equals_vllm_omni_own_transformer(ours, own):
    with_lora, base = ours["images"][4].astype(int), ours["images"][3].astype(int)
    assert np.abs(with_lora - base).mean() > 1.0
    # Exact: vllm-omni's own transformer fuses q/k/v (one GEMM, LoRA per slice), yet on this fp32
    # checkpoint the uint8 images are the same bits.
    np.testing.assert_array_equal(ours["images"][4], own["images"][4])
    np.testing.assert_array_equal(ours["images"][2], ours["images"][4])  # the static adapter is that adapter
    np.testing.assert_array_equal(ours["images"][2], own["images"][2])


@pytest.mark.vllm_omni_engine
@needs_engine
def test_switching_adapters_between_requests(ours):
    shared, diffusers, base = ours["images"][4], ours["images"][6], ours["images"][3]
    assert np.abs(diffusers.astype(int) - base).mean() > 1.0
    assert np.abs(diffusers.astype(int) - shared).mean() > 1.0
    np.testing.assert_array_equal(ours["images"][7], shared)  # back to the first adapter
    half = ours["images"][11]
    assert not np.array_equal(half, diffusers) and not np.array_equal(half, base)  # scale 0.5 differs from both


@pytest.mark.vllm_omni_engine
@needs_engine
def test_adapter_rewritten_on_disk_applies_under_a_new_lora_int_id(ours, adapters):
    np.testing.assert_array_equal(ours["images"][8], ours["images"][4])  # live held the shared adapter
    np.testing.assert_array_equal(ours["images"][10], ours["images"][6])  # then the diffusers one
    (state,) = ours["steps"][12]["rpc"][0]
    assert state["active"] == 2
    # The layers wrapped so far: those of both adapters (to_out.0 and the MLPs by the diffusers one).
    assert set(state["wrapped"]) == adapter_modules(adapters["shared"]) | adapter_modules(adapters["diffusers"])
    assert "transformer.transformer_blocks.0.attn.to_out.0" in state["wrapped"]


@pytest.mark.vllm_omni_engine
@needs_engine
def test_per_request_lora_equals_diffusers_peft_with_the_same_adapter(ours, checkpoint, adapters):
    """The diffusers-keyed adapter (to_out.0, MLPs, modulation) against diffusers' own PEFT LoRA, bitwise."""
    adapter = adapters["diffusers"]
    np.testing.assert_array_equal(ours["images"][6], diffusers_images(checkpoint, adapter=adapter))
    np.testing.assert_array_equal(ours["images"][11], diffusers_images(checkpoint, adapter=adapter, scale=0.5))


@pytest.mark.vllm_omni_engine
@needs_engine
def test_weight_sync_after_lora_wrapping_loads_diffusers_names(ours, checkpoint, adapters, updated_weights):
    """RL weight sync into a running engine whose linears are LoRA-wrapped (``to_q.base_layer.weight``)."""
    weights = load_file(str(updated_weights))
    assert ours["steps"][13]["rpc"] == [[len(weights)]]
    np.testing.assert_array_equal(ours["images"][14], diffusers_images(checkpoint, weights))
    # The adapter still applies on top of the new base weights.
    np.testing.assert_array_equal(ours["images"][15], diffusers_images(checkpoint, weights, adapters["diffusers"]))
