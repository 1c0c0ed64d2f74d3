# The two set-up commands of the README are `make demo` and `make test`; both create
# `.venv` from scratch on a fresh machine.
VENV ?= .venv
export NO_MKDOCS_2_WARNING := 1
PYTHON := $(VENV)/bin/python
DEV_STAMP := $(VENV)/.installed-dev
EXAMPLES_STAMP := $(VENV)/.installed-examples
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test lint pytest bench docs docs-serve

$(PYTHON):
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip

$(DEV_STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $@

$(EXAMPLES_STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --quiet -e ".[examples]"
	touch $@

$(BENCH_STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --quiet -e ".[dev,bench]"
	touch $@

demo: $(EXAMPLES_STAMP)
	$(PYTHON) examples/demo.py

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright

pytest: $(DEV_STAMP)
	$(VENV)/bin/pytest

test: lint pytest docs

# `make bench BENCH_FLAGS=--quick` for the small configurations. Files starting with
# `_` are shared helpers; report.py runs last and rewrites the README's tables.
bench: $(BENCH_STAMP)
	@for script in benchmarks/[!_]*.py; do [ $$script = benchmarks/report.py ] && continue; echo "== $$script"; $(PYTHON) $$script $(BENCH_FLAGS) || exit 1; done
	$(PYTHON) benchmarks/report.py

docs: $(DEV_STAMP)
	$(VENV)/bin/mkdocs build --strict

docs-serve: $(DEV_STAMP)
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000
