# pagedkv developer entry points. `make test` and `make demo` create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PACKAGES := . $(sort $(dir $(wildcard backends/*/pyproject.toml))) conformance
PYTEST_FLAGS ?=
# One BLAS thread: the NumPy kernels and the demo's small matmuls gain nothing from more,
# and spinning BLAS threads on a shared 2-core machine slow everything down several times.
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: test test-all demo bench lint install clean wheels

# backends' C sources too: an editable install compiles them once, so a change needs a reinstall
$(STAMP): requirements-dev.txt pyproject.toml $(wildcard backends/*/pyproject.toml backends/*/setup.py backends/*/csrc/*) \
		conformance/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps $(foreach p,$(PACKAGES),-e $(p))
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q -m "not slow and not benchmark" $(PYTEST_FLAGS)

test-all: lint
	$(PY) -m pytest -q -m "not benchmark" $(PYTEST_FLAGS)

demo: $(STAMP)
	$(VENV)/bin/pagedkv demo

# build every distribution's sdist + wheel; install core + numpy + conformance wheels in a fresh venv; run them
wheels: $(STAMP)
	PY=$(PY) .ci/wheels

bench: $(STAMP)
	$(PY) -m pytest -q -s -m benchmark --benchmark-only --benchmark-columns=min,median,mean,rounds $(PYTEST_FLAGS)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks .hypothesis
