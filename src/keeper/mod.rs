//! The keeper (`vaultfs keeper`): a small long-lived process that holds duplicates of live FUSE
//! connections handed to it over a unix socket, so that a mount outlives the daemon serving it
//! and a successor daemon can take the connection and serve it again. It never reads FUSE
//! requests. It also stashes, in memory only, each volume's Vault session (token and its
//! renewal plan) and leased values (dynamic credentials with their leases) as opaque records
//! the daemon hands it, so that a successor reuses them instead of logging in and reading new
//! credentials. Also the blocking client the daemon uses.
//!
//! One job per file:
//! - `protocol`: the messages (requests, replies), their encoding, limits and errors, and the
//!   wire table;
//! - `state`: what is held and stashed and who owns it, a pure state machine over requests,
//!   hang-ups and an injected clock;
//! - `admission`: who may connect (root with `CAP_SYS_ADMIN` in the keeper's user namespace);
//! - `server`: the poll loop of `vaultfs keeper` that ties the three together;
//! - `client`: [`KeeperClient`], the daemon's side.
//!
//! The socket calls (`SOCK_SEQPACKET`, `SCM_RIGHTS`, `poll`), the stop signals and the peer's
//! credentials are `sys::socket`, `sys::signal` and `sys::pidfd`: nothing here is `unsafe`.
//! Uses std, serde/serde_json, thiserror, tracing (and anyhow for `run_keeper`'s error chain)
//! and, in vaultfs, `logging`, `secret` (to wipe what it held) and `sys` only. Everything
//! public is re-exported here: callers write `keeper::KeeperClient`, `keeper::run_keeper`.

mod admission;
mod client;
mod protocol;
mod server;
mod state;

pub use crate::sys::socket::check_socket_path;
pub use admission::{check_client, ClientRefusal};
pub use client::{KeeperClient, TakenConnection};
pub use protocol::{
    check_connection, check_name, decode, encode, ConnectionInfo, KeeperError, Reply, Request,
    Sealed, MAX_HELD, MAX_INIT_BYTES, MAX_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_RECORD_BYTES,
    MAX_STASHED, MAX_STASHED_BYTES, PROTOCOL_VERSION,
};
pub use server::{run_keeper, DEFAULT_SOCKET, MAX_CLIENTS};
