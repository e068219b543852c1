#!/usr/bin/env bash
# Build a venv with incstore from this action's own checkout (so the action's ref is the code's
# version), once per job, and print its interpreter as the step output `python`.
set -euo pipefail
root="$(cd "$ACTION_PATH/../../.." && pwd)"
venv="${RUNNER_TEMP:-/tmp}/incstore-venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$root"
fi
echo "python=$venv/bin/python" >> "$GITHUB_OUTPUT"
