# Two commands for a new machine: `make demo` (set up + the main job) and `make test` (set up + the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := ../shared/datasets
DEMO := demo

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# Every install goes through constraints.txt, which pins the tested torch (a bare `torch` would pull CUDA wheels).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	rm -rf $(DEMO)
	$(BIN)/vitkit models
	$(BIN)/vitkit create ViT-Ti/16 $(DEMO)/vit_ti16 --seed 0
	$(BIN)/vitkit convert $(DEMO)/vit_ti16 $(DEMO)/ViT-Ti_16.npz --to npz
	$(BIN)/vitkit convert $(DEMO)/ViT-Ti_16.npz $(DEMO)/vit_ti16_hf --to hf
	$(BIN)/vitkit predict $(DEMO)/vit_ti16_hf $(DATA)/imagenet_samples --topk 3 \
		--class-index $(DATA)/imagenet_samples/imagenet_class_index.json

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
