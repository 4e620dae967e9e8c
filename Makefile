# The README's two commands are `make run` and `make test`; .ci/run calls `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup system-deps lint types pytest dev-orthanc clean

run: setup  ## install, migrate and serve on the embedded defaults
	$(BIN)/orthanc-intake migrate
	$(BIN)/orthanc-intake serve

test: setup system-deps lint types pytest  ## install everything, then lint, types and the suite

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) scripts/check_python.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

system-deps:  ## Debian packages the tests run for real (Orthanc, PostgreSQL)
	bash scripts/system-deps.sh

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types:
	$(BIN)/mypy

pytest:
	$(BIN)/python -m pytest $(PYTEST_ARGS)

dev-orthanc: setup system-deps  ## a local private Orthanc on 127.0.0.1:8042 for development
	$(BIN)/python scripts/dev_orthanc.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
