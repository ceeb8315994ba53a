# fastuda: `make demo` and `make test` work on a fresh clone; every step is idempotent.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check -q
DEPS    := $(VENV)/.stamp-deps
BUILT   := $(VENV)/.stamp-build
EMU     := $(VENV)/.stamp-emu
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)
# ccache (when installed) makes rebuilds near-free: its compiler links shadow gcc/g++
ifneq ($(wildcard /usr/lib/ccache/g++),)
export PATH := /usr/lib/ccache:$(PATH)
export PYTORCH_NVCC := ccache nvcc
# pip builds in a new temporary folder each time: without NOHASHDIR that folder (in the -g
# debug info) would be part of every hash and no rebuild would hit the cache
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_NOHASHDIR := 1
endif
export MAX_JOBS ?= 2
# The CUDA kernels compile only where a GPU can run them (minutes of nvcc saved on a CPU machine);
# FASTUDA_CUDA=1 builds them anyway, as CI does to prove they compile
export FASTUDA_CUDA ?= $(if $(shell nvidia-smi -L 2>/dev/null),auto,0)

.PHONY: setup build test demo bench lint clean gpu-check

setup: $(BUILT)

$(PY):
	python3 -m venv $(VENV)

# torch is pinned: 2.14.1 installs from a local file on our machines (no multi-GB download)
$(DEPS): pyproject.toml | $(PY)
	$(PIP) install torch==2.14.1 setuptools wheel ninja
	$(PIP) install numpy pillow tqdm tensorboard pytest ruff cityscapesscripts
	# timm (the `vit` extra): model.name = "vit" builds DINOv2 ViTs with it (brings safetensors)
	$(PIP) install timm
	# the `export` extra: fastuda.export writes ONNX (dynamo exporter) and checks it in onnxruntime
	$(PIP) install onnx onnxscript onnxruntime
	# DALI (the `dali` extra): data.loader = "auto" uses it, and the tests compare it with torch's
	$(PIP) install nvidia-dali-cuda130
	touch $@

# fastuda._C first (all the demo needs); the emulated CUDA kernels (fastuda._C_emu) are compiled
# in place for the tests only, in their own step
$(BUILT): $(DEPS) $(SOURCES)
	FASTUDA_EXTENSIONS=main $(PIP) install --no-build-isolation --no-deps -e .
	touch $@

$(EMU): $(BUILT)
	FASTUDA_EXTENSIONS=emu $(PY) setup.py -q build_ext --inplace
	touch $@

build: $(BUILT)

test: $(BUILT) $(EMU)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(BUILT)
	$(PY) -m fastuda.train configs/demo.toml --resume auto $(DEMO_ARGS)

bench: $(BUILT)
	$(PY) benchmarks/kernel_bench.py

# The prepared GPU check (benchmarks/gpu_check.py): on the GPU machine, with the python3 found
# there (no venv, nothing installed from a registry); without a GPU it says so and exits 0
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --python $(GPU_PYTHON) --out "$${OUT:-bench_results/gpu_check}" $(GPU_CHECK_ARGS)

lint: $(DEPS)
	$(PY) -m ruff check fastuda tests benchmarks setup.py

clean:
	rm -rf build *.egg-info fastuda/*.so $(BUILT) $(EMU)
