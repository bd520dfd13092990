# portalloc's own recipes; `just --list` shows them.

# Run lint, types and the test suite (the same command CI runs).
test:
    ruff check . && ruff format --check . && mypy && pytest

# Lint and type-check only.
lint:
    ruff check . && ruff format --check . && mypy

# Measure start-up, contention and ledger-size costs (bench/run.py).
bench:
    python bench/run.py
