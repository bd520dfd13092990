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

# The recipes below need only git, bash and portalloc on PATH: copy this file into any
# git repository. Worktrees live beside the main one, at ../<repo>-<NAME>.

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

# Create worktree ../<repo>-NAME on branch NAME (new or existing), lease its ports, print its URLs.
[positional-arguments]
worktree-new NAME:
    #!/usr/bin/env bash
    set -euo pipefail
    name="$1"
    if ! git check-ref-format --branch "$name" > /dev/null 2>&1; then
        echo "worktree-new: '$name' is not a valid branch name" >&2
        exit 2
    fi
    # The first entry of `git worktree list` is the main worktree, also when run from a linked one.
    main="$(git worktree list --porcelain | sed -n '1s/^worktree //p')"
    main="$(cd "$main" && pwd -P)"
    tree="$(dirname "$main")/$(basename "$main")-${name//\//-}"
    if [ -e "$tree" ]; then
        if [ ! -e "$tree/.git" ]; then
            echo "worktree-new: $tree exists and is not a git worktree" >&2
            exit 1
        fi
        echo "worktree-new: reusing the existing worktree $tree" >&2
    elif git show-ref --verify --quiet "refs/heads/$name"; then
        git worktree add "$tree" "$name"
    else
        git worktree add -b "$name" "$tree"
    fi
    # Keep the manifest out of `git status`; info/exclude is shared by every worktree.
    exclude="$(git rev-parse --path-format=absolute --git-common-dir)/info/exclude"
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '.worktree-ports.json' "$exclude" 2> /dev/null || echo '.worktree-ports.json' >> "$exclude"
    cd "$tree"    # so the worktree's own portalloc.toml / pyproject.toml profile applies
    portalloc env --worktree "$tree" --write "$tree" > /dev/null
    echo "worktree  $tree  (branch $name)"
    echo "manifest  $tree/.worktree-ports.json"
    portalloc env --worktree "$tree" --format dotenv | while IFS= read -r line; do
        value="${line#*=}"
        case "${line%%=*}" in
            *_PORT) printf '  %-40s http://localhost:%s\n' "$line" "$value" ;;
            *) printf '  %s\n' "$line" ;;
        esac
    done
    echo "next: cd $(printf '%q' "$tree") && eval \"\$(portalloc env)\""

# Release the ports of worktree NAME, then `git worktree remove` it (extra ARGS, e.g. --force, go to git).
[positional-arguments]
worktree-remove NAME *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    name="$1"
    shift
    main="$(git worktree list --porcelain | sed -n '1s/^worktree //p')"
    main="$(cd "$main" && pwd -P)"
    tree="$(dirname "$main")/$(basename "$main")-${name//\//-}"
    portalloc release "$tree"
    if [ -e "$tree" ]; then
        rm -f "$tree/.worktree-ports.json"
        cd "$main"
        git worktree remove "$@" "$tree"
        echo "removed worktree $tree (branch $name is kept; git branch -d $name deletes it)"
    else
        git worktree prune
        echo "worktree $tree was already gone; its lease is released"
    fi

# Print worktree NAME's environment block (extra ARGS go to `portalloc env`, e.g. --format fish).
[positional-arguments]
worktree-env NAME *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    name="$1"
    shift
    main="$(git worktree list --porcelain | sed -n '1s/^worktree //p')"
    main="$(cd "$main" && pwd -P)"
    tree="$(dirname "$main")/$(basename "$main")-${name//\//-}"
    if [ ! -d "$tree" ]; then
        echo "worktree-env: no worktree at $tree (create it with: just worktree-new $name)" >&2
        exit 1
    fi
    cd "$tree"
    portalloc env --worktree "$tree" "$@"

# Serve portalloc's HTTP API on this worktree's own `api` port (generates a key if PORTALLOC_API_KEY is unset).
worktree-serve:
    #!/usr/bin/env bash
    set -euo pipefail
    tree="$(git rev-parse --show-toplevel)"
    tree="$(cd "$tree" && pwd -P)"
    cd "$tree"
    portalloc env --worktree "$tree" > /dev/null
    port="$(portalloc get "$tree" api)"
    if [ -z "${PORTALLOC_API_KEY:-}" ]; then
        PORTALLOC_API_KEY="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
        export PORTALLOC_API_KEY
        echo "worktree-serve: PORTALLOC_API_KEY is unset; this run uses $PORTALLOC_API_KEY" >&2
    fi
    echo "worktree-serve: http://127.0.0.1:$port/ports/status" >&2
    exec portalloc serve --port "$port"
