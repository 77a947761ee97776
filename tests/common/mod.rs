//! Helpers shared by the integration tests and the benchmarks, one module per job:
//!
//! * [`bao`]: a real OpenBao dev server ([`Bao`]) and its HTTP API helpers;
//! * [`daemon`]: the `vaultfs mount` binary under test ([`Mount`], [`MountBuilder`]);
//! * [`backend`], [`semantics`]: the consistency semantics written once over a
//!   [`backend::Backend`] and run over both `MockSource` behind a real FUSE mount in the test
//!   process (`tests/fuse_mock.rs`) and OpenBao behind the binary;
//! * [`csi`], [`kubelet`], [`k8s`], [`jwt`], [`pg`], [`pki`], [`reader`]: the CSI node plugin
//!   and kubelet, the Kubernetes API and service-account tokens, PostgreSQL, a Vault PKI
//!   certificate authority and `openssl` checks of PEM files, reader processes;
//! * [`files`], [`probe`], [`poll`]: bounded filesystem calls through a mount, timed sampling
//!   of reads, deadlines;
//! * [`mounts`], [`procfs`], [`process`], [`http`]: the mount table, `/proc`, child processes
//!   and privileges, small HTTP clients.
//!
//! Every blocking filesystem operation that goes through a mount should be wrapped with
//! [`within`] (or use the helpers of [`files`] that already do) so that a hung daemon fails the
//! test instead of hanging the whole test run.
//!
//! Each test crate declares this module as `pub mod common;`: its public items are then that
//! crate's interface, so a helper one test file does not use is not reported as dead code
//! there, while a private helper nobody calls still is. (Whether every public helper is used
//! by some test is checked by hand, with `grep` over `tests/` and `benches/`.)

pub mod backend;
pub mod bao;
pub mod csi;
pub mod daemon;
pub mod files;
pub mod http;
pub mod jwt;
pub mod k8s;
pub mod kubelet;
pub mod mounts;
pub mod pg;
pub mod pki;
pub mod poll;
pub mod probe;
pub mod process;
pub mod procfs;
pub mod reader;
pub mod semantics;

// The helpers most tests use, at the paths they always had (`common::Bao`, `common::within`).
pub use bao::*;
pub use daemon::*;
pub use files::*;
pub use http::*;
pub use mounts::*;
pub use poll::*;
pub use probe::*;
pub use process::*;
pub use procfs::*;
