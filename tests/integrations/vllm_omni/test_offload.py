"""vllm-omni's layerwise offload and HSDP with our transformer, on the full engine (CPU platform).

Each engine serves a 3-block copy of the tiny checkpoint (layerwise offload needs at least two
blocks to stream; the suite's checkpoint has one). The images of an engine with the feature must
equal those of the same engine without it, and its log must not carry vllm-omni's "skipped"
warnings for our class.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm_omni")

from tests.support.vllm_omni_engine import has_cpu_platform, run_engine_job

pytestmark = [
    pytest.mark.vllm_omni,
    pytest.mark.slow,
    pytest.mark.skipif(not has_cpu_platform(), reason="needs the test CPU platform (make test-vllm-omni)"),
]

OUR_TRANSFORMER = "qwen_image_omni.models.transformer_qwenimage.QwenImageTransformer2DModel"
SAMPLING = {"height": 64, "width": 64, "num_inference_steps": 2, "seed": 0}
# vllm-omni's log lines when layerwise offload finds no blocks on a transformer.
OFFLOAD_SKIPPED = ("No _layerwise_offload_blocks_attrs defined", "Target layers (blocks) not found")
# Our log line when the blocks attend through vllm-omni's Attention layer (integrations.vllm_omni.parallel).
ROUTED = "3 transformer blocks attend through vllm-omni's Attention (backend "


@pytest.fixture(scope="module")
def checkpoint3(tmp_path_factory):
    """The tiny checkpoint with a 3-block transformer (random weights, seed 1)."""
    import torch
    from diffusers import QwenImageTransformer2DModel as DiffusersTransformer

    from tests.support.tiny_checkpoint import CHECKPOINT_TRANSFORMER_CONFIG, tiny_pipeline

    pipeline = tiny_pipeline()
    torch.manual_seed(1)
    pipeline.transformer = DiffusersTransformer(**{**CHECKPOINT_TRANSFORMER_CONFIG, "num_layers": 3})
    path = tmp_path_factory.mktemp("tiny-qwen-image-3-blocks")
    pipeline.save_pretrained(path)
    return path


def job(checkpoint, engine: dict) -> dict:
    return {
        "model": str(checkpoint),
        "engine": engine,
        "steps": [{"rpc": "probe_pipeline"}, {"generate": ["a red cube", "a cat"], "sampling": SAMPLING}],
    }


@pytest.fixture(scope="module")
def reference(checkpoint3, tmp_path_factory):
    """Images of the engine with our transformer and neither feature."""
    result = run_engine_job(tmp_path_factory.mktemp("engine-plain"), job(checkpoint3, {}), plugin=True)
    assert result["steps"][0]["rpc"][0][0]["transformer"] == OUR_TRANSFORMER
    assert ROUTED not in result["log"]  # no backend named, no SP: our blocks keep their own attention
    return result["images"][1]


@pytest.mark.vllm_omni_engine
def test_layerwise_offload_streams_our_blocks_and_keeps_the_images(checkpoint3, reference, tmp_path):
    # The CPU platform cannot pin memory (pinning needs a CUDA driver); on a GPU leave it on.
    engine = {"enable_layerwise_offload": True, "pin_cpu_memory": False}
    result = run_engine_job(tmp_path / "offload", job(checkpoint3, engine), plugin=True)
    assert result["steps"][0]["rpc"][0][0]["transformer"] == OUR_TRANSFORMER
    log = result["log"]
    assert "Layer-wise offloading enabled on 3 layers (blocks)" in log
    for skipped in OFFLOAD_SKIPPED:
        assert skipped not in log
    np.testing.assert_array_equal(result["images"][1], reference)


@pytest.mark.vllm_omni_engine
def test_hsdp_shards_our_blocks_and_keeps_the_images(checkpoint3, reference, tmp_path):
    # Two CPU ranks (gloo), each holding half of every parameter; FSDP2 all-gathers a block's
    # parameters before it runs. step_execution: see the Ulysses test below (vllm-omni's multi-rank
    # async output thread needs CUDA). One rank (hsdp_shard_size=1, no step_execution) passes too.
    engine = {"use_hsdp": True, "hsdp_shard_size": 2, "step_execution": True}
    result = run_engine_job(tmp_path / "hsdp", job(checkpoint3, engine), plugin=True)
    # FSDP2 swaps the instance's class for a generated subclass of ours.
    assert result["steps"][0]["rpc"][0][0]["transformer"].endswith("FSDPQwenImageTransformer2DModel")
    log = result["log"]
    assert "Sharded 3 modules + root" in log
    assert "has no _hsdp_shard_conditions" not in log
    np.testing.assert_array_equal(result["images"][1], reference)


def test_hsdp_shard_conditions_select_exactly_the_blocks():
    """vllm-omni's ``shard_model`` wraps the modules our conditions pick: the blocks, nothing inside them."""
    from qwen_image_omni import QwenImageTransformer2DModel

    from tests.support.tiny import TINY_CONFIG

    model = QwenImageTransformer2DModel(**{**TINY_CONFIG, "num_layers": 3})
    conditions = model._hsdp_shard_conditions
    picked = [name for name, module in model.named_modules() if any(cond(name, module) for cond in conditions)]
    # vllm-omni's own name rule (numbered modules under transformer_blocks) would also pick
    # Sequential/ModuleList children inside our blocks (img_mod.0, to_out.0, net.0, ...); ours does not.
    assert picked == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]


