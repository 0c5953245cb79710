"""qwen-image-omni in vllm-omni's full engine on the CPU: offline ``Omni`` and ``vllm serve --omni``.

Every engine runs in its own process (``tests/support/vllm_omni_engine.py``) on the test-support CPU
platform, ``dtype="float32"``, on the tiny checkpoint. The references are the same engine without
our plugin (vllm-omni's own transformer) and diffusers' own pipeline in this process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.vllm_omni, pytest.mark.vllm_omni_engine, pytest.mark.slow]
pytest.importorskip("vllm_omni", reason="needs vllm-omni (make test-vllm-omni)")

from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.support.tiny_checkpoint import TEXT_DIM  # noqa: E402
from tests.support.vllm_omni_engine import (  # noqa: E402
    OURS,
    REPO,
    VLLM_OMNI_OWN,
    engine_env,
    free_port,
    has_cpu_platform,
    run_engine_job,
)

if not has_cpu_platform():
    pytest.skip(
        "needs the test-support CPU platform (pip install -e tests/support/cpu_platform)", allow_module_level=True
    )

PROMPTS = ["a cat", "a red dog sitting on a green mat"]
SAMPLING = {"height": 64, "width": 64, "num_inference_steps": 2, "seed": 0}
VALID, WIDTH = 5, 24  # prompt-embeds rows: valid tokens, and the fixed width they are padded to


def prompt_embeds(width: int) -> dict[str, torch.Tensor]:
    """One request's prompt embeddings: :data:`VALID` random tokens right-padded with zeros to ``width``."""
    embeds = torch.zeros(width, TEXT_DIM)
    embeds[:VALID] = torch.randn(VALID, TEXT_DIM, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(width, dtype=torch.long)
    mask[:VALID] = 1
    return {"prompt": "", "prompt_embeds": embeds, "prompt_embeds_mask": mask}


def updated_transformer_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's transformer tensors after a pretend trainer step (seeded noise on every one)."""
    generator = torch.Generator().manual_seed(1)
    tensors = load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")
    return {name: t + 0.05 * torch.randn(t.shape, generator=generator) for name, t in sorted(tensors.items())}


@pytest.fixture(scope="module")
def updated_weights(checkpoint, tmp_path_factory) -> Path:
    """:func:`updated_transformer_weights` saved as a diffusers-named safetensors file."""
    path = tmp_path_factory.mktemp("weights") / "transformer.safetensors"
    save_file(updated_transformer_weights(checkpoint), str(path))
    return path


@pytest.fixture(scope="module")
def ours(checkpoint, updated_weights, tmp_path_factory) -> dict:
    """One engine with our plugin: text prompts, padded and unpadded prompt embeds, then a weight update."""
    job_dir = tmp_path_factory.mktemp("ours")
    torch.save(prompt_embeds(WIDTH), job_dir / "padded.pt")
    torch.save(prompt_embeds(VALID), job_dir / "unpadded.pt")
    steps = [
        {"rpc": "probe_pipeline"},
        {"generate": PROMPTS, "sampling": SAMPLING},
        {"generate": ["padded.pt"], "sampling": SAMPLING},
        {"generate": ["unpadded.pt"], "sampling": SAMPLING},
        {"rpc": "probe_load_transformer_weights", "args": [str(updated_weights)]},
        {"generate": PROMPTS, "sampling": SAMPLING},
    ]
    return run_engine_job(job_dir, {"model": str(checkpoint), "steps": steps})


@pytest.fixture(scope="module")
def own(checkpoint, tmp_path_factory) -> dict:
    """The same engine without our plugin: vllm-omni's own transformer."""
    steps = [{"rpc": "probe_pipeline"}, {"generate": PROMPTS, "sampling": SAMPLING}]
    return run_engine_job(tmp_path_factory.mktemp("own"), {"model": str(checkpoint), "steps": steps}, plugin=False)


def test_engine_with_our_plugin_serves_our_transformer(ours):
    assert ours["steps"][0]["rpc"] == [[OURS]]


def test_engine_without_our_plugin_serves_vllm_omni_own_transformer(own):
    assert own["steps"][0]["rpc"] == [[VLLM_OMNI_OWN]]


def test_offline_images_equal_vllm_omni_own_transformer(ours, own):
    assert ours["images"][1].shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(ours["images"][1], own["images"][1])


def test_offline_images_equal_diffusers_pipeline(ours, checkpoint):
    pipe = DiffusersQwenImagePipeline.from_pretrained(checkpoint, local_files_only=True, torch_dtype=torch.float32)
    for row, prompt in enumerate(PROMPTS):
        image = pipe(
            prompt=prompt, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
        ).images[0]
        np.testing.assert_array_equal(ours["images"][1][row], np.asarray(image.convert("RGB")))


def test_prompt_embeds_padded_to_a_fixed_width_give_the_unpadded_image(ours):
    np.testing.assert_array_equal(ours["images"][2], ours["images"][3])


def test_weight_update_on_a_running_engine_equals_a_fresh_engine_with_those_weights(
    ours, checkpoint, updated_weights, tmp_path
):
    """RL weight sync: diffusers-named tensors into a running engine, then the next request."""
    assert ours["steps"][4]["rpc"] == [[len(load_file(str(updated_weights)))]]
    assert not np.array_equal(ours["images"][5], ours["images"][1])
    fresh = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, fresh)
    shutil.copy(updated_weights, fresh / "transformer" / "diffusion_pytorch_model.safetensors")
    steps = [{"generate": PROMPTS, "sampling": SAMPLING}]
    rebuilt = run_engine_job(tmp_path / "job", {"model": str(fresh), "steps": steps})
    np.testing.assert_array_equal(ours["images"][5], rebuilt["images"][0])


