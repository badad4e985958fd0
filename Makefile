# Set-up and everyday commands. `make demo` runs the main job, `make test` the test suite; both create .venv on
# first use and reuse it after. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CUDA_VENV := .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
BUILD_LOCK := /tmp/structalign-build.lock

.PHONY: demo test ext check-cuda bench clean

$(VENV)/.installed: requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-cpu.txt
	touch $@

# Editable install once (registers the package and the `structalign` command), then incremental in-place rebuilds.
$(VENV)/.editable: $(VENV)/.installed setup.py
	flock $(BUILD_LOCK) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

ext: $(VENV)/.editable
	flock $(BUILD_LOCK) $(PY) setup.py -q build_ext --inplace

test: ext
	$(PY) -m pytest -q tests

demo: ext
	$(VENV)/bin/structalign demo

bench: ext
	$(PY) benchmarks/ops.py

# Compile-and-link check of the whole extension, CUDA launchers included, against a CUDA build of torch
# (torch 2.14.1+cu130 in a separate venv). Nothing runs on a GPU; the .so is loaded and its CUDA kernels listed.
$(CUDA_VENV)/.installed:
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q torch==2.14.1 numpy ninja setuptools wheel
	touch $@

check-cuda: $(CUDA_VENV)/.installed
	@command -v nvcc >/dev/null || { echo "check-cuda: SKIPPED (no nvcc on PATH)"; exit 0; }
	CUDA_HOME=$(CUDA_HOME) STRUCTALIGN_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" flock $(BUILD_LOCK) \
	  $(CUDA_PY) setup.py -q build_ext --build-temp build/check-cuda/tmp --build-lib build/check-cuda/lib
	$(CUDA_PY) tools/check_cuda_build.py build/check-cuda/lib

clean:
	rm -rf build structalign/_C*.so $(VENV)/.editable
