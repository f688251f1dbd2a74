# prodvec: `make run` and `make test` are all a new user needs (Python 3.11, Java 17).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
RUFF := $(VENV)/bin/ruff
SOURCES := pipelines models jobs tests bench deploy/airflow
export PYTHONUNBUFFERED := 1

.PHONY: install run test test-fast lint format bench clean-work java dist

install: $(STAMP)

java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "prodvec needs Java 17 for Spark. On Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless"; \
	  exit 1; }

# torch first, pinned: it resolves to the CPU wheel on local disk; an unpinned
# torch (or one pulled in by another package) would download a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml | java
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(VENV)/bin/prodvec run

test: install
	$(PY) -m pytest

# Everything but the shared-data, spark-submit, cluster and end-to-end tests: the tier to run
# while working (under 2 minutes on 2 cores). Two worker processes, each with its own Spark
# session: one test process leaves a core idle while its JVM and Python wait on each other.
# A module's tests, and the users of one pipeline fixture, stay in one worker (conftest.py).
test-fast: install
	$(PY) -m pytest -n 2 --dist loadgroup -m "not (shared_data or spark_submit or cluster or slow)"

# ruff (lint and format) over everything; mypy over the library and the models (setup.cfg).
lint: install
	$(RUFF) check --line-length 100 $(SOURCES)
	$(RUFF) format --check --line-length 100 $(SOURCES)
	$(VENV)/bin/mypy

format: install
	$(RUFF) format --line-length 100 $(SOURCES)

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The wheel the job image installs, and the same archive as .zip for spark-submit --py-files:
# Spark puts only .zip/.egg/.jar py-files on the executors' path (a .whl reaches the driver
# alone). Built with the venv's setuptools, no build isolation: nothing is downloaded.
dist:
	rm -rf dist build
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .
	cd dist && for wheel in *.whl; do cp "$$wheel" "$${wheel%.whl}.zip"; done

clean-work:
	rm -rf work
