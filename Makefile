# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   create .venv, install lipnorm with what the demo needs, run `lipnorm demo`
#   make test   create .venv, install every backend and test tool, run the suite, build the docs
# Installs are recorded in stamp files inside .venv, so a repeated command installs nothing
# unless pyproject.toml or this Makefile changed.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# pip without this pin takes the newest torch, a CUDA build of several GB.
TORCH_PIN := torch==2.13.0

# Extras the demo needs (pyproject's `demo` extra lists torch, Keras on TensorFlow-CPU,
# scikit-learn and matplotlib); a new demo section adds what it needs there.
DEMO_EXTRAS := demo
# tensorflow-cpu rather than tensorflow: CI has no GPU. cupy needs CUDA and is not installed.
TEST_EXTRAS := test,demo,torch,tensorflow-cpu,keras,jax,dask,onnx,cli,docs

# Parallel test workers (pytest-xdist); PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

# In CI every backend must be there: conftest turns a backend named here but missing into an error.
ifeq ($(CI),true)
export LIPNORM_TEST_BACKENDS ?= numpy,array_api_strict,torch,tensorflow,jax,dask
export HYPOTHESIS_PROFILE ?= ci
endif

.PHONY: demo test test-only docs docs-serve figures bench clean

demo: $(VENV)/.demo-installed
	$(VENV)/bin/lipnorm demo

test: $(VENV)/.test-installed
	$(MAKE) test-only

# The suite and the docs build, without the install check.
test-only:
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs: $(VENV)/.test-installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: $(VENV)/.test-installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

# Every figure of the docs (docs/img/), from the scripts that make them: docs/figures/*.py,
# the plots of benchmarks/results/bench_conv.json and bench_tight.json, and the examples that draw one.
# A few minutes on a CPU; the committed figures are what this wrote.
FIGURE_SCRIPTS := $(wildcard docs/figures/[a-z]*.py)
figures: $(VENV)/.test-installed
	set -e; for script in $(FIGURE_SCRIPTS); do PYTHONPATH=. OMP_NUM_THREADS=1 $(PY) $$script; done
	PYTHONPATH=. $(PY) benchmarks/plot_conv.py
	PYTHONPATH=. $(PY) benchmarks/plot_tight.py
	PYTHONPATH=. OMP_NUM_THREADS=1 $(PY) examples/sngan_digits_torch.py --plot docs/img/sngan_conv_norms.png
	mkdir -p build
	PYTHONPATH=. OMP_NUM_THREADS=1 $(PY) examples/checkpoint_sigma_histogram.py \
		--checkpoint build/example-checkpoint.safetensors --plot docs/img/checkpoint_sigma_histogram.png

bench: $(VENV)/.test-installed
	$(PY) benchmarks/bench_sigma.py

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml Makefile | $(PY)
	$(PIP) install --progress-bar off -e '.[$(DEMO_EXTRAS)]' '$(TORCH_PIN)'
	touch $@

# The test install includes everything the demo needs.
$(VENV)/.test-installed: pyproject.toml Makefile | $(PY)
	$(PIP) install --progress-bar off -e '.[$(TEST_EXTRAS)]' '$(TORCH_PIN)'
	touch $(VENV)/.demo-installed $@

clean:
	rm -rf $(VENV) site site-screenshots .pytest_cache .hypothesis
