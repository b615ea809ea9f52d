# Set-up and the three jobs the README promises: test, demo, bench.
# The venv is built once (torch first, pinned to the local CPU build, so that
# nothing pulls the CUDA wheels), then rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: test demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,bench]" $(TORCH)
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest

demo: $(VENV)/.installed
	$(PY) examples/demo.py

bench: $(VENV)/.bench
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
