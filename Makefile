# Self-contained targets: each creates .venv on a fresh machine with only Python.
# The CPU torch 2.13.0 wheel is installed only when the venv has no torch, so users
# with a GPU keep their own torch (create .venv with it, or set PYTHON/VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# test-triton-3.6: the kernel tests (Triton interpreted, and the sm_90 compile of
# test_compiled_figures.py) under Triton 3.6, the GPU image's, beside the CPU torch 2.13.0 and the
# newest NumPy (2.4 and later broke Triton 3.6's interpreter on a runtime loop bound). All of
# tests/kernels: the files that never reach Triton add only about 7 s to the 40 s; the target takes
# about 1 min 45 s from scratch, most of it the install.
TRITON36_VENV ?= .venv-triton-3.6
TRITON36_PY := $(TRITON36_VENV)/bin/python
TRITON36_STAMP := $(TRITON36_VENV)/.installed

# The vllm-omni tiers run in venvs of their own: vllm-omni pins vllm, diffusers and transformers.
# PyPI's torch 2.13.0 and torchvision 0.28.0 come first, asked for as `torch===2.13.0` (string
# equality), so the local 2.13.0+cpu wheel is never taken: vllm-omni's full engine needs torchvision
# (transformers' Qwen2-VL processor imports it), and PyPI's torchvision loads only beside PyPI's torch
# (a CUDA build, which runs fine without a GPU; about 9 GB in a venv).
# test-vllm-omni: vllm 0.30.0 + vllm-omni 0.30.0 (the newest final release; pyproject's extra), every tier.
VLLM_OMNI_VENV ?= .venv-vllm-omni
VLLM_OMNI_PY := $(VLLM_OMNI_VENV)/bin/python
VLLM_OMNI_STAMP := $(VLLM_OMNI_VENV)/.installed

# test-vllm-omni-newest: vllm 0.32.0 + vllm-omni 0.32.0rc1 (the newest on the registry, a pre-release),
# the plugin's component tier.
VLLM_OMNI_NEWEST_VENV ?= .venv-vllm-omni-newest
VLLM_OMNI_NEWEST_PY := $(VLLM_OMNI_NEWEST_VENV)/bin/python
VLLM_OMNI_NEWEST_STAMP := $(VLLM_OMNI_NEWEST_VENV)/.installed

# test-verl-omni: verl-omni main's own pinned environment: vllm 0.27.0 + vllm-omni 0.27.0rc1 (which pins
# diffusers 0.38.0), verl at the commit verl-omni pins (VERL_SRC, a source snapshot) and verl-omni's own
# dependencies, with the verl-omni source (VERL_OMNI_SRC) on PYTHONPATH; neither is on the registry.
VERL_OMNI_VENV ?= .venv-verl-omni
VERL_OMNI_PY := $(VERL_OMNI_VENV)/bin/python
VERL_OMNI_STAMP := $(VERL_OMNI_VENV)/.installed
VERL_OMNI_SRC ?= $(wildcard ../shared/verl-omni)
VERL_SRC ?= $(wildcard ../shared/verl)

# The plugin's component tier: every vllm-omni test but the full-engine ones and verl-omni's, on vllm's
# CPU platform (vllm 0.27 picks it only when asked).
VLLM_OMNI_COMPONENTS = VLLM_TARGET_DEVICE=cpu $(1) -m pytest -q -m "vllm_omni and not vllm_omni_engine and not verl_omni"

# A venv with PyPI's torch and torchvision, then $(2): the vllm and vllm-omni pins.
define vllm_omni_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q "torch===2.13.0" "torchvision===0.28.0"
	$(1)/bin/python -m pip install -q $(2)
endef

.PHONY: demo test test-triton-3.6 test-vllm-omni test-vllm-omni-newest test-verl-omni bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qwen-image-omni check

test: $(STAMP)
	$(PY) -m pytest -q

$(TRITON36_STAMP): pyproject.toml
	test -x $(TRITON36_PY) || $(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_PY) -m pip install -q torch==2.13.0 triton==3.6.0 "numpy>=2.4"
	$(TRITON36_PY) -m pip install -q -e ".[test]"
	touch $(TRITON36_STAMP)

test-triton-3.6: $(TRITON36_STAMP)
	$(TRITON36_PY) -m pytest -q tests/kernels

$(VLLM_OMNI_STAMP): pyproject.toml tests/support/cpu_platform/pyproject.toml
	$(call vllm_omni_venv,$(VLLM_OMNI_VENV),"vllm==0.30.0" "vllm-omni==0.30.0")
	$(VLLM_OMNI_PY) -m pip install -q -e ".[test,vllm-omni]" -e tests/support/cpu_platform
	touch $(VLLM_OMNI_STAMP)

