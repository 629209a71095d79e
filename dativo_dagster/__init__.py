"""dativo-dagster: YAML asset specs become Dagster assets that ingest CSV into Iceberg."""

__version__ = "0.1.0"
