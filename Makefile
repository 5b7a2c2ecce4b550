# Two commands for a new machine: `make demo` (set up + the main job) and `make test` (set up + the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := ../shared/datasets
DEMO := demo

.PHONY: setup demo gallery test lint browser clean

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
	$(BIN)/vitkit eval $(DEMO)/digits/model digits --out $(DEMO)/digits/eval --overwrite
	$(BIN)/python -c "from vitkit.data import open_source; s = open_source(None, 'val'); import os; \
		os.makedirs('$(DEMO)/images'); [s.load(i, 1).resize((64, 64)).save(f'$(DEMO)/images/digit_{i:03d}.png') \
		for i in range(0, 179, 30)]"
	$(BIN)/vitkit predict $(DEMO)/digits/model $(DEMO)/images --topk 3 --annotate $(DEMO)/annotated
	@echo "plots: $(DEMO)/digits/curves.png $(DEMO)/digits/eval/confusion.png; annotated images: $(DEMO)/annotated"

# The paper's analyses of a trained model, drawn into docs/analysis/ for the README:
#   make gallery MODEL=runs/x/model DATA=path/to/dataset IMAGES="a.jpg b.jpg"
GALLERY := docs/analysis
gallery: setup
	@test -n "$(MODEL)" -a -n "$(IMAGES)" -a "$(origin DATA)" != file || \
		{ echo "usage: make gallery MODEL=model DATA=dataset IMAGES=images"; exit 2; }
	$(BIN)/vitkit analyze attention $(MODEL) $(IMAGES) --layers all --out $(GALLERY) --overwrite
	$(BIN)/vitkit analyze distance $(MODEL) $(DATA) --out $(GALLERY) --overwrite
	$(BIN)/vitkit analyze posembed $(MODEL) --out $(GALLERY) --overwrite
	$(BIN)/vitkit analyze filters $(MODEL) --out $(GALLERY) --overwrite

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# The browser test of `vitkit serve`'s page drives the system's chromium through chromedriver. Install them
# (Debian: chromium chromium-driver) when missing and possible: as root or with password-less sudo, through apt-get.
# Where that fails the test skips and says why; `make test` goes on either way.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo -n"; fi; \
		if command -v apt-get >/dev/null 2>&1 && { [ -z "$$sudo" ] || sudo -n true 2>/dev/null; }; then \
			echo "installing chromium and chromedriver with apt-get (for tests/test_serve_browser.py)"; \
			{ $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				chromium chromium-driver; } >/dev/null 2>&1 || echo "apt-get failed: the browser test will skip"; \
		else echo "no chromium/chromedriver and no apt-get to install them: the browser test will skip"; fi; \
	fi

test: lint browser
	$(BIN)/pytest

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
