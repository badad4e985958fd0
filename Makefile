# Set-up and everyday commands. `make demo` runs the main job, `make test` the test suite; both create .venv on
# first use and reuse it after. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CUDA_VENV := .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
# `make check-cuda` builds against the torch release the runtime pins (requirements-cpu.txt), as a CUDA build.
TORCH_PIN := $(shell sed -n 's/^torch==\([0-9][0-9.]*\).*/\1/p' requirements-cpu.txt)
CUDA_STAMP := $(CUDA_VENV)/.installed-torch-$(TORCH_PIN)
CHECK_CUDA_ARCHS ?= 8.0;9.0
export MAX_JOBS ?= 2
BUILD_LOCK := /tmp/structalign-build.lock
OUT ?= runs/gpu-check
# What `make gpu-check` needs beyond the GPU machines' image (README "GPU check"): pydantic and its needs, for CPython
# 3.12 (the image's) and for the local python (the dry run here), one folder per Python: .gpu-deps/cp312, ...
GPU_DEPS := .gpu-deps
GPU_DEPS_PYTHONS := $(sort 3.12 $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'))
PYDANTIC_REQ := $(shell sed -n 's/^\(pydantic[^ #]*\).*/\1/p' requirements-cpu.txt)
# A venv with only the image's packages that the GPU check uses (no pydantic, no DALI), where its dry run runs with
# $(GPU_DEPS) (tests/test_gpu_check.py). torch and Triton: the pinned releases unless IMAGE_TORCH / IMAGE_TRITON name
# others (the registry has no CPU build of the image's torch 2.11: IMAGE_TORCH=2.11.0 IMAGE_TRITON=3.6.0 brings its
# CUDA build, ~4 GB).
IMAGE_VENV := .venv-image
IMAGE_TORCH ?= $(TORCH_PIN)
IMAGE_TRITON ?= $(shell sed -n 's/^triton==\([0-9][0-9.]*\).*/\1/p' requirements-cpu.txt)
IMAGE_PACKAGES := torch==$(IMAGE_TORCH) triton==$(IMAGE_TRITON) numpy pytest pyyaml scipy pillow tqdm h5py onnx \
  "opencv-python-headless<5" setuptools ninja

.PHONY: demo test ext check-cuda check-cuda-build bench gpu-check gpu-deps image-venv gpu-check-dry clean

$(VENV)/.installed: requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-cpu.txt
	touch $@

# The test suite's own packages (pytest, hypothesis, import-linter, scikit-image) on top of the runtime.
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

# Editable install once (registers the package and the `structalign` command; STRUCTALIGN_NO_EXT=1 leaves the
# extension to `ext`, which compiles it once, incrementally, instead of pip compiling it first in a temp dir).
$(VENV)/.editable: $(VENV)/.installed setup.py
	STRUCTALIGN_NO_EXT=1 flock $(BUILD_LOCK) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

ext: $(VENV)/.editable
	flock $(BUILD_LOCK) $(PY) setup.py -q build_ext --inplace

# pytest-xdist workers, whole test files each (a file's fixtures are made once); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: ext $(VENV)/.installed-test gpu-deps image-venv
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: ext
	$(VENV)/bin/structalign demo

bench: ext
	$(PY) benchmarks/ops.py

# Compile-and-link check of the whole extension, CUDA launchers included, against a CUDA build of the torch release
# that requirements-cpu.txt pins (PyPI's Linux wheel of torch==$(TORCH_PIN) is the cu130 build; the config files are
# bypassed because their find-links folder holds the +cpu wheel, which pip would prefer). Nothing runs on a GPU: the
# newest .so built is loaded, its ops must all have CUDA kernels, and its SASS architectures are listed.
# Skips (exit 0, nothing built, no venv) when no CUDA toolkit is found (tools/cuda_home.py; CUDA_HOME=none forces it).
check-cuda:
	@cuda_home=$$($(PYTHON) tools/cuda_home.py) || { \
	echo "check-cuda: SKIPPED (no CUDA toolkit: no nvcc in CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda); nothing built"; \
	  exit 0; }; \
	$(MAKE) --no-print-directory check-cuda-build CUDA_HOME="$$cuda_home"

$(CUDA_STAMP):
	rm -rf $(CUDA_VENV)
	$(PYTHON) -m venv $(CUDA_VENV)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(CUDA_PY) -m pip install -q \
	  torch==$(TORCH_PIN) numpy ninja setuptools wheel
	$(CUDA_PY) -c "import sys, torch; ok = torch.version.cuda and torch.__version__.split('+')[0] == '$(TORCH_PIN)'; \
	  print('check-cuda: torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(0 if ok else \
	  'check-cuda: expected a CUDA build of torch $(TORCH_PIN) in $(CUDA_VENV)')"
	touch $@

check-cuda-build: $(CUDA_STAMP)
	@test -n "$(CUDA_HOME)" || { echo "check-cuda-build: run it as make check-cuda"; exit 2; }
	CUDA_HOME=$(CUDA_HOME) STRUCTALIGN_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CHECK_CUDA_ARCHS)" flock $(BUILD_LOCK) \
	  $(CUDA_PY) setup.py -q build_ext --build-temp build/check-cuda/tmp --build-lib build/check-cuda/lib
	CUDA_HOME=$(CUDA_HOME) $(CUDA_PY) tools/check_cuda_build.py build/check-cuda/lib \
	  --archs "$(CHECK_CUDA_ARCHS)" --torch-pin $(TORCH_PIN)

# The whole GPU path in one short run, on a GPU machine's own python3 and torch (no venv, nothing installed, no
# network; carry $(GPU_DEPS) there): builds for the local GPU, runs the `gpu` tests, compute-sanitizer, the benchmarks;
# writes $(OUT)/results.{json,md}. `make gpu-check-dry` runs its dry run here, in $(IMAGE_VENV).
gpu-check:
	$(PYTHON) tools/gpu_check.py --out $(OUT)

gpu-check-dry: gpu-deps image-venv
	$(IMAGE_VENV)/bin/python tools/gpu_check.py --dry-run --out $(OUT)-dry

gpu-deps: $(GPU_DEPS)/.complete

$(GPU_DEPS)/.complete: requirements-cpu.txt
	rm -rf $(GPU_DEPS)
	for v in $(GPU_DEPS_PYTHONS); do PIP_ROOT_USER_ACTION=ignore $(PYTHON) -m pip install -q --no-warn-conflicts \
	  --no-compile --only-binary=:all: --implementation cp \
	  --python-version $$v --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --target $(GPU_DEPS)/cp$${v/./} "$(PYDANTIC_REQ)" || exit 1; done
	@mib=$$(du -sm $(GPU_DEPS) | cut -f1); echo "gpu-deps: $(GPU_DEPS) holds $$mib MiB"; \
	  test $$mib -le 64 || { echo "gpu-deps: over 64 MiB"; exit 1; }
	touch $@

image-venv: $(IMAGE_VENV)/.installed-torch-$(IMAGE_TORCH)-triton-$(IMAGE_TRITON)

$(IMAGE_VENV)/.installed-torch-$(IMAGE_TORCH)-triton-$(IMAGE_TRITON): requirements-cpu.txt
	rm -rf $(IMAGE_VENV)
	$(PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install -q $(IMAGE_PACKAGES)
	touch $@

clean:
	rm -rf build structalign/_C*.so $(VENV)/.editable
