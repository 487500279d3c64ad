.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
# The PostgreSQL server `make test-server` uses (docker-compose's `db`, or any local one).
SERVER_DSN ?= postgresql://postgres@127.0.0.1:5432/postgres

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,lint]'

install: $(VENV) ## Create the virtualenv with test and lint tools

test: $(VENV) ## Run the tests as `pytest` does: on KAIJU_TASKS_TEST_DSN if set, else embedded
	$(VENV)/bin/pytest -n 2 -q

test-server: $(VENV) ## Run the tests on the server at SERVER_DSN (127.0.0.1:5432)
	KAIJU_TASKS_TEST_DSN='$(SERVER_DSN)' $(VENV)/bin/pytest -n 2 -q

test-embedded: $(VENV) ## Run the tests on the embedded PostgreSQL, even if KAIJU_TASKS_TEST_DSN is set
	env -u KAIJU_TASKS_TEST_DSN $(VENV)/bin/pytest -n 2 -q

lint: $(VENV) ## ruff check, ruff format --check, mypy, lint-imports
	$(VENV)/bin/ruff check kaiju_tasks tests
	$(VENV)/bin/ruff format --check kaiju_tasks tests
	$(VENV)/bin/mypy kaiju_tasks tests
	$(VENV)/bin/lint-imports

format: $(VENV) ## Format the code
	$(VENV)/bin/ruff check --fix kaiju_tasks tests
	$(VENV)/bin/ruff format kaiju_tasks tests

migrate: $(VENV) ## Apply migrations to the configured database
	$(VENV)/bin/kaiju-tasks migrate

db: $(VENV) ## Start the embedded PostgreSQL and print its DSN
	$(PY) -c 'from kaiju_tasks.store import embedded; print(embedded.EmbeddedPostgres().start())'

ci: ## Run what CI runs
	.ci/run

.PHONY: help install test test-server test-embedded lint format migrate db ci
