# Quick start: `make serve` runs the whole service; `make test` runs the test suite.
# Both create .venv and install the project first (torch pinned to the CPU wheel by constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

.PHONY: install serve test lint openapi bench
install: $(STAMP)

serve: $(STAMP)
	exec $(BIN)/modelshrink serve --host $${HOST:-127.0.0.1} --port $${PORT:-8000}

test: $(STAMP)
	./scripts/ensure-services.sh
	./scripts/ensure-browser.sh
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check service workers bench tests modelshrink
	$(BIN)/mypy service/core

openapi: $(STAMP)
	$(BIN)/python -m service.api.openapi_dump

bench: $(STAMP)
	$(BIN)/python -m bench.service_overhead
	$(BIN)/python -m bench.status_load
	$(BIN)/python -m bench.upload_throughput
	$(BIN)/python -m bench.pruning_mnist
	$(BIN)/python -m bench.distill_mnist
	$(BIN)/python -m bench.deep_compression_mnist
	$(BIN)/python -m bench.lowbit_mnist
