-- Run once by the postgres image on its first start (docker-compose.yml mounts this folder at
-- /docker-entrypoint-initdb.d): a database for the optional pyiceberg SQL catalog, next to Dagster's own.
-- pyiceberg creates its tables (iceberg_tables, iceberg_namespace_properties) on first use.
CREATE DATABASE iceberg_catalog;
