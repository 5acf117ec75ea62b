# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/demo

.PHONY: demo test test-fast install clean

# glibc malloc on CPU: XLA frees and reallocates each step's temporary buffer (452 MB for the
# demo's stage-1 step); above glibc's mmap threshold that is a fresh mmap whose every page
# faults in again, a quarter of the step's time. One arena, no mmap and a high trim threshold
# keep the memory in the heap: 1.2x faster tiny-model steps, identical numbers.
export MALLOC_ARENA_MAX ?= 1
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296

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
	$(PY) -m pytest -q -rs --durations=30 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) workdir
