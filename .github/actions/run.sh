#!/usr/bin/env bash
# Run one incstore action step (restore or save) as root when the store needs it. Every input
# arrives in INCSTORE_* environment variables; nothing is expanded into this script.
set -euo pipefail
verb="$1"
runner=()
if [ "$(id -u)" != 0 ] && [ "${INCSTORE_SUDO:-auto}" != false ]; then
    runner=(sudo --preserve-env)
fi
exec "${runner[@]}" "$INCSTORE_PYTHON" -m incstore.actionstep "$verb"
