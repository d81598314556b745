# tuneqn — the two commands that matter: `make demo` and `make test`.
# Each sets itself up on a fresh machine (only Python needed).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp
# pytest-xdist workers: one more than the cores by default (tests that wait on a real agent, lease or process
# leave their core to the others: 5:21 instead of 6:27 on 2 cores); TEST_WORKERS=0 runs in this process, in file order.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(len(os.sched_getaffinity(0)) + 1)")
# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set: without it every worker rewrites and compiles
# each test module again (~4 s of CPU per worker) and every controller process the tests start compiles tuneqn.
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist worksteal
EXAMPLE_DIR := examples/lite0
SOURCES := controller agent tests bench examples
TYPECHECK := $(VENV)/typecheck
EXAMPLE_OUT ?= out/lite0

.PHONY: demo test test-fast check lint typecheck format venv example protos schema clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[test,example,tvm]'
	touch $(STAMP)

venv: $(STAMP)

## Prepare the real example (EfficientNet-Lite0 + real photos), cached under ~/.cache/tuneqn.
example: $(STAMP)
	$(PY) $(EXAMPLE_DIR)/prepare.py

## Run the whole example study end to end and print where the report is.
demo: example
	$(VENV)/bin/tuneqn tune $(EXAMPLE_DIR)/study.toml --out $(EXAMPLE_OUT) --no-lab

## The full test suite, slow real-model tests included (they use the prepared example).
test: example
	TUNEQN_EXAMPLE_DIR=$(EXAMPLE_DIR)/work $(PYTEST)

## The fast tests: without the real model (marker slow) and without the heavy end-to-end runs (marker heavy).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not heavy"

## The inner loop: lint, format and types, then the fast tests.
check: lint test-fast

## ruff (lint and format) and the type checker, each with zero findings (also run by .ci/run).
lint: $(STAMP)
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(MAKE) --no-print-directory typecheck

## Rewrite the sources in ruff's format and apply ruff's safe fixes.
format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(SOURCES)
	$(VENV)/bin/ruff format $(SOURCES)

## mypy on the package as it is imported: the folders map into one `tuneqn` namespace, so it reads a tree of
## links under the venv ([tool.mypy] in pyproject.toml: strict on the store, search, farm and report).
typecheck: $(STAMP)
	@mkdir -p $(TYPECHECK)/tuneqn
	@ln -sfn $(CURDIR)/protos/tuneqn/__init__.py $(TYPECHECK)/tuneqn/__init__.py
	@ln -sfn $(CURDIR)/protos/tuneqn/v1 $(TYPECHECK)/tuneqn/v1
	@ln -sfn $(CURDIR)/controller $(TYPECHECK)/tuneqn/controller
	@ln -sfn $(CURDIR)/agent $(TYPECHECK)/tuneqn/agent
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache -p tuneqn

## Regenerate the checked-in gRPC stubs from protos/tuneqn/v1/*.proto.
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/tuneqn/v1/*.proto

## Regenerate the checked-in JSON Schema of report.json from the pydantic models (controller/report/schema.py).
schema: $(STAMP)
	$(PY) -c "from tuneqn.controller.report.schema import main; main()" > docs/report.schema.json

clean:
	rm -rf $(VENV) out .pytest_cache