# ----------------------------------------------------------------------------- vllm serve


def wait_for_health(url: str, server: subprocess.Popen, timeout_s: float = 600) -> None:
    """Poll ``url`` until it answers 200; fail if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve was not healthy after {timeout_s} s")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """``vllm serve <checkpoint> --omni`` on 127.0.0.1 with our plugin; stopped by its PID afterwards."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = log_path.open("w")
    vllm = Path(sys.executable).with_name("vllm")
    command = [str(vllm), "serve", str(checkpoint), "--omni", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--dtype", "float32", "--enforce-eager"]
    process = subprocess.Popen(
        command, cwd=REPO, env=engine_env(plugin=True), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for_health(f"http://127.0.0.1:{port}/health", process)
        yield f"http://127.0.0.1:{port}", log_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_server_answers_image_generation_with_a_png_equal_to_offline(server, ours):
    url, log_path = server
    body = {"prompt": PROMPTS[0], "size": "64x64", "n": 1, "num_inference_steps": 2, "seed": 0}
    request = urllib.request.Request(
        f"{url}/v1/images/generations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        payload = json.loads(response.read())
    png = base64.b64decode(payload["data"][0]["b64_json"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    np.testing.assert_array_equal(image, ours["images"][1][0])
    registered = "QwenImagePipeline -> qwen_image_omni.integrations.vllm_omni.pipelines.QwenImagePipeline"
    assert registered in log_path.read_text()


# ----------------------------------------------------------------------------- cache-dit


def test_cache_dit_engine_with_ours_equals_vllm_omni_own_transformer(checkpoint, tmp_path):
    """``cache_backend="cache_dit"``: ours serves it, and the images equal vllm-omni's own transformer under it."""
    steps = [{"rpc": "probe_pipeline"}, {"generate": PROMPTS, "sampling": {**SAMPLING, "num_inference_steps": 6}}]
    job = {"model": str(checkpoint), "engine": {"cache_backend": "cache_dit"}, "steps": steps}
    ours = run_engine_job(tmp_path / "ours", job, plugin=True)
    own = run_engine_job(tmp_path / "own", job, plugin=False)
    assert ours["steps"][0]["rpc"] == [[OURS]] and own["steps"][0]["rpc"] == [[VLLM_OMNI_OWN]]
    assert "Enabling cache-dit on transformer" in ours["log"]
    np.testing.assert_array_equal(ours["images"][1], own["images"][1])
