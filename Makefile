# Two commands do all set-up: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv if missing: torch's CPU build first (pip finds torch==2.13.0 locally;
# without this, pip would pull gigabytes of CUDA packages), then the project with its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-dev pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

demo: $(VENV)/.installed-dev
	$(BIN)/edgeslim demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-bench
	@set -e; for script in benchmarks/[!_]*.py; do \
		echo "== $$script --quick"; \
		$(BIN)/python $$script --quick --json benchmarks/results/$$(basename $$script .py).quick.json; \
	done

clean:
	rm -rf $(VENV) runs .pytest_cache
