# Two commands for a fresh machine (Python 3.10+ and pip, nothing else):
#   make demo   set up .venv, obtain SmolLM2-135M-Instruct, generate an answer with it
#   make test   set up .venv with the test dependencies and run the whole test suite
# TORCH pins the CPU wheel; override it for a GPU build, e.g. make demo TORCH='torch'.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DEMO_MODEL ?= models/SmolLM2-135M-Instruct
PROMPT ?= What is the capital of France? Answer in one sentence.
PYTEST_ARGS ?=

BIN := $(VENV)/bin

.PHONY: demo test test-fast setup clean-venv

demo: $(VENV)/.base
	$(BIN)/python scripts/fetch_demo_model.py $(DEMO_MODEL)
	$(BIN)/llamacli generate --model $(DEMO_MODEL) --prompt "$(PROMPT)" --max-new-tokens 64 --stats

test: $(VENV)/.test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

setup: $(VENV)/.base

$(VENV)/.base: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

clean-venv:
	rm -rf $(VENV)
