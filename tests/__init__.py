"""relay's tests; a package so helpers import as `tests.x` and run as `python -m tests.x`."""
