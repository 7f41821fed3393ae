"""The ingest benchmark: `python -m tests.bench --help` (see docs/performance.md)."""
