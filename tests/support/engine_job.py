"""Run one vllm-omni engine job in this process and write what it produced (for ``vllm_omni_engine.py``).

``python -m tests.support.engine_job JOB_DIR`` reads ``JOB_DIR/job.json``:

- ``model``: checkpoint directory; ``engine``: extra ``Omni`` keyword arguments;
- ``steps``: run in order, each one of
  - ``{"generate": [prompt, ...], "sampling": {...}, "lora": {...} | None}``: one ``Omni.generate``
    call; a prompt is a string or the name of a ``torch.save``'d dict in JOB_DIR (``prompt_embeds``,
    ``prompt_embeds_mask``, ...); ``lora`` holds ``LoRARequest`` fields plus ``scale``;
  - ``{"rpc": method, "args": [...]}``: ``collective_rpc`` on the diffusion stage's workers;
  - ``{"copy": [source, destination]}``: copy a file or directory (relative to JOB_DIR) over another
    between requests, e.g. a LoRA adapter a trainer rewrites in place.

  A generate step with ``"rollout": true`` ``torch.save``s instead, per output, what an RL rollout
  server reads (its images, ``trajectory_*`` fields and ``multimodal_output``) to ``JOB_DIR/step<i>.pt``.

It writes ``JOB_DIR/result.json`` (one entry per step: the RPC results, or the number of images) and
``JOB_DIR/step<i>.npy``, the images of generate step ``i`` as one uint8 array ``(N, H, W, 3)``.
The engine always carries the test probe (:mod:`qwen_image_omni_cpu_platform.probe`) as its worker
extension, so ``probe_pipeline`` tells which classes serve it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

PROBE = "qwen_image_omni_cpu_platform.probe.EngineProbe"


def load_prompt(job_dir: Path, prompt):
    """A text prompt as is; a file name becomes the prompt dict saved there."""
    if isinstance(prompt, str) and (job_dir / prompt).is_file():
        return torch.load(job_dir / prompt)
    return prompt


def rollout_fields(output) -> dict:
    """What an RL rollout server reads from one engine output (verl-omni's ``vllm_omni_async_server``),
    the images as uint8 ``(H, W, 3)`` arrays."""
    names = ("request_id", "trajectory_latents", "trajectory_log_probs", "trajectory_timesteps", "multimodal_output")
    fields = {name: getattr(output, name, None) for name in names}
    return fields | {"images": [np.asarray(image.convert("RGB")) for image in output.images]}


def main(job_dir: Path) -> None:
    """Start the engine, run the steps, write the results, close the engine."""
    from vllm.lora.request import LoRARequest
    from vllm_omni import Omni
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    job = json.loads((job_dir / "job.json").read_text())
    engine = {"dtype": "float32", "enforce_eager": True, "worker_extension_cls": PROBE, **job.get("engine", {})}
    omni = Omni(model=job["model"], **engine)
    results = []
    try:
        for index, step in enumerate(job["steps"]):
            if "rpc" in step:
                reply = omni.engine.collective_rpc(step["rpc"], args=tuple(step.get("args", ())), stage_ids=[0])
                results.append({"rpc": reply})
                continue
            if "copy" in step:
                source, destination = (job_dir / name for name in step["copy"])
                if source.is_dir():
                    shutil.copytree(source, destination, dirs_exist_ok=True)
                else:
                    shutil.copy(source, destination)
                results.append({"copy": step["copy"]})
                continue
            sampling = OmniDiffusionSamplingParams(**step.get("sampling", {}))
            if step.get("lora"):
                lora = dict(step["lora"])
                sampling.lora_scale = lora.pop("scale", 1.0)
                sampling.lora_request = LoRARequest(**lora)
            prompts = [load_prompt(job_dir, prompt) for prompt in step["generate"]]
            outputs = omni.generate(prompts, sampling, use_tqdm=False)
            if step.get("rollout"):
                torch.save([rollout_fields(output) for output in outputs], job_dir / f"step{index}.pt")
                results.append({"rollouts": len(outputs)})
                continue
            images = [np.asarray(image.convert("RGB")) for output in outputs for image in output.images]
            np.save(job_dir / f"step{index}.npy", np.stack(images))
            results.append({"images": len(images)})
    finally:
        omni.close()
    (job_dir / "result.json").write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
