# Two commands on a fresh machine: `make run` serves on the embedded defaults, `make test` lints, then runs the tests.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv run lint test bench clean

venv: $(STAMP)

# Reinstall only when the project's metadata changed since the last install.
$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet --config-settings editable_mode=compat -e '.[test,bench]'
	touch $(STAMP)

run: venv
	$(VENV)/bin/sira serve

lint: venv
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

BENCH_ARGS ?=
bench: venv
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
