# sd_lightning: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test test-fast demo lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## make .venv and install the package with its dev extra

test: $(STAMP) ## run the whole test suite (installs first)
	$(BIN)/pytest tests

test-fast: $(STAMP) ## run the tests not marked slow
	$(BIN)/pytest tests -m "not slow"

demo: $(STAMP) ## train stage 1 (VAE + PatchGAN) on the embedded demo data (installs first)
	$(BIN)/python -m sd_lightning experiment=demo

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check sd_lightning tests
	$(BIN)/ruff format --check sd_lightning tests

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
