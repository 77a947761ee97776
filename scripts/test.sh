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

# The Python tools live in the project's virtual environment; the end-to-end harness finds
# OpenBao through VAULTFS_TEST_BAO, the manifest tests kubectl and kubernetes-validate on PATH
# and the Python with helm-sdkpy through VAULTFS_TEST_PYTHON.
. scripts/lib.sh
export PATH="$VENV/bin:$PATH"
export VAULTFS_TEST_PYTHON="$VENV/bin/python"
VAULTFS_TEST_BAO=$(bao_binary)
export VAULTFS_TEST_BAO

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

section "cargo test --all-targets (all tiers, including the end-to-end tests)"
# Each end-to-end test starts its own OpenBao server and FUSE mount; a few in parallel is fine
# on a 2-core machine.
# VAULTFS_BENCH_SMOKE=1 makes the benchmarks run their smoke versions too (they need root).
VAULTFS_BENCH_SMOKE=1 cargo test --all-targets --no-fail-fast -- --include-ignored --test-threads="${VAULTFS_TEST_THREADS:-3}"

section "real-cluster tier (tests/k8s/run.sh)"
# The CSI node plugin from deploy/base, deploy/reload-signals and the Helm chart on a real
# single-node Kubernetes (the k8s-lab kit beside the repository, or $K8S_LAB) with a real
# OpenBao: publishes, rotation, isolation, Vault down, restarts under reading pods with a new
# pod after each, reload signals, uninstall. It wipes any k8s-lab cluster on this machine first
# and stops and wipes its own at the end.
tests/k8s/run.sh

section "all checks passed"
