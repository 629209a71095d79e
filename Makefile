# Local development of dativo-dagster. `make run` is the demo: the specs in asset_specs/ land as Iceberg
# tables in a local warehouse with a SQLite catalog under .dativo/.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATIVO_DIR := $(CURDIR)/.dativo
DEMO_BRANCH := demo_tenant
# Run history of `make run` and `make dev` persists here (Dagster needs an absolute path); tests do not use it.
LOCAL_DAGSTER_HOME := $(CURDIR)/.dagster_home

.PHONY: venv run test dev validate clean bench bench-quick

venv: $(VENV)/.installed

# Reinstall only when the dependencies change; the package itself is installed in editable mode.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

$(LOCAL_DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(LOCAL_DAGSTER_HOME)
	cp dagster.yaml $@

run dev: export DAGSTER_HOME = $(LOCAL_DAGSTER_HOME)

# Exit code 1 means a warn-mode asset committed its valid rows and quarantined the rest: the demo's
# listening_history spec does that on purpose, so only exit code 2 (failure) fails this target.
run: venv $(LOCAL_DAGSTER_HOME)/dagster.yaml
	@status=0; $(BIN)/dativo-dagster materialize || status=$$?; \
	if [ $$status -eq 1 ]; then \
		echo "note: exit code 1 = warn-mode rows were rejected and kept in a <table>__rejects table (expected in the demo)"; \
	elif [ $$status -ne 0 ]; then \
		echo "dativo-dagster materialize failed with exit code $$status" >&2; exit $$status; \
	fi
	@echo "warehouse: $(DATIVO_DIR)/warehouse"
	@echo "catalog:   $(DATIVO_DIR)/catalog.db (pyiceberg SqlCatalog 'dativo'; rows are on branch '$(DEMO_BRANCH)')"
	@echo "query:     $(BIN)/python -c \"from pyiceberg.catalog.sql import SqlCatalog; t = SqlCatalog('dativo', uri='sqlite:///$(DATIVO_DIR)/catalog.db', warehouse='$(DATIVO_DIR)/warehouse').load_table('adventureworks.csv_person'); print(t.scan(snapshot_id=t.snapshot_by_name('$(DEMO_BRANCH)').snapshot_id).to_pandas())\""

test: venv
	$(BIN)/python -m pytest

dev: venv $(LOCAL_DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -m dativo_dagster.definitions -h 127.0.0.1 -p 3000

validate: venv
	$(BIN)/dativo-dagster validate

clean:
	rm -rf $(DATIVO_DIR)

# The benchmark (benchmarks/README.md): generated data, pyarrow baseline, this project, dlt and the naive loader.
bench: venv
	$(BIN)/python benchmarks/run.py

bench-quick: venv
	$(BIN)/python benchmarks/run.py --quick
