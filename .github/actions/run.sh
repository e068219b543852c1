#!/usr/bin/env bash
# Run one incstore action step. Every input arrives in INCSTORE_* environment variables;
# nothing is expanded into this script. Paths with `~` are expanded here, as the runner's
# user, before sudo changes HOME; the verbs that touch the store run as root through sudo
# (with the environment kept, and the venv's interpreter by its absolute path, so sudo's
# secure_path does not matter).
set -euo pipefail
verb="$1"
if [ -z "${INCSTORE_PYTHON:-}" ]; then
    echo "::warning title=incstore::incstore is not set up (see the setup step); skipping ${verb}"
    exit 0
fi
for var in INCSTORE_CACHE INCSTORE_XFER INCSTORE_STATE; do
    value="${!var:-}"
    # a literal tilde in the value, not one for the shell to expand
    # shellcheck disable=SC2088
    case "$value" in
        "~") printf -v "$var" '%s' "$HOME" ;;
        "~/"*) printf -v "$var" '%s' "$HOME/${value#"~/"}" ;;
    esac
    export "${var?}"
done
mkdir -p "$INCSTORE_XFER"
cleanup=""
if [ -n "${INCSTORE_SIGNING_KEY:-}" ]; then
    # the secret goes to a private file for this step only; it never reaches a command line
    key_file="$(umask 077 && mktemp "${RUNNER_TEMP:-/tmp}/incstore-key.XXXXXX")"
    printf '%s\n' "$INCSTORE_SIGNING_KEY" > "$key_file"
    export INCSTORE_SIGN_KEY_FILE="$key_file"
    cleanup="$key_file"
fi
unset INCSTORE_SIGNING_KEY
as=()
case "$verb" in
    restore-prepare | restore-plan | save-prepare) ;;
    *)
        if [ "$(id -u)" != 0 ] && [ "${INCSTORE_SUDO:-auto}" != false ]; then
            as=(sudo --preserve-env)
        fi
        ;;
esac
status=0
"${as[@]}" "$INCSTORE_PYTHON" -m incstore.actionstep "$verb" || status=$?
if [ -n "$cleanup" ]; then rm -f "$cleanup"; fi
exit "$status"
