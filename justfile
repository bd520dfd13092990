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

# Mirror skills/ into .claude/skills, .codex/skills and .gemini/skills, byte for byte.
sync-skills:
    #!/usr/bin/env bash
    set -euo pipefail
    cd "$(git rev-parse --show-toplevel)"
    for client in .claude .codex .gemini; do
        rm -rf "$client/skills"
        mkdir -p "$client/skills"
        cp -R skills/. "$client/skills/"
        echo "synced skills/ -> $client/skills/"
    done

# The worktree recipes (worktree-new, -remove, -env, -serve) live in their own file,
# the one to copy into other repositories.
import 'worktree.just'
