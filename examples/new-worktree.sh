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

# Beside the main worktree, as `just worktree-new` does, also when run from a linked one:
# the first entry of `git worktree list` is the main worktree.
main="$(git worktree list --porcelain | sed -n '1s/^worktree //p')"
main="$(cd "$main" && pwd -P)"
tree="$(dirname "$main")/$(basename "$main")-${name//\//-}"

if [ -e "$tree" ]; then
    if [ ! -e "$tree/.git" ]; then
        echo "$0: $tree exists and is not a git worktree" >&2
        exit 1
    fi
    # `feat/x` and `feat-x` share a directory: reuse it only for the branch it holds.
    held="$(git -C "$tree" symbolic-ref --short -q HEAD || true)"
    if [ "$held" != "$name" ]; then
        echo "$0: $tree holds ${held:+branch }${held:-a detached HEAD}, not branch $name (branch names that differ only in / and - share a directory); pick another NAME" >&2
        exit 1
    fi
    echo "$0: reusing the existing worktree $tree" >&2
elif git show-ref --verify --quiet "refs/heads/$name"; then
    git worktree add "$tree" "$name"
else
    git worktree add -b "$name" "$tree" "$base"
fi

# Keep the manifest out of `git status`; info/exclude is shared by every worktree.
exclude="$(git rev-parse --path-format=absolute --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qxF '.worktree-ports.json' "$exclude" 2> /dev/null || echo '.worktree-ports.json' >> "$exclude"

cd "$tree"
# Lease keyed by the worktree path (what `portalloc env` uses inside it), reclaimed when
# the directory goes away; the manifest is for tools that read a file.
portalloc env --worktree "$tree" --write "$tree" > /dev/null

echo "worktree $tree"
portalloc env --worktree "$tree"
echo "next: cd $(printf '%q' "$tree") && eval \"\$(portalloc env)\" && docker compose -p \"\$COMPOSE_PROJECT_NAME\" -f examples/compose.yaml up -d && portalloc check --wait 60"
