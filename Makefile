# Self-contained targets: each creates .venv on a fresh machine with only Python.
# The CPU torch 2.13.0 wheel is installed only when the venv has no torch, so users
# with a GPU keep their own torch (create .venv with it, or set PYTHON/VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# test-vllm-omni runs in its own venv: vllm-omni pins vllm, diffusers and transformers.
VLLM_OMNI_VENV ?= .venv-vllm-omni
VLLM_OMNI_PY := $(VLLM_OMNI_VENV)/bin/python
VLLM_OMNI_STAMP := $(VLLM_OMNI_VENV)/.installed

# test-verl-omni: vllm-omni's venv recipe plus verl 0.9.1 and tensordict (verl pins its own transformers),
# with the verl-omni source snapshot on PYTHONPATH (verl-omni is not on the package registry).
VERL_OMNI_VENV ?= .venv-verl-omni
VERL_OMNI_PY := $(VERL_OMNI_VENV)/bin/python
VERL_OMNI_STAMP := $(VERL_OMNI_VENV)/.installed
VERL_OMNI_SRC ?= $(wildcard ../shared/verl-omni)

.PHONY: demo test test-vllm-omni test-verl-omni bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qwen-image-omni check

test: $(STAMP)
	$(PY) -m pytest -q

# vllm==0.30.0 + vllm-omni==0.30.0 (the extra) on PyPI's build of torch 2.13.0 and torchvision 0.28.0.
# vllm-omni's full engine needs torchvision (transformers' Qwen2-VL processor imports it), and PyPI's
# torchvision loads only beside PyPI's torch (a CUDA build, which runs fine without a GPU; about
# 9 GB in the venv). `torch===2.13.0` (string equality) asks for that build by name, so a local
# 2.13.0+cpu wheel on pip's find-links is not taken instead.
$(VLLM_OMNI_STAMP): pyproject.toml tests/support/cpu_platform/pyproject.toml
	test -x $(VLLM_OMNI_PY) || $(PYTHON) -m venv $(VLLM_OMNI_VENV)
	$(VLLM_OMNI_PY) -m pip install -q "torch===2.13.0" "torchvision===0.28.0"
	$(VLLM_OMNI_PY) -m pip install -q -e ".[test,vllm-omni]"
	$(VLLM_OMNI_PY) -m pip install -q -e tests/support/cpu_platform
	touch $(VLLM_OMNI_STAMP)

test-vllm-omni: $(VLLM_OMNI_STAMP)
	$(VLLM_OMNI_PY) -m pytest -q -m vllm_omni

$(VERL_OMNI_STAMP): pyproject.toml tests/support/cpu_platform/pyproject.toml
	test -x $(VERL_OMNI_PY) || $(PYTHON) -m venv $(VERL_OMNI_VENV)
	$(VERL_OMNI_PY) -m pip install -q "torch===2.13.0" "torchvision===0.28.0"
	$(VERL_OMNI_PY) -m pip install -q -e ".[test,vllm-omni]"
	$(VERL_OMNI_PY) -m pip install -q -e tests/support/cpu_platform
	# Last, on their own, as pip finds no single resolution of all the pins: verl 0.9.1 (it asks for
	# transformers<5.11, which breaks vllm-omni 0.30's imports; vllm-omni's 5.14.1 goes back on and
	# verl runs with it) and what verl-omni main imports besides (its pyproject: TransferQueue, peft).
	$(VERL_OMNI_PY) -m pip install -q "verl==0.9.1" tensordict "TransferQueue==0.1.8" peft
	$(VERL_OMNI_PY) -m pip install -q "transformers==5.14.1" "accelerate==1.12.0"
	touch $(VERL_OMNI_STAMP)

# Skips (exit 0, one line saying why) when no verl-omni source is found: set VERL_OMNI_SRC to a checkout.
test-verl-omni:
	@if [ -z "$(VERL_OMNI_SRC)" ] || [ ! -d "$(VERL_OMNI_SRC)/verl_omni" ]; then \
		echo "test-verl-omni: SKIPPED: no verl-omni source (set VERL_OMNI_SRC=<a verl-omni checkout>; default ../shared/verl-omni)"; \
	else \
		$(MAKE) $(VERL_OMNI_STAMP) && \
		VLLM_TARGET_DEVICE=cpu PYTHONPATH="$(abspath $(VERL_OMNI_SRC))" $(VERL_OMNI_PY) -m pytest -q -m verl_omni; \
	fi

bench: $(STAMP)
	$(PY) benchmarks/bench_qk_norm_rope.py
	$(PY) benchmarks/bench_transformer.py
	$(PY) benchmarks/rollout_trainer_kl.py

# The cuda-marked tests and the GPU benchmark tables, one summary table (benchmarks/gpu_check.py;
# options in GPU_CHECK_ARGS, e.g. "--out PATH"). It fails at once, with one line, without a GPU.
# PY=... on the command line runs that interpreter as it is, with no install step (for a GPU
# machine that is offline or brings its own torch); the script runs this checkout in place.
gpu-check: $(if $(filter command line,$(origin PY)),,$(STAMP))
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_OMNI_VENV) $(VERL_OMNI_VENV) build *.egg-info
