# Two entry points for a newcomer: `make train` (demo, CPU, offline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA ?= runs/demo-data
# Nothing downloads at run time; Triton runs in its interpreter on CPU hosts.
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: install train test lint format ui bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(DEMO_DATA)/classes.json: | $(STAMP)
	$(BIN)/patchsae make-demo-data --out $(DEMO_DATA)

train: $(STAMP) $(DEMO_DATA)/classes.json
	$(BIN)/patchsae train --config configs/demo.yaml --set data.urls=$(DEMO_DATA) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) lint
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(or $(RUN_DIR),runs/demo)/mlflow.db --host 127.0.0.1 --port $(or $(PORT),5000)

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf runs .pytest_cache
