#!/usr/bin/env bash
# Create a git worktree beside this repository and lease its own block of ports.
#
#   examples/new-worktree.sh NAME [BASE]
#
# NAME is the branch (created from BASE, default HEAD, unless it exists already);
# the worktree goes to ../<repo>-NAME. Prints the worktree's environment block.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 NAME [BASE]" >&2
    exit 2
fi
name="$1"
base="${2:-HEAD}"

git check-ref-format --branch "$name" > /dev/null || {
    echo "$0: '$name' is not a valid branch name" >&2
    exit 2
}

top="$(cd "$(git rev-parse --show-toplevel)" && pwd -P)"
tree="$(dirname "$top")/$(basename "$top")-${name//\//-}"

if git show-ref --verify --quiet "refs/heads/$name"; then
    git worktree add "$tree" "$name"
else
    git worktree add -b "$name" "$tree" "$base"
fi

cd "$tree"
# Lease keyed by the worktree path (what `portalloc env` uses inside it), reclaimed when
# the directory goes away; the manifest is for tools that read a file.
portalloc env --worktree "$tree" --write "$tree" > /dev/null
grep -qxF '.worktree-ports.json' .gitignore 2> /dev/null ||
    echo "note: add .worktree-ports.json to .gitignore" >&2

echo "worktree $tree"
portalloc env --worktree "$tree"
echo "next: cd $(printf '%q' "$tree") && eval \"\$(portalloc env)\" && docker compose up -d && portalloc check --wait 60"
