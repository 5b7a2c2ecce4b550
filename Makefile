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

# The main job on the digits embedded in vitkit: train a small ViT from scratch, evaluate it, predict on a few
# images and draw the plots (about a minute on 2 CPU cores).
demo: setup
	rm -rf $(DEMO)
	$(BIN)/vitkit train --out $(DEMO)/digits
	$(BIN)/vitkit eval $(DEMO)/digits/model digits --out $(DEMO)/digits/eval
	$(BIN)/python -c "from vitkit.data import open_source; s = open_source(None, 'val'); import os; \
		os.makedirs('$(DEMO)/images'); [s.load(i, 1).resize((64, 64)).save(f'$(DEMO)/images/digit_{i:03d}.png') \
		for i in range(0, 179, 30)]"
	$(BIN)/vitkit predict $(DEMO)/digits/model $(DEMO)/images --topk 3 --annotate $(DEMO)/annotated
	@echo "plots: $(DEMO)/digits/curves.png $(DEMO)/digits/eval/confusion.png; annotated images: $(DEMO)/annotated"

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
