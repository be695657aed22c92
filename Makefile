# The two commands of the README (plus gpu-check, the GPU acceptance check):
#   make demo   set up .venv and run the main job on built-in generated data
#   make test   set up .venv and run the tests
#   make gpu-check   the GPU acceptance run (tools/gpu_check.py)
#   make gpu-bundle / gpu-check-offline   the same on a GPU machine without internet whose python3
#                    has torch: wheels built here into .whl/, installed there into $(GPU_SITE)
# VENV_FLAGS=--system-site-packages reuses a detectron2 you built yourself.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
# torch/torchvision wheels for Linux x86_64 on the registry are the CUDA builds; they run on CPU.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
GPU_SITE ?= /tmp/site
BUNDLE_FLAGS ?= --bench

.PHONY: install test demo gpu-check gpu-bundle gpu-check-offline clean

$(VENV)/.installed: setup.py tools/install_detectron2.py Makefile
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) tools/install_detectron2.py
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: install
	$(PY) tools/run_main_job.py

# GPU acceptance: every stage's figures in output/gpu_check/gpu_check.json (tiny CPU mode without CUDA)
gpu-check: install
	$(PY) tools/gpu_check.py

# here, with internet; --bench (the default) adds mmpretrain: the pretrain stage's reference
gpu-bundle: install
	$(PY) tools/gpu_bundle.py build $(BUNDLE_FLAGS)

# there, offline, with the machine's own python3 (torch, torchvision): no .venv
gpu-check-offline:
	$(PYTHON) tools/gpu_bundle.py install --target $(GPU_SITE)
	PYTHONPATH=$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) tools/gpu_check.py

clean:
	rm -rf $(VENV) output
