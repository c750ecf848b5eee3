# Set-up, main job and tests. `make run` and `make test` are the two commands in the README.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
RUN_DIR ?= runs/fashion_mnist
RUN_FLAGS ?=

.PHONY: setup data run test lint format clean

setup: $(STAMP) data

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package. Without apt (or root),
# this prints what to do instead of failing, because the tests run on bundled digits.
data:
	@if [ -e "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz" ] || [ -e "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte" ]; then \
	  true; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "Installing Debian package dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) \
	  || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST runs need it"; \
	elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	  sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	  || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST runs need it"; \
	else \
	  echo "warning: Fashion-MNIST not found in $(FASHION_MNIST_DIR); install the Debian package" \
	       "dataset-fashion-mnist or pass --data-dir to the experiments"; \
	fi

run: setup
	$(PY) -m experiments.run --dataset fashion_mnist --out $(RUN_DIR) --resume $(RUN_FLAGS)

test: setup lint
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check ppds_jax experiments benchmarks tests
	$(PY) -m ruff format --check ppds_jax experiments benchmarks tests

format: $(STAMP)
	$(PY) -m ruff format ppds_jax experiments benchmarks tests
	$(PY) -m ruff check --fix ppds_jax experiments benchmarks tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
