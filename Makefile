# The two set-up commands of the README are `make demo` and `make test`; both create
# `.venv` from scratch on a fresh machine.
VENV ?= .venv
export NO_MKDOCS_2_WARNING := 1
PYTHON := $(VENV)/bin/python
DEV_STAMP := $(VENV)/.installed-dev
EXAMPLES_STAMP := $(VENV)/.installed-examples
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test lint pytest bench docs docs-serve

# uv installs the test and example dependencies in about 10 s where pip takes one
# to two minutes (most of `make test`'s set-up on a fresh machine); pip is the
# fallback where uv cannot be installed or cannot reach the index. The bench extras
# stay with pip, which reads the machine's pip configuration (local wheels, the cap
# on torch's version) that uv ignores. The venv's own pip (Python 3.11's, 23.x)
# installs editable projects (PEP 660) and is not upgraded: that took 5-10 s.
$(PYTHON):
	python3 -m venv $(VENV)
	-$(PYTHON) -m pip install --quiet uv

INSTALL = $(VENV)/bin/uv pip install --quiet --python $(PYTHON) -e "$(1)" \
	|| $(PYTHON) -m pip install --quiet -e "$(1)"

$(DEV_STAMP): pyproject.toml | $(PYTHON)
	$(call INSTALL,.[dev])
	touch $@

$(EXAMPLES_STAMP): pyproject.toml | $(PYTHON)
	$(call INSTALL,.[examples])
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

# One worker per core: the suite is mostly XLA compilation, which is single-threaded.
# Work stealing keeps both workers busy to the end (a few tests take over a minute).
pytest: $(DEV_STAMP)
	$(VENV)/bin/pytest -n auto --dist worksteal

# The linters, the suite and the docs build run side by side, each one's output
# printed whole when it ends: pyright and mkdocs are single-threaded, and run one
# after the other they would leave a core idle for about 40 s.
test: $(DEV_STAMP)
	$(MAKE) --no-print-directory -j3 --output-sync=target lint pytest docs

# `make bench BENCH_FLAGS=--quick` for the smoke-test configurations (written to
# benchmarks/results/quick/); a full run rewrites the README's Performance section.
bench: $(BENCH_STAMP)
	$(PYTHON) benchmarks/run_all.py $(BENCH_FLAGS)

docs: $(DEV_STAMP)
	$(VENV)/bin/mkdocs build --strict

docs-serve: $(DEV_STAMP)
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000
