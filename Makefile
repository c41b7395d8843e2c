# The two commands of the README: `make demo` and `make test`.
# The venv lives outside the clone (it is ~8 GB), keyed on the pins in
# requirements.txt, so a fresh clone with unchanged pins reuses it.
PYTHON ?= python3.11
PINS_HASH := $(shell sha256sum requirements.txt | cut -c1-12)
VENV ?= $(HOME)/.cache/prune-search/venv-$(PINS_HASH)
BIN := $(VENV)/bin
STAMP := .make/project-$(PINS_HASH)
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

# No prerequisite on purpose: the venv path already holds the pins' hash, and a fresh clone's
# requirements.txt is always newer than the venv it can reuse.
$(VENV)/.pins-installed:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

# The project itself is installed editable (seconds). The venv is shared by clones with the same
# pins, so the install is redone whenever it points at another clone.
$(STAMP): $(VENV)/.pins-installed pyproject.toml
	$(BIN)/pip install --quiet --no-deps -e .
	mkdir -p .make && touch $@

install: $(STAMP)
	@cd / && $(BIN)/python -c "import prune_core, sys; sys.exit(not prune_core.__file__.startswith('$(CURDIR)/'))" \
		|| $(BIN)/pip install --quiet --no-deps -e $(CURDIR)
	@ln -sfn $(VENV) $(CURDIR)/.venv

demo: install
	$(BIN)/python -m search.cli demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m benchmarks.latency

clean:
	rm -rf .make .venv runs mlruns
