"""Integration tests against real servers (SeaweedFS, PostgreSQL) started by the fixtures in conftest.py."""
