#!/usr/bin/env bash
# Build the venv incstore runs in, from this action's own checkout (so the action's ref pins
# the code), with the runner's python3 (3.10 or newer). `check` names the wheels to cache and
# says whether this job already has a working venv; `install` builds it from the cached wheels
# when they are complete (no PyPI), else downloads them first. A half-built venv is never
# reused: it is built under a temporary name and renamed into place once it works.
# If anything fails, the step warns and sets no `python` output; the incstore steps then skip
# themselves and the job goes on (a cache problem is a cache miss).
set -euo pipefail
mode="${1:-install}"
root="$(cd "$ACTION_PATH/../../.." && pwd)"
wheels="${HOME}/.cache/incstore-wheels"
out="${GITHUB_OUTPUT:-/dev/null}"

if [ "${RUNNER_OS_NAME:-Linux}" != Linux ] || [ "$(uname -s)" != Linux ]; then
    echo "::error title=incstore::incstore runs on Linux runners only (this is ${RUNNER_OS_NAME:-$(uname -s)}): Guix and Nix stores in CI are Linux"
    exit 1
fi

python=""
for candidate in python3 python3.13 python3.12 python3.11 python3.10; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        python="$(command -v "$candidate")"
        break
    fi
done
if [ -z "$python" ]; then
    echo "::warning title=incstore::no python3 of version 3.10 or newer on this runner; the cache is skipped"
    exit 0
fi

version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
deps="$(sed -n '/^dependencies = \[/,/^\]/p' "$root/pyproject.toml" | grep -o '"[^"]*"' | tr -d '"')"
target="$root"
case "${INCSTORE_CACHE:-}" in
    s3://*)  # the S3 chunk store needs the s3 extra (obstore)
        deps="$deps
$(sed -n 's/^s3 = \[\(.*\)\]$/\1/p' "$root/pyproject.toml" | grep -o '"[^"]*"' | tr -d '"')"
        target="${root}[s3]" ;;
esac
source_hash="$(cd "$root" && cat pyproject.toml incstore/*.py schema/*.sql schema/*.json | sha256sum | cut -c1-16)"
deps_hash="$(printf '%s\n' "$deps" | sha256sum | cut -c1-16)"
venv="${RUNNER_TEMP:-/tmp}/incstore-venv-${version}-${source_hash}-${deps_hash}"

# a venv prepared beforehand (a self-hosted runner's image, say) is used as it is
if [ -n "${INCSTORE_VENV:-}" ] && "$INCSTORE_VENV/bin/python" -m incstore --version >/dev/null 2>&1; then
    if [ "$mode" = check ]; then echo "ready=true" >> "$out"; echo "tag=preset" >> "$out"
    else echo "python=$INCSTORE_VENV/bin/python" >> "$out"; fi
    exit 0
fi

if [ "$mode" = check ]; then
    ready=false
    if [ -f "$venv/.incstore-ready" ]; then ready=true; fi
    # the wheels entry lands under $HOME, which actions/cache records relative to the
    # workspace: a runner whose home sits elsewhere (a container job, a self-hosted runner)
    # keeps entries of its own
    home_hash="$(printf '%s' "$HOME" | sha256sum | cut -c1-8)"
    {
        echo "tag=py${version}-${deps_hash}-home${home_hash}"
        echo "ready=${ready}"
    } >> "$out"
    exit 0
fi

if [ -f "$venv/.incstore-ready" ]; then
    echo "python=$venv/bin/python" >> "$out"
    exit 0
fi

fail() {
    echo "::warning title=incstore::could not set up incstore ($1); the cache is skipped"
    rm -rf "${building:-}"
    exit 0
}
mkdir -p "$wheels"
# one requirement per line (a requirement may carry an environment marker, spaces and all)
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT
printf '%s\n' "$deps" > "$requirements"
# the wheels directory is complete when every pinned requirement and the build backend are in
# it; otherwise fetch them (this is the only step that may reach PyPI)
if ! "$python" -m pip download --quiet --disable-pip-version-check --no-index \
        --find-links "$wheels" -d "$wheels" setuptools wheel -r "$requirements" >/dev/null 2>&1; then
    "$python" -m pip download --quiet --disable-pip-version-check -d "$wheels" \
        "setuptools>=68" wheel -r "$requirements" || fail "downloading its dependencies"
fi
building="$(mktemp -d "${venv}.building.XXXXXX")"
"$python" -m venv "$building" || fail "python3 -m venv (install python3-venv)"
"$building/bin/pip" install --quiet --disable-pip-version-check --no-index \
    --find-links "$wheels" setuptools wheel || fail "installing setuptools"
"$building/bin/pip" install --quiet --disable-pip-version-check --no-index \
    --find-links "$wheels" --no-build-isolation "$target" || fail "installing incstore"
"$building/bin/python" -m incstore --version >/dev/null || fail "running incstore"
touch "$building/.incstore-ready"
rm -rf "$venv"
mv "$building" "$venv"
echo "python=$venv/bin/python" >> "$out"
