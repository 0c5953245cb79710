"""verl-omni's own trainer, whole, on the CPU: the inputs, stand-ins and launcher of ``tests/integrations/verl_omni/test_run.py``.

Test support only (``tests/`` is not in the wheel). A run is ``python -m verl_omni.trainer.main_diffusion``
with Ray local, verl-omni's FSDP2 diffusion engine, its vllm-omni rollout server and its reward loop:

- :mod:`.run_inputs`: the tiny random Qwen-Image checkpoint (tokenizer with a chat template) and the
  prompt data, written in code;
- :mod:`.reward`: the reward, the mean brightness of the image (trivial, but computed from the image);
- :mod:`.peft_fix_only`: the ``external_lib`` of runs that keep verl-omni's own Qwen-Image pipeline and
  take from us only the LoRA weight-sync workaround (so both runs train the same way);
- :mod:`.launch`: the command line, its environment and the metrics reader.

What stands in for the GPU is in ``tests/support/cpu_platform`` (a verl platform, a vllm-omni platform and
its attention backend); :mod:`.launch` lists each piece and why it is needed.
"""
