# One-command entry points (see README.md). Each target sets up what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
KJV := /usr/lib/bible.data

.PHONY: setup data demo test lint test-zoo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist package (skipped when already present or when
# NEURONMERGE_FASHION_MNIST_DIR points elsewhere); the King James Bible (bible-kjv-text, read by the
# bible-kjv program) for the small GPT.
data:
	@if [ -z "$$NEURONMERGE_FASHION_MNIST_DIR" ] && [ ! -e $(FMNIST) ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; fi
	@if [ ! -e $(KJV) ] || ! command -v bible >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq bible-kjv-text bible-kjv; fi

# The main job: train LeNet-300-100 here (cached) and print the paper's prune-vs-merge table.
demo: setup data
	$(VENV)/bin/neuronmerge reproduce lenet-300-100

test: setup data
	$(PY) -m pytest -q

# Second tier: real torchvision architectures. torchvision imports only beside torch 2.14.1 (a CUDA build
# that runs on CPU, ~5.5 GB, taken from the local disk by pip), so these tests get their own venv and
# their own directory; the main suite above stays on torch 2.13.0.
ZOO ?= .venv-zoo

$(ZOO)/.installed: pyproject.toml
	python3 -m venv $(ZOO)
	$(ZOO)/bin/python -m pip install --quiet --upgrade pip
	$(ZOO)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(ZOO)/bin/python -m pip install --quiet -e . 'torch-pruning>=1.5' pytest
	touch $@

test-zoo: $(ZOO)/.installed
	$(ZOO)/bin/python -m pytest -q -p no:cacheprovider tests_zoo

lint: setup
	$(VENV)/bin/ruff check src tests $(wildcard tests_zoo benchmarks experiments docs)
	$(VENV)/bin/ruff format --check src tests $(wildcard tests_zoo benchmarks experiments docs)
	$(VENV)/bin/mypy src
