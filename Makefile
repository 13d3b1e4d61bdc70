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

.PHONY: demo test bench clean

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON_BOOT) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) setuptools wheel
	$(PIP_INSTALL) --no-build-isolation -e ".[test,trainer,examples]"
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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .benchmarks bench/out runs