def test_layerwise_offload_finds_our_blocks():
    """vllm-omni's block discovery returns our block list (the class attribute it reads)."""
    from vllm_omni.diffusion.offloader.block_discovery import get_blocks_from_dit

    from qwen_image_omni import QwenImageTransformer2DModel

    from tests.support.tiny import TINY_CONFIG

    model = QwenImageTransformer2DModel(**{**TINY_CONFIG, "num_layers": 3})
    attrs, blocks = get_blocks_from_dit(model)
    assert attrs == ["transformer_blocks"]
    assert blocks == list(model.transformer_blocks)


# --------------------------------------------------------------------------------------------------
# Attention through vllm-omni's Attention layer (qwen_image_omni.integrations.vllm_omni.parallel).
# --------------------------------------------------------------------------------------------------


@pytest.mark.vllm_omni_engine
def test_attention_through_vllm_omni_keeps_the_images(checkpoint3, reference, tmp_path):
    # The engine names its attention backend (the CPU platform runs TORCH_SDPA only); with our
    # transformer it is vllm-omni's Attention layer that runs it, and the images stay the same.
    engine = {"diffusion_attention_backend": "TORCH_SDPA"}
    result = run_engine_job(tmp_path / "routed", job(checkpoint3, engine), plugin=True)
    assert result["steps"][0]["rpc"][0][0]["transformer"] == OUR_TRANSFORMER
    assert ROUTED + "TORCH_SDPA, sequence parallel size 1)" in result["log"]
    np.testing.assert_array_equal(result["images"][1], reference)


ROUTING_UNIT = """
import types

import torch

from qwen_image_omni import QwenImageTransformer2DModel
from qwen_image_omni.integrations.vllm_omni.parallel import (
    VllmOmniDoubleStreamAttnProcessor,
    route_attention_through_vllm_omni,
)
from tests.support.tiny import TINY_CONFIG

torch.manual_seed(0)
config = {**TINY_CONFIG, "num_layers": 2}
reference = QwenImageTransformer2DModel(**config).eval()
routed = QwenImageTransformer2DModel(**config).eval()
routed.load_state_dict(reference.state_dict())
keys = list(routed.state_dict())
route_attention_through_vllm_omni(routed, types.SimpleNamespace(parallel_config=None))
assert all(isinstance(b.attn.processor, VllmOmniDoubleStreamAttnProcessor) for b in routed.transformer_blocks)
assert list(routed.state_dict()) == keys, "routing changed the state-dict keys"
assert "_sp_plan" not in vars(reference) and not hasattr(QwenImageTransformer2DModel, "_sp_plan")
hidden = torch.randn(2, 16, 16)
text = torch.randn(2, 7, 24)
mask = torch.ones(2, 7, dtype=torch.bool)
mask[1, 4:] = False
with torch.no_grad():
    for text_mask in (None, mask):
        args = (hidden, text, text_mask, torch.tensor([0.5, 0.5]), [[(1, 4, 4)]] * 2)
        assert torch.equal(reference(*args).sample, routed(*args).sample)
print("ROUTING-OK")
"""


def test_routed_transformer_equals_diffusers_attention_and_keeps_its_keys():
    """Forward equality (with and without a text mask) and unchanged state-dict keys, outside the engine.

    Runs in a fresh process on the CPU platform: vllm-omni's Attention resolves its backend from the
    platform, which a process resolves once.
    """
    import subprocess
    import sys

    from tests.support.vllm_omni_engine import REPO, engine_env

    process = subprocess.run(
        [sys.executable, "-c", ROUTING_UNIT],
        check=False,
        cwd=REPO,
        env={**engine_env(plugin=False), "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "ROUTING-OK" in process.stdout, process.stdout[-3000:] + process.stderr[-3000:]


@pytest.mark.vllm_omni_engine
def test_ulysses_sequence_parallel_over_two_ranks_keeps_the_images(checkpoint3, reference, tmp_path):
    # Two CPU ranks (gloo). step_execution: otherwise a multi-rank worker's async output thread opens
    # a CUDA stream and dies without a driver (a limit of vllm-omni on the CPU, not of our transformer).
    engine = {"ulysses_degree": 2, "step_execution": True}
    result = run_engine_job(tmp_path / "ulysses", job(checkpoint3, engine), plugin=True)
    assert result["steps"][0]["rpc"][0][0]["transformer"] == OUR_TRANSFORMER
    log = result["log"]
    assert "Applying sequence parallelism to QwenImageTransformer2DModel" in log
    assert "SP hooks not applied" not in log and "Failed to apply sequence parallelism" not in log
    assert ROUTED in log and "sequence parallel size 2)" in log
    np.testing.assert_array_equal(result["images"][1], reference)


@pytest.mark.vllm_omni_engine
def test_ulysses_with_auto_padding_equals_vllm_omni_own_transformer(checkpoint3, tmp_path):
    # 48x80 pixels: 15 image tokens, odd, so vllm-omni's SP hooks pad one token onto the last rank
    # (left unmasked, its default mask_sp_padding=False). Ours must do what vllm-omni's own does.
    sampling = {**SAMPLING, "height": 48, "width": 80}
    engine = {"ulysses_degree": 2, "step_execution": True}
    padded = job(checkpoint3, engine)
    padded["steps"][1]["sampling"] = sampling
    ours = run_engine_job(tmp_path / "ours", padded, plugin=True)
    own = run_engine_job(tmp_path / "own", padded, plugin=False)
    assert ours["steps"][0]["rpc"][0][0]["transformer"] == OUR_TRANSFORMER
    assert own["steps"][0]["rpc"][0][0]["transformer"] != OUR_TRANSFORMER
    assert "SP auto-padding applied 1 token(s)" in own["log"]
    np.testing.assert_array_equal(ours["images"][1], own["images"][1])
