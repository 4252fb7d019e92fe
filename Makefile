# sms-router developer entry points.  CI runs `bash .ci/run`, i.e. `make test`.
#
#   make venv         create $(VENV) and install the package with [dev] extras
#   make run          run the demo daemon (ARGS=... for extra flags)
#   make build        recompile the per-message modules whose source changed
#   make test         run pytest against a PostgreSQL from scripts/test_database.py
#   make lint         ruff + mypy
#   make bench-quick  quick benchmark run;  make bench: full run
#   make sim          traffic simulator
#   make clean        remove the venv, caches and embedded PostgreSQL data

VENV ?= .venv
# python3.11 if it actually runs (pyenv shims may exist without the version), else python3
ifeq ($(origin PY),undefined)
PY := $(shell python3.11 -c 'import sys' >/dev/null 2>&1 && echo python3.11 || echo python3)
endif
PYTEST_ARGS ?=
ARGS ?=

STAMP := $(VENV)/.installed
PIP_FLAGS := --quiet --disable-pip-version-check

.DEFAULT_GOAL := help
.PHONY: help venv build run test lint bench-quick bench sim clean

help:
	@sed -n 's/^#   //p' Makefile

venv: $(STAMP)

# Compiling is `make build`'s job (in place, incremental); not twice.
$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	SMS_ROUTER_NO_EXTENSIONS=1 $(VENV)/bin/pip install $(PIP_FLAGS) -e '.[dev]'
	@touch $@

# In place and incremental (only modules whose .py changed); a module left
# stale runs from its source anyway (router/accel.py), just slower.
build: $(STAMP)
	$(VENV)/bin/python setup.py --quiet build_ext --inplace

run: build
	exec $(VENV)/bin/sms-router run --demo $(ARGS)

# One shell: the trap stops an embedded server started by `start` even when
# pytest fails or the run is interrupted; the recipe exits with pytest's
# status (5, "no tests collected", is non-zero and therefore a failure too).
test: build
	@status=0; \
	cleanup() { $(VENV)/bin/python scripts/test_database.py stop \
	    || echo "make test: WARNING: could not stop the embedded test PostgreSQL" >&2; }; \
	trap cleanup EXIT; \
	trap 'exit 130' INT; \
	trap 'exit 143' TERM; \
	url=$$($(VENV)/bin/python scripts/test_database.py start) || { \
	    echo "make test: could not provide a test database" >&2; exit 1; }; \
	if [ -z "$$url" ]; then echo "make test: empty test database URL" >&2; exit 1; fi; \
	ROUTER_TEST_DATABASE_URL="$$url"; export ROUTER_TEST_DATABASE_URL; \
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) || status=$$?; \
	if [ "$$status" -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check router tests benchmarks
	$(VENV)/bin/mypy router

bench-quick: build
	$(VENV)/bin/python -m benchmarks run --quick

bench: build
	$(VENV)/bin/python -m benchmarks run

sim: $(STAMP)
	$(VENV)/bin/sms-router sim

clean:
	-@test -x $(VENV)/bin/python && $(VENV)/bin/python scripts/test_database.py stop 2>/dev/null; true
	rm -rf $(VENV) .pgdata .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	find router \( -name '*.so' -o -name '*.c' -o -name '*.sha256' \) -delete
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
