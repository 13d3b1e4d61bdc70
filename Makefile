# Quick start: `make demo` and `make test`; both build .venv on first use.
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A local CPU wheel on the project's machines; a torch already importable is kept.
TORCH_SPEC ?= torch==2.13.0
# The venv holds about 2 GB (torch, triton); a wheel cache beside it would double that
# on machines whose disks run nearly full.
PIP_INSTALL := $(PY) -m pip install -q --no-cache-dir
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-prebuilt clean

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON_BOOT) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) setuptools wheel
	@# The torch in the venv stays: pinned for the extras, which must not pull another.
	@$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/keep-torch.txt
	$(PIP_INSTALL) -c $(VENV)/keep-torch.txt --no-build-isolation -e ".[test,trainer,examples]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m distil train

# Triton picks compiler or interpreter at import, so the interpreter tests run in a
# second process; the first runs everything else (ahead-of-time compiles included).
test: $(STAMP)
	$(PY) -m pytest -q tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m interpreter tests

bench: $(STAMP)
	$(PY) -m bench loss --device cpu

# The csrc/ extension built here for the GPU machine (its Python 3.12 and torch 2.11 with
# CUDA 13.0, sm_90), for `GPU_CHECK_PREBUILT=1 bash bench/gpu_check.sh` with build/prebuilt
# in the device tool's carry: the device then skips its ~70 s build. Downloads the CUDA
# torch wheels (~4.5 GB) into build/gpu-venv once; a build from csrc/ sources other than
# the device copy's is refused there and rebuilt (distil_kernels/cuda_ext.py).
GPU_PYTHON ?= python3.12
GPU_TORCH_SPEC ?= torch==2.11.0
GPU_CUDA_HOME ?= /usr/local/cuda-13.0
gpu-prebuilt:
	@test -x build/gpu-venv/bin/python || $(GPU_PYTHON) -m venv build/gpu-venv
	build/gpu-venv/bin/python -m pip install -q --no-cache-dir "$(GPU_TORCH_SPEC)" setuptools wheel
	rm -rf build/gpu-src && mkdir -p build/gpu-src/distil_kernels build/prebuilt
	cp -r csrc setup.py pyproject.toml build/gpu-src/ && cp distil_kernels/cuda_ext.py build/gpu-src/distil_kernels/
	cd build/gpu-src && CUDA_HOME=$(GPU_CUDA_HOME) DISTIL_KERNELS_CUDA_ARCHS=9.0 \
		../gpu-venv/bin/python setup.py -q build_ext --inplace
	rm -f build/prebuilt/_C*.so && cp build/gpu-src/distil_kernels/_C*.so build/prebuilt/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .benchmarks bench/out runs
