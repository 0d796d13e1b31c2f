# Developer shortcuts (CI runs .ci/run: a fresh venv, then the full suite).
PYTHON ?= python

.PHONY: test test-full test-gpu lint format

test:  ## the fast tier: unit and in-process integration tests (no CLI subprocesses, no end-to-end runs)
	$(PYTHON) -m pytest -q -m "not slow"

test-full:  ## everything, as CI and the README run it
	$(PYTHON) -m pytest -q

test-gpu:  ## the CUDA tests (skipped without a GPU)
	$(PYTHON) -m pytest -q -m gpu

lint:
	ruff check .
	ruff format --check .

format:
	ruff check --fix .
	ruff format .
