# Self-contained targets: each creates .venv on a fresh machine with only Python.
# The CPU torch 2.13.0 wheel is installed only when the venv has no torch, so users
# with a GPU keep their own torch (create .venv with it, or set PYTHON/VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qwen-image-omni check

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_qk_norm_rope.py
	$(PY) benchmarks/bench_transformer.py
	$(PY) benchmarks/rollout_trainer_kl.py

clean:
	rm -rf $(VENV) build *.egg-info
