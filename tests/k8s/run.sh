#!/usr/bin/env bash
# vaultfs's real-cluster end-to-end tier: the CSI node plugin (deploy/base, deploy/reload-signals,
# the Helm chart) on a real single-node Kubernetes cluster, with a real OpenBao.
#
#   tests/k8s/run.sh            (as root; VAULTFS_BIN=/path/to/vaultfs skips the release build)
#
# Uses the k8s-lab kit at ${K8S_LAB:-<repo>/../shared/k8s-lab} (for a clone made elsewhere, such
# as a clean clone in /tmp, the kit beside the local repository it was cloned from; read-only; its state is in
# ${K8S_LAB_STATE:-/var/tmp/k8s-lab}): wipes any cluster state it has (down.sh --purge), runs
# setup.sh and up.sh, builds vaultfs (cargo build --release) unless VAULTFS_BIN is set, packs it
# into an image imported into the cluster's containerd, installs the test dependencies
# (scripts/install-deps.sh: OpenBao in .venv), and runs the checks (tests/k8s/e2e.py). On exit,
# whatever happened: OpenBao is stopped, the cluster is stopped and wiped (down.sh --purge), and
# host directories the manifests' hostPath volumes created are removed. Prints PASS/FAIL lines
# and, last, "N passed, M failed"; exits non-zero on any failure. Logs of each step are in a
# temporary directory, kept (and named) only when something failed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
kit=${K8S_LAB:-$root/../shared/k8s-lab}
if [ -z "${K8S_LAB:-}" ] && [ ! -x "$kit/up.sh" ]; then
    # A clone of a local repository (`git clone /work/main /tmp/x`): the kit beside that one.
    origin=$(git -C "$root" remote get-url origin 2>/dev/null || true)
    if [ -n "$origin" ] && [ -d "$origin" ]; then
        kit=$(cd "$origin" && pwd)/../shared/k8s-lab
    fi
fi
export K8S_LAB_STATE=${K8S_LAB_STATE:-/var/tmp/k8s-lab}
[ "$(id -u)" -eq 0 ] || { echo "tests/k8s/run.sh: must run as root (the cluster and FUSE need it)" >&2; exit 1; }
[ -x "$kit/up.sh" ] || { echo "tests/k8s/run.sh: no k8s-lab kit at $kit (set K8S_LAB)" >&2; exit 1; }
kit=$(cd "$kit" && pwd)

work=$(mktemp -d /tmp/vaultfs-k8s.XXXXXX)
t_start=$(date +%s)
setup_failed=0
cluster_started=0
elapsed() { echo "$(( $(date +%s) - t_start ))s"; }
note() { printf '[%5s] %s\n' "$(elapsed)" "$*"; }

# step NAME CMD...: runs CMD with its output in $work/NAME.log; a failure is a FAIL of the tier.
step() {
    local name=$1 t=$(date +%s)
    shift
    if "$@" >"$work/$name.log" 2>&1; then
        note "$name: $(( $(date +%s) - t ))s"
    else
        echo "FAIL: $name -- exit $?; last lines of $work/$name.log:"
        tail -n 15 "$work/$name.log" | sed 's/^/    /'
        setup_failed=1
        exit 1
    fi
}

# hostPath directories of the manifests that do not exist yet: removed again at the end.
new_host_dirs() {
    local dir
    for base in "$root/deploy/base" "$root/deploy/reload-signals"; do
        kubectl kustomize "$base" | python3 -c '
import re, sys
for m in re.finditer(r"hostPath:\s*\n\s*path: (\S+)", sys.stdin.read()):
    print(m.group(1))'
    done | sort -u | while read -r dir; do
        case $dir in /dev/*|/sys/*|/proc/*|/var/lib/kubelet*|/) continue ;; esac
        [ -e "$dir" ] || echo "$dir"
    done
}

teardown() {
    local rc=$? passed=0 failed=0 t=$(date +%s)
    set +e
    trap - EXIT INT TERM
    if [ -s "$work/openbao.pid" ] && kill -0 "$(cat "$work/openbao.pid")" 2>/dev/null; then
        kill "$(cat "$work/openbao.pid")"
        for _ in $(seq 100); do kill -0 "$(cat "$work/openbao.pid")" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$(cat "$work/openbao.pid")" 2>/dev/null
    fi
    if [ "$cluster_started" = 1 ]; then
        "$kit/down.sh" --purge >"$work/down.log" 2>&1 || echo "tests/k8s/run.sh: down.sh --purge failed (see $work/down.log)"
        # A FUSE mount left on the host by the run (none is expected: the uninstall checks say).
        awk '$0 ~ / - fuse\.vaultfs / { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
            echo "teardown: unmounting a leftover fuse.vaultfs mount $m"
            umount -l "$m"
        done
        [ -s "$work/host-dirs" ] && while read -r dir; do
            [ -d "$dir" ] && ! grep -q " ${dir}[/ ]" /proc/self/mountinfo && rm -rf -- "$dir"
        done <"$work/host-dirs"
        note "teardown (OpenBao stopped, cluster stopped and wiped): $(( $(date +%s) - t ))s"
    fi
    [ -s "$work/results" ] && read -r passed failed <"$work/results"
    [ -s "$work/results" ] || [ "$setup_failed" = 1 ] || failed=$((failed + 1))  # died before a result
    failed=$((failed + setup_failed))
    note "tier total: $(elapsed)"
    if [ "$failed" -eq 0 ] && [ "$rc" -eq 0 ]; then rm -rf "$work"; else echo "logs: $work"; fi
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ] && [ "$rc" -eq 0 ]
    exit $?
}
trap teardown EXIT
trap 'exit 130' INT TERM

note "kit $kit, state $K8S_LAB_STATE, work $work"
step "install-deps" "$root/scripts/install-deps.sh"
. "$root/scripts/lib.sh"
bao=$(bao_binary)
[ -x "$bao" ] || { echo "FAIL: no OpenBao binary from scripts/lib.sh bao_binary"; setup_failed=1; exit 1; }

if [ -z "${VAULTFS_BIN:-}" ]; then
    step "cargo-build-release" bash -c "cd '$root' && cargo build --release"
    VAULTFS_BIN=${CARGO_TARGET_DIR:-$root/target}/release/vaultfs
fi
[ -x "$VAULTFS_BIN" ] || { echo "FAIL: no vaultfs binary at $VAULTFS_BIN"; setup_failed=1; exit 1; }

cluster_started=1
step "k8s-lab-down-purge-first" "$kit/down.sh" --purge
step "k8s-lab-setup" "$kit/setup.sh"
step "k8s-lab-up" "$kit/up.sh"
. "$kit/env.sh"
new_host_dirs >"$work/host-dirs"

tag=k8s-$(date +%Y%m%d-%H%M%S)-$$
image=localhost/vaultfs:$tag
step "image" "$here/image.sh" "$kit" "$VAULTFS_BIN" "$work" "$image" "$image-b"
note "image $image (and $image-b) from $VAULTFS_BIN"

K8S_E2E_WORK=$work K8S_E2E_RESULTS=$work/results K8S_E2E_IMAGE=$image K8S_E2E_IMAGE2=$image-b \
    K8S_E2E_BAO=$bao K8S_E2E_HELM_PYTHON=$VENV/bin/python VAULTFS_ROOT=$root \
    python3 "$here/e2e.py"
