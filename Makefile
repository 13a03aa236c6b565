# sharebone: `make train` (install + the default experiment), `make test` (install + the suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The real Omniglot archives: ../shared/data on the project's machines, else ./data (downloaded).
DATA_DIR ?= $(if $(wildcard ../shared/data/omniglot/*.zip),$(abspath ../shared/data),$(abspath data))
export SHAREBONE_DATA_DIR ?= $(DATA_DIR)

.PHONY: install l2l train test test-slow test-all lint bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# learn2learn 0.2.0 needs its C files regenerated on Python >= 3.11 (see DEVELOPERS.md).
$(VENV)/.l2l: $(VENV)/.installed scripts/install_learn2learn.sh
	bash scripts/install_learn2learn.sh --lean $(BIN)/python
	touch $@

l2l: $(VENV)/.l2l

train: install
	$(BIN)/sharebone-train experiment=omniglot_protonet_5w1s trainer.max_epochs=1

# Two workers, a test file each at a time (module fixtures are built once), one thread each.
# `make test-slow` runs the long tests the default deselects; CI (.ci/run) runs both.
TEST_WORKERS ?= 2
test: install l2l
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: install l2l
	$(BIN)/python -m pytest -q -m slow

test-all: install l2l
	$(BIN)/python -m pytest -q -m ""

lint: install
	$(BIN)/ruff check src tests scripts

bench: install l2l
	$(BIN)/python scripts/bench_sampler.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
