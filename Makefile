# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/demo

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, pinned, so the [torch] extra does not pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,torch,tpu,profile]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# The demo is the CPU job; JAX_PLATFORMS=cpu keeps libtpu (the [tpu] extra) from probing for a TPU.
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m clara_jax.demo --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -rs tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) workdir
