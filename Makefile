# The README's two commands are `make run` and `make test`; .ci/run calls `make test`.
# Each installs what it needs and no more: `run` the runtime dependencies, `test` the
# test extras and the Debian packages the suite runs for real as well.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test
# `make dev-orthanc DEV_ORTHANC_PORT=8043`: empty reuses the last port (8042 at first).
DEV_ORTHANC_PORT ?=
# pytest-xdist workers for `make test`: one more than the CPUs (the suite waits on real
# processes and timeouts part of the time; measured on 2 CPUs: 2 workers 610 s, 3 workers
# 536 s, with the CPUs 73 % and 89 % busy). Each takes whole modules (--dist loadfile), so
# a module's shared intakes start once. `PYTEST_WORKERS=0` runs serially.
PYTEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))

.PHONY: run test setup system-deps lint types pytest dev-orthanc clean

run: $(RUNTIME)  ## install the runtime, migrate and serve on the embedded defaults
	$(BIN)/orthanc-intake migrate
	$(BIN)/orthanc-intake serve

test: setup system-deps lint types pytest  ## install everything, then lint, types and the suite

setup: $(TESTDEPS)  ## the runtime and the test extras (pytest, ruff, mypy, playwright, ...)

$(RUNTIME): pyproject.toml
	$(PYTHON) scripts/check_python.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(TESTDEPS): $(RUNTIME)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

system-deps:  ## Debian packages the tests run for real (Orthanc, PostgreSQL, PHP, Chromium)
	bash scripts/system-deps.sh

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types:
	$(BIN)/mypy

pytest:
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

dev-orthanc:  ## a private Orthanc for `make run`, answering 127.0.0.1 only (Debian's orthanc)
	bash scripts/orthanc-deps.sh
	$(PYTHON) scripts/dev_orthanc.py $(if $(DEV_ORTHANC_PORT),--port $(DEV_ORTHANC_PORT))

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