test-vllm-omni: $(VLLM_OMNI_STAMP)
	$(VLLM_OMNI_PY) -m pytest -q -m vllm_omni

$(VLLM_OMNI_NEWEST_STAMP): pyproject.toml tests/support/cpu_platform/pyproject.toml
	$(call vllm_omni_venv,$(VLLM_OMNI_NEWEST_VENV),"vllm==0.32.0" "vllm-omni==0.32.0rc1")
	$(VLLM_OMNI_NEWEST_PY) -m pip install -q -e ".[test]" -e tests/support/cpu_platform
	touch $(VLLM_OMNI_NEWEST_STAMP)

test-vllm-omni-newest: $(VLLM_OMNI_NEWEST_STAMP)
	$(call VLLM_OMNI_COMPONENTS,$(VLLM_OMNI_NEWEST_PY))

# verl is copied out of its snapshot first (pip builds inside the source folder). verl-omni's own
# dependencies come from its pyproject (its `vllm-omni` extra too, but for vllm-omni itself, installed
# already), after vllm-omni, as verl-omni's install docs order them: they take transformers back to
# 5.14.1 and accelerate up to 1.14 (verl-omni's uv override) over vllm-omni 0.27.0rc1's
# accelerate==1.12.0 pin, which pip reports as a conflict it leaves in place.
$(VERL_OMNI_STAMP): pyproject.toml tests/support/cpu_platform/pyproject.toml
	$(call vllm_omni_venv,$(VERL_OMNI_VENV),"vllm==0.27.0" "vllm-omni==0.27.0rc1")
	rm -rf $(VERL_OMNI_VENV)/src && mkdir -p $(VERL_OMNI_VENV)/src && cp -r $(VERL_SRC) $(VERL_OMNI_VENV)/src/verl
	$(VERL_OMNI_PY) -c "import sys, tomllib; p = tomllib.load(open(sys.argv[1], 'rb'))['project']; \
		extra = [r for r in p['optional-dependencies']['vllm-omni'] if not r.startswith('vllm-omni')]; \
		print('\n'.join(p['dependencies'] + extra))" \
		$(VERL_OMNI_SRC)/pyproject.toml > $(VERL_OMNI_VENV)/verl-omni-requirements.txt
	$(VERL_OMNI_PY) -m pip install -q $(VERL_OMNI_VENV)/src/verl -r $(VERL_OMNI_VENV)/verl-omni-requirements.txt
	$(VERL_OMNI_PY) -m pip install -q -e ".[test]" -e tests/support/cpu_platform
	touch $(VERL_OMNI_STAMP)

# Skips (exit 0, one line saying why) without the verl and verl-omni sources: set VERL_SRC and
# VERL_OMNI_SRC (defaults ../shared/verl and ../shared/verl-omni). Runs the plugin's component tier on
# vllm-omni 0.27.0rc1, then the verl-omni tier, about 10 minutes with its whole training runs.
test-verl-omni:
	@if [ ! -d "$(VERL_OMNI_SRC)/verl_omni" ] || [ ! -d "$(VERL_SRC)/verl" ]; then \
		echo "test-verl-omni: SKIPPED: no verl or verl-omni source (set VERL_SRC and VERL_OMNI_SRC; defaults ../shared/verl, ../shared/verl-omni)"; \
	else \
		$(MAKE) $(VERL_OMNI_STAMP) && \
		$(call VLLM_OMNI_COMPONENTS,$(VERL_OMNI_PY)) && \
		VLLM_TARGET_DEVICE=cpu PYTHONPATH="$(abspath $(VERL_OMNI_SRC))" $(VERL_OMNI_PY) -m pytest -q -m verl_omni; \
	fi

bench: $(STAMP)
	$(PY) benchmarks/bench_qk_norm_rope.py
	$(PY) benchmarks/bench_transformer.py
	$(PY) benchmarks/rollout_trainer_kl.py
	$(PY) benchmarks/kernel_static.py

# The cuda-marked tests and the GPU benchmark tables, one summary table (benchmarks/gpu_check.py;
# options in GPU_CHECK_ARGS, e.g. "--out PATH"). It fails at once, with one line, without a GPU.
# PY=... on the command line runs that interpreter as it is, with no install step (for a GPU
# machine that is offline or brings its own torch); the script runs this checkout in place.
gpu-check: $(if $(filter command line,$(origin PY)),,$(STAMP))
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(TRITON36_VENV) $(VLLM_OMNI_VENV) $(VLLM_OMNI_NEWEST_VENV) $(VERL_OMNI_VENV) build *.egg-info
