"""dativo-dagster: YAML asset specs become Dagster assets that ingest CSV into Iceberg."""

import os
import sys

# Arrow's buffers come from jemalloc rather than pyarrow's default, mimalloc, which keeps the pages the three
# streaming stages free for reuse. On the 5M-row benchmark file the pass peaked ~60 MB lower at the same
# speed (mimalloc told to return pages at once, MIMALLOC_PURGE_DELAY=0, saved ~45 MB but ran ~15 % slower).
# Arrow reads this once, before its first allocation: it only counts when set before pyarrow is imported,
# which is the case for the CLI and Dagster's code servers and step processes. An explicit setting wins;
# pyarrow's Windows wheels have no jemalloc.
if sys.platform != "win32":
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")

__version__ = "0.1.0"

# The dg Component, imported only when asked for (dg, `from dativo_dagster import IngestionComponent`): importing
# it brings in Dagster, which `dativo-dagster validate` never needs. dg finds it through the
# `dagster_dg_cli.registry_modules` entry point (pyproject.toml), which lists this module's names with dir().
_LAZY = {"IngestionComponent": "dativo_dagster.component"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["IngestionComponent", "__version__"]
