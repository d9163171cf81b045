# Two entry points a hospital IT engineer needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format typecheck bench soak docs screenshots clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hutong demo

# The whole suite, in file order (pyproject's addopts keep pytest-randomly off): multi-process
# tests included.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# Unit and single-process tests (not marked `slow` or `postgres`) in a random order
# (pytest-randomly, which also seeds random and Hypothesis): the seed is printed first, and
# `make test-fast SEED=N` replays that order. Tests must pass alone and in any order.
test-fast: $(STAMP)
	@seed=$${SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "test-fast: random order, SEED=$$seed"; \
	$(BIN)/python -m pytest -q -m "not slow and not postgres" -p randomly --randomly-seed=$$seed

# Lint and type checks (the `dev` extra: ruff, mypy, stubs); config in pyproject.toml.
DEV_STAMP := $(VENV)/.dev-installed
$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# `make lint` checks the format too; `make format` applies it.
format: $(DEV_STAMP)
	$(BIN)/ruff format .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/run.py

# Before a release, not in `make bench` nor `make test`: a steady rate for minutes on SQLite and
# PostgreSQL, sampled every 15 s, first part against last (bench/README.md, "soak").
# SOAK_ARGS="--minutes 15" for the issue's first-vs-last five minutes.
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# The docs site (mkdocs.yml) into build/site; --strict fails on any warning (broken link or
# anchor, missing page or snippet). NO_MKDOCS_2_WARNING silences Material's end-of-life banner,
# which is printed outside mkdocs' log and is not a build warning.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d build/site

# The screenshots the docs show (docs/img/), retaken by the browser tests (Debian Chromium):
# only the files docs/img already holds are replaced.
screenshots: $(DEV_STAMP)
	$(BIN)/python -m pytest -q tests/test_web_browser.py tests/test_web_people_browser.py
	for f in docs/img/*.png; do cp "test-artifacts/screenshots/$$(basename "$$f")" "$$f"; done

clean:
	rm -rf $(VENV) var demo-data
