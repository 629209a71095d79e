# Local development of dativo-dagster. `make run` is the demo: the specs in asset_specs/ land as Iceberg
# tables in a local warehouse with a SQLite catalog under .dativo/.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_INSTALL = $(BIN)/python -m pip install
DATIVO_DIR := $(CURDIR)/.dativo
DEMO_BRANCH := demo_tenant
DEV_PORT ?= 3000
# Run history of `make run` and `make dev` persists here (Dagster needs an absolute path); tests do not use it.
LOCAL_DAGSTER_HOME := $(CURDIR)/.dagster_home
# What each virtualenv has, one marker per level: the package with its runtime dependencies (`make run`,
# `make dev`), and the test extras on top (`make test`). Each is redone only when pyproject.toml changes.
RUN_INSTALLED := $(VENV)/.installed-run
TEST_INSTALLED := $(VENV)/.installed-test

.PHONY: venv venv-run system-packages run run-db test dev validate clean bench bench-quick

venv-run: $(RUN_INSTALLED)

venv: $(TEST_INSTALLED)

# The package itself is installed in editable mode.
$(RUN_INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e .
	touch $@

# Everything `make run` needs is part of it, so its marker is set too.
$(TEST_INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[test]'
	touch $(RUN_INSTALLED) $@

# Chromium, PostgreSQL, MariaDB and Redis, which the browser and integration tests drive (apt-get, only what is missing).
system-packages:
	.ci/install-system-packages

$(LOCAL_DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(LOCAL_DAGSTER_HOME)
	cp dagster.yaml $@

run run-db dev: export DAGSTER_HOME = $(LOCAL_DAGSTER_HOME)
# The project the command is typed in, also when the package was installed from another checkout.
run dev validate: export DATIVO_ASSET_SPECS_DIR ?= $(CURDIR)/asset_specs

# Exit code 1 means a warn-mode asset committed its valid rows and quarantined the rest: the demo's
# listening_history spec does that on purpose, so only exit code 2 (failure) fails this target.
run: venv-run $(LOCAL_DAGSTER_HOME)/dagster.yaml
	@status=0; $(BIN)/dativo-dagster materialize || status=$$?; \
	if [ $$status -eq 1 ]; then \
		echo "note: exit code 1 = warn-mode rows were rejected and kept in a <table>__rejects table (expected in the demo)"; \
	elif [ $$status -ne 0 ]; then \
		echo "dativo-dagster materialize failed with exit code $$status" >&2; exit $$status; \
	fi
	@echo "warehouse: $(DATIVO_DIR)/warehouse"
	@echo "catalog:   $(DATIVO_DIR)/catalog.db (pyiceberg SqlCatalog 'dativo'; rows are on branch '$(DEMO_BRANCH)')"
	@echo "read the rows: README.md, section 'Look at the rows' (pyiceberg and DuckDB)"

# The database demo: a private PostgreSQL (initdb under .dativo/run-db, loopback, a free port) loaded with the
# AdventureWorks sample files, read into Iceberg by the specs of asset_specs_db/ (demo/run_db.py), then stopped.
# Its specs are not in asset_specs/, so `make run` and `make dev` stay server-free.
run-db: venv-run $(LOCAL_DAGSTER_HOME)/dagster.yaml
	$(BIN)/python demo/run_db.py

test: venv system-packages
	$(BIN)/python -m pytest

# From inside DAGSTER_HOME: started in the project folder, Dagster would warn that the project's dagster.yaml
# is not used (it is: as the copy in DAGSTER_HOME).
dev: venv-run $(LOCAL_DAGSTER_HOME)/dagster.yaml
	@echo "the asset graph: http://127.0.0.1:$(DEV_PORT)/asset-groups (once Dagster says it is serving)"
	cd $(LOCAL_DAGSTER_HOME) && $(abspath $(BIN))/dagster dev -m dativo_dagster.definitions -h 127.0.0.1 -p $(DEV_PORT)

validate: venv-run
	$(BIN)/dativo-dagster validate

clean:
	rm -rf $(DATIVO_DIR)

# The benchmark (benchmarks/README.md): generated data, pyarrow baseline, this project, dlt and the naive loader.
bench: venv
	$(BIN)/python benchmarks/run.py

bench-quick: venv
	$(BIN)/python benchmarks/run.py --quick
