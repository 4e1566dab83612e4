# The two set-up commands of the README: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv on first use and installs what it needs; later runs reuse it and rebuild the
# extension when csrc/ or the build files change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.13.0 is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEPS   := numpy pytest tqdm matplotlib scikit-build-core pybind11 ninja triton transformers tokenizers accelerate scikit-learn mnist1d trl
SOURCES := $(shell find csrc -type f) CMakeLists.txt pyproject.toml

.PHONY: demo test bench venv clean

venv: $(VENV)/.deps $(VENV)/.built

$(VENV)/.deps:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	PYTHON=$(PY) bash scripts/dev_build.sh
	touch $@

demo: venv
	$(PY) -m fastkd.cli demo

test: venv
	$(PY) -m pytest -q -ra

bench: venv
	$(PY) bench/kd.py

clean:
	rm -rf build $(VENV)
