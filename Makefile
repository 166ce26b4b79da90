# jobstream — the two commands a fresh machine needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export KAFKA_PORT ?= 19092
export PG_PORT ?= 15432
export JOBSTREAM_KAFKA_BOOTSTRAP_TEST ?= 127.0.0.1:$(KAFKA_PORT)
export JOBSTREAM_TEST_PG ?= postgresql://postgres@127.0.0.1:$(PG_PORT)/postgres

.PHONY: venv bytecode demo services stop-services lint typecheck test unit schema clean chaos bench-report audit

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@scripts/bootstrap-python.sh "$(PYTHON)" "$(VENV)"
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

## Bytecode of the project's modules, written ahead: with PYTHONDONTWRITEBYTECODE set (as on
## this machine) or a read-only tree, Python would otherwise compile every module at each
## process start (~60 ms of a short command). Incremental: only changed files are compiled.
bytecode: venv
	@$(BIN)/python -m compileall -q agents streams bench >/dev/null

## The main job: everything in one process (embedded broker and PostgreSQL), a sample workload.
demo: venv bytecode
	$(BIN)/jobstream demo

## Real services on loopback: Apache Kafka (KRaft, jars from Maven Central), PostgreSQL and
## InfluxDB 1.6 (Debian's package, unpacked into .cache/: the Telegraf stand-in) and Redis 7
## (Debian's, unpacked likewise: the Celery peer's broker in bench/).
services:
	scripts/kafka.sh start
	scripts/postgres.sh start
	scripts/influxdb.sh start
	scripts/redis.sh start
	scripts/chromium.sh >/dev/null

stop-services:
	-scripts/kafka.sh stop
	-scripts/postgres.sh stop
	-scripts/influxdb.sh stop
	-scripts/redis.sh stop

lint: venv
	$(BIN)/ruff check streams agents tests bench
	$(BIN)/ruff format --check streams agents tests bench

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests/unit

## The whole suite: lint, types, unit, integration and end-to-end tests against real services.
# the worker's tests run a second time with workers in a Kafka share group (docs/workers.md)
WORKER_TESTS = tests/integration/test_workers.py tests/integration/test_attempts.py \
	tests/integration/test_worker_buffer.py tests/integration/test_redelivered_start.py

test: venv bytecode services lint typecheck
	$(BIN)/pytest -q -ra
	JOBSTREAM_TEST_WORKER_DISPATCH=share $(BIN)/pytest -q -ra $(WORKER_TESTS)

## Faults injected into a running system (100 by default), then the invariant checker's verdict.
chaos: venv bytecode services
	$(BIN)/python -m bench chaos --faults $${FAULTS:-100} --jobs-per-run $${JOBS:-1200}

## Side by side with Celery and procrastinate, full size (~40 min): docs/bench/ and the
## tables in docs/performance.md. SMALL=1 for the CI-sized form.
bench-report: venv bytecode services
	$(BIN)/python -m bench.report $${SMALL:+--small}

## Known vulnerabilities in the installed dependencies (pip-audit; needs the advisory service).
audit: venv
	scripts/audit.sh

## Regenerate the published JSON Schema of the submission event.
schema: venv
	$(BIN)/python -c "import json; from streams.events import submission_schema; \
	  open('streams/schema/job-submitted.v1.json','w').write(json.dumps(submission_schema(), indent=2) + '\n')"

clean: stop-services
	rm -rf .services var .pytest_cache .mypy_cache .ruff_cache
