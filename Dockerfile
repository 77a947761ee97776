# syntax=docker/dockerfile:1
# vaultfs container image: the node plugin (`vaultfs csi`) and the hostPath daemon
# (`vaultfs mount`) are the same binary.
#   docker build -t ghcr.io/vaultfs/vaultfs:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and compiled dependencies between builds; the
# binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/vaultfs /usr/local/bin/vaultfs

FROM debian:bookworm-slim
# ca-certificates: a CA bundle under /etc/ssl/certs for --vault-cacert/VAULT_CACERT (vaultfs
# also carries the public web roots itself); fuse3: fusermount3 for operators debugging a
# mount. vaultfs mounts with mount(2) itself and needs no helper. It runs as root: mounting
# needs it (the manifests run it privileged).
# Not version-pinned: bookworm's security updates replace old versions on the mirrors.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates fuse3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/vaultfs /usr/local/bin/vaultfs
ENTRYPOINT ["/usr/local/bin/vaultfs"]
