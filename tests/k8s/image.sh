#!/usr/bin/env bash
# image.sh KIT VAULTFS_BIN WORKDIR IMAGE [IMAGE2]: packs the vaultfs binary into a single-layer
# OCI image with the kit's mkimage.py and imports it into the cluster's containerd (k8s.io
# namespace); IMAGE2, if given, is a second name for the same image (`ctr images tag`), for a
# DaemonSet rollout to a different image reference.
#
# The binary is linked dynamically against glibc: every library `ldd` lists, the loader
# included, is copied to the same path in the rootfs. The image also carries `reloadcount`
# (tests/k8s/reloadcount.c, gcc -static), the app the reload-signal check runs.
set -euo pipefail
kit=$1 bin=$2 work=$3 image=$4 image2=${5:-}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

rootfs=$work/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs"/{proc,sys,dev,etc,tmp,run}
install -m 0755 "$bin" "$rootfs/vaultfs"
# `ldd` lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and
# "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no file.
ldd "$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | sort -u |
    while read -r lib; do
        mkdir -p "$rootfs$(dirname "$lib")"
        cp -L "$lib" "$rootfs$lib"
    done
gcc -static -O2 -o "$rootfs/reloadcount" "$here/reloadcount.c"
# The binary must start in that rootfs alone (no library of the host missing).
chroot "$rootfs" /vaultfs --version >/dev/null

python3 "$kit/images/mkimage.py" "$rootfs" "$image" "$work/vaultfs-image.tar" \
    --entrypoint '["/vaultfs"]' >/dev/null
ctr -n k8s.io images import "$work/vaultfs-image.tar" >/dev/null
if [ -n "$image2" ]; then
    ctr -n k8s.io images tag --force "$image" "$image2" >/dev/null
fi
rm -f "$work/vaultfs-image.tar"
ctr -n k8s.io images ls -q | grep -qxF "$image" || { echo "image $image not imported" >&2; exit 1; }
