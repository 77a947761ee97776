//! vaultfs: a read-only FUSE filesystem whose files are Vault/OpenBao secrets, fetched lazily
//! on first access, held in memory with a TTL and hot-swapped when they change in Vault.
//!
//! Dependencies point one way only:
//! `main → app → csi → volume → mount → fuse → fs → cache → source → {secret, spec} → logging`,
//! with `config` (durations, file modes and the defaults, each written once) a leaf any of them
//! may use. `volume` alone builds, starts and tears down a volume, wired to its connection's
//! kernel invalidations at construction; `mount` owns the FUSE connections (one per `vaultfs
//! mount`, one node-wide for `vaultfs csi`), the bind mounts and a restart's hand-over of the
//! node's connections (`mount::TakenOver`: take, adopt, serve, in that order only).
//! `tonic` is imported only by `csi`; `fuser` only by `fuse` and `mount`; HTTP and Vault auth
//! live only in `source::vault`, and `csi` makes identities only through `source::Connect`
//! with a source-neutral `source::Login`. What a daemon hands its successor of a volume's Vault
//! session is `source::handoff`.
//! `slot` (a volume's number on its FUSE connection, and the connection's inode numbers) uses
//! only `spec`; `csi`, `mount`, `fuse` and the wiring number volumes with it.
//! Everything below `fuse` is plain Rust, testable without a kernel. `volume` and `csi` use a
//! volume's identity only through `source::Identity` and mounts only through
//! `mount::Mounter`, which is generic over the source: the CSI contract tier runs the whole
//! lifecycle over `source::mock::MockSource` and `mount::FakeMounter`, which are compiled
//! only for tests (`cfg(test)` or the `testing` feature).
//! `reload` (reload signals: signal names, a pod's processes, the debounce) is used by `volume`
//! and the wiring and uses only `metrics` and `pidfd` (to signal exactly the process it checked).
//! `sys` (every Linux call vaultfs makes itself, one module per topic: process, file, fuse,
//! mount, mountinfo, socket, signal, pidfd; no `unsafe` block outside it) uses no vaultfs
//! module; `pidfd` is `sys::pidfd`.
//! `keeper` (the process that holds FUSE connections across daemon restarts, and its client)
//! stands beside this chain: it uses only `logging`, `sys` (its socket calls, and `pidfd` to
//! check who connects) and `secret` (to wipe what it held), and only `main`, the wiring and
//! `mount::keeper_link` (which also stashes the volumes' Vault sessions there, through
//! `source::SessionStore`) use it.
//! `quarantine` (the node plugin's requests in flight per volume, in shared memory that
//! outlives a crash, and the volumes fenced off after consecutive crashes) uses only `sys` and
//! `config`; `fuse` counts and fences requests through it, the wiring opens it.

pub mod app;
pub mod audit;
pub mod cache;
pub mod config;
pub mod csi;
pub mod fs;
pub mod fuse;
pub mod health;
pub mod keeper;
pub mod logging;
pub mod metrics;
pub mod mount;
pub mod quarantine;
pub mod reload;
pub mod render;
pub mod secret;
pub mod slot;
pub mod source;
pub mod spec;
pub mod sys;
/// `sys::pidfd`, at the path its users know.
pub use sys::pidfd;
pub mod template;
pub mod volume;
