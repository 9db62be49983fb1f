# Two entry points for a fresh machine: `make demo` and `make test`.
# torch==2.13.0 (the local CPU build) is installed first and every later
# install is constrained to it, so pip never pulls CUDA wheels.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
PIP_Q   := --quiet --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test venv install install-test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(PIP) install $(PIP_Q) torch==2.13.0
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) install $(PIP_Q) -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) install $(PIP_Q) -c constraints.txt -e ".[test]"
	touch $@

venv install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/python examples/quickstart.py

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/guardalign bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
