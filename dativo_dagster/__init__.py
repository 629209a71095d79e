"""dativo-dagster: YAML asset specs become Dagster assets that ingest CSV into Iceberg."""

import os

# pyarrow's allocator (mimalloc) keeps freed pages for a while before it returns them to the system; with
# three stages allocating and freeing batches at once that delay alone is worth ~100 MB of resident memory.
# Read once, when pyarrow first allocates: set before pyarrow is imported. An explicit setting wins.
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")

__version__ = "0.1.0"
