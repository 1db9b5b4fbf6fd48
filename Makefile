# Two commands on a fresh Debian/Ubuntu machine:  make run   and   make test
# (both set up a virtualenv and a local TimescaleDB first; see README.md).

PYTHON    ?= python3
VENV      := .venv
PY        := $(VENV)/bin/python
DEVDB     := bash scripts/dev-db.sh
DATA_DIR  ?= ./Task-0/extracted_data
PYTEST_ARGS ?=
# What pytest runs: files, directories, node ids, options such as -k, e.g.
#   make test TESTS=tests/test_e2e.py      make test TESTS='tests/test_e2e.py -k foo'
TESTS     ?= tests

.PHONY: setup venv db-up db-down db-status pgbouncer-up pgbouncer-down run sample test lint bench clean

venv: $(VENV)/.installed

# A Debian system Python needs python3-venv for `python3 -m venv`; install it when missing.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "make: installing python3-venv (needed by python3 -m venv)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

setup: venv db-up

db-up:
	$(DEVDB) up

db-down:
	$(DEVDB) down

db-status:
	$(DEVDB) status

# Two PgBouncers (session and transaction pooling) in front of the local database, for
# tests/test_pgbouncer.py; ports POSTGRES_PORT+1 and +2 (`scripts/dev-db.sh pgbouncer env`).
pgbouncer-up: db-up
	$(DEVDB) pgbouncer up

pgbouncer-down:
	$(DEVDB) pgbouncer down

# Writes a small deterministic Task-0-like sample when DATA_DIR holds no JSON yet.
sample: venv
	@if find "$(DATA_DIR)" -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.ndjson' \
	      -o -name '*.json.gz' -o -name '*.jsonl.gz' -o -name '*.ndjson.gz' \) 2>/dev/null | grep -q .; then \
	  echo "make: $(DATA_DIR) already holds JSON; not writing a sample"; \
	else \
	  $(PY) scripts/make_sample.py "$(DATA_DIR)" --users 2 --seconds 3600; \
	fi

run: setup sample
	eval "$$($(DEVDB) env)" && $(PY) ingest.py --data-dir "$(DATA_DIR)"

test: setup pgbouncer-up
	eval "$$($(DEVDB) env)" && eval "$$($(DEVDB) pgbouncer env)" && $(PY) -m pytest $(PYTEST_ARGS) $(TESTS)

lint: venv
	VENV=$(VENV) bash scripts/lint.sh

bench: setup
	eval "$$($(DEVDB) env)" && $(PY) scripts/bench.py && $(PY) scripts/bench_shapes.py \
	  && $(PY) scripts/bench_fitbit.py && $(PY) scripts/bench_mechanisms.py

clean: db-down
	rm -rf .dev $(VENV) .pytest_cache
