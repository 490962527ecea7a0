# On a fresh machine these targets are the whole set-up: each creates .venv with
# the running python3 when it is missing and installs the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench-push clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m bench.demo

lint: $(STAMP)
	$(BIN)/ruff check manifests distd seeder bench tests
	$(BIN)/ruff format --check manifests distd seeder bench tests

typecheck: $(STAMP)
	$(BIN)/mypy --strict manifests distd seeder bench

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench-push: $(STAMP)
	$(BIN)/python -m bench.push

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis build
