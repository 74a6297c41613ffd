# Two commands set everything up on a fresh machine:
#   make demo   installs lookalike into .venv, builds a sample catalog (offline profile), serves it
#   make test   also installs the test tools into .venv, then runs ruff, mypy and the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A torch build that runs on CPU and GPU; pip takes it from a local wheel cache when one exists.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PORT ?= 8000

.PHONY: install install-dev demo test lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# What `lookalike` needs to run (the demo): no test tools, no optional back ends.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e .
	touch $@

# The tests' tools and the optional back ends they cover (diffusers, Milvus).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	# Only for the compatibility test with clip-retrieval's ClipClient (its deps are heavy).
	$(BIN)/pip install -q --no-deps clip-retrieval==2.45.0
	# Milvus in process for the Milvus store's tests; --no-deps because it asks for faiss-cpu,
	# whose files would overwrite faiss-gpu's (the same `faiss` module) in this environment.
	$(BIN)/pip install -q --no-deps milvus-lite==3.2.2
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/lookalike demo --port $(PORT)

lint: install-dev
	$(BIN)/ruff check indexer recommender service tests benchmarks
	$(BIN)/ruff format --check indexer recommender service tests benchmarks

typecheck: install-dev
	$(BIN)/mypy

unit: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

test: lint typecheck unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
