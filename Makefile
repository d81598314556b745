# tuneqn — the two commands that matter: `make demo` and `make test`.
# Each sets itself up on a fresh machine (only Python needed).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp
EXAMPLE_DIR := examples/lite0
EXAMPLE_OUT ?= out/lite0

.PHONY: demo test test-fast venv example protos schema clean

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
	TUNEQN_EXAMPLE_DIR=$(EXAMPLE_DIR)/work $(PY) -m pytest -q -ra

## Tests without the real-model ones.
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

## Regenerate the checked-in gRPC stubs from protos/tuneqn/v1/*.proto.
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/tuneqn/v1/*.proto

## Regenerate the checked-in JSON Schema of report.json from the pydantic models (controller/report/schema.py).
schema: $(STAMP)
	$(PY) -c "from tuneqn.controller.report.schema import main; main()" > docs/report.schema.json

clean:
	rm -rf $(VENV) out .pytest_cache
