"""Benchmarks and utilities, run as scripts (`python tools/NAME.py --help`). The test suite imports the
ones it builds fixtures with as `tools.NAME` (the repository root is on its path)."""
