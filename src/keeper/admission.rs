//! Who may use the keeper: the check the server makes of every client as it connects, before
//! anything it sends is read.
//!
//! What the keeper holds reads every pod's secrets (tokens) and FUSE requests (the descriptor),
//! so it answers only a client that holds what the plugin holds: uid 0 *and* `CAP_SYS_ADMIN` in
//! its effective set, in the keeper's user namespace (see [`check_client`]). A root process
//! without capabilities (a container that dropped them all, a host agent) is refused, and so
//! is one that gave itself capabilities in a user namespace of its own. There is no exception
//! for the keeper's own uid: a keeper run as another user serves nobody. The check reads
//! `/proc/<pid>` of the client, so the keeper must see the client's pid namespace (in a cluster:
//! `hostPID: true`); a client it cannot see is refused, saying so. A refused client gets one
//! `error` message, unasked, and is disconnected.

use std::io;

use thiserror::Error;

use crate::sys::pidfd;

/// Why a client is refused as soon as it connects, before anything it sends is read. The text
/// goes back to it in an `error` message, and to the keeper's log.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClientRefusal {
    #[error("uid {uid} (pid {pid}) may not use the keeper: only root with CAP_SYS_ADMIN, as the plugin runs, may")]
    NotRoot { uid: u32, pid: i32 },
    #[error("pid {pid} (uid 0) may not use the keeper: its effective capabilities lack CAP_SYS_ADMIN, which the plugin holds")]
    NoCapability { pid: i32 },
    #[error("pid {pid} (uid 0) may not use the keeper: it runs in a user namespace other than the keeper's, where its capabilities do not count")]
    UserNamespace { pid: i32 },
    #[error("a client (uid {uid}) in a pid namespace the keeper cannot see may not use the keeper: its capabilities cannot be checked; run the keeper in the host's pid namespace (hostPID: true)")]
    Hidden { uid: u32 },
    #[error("pid {pid} (uid {uid}) exited before its capabilities could be checked")]
    Gone { pid: i32, uid: u32 },
    #[error(
        "pid {pid} (uid {uid}) may not use the keeper: its capabilities cannot be checked: {error}"
    )]
    Unchecked { pid: i32, uid: u32, error: String },
}

/// Whether `peer` may use the keeper: uid 0 (`SO_PEERCRED`) and `CAP_SYS_ADMIN` in its
/// effective set (`/proc/<pid>/status`), in the keeper's own user namespace (its
/// `/proc/<pid>/uid_map` reads as `own_uid_map`, the keeper's). Race-free: the process is held
/// by a pidfd (`SO_PEERPIDFD`, the very process that connected) while `/proc/<pid>` is read, and
/// is still alive afterwards, so what was read was about it and not about a process that got its
/// pid since.
///
/// The user namespace: a root process without capabilities may create a user namespace, in which
/// it holds every capability (`CapEff` shows them all) while it stays uid 0 to the keeper; the
/// capabilities count only inside that namespace. A namespace's `uid_map` can read as the
/// keeper's whole-range map only if its creator held `CAP_SETUID` and `CAP_SETFCAP` in the
/// keeper's namespace.
pub fn check_client(peer: &pidfd::Peer, own_uid_map: &str) -> Result<(), ClientRefusal> {
    let (pid, uid) = (peer.pid, peer.uid);
    if uid != 0 {
        return Err(ClientRefusal::NotRoot { uid, pid });
    }
    if pid == 0 {
        return Err(ClientRefusal::Hidden { uid });
    }
    let unchecked = |e: &io::Error| match e.raw_os_error() {
        // EINVAL: SO_PEERPIDFD of a peer that has exited, on Linux 6.5 to 6.8.
        Some(libc::ESRCH | libc::ENOENT | libc::EINVAL) => ClientRefusal::Gone { pid, uid },
        _ => ClientRefusal::Unchecked {
            pid,
            uid,
            error: e.to_string(),
        },
    };
    let process = peer.process.as_ref().map_err(unchecked)?;
    let read = |file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|e| unchecked(&e))
    };
    let (status, uid_map) = (read("status")?, read("uid_map")?);
    if !process.is_alive() {
        return Err(ClientRefusal::Gone { pid, uid });
    }
    check_client_status(pid, &status, &uid_map, own_uid_map)
}

/// The part of [`check_client`] that reads what `/proc/<pid>` said: `status` and `uid_map`.
fn check_client_status(
    pid: i32,
    status: &str,
    uid_map: &str,
    own_uid_map: &str,
) -> Result<(), ClientRefusal> {
    match pidfd::has_effective_capability(status, pidfd::CAP_SYS_ADMIN) {
        None => Err(ClientRefusal::Unchecked {
            pid,
            uid: 0,
            error: "its /proc status has no CapEff line".into(),
        }),
        Some(false) => Err(ClientRefusal::NoCapability { pid }),
        Some(true) if uid_map != own_uid_map => Err(ClientRefusal::UserNamespace { pid }),
        Some(true) => Ok(()),
    }
}

impl ClientRefusal {
    /// A key per kind of refusal, for the log rate limit.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            ClientRefusal::NotRoot { .. } => "uid",
            ClientRefusal::NoCapability { .. } => "capability",
            ClientRefusal::UserNamespace { .. } => "user-namespace",
            ClientRefusal::Hidden { .. } => "hidden",
            ClientRefusal::Gone { .. } | ClientRefusal::Unchecked { .. } => "unchecked",
        }
    }

    /// What the client lacks, for the log line.
    pub(super) fn missing(&self) -> &'static str {
        match self {
            ClientRefusal::NotRoot { .. } => "uid 0",
            ClientRefusal::NoCapability { .. } => "CAP_SYS_ADMIN",
            ClientRefusal::UserNamespace { .. } => "CAP_SYS_ADMIN in the keeper's user namespace",
            ClientRefusal::Hidden { .. }
            | ClientRefusal::Gone { .. }
            | ClientRefusal::Unchecked { .. } => "a checkable process",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_UID_MAP: &str = "         0          0 4294967295\n";

    fn status(cap_eff: &str) -> String {
        format!("Name:\tvaultfs\nUid:\t0\t0\t0\t0\nCapPrm:\t000001ffffffffff\nCapEff:\t{cap_eff}\n")
    }
    #[test]
    fn only_root_with_cap_sys_admin_in_the_keepers_user_namespace_is_served() {
        let plugin = status("000001ffffffffff");
        assert_eq!(
            check_client_status(7, &plugin, HOST_UID_MAP, HOST_UID_MAP),
            Ok(())
        );
        let just_sys_admin = status("0000000000200000");
        assert_eq!(
            check_client_status(7, &just_sys_admin, HOST_UID_MAP, HOST_UID_MAP),
            Ok(())
        );
        let all_but_sys_admin = status("000001ffffdfffff");
        let refused = check_client_status(7, &all_but_sys_admin, HOST_UID_MAP, HOST_UID_MAP);
        assert_eq!(refused, Err(ClientRefusal::NoCapability { pid: 7 }));
        let message = refused.unwrap_err().to_string();
        assert!(
            message.contains("pid 7") && message.contains("CAP_SYS_ADMIN"),
            "{message}"
        );
        assert_eq!(
            check_client_status(7, &status("0000000000000000"), HOST_UID_MAP, HOST_UID_MAP),
            Err(ClientRefusal::NoCapability { pid: 7 })
        );
        // unshare(CLONE_NEWUSER) by a root without capabilities: every capability, in a
        // namespace of its own with no map (or a one-uid map).
        for uid_map in ["", "         0          0          1\n"] {
            assert_eq!(
                check_client_status(7, &plugin, uid_map, HOST_UID_MAP),
                Err(ClientRefusal::UserNamespace { pid: 7 }),
                "{uid_map:?}"
            );
        }
        assert!(matches!(
            check_client_status(7, "Name:\tx\n", HOST_UID_MAP, HOST_UID_MAP),
            Err(ClientRefusal::Unchecked { .. })
        ));
    }
    #[test]
    fn a_client_not_root_or_out_of_sight_is_refused_before_its_process_is_read() {
        let peer = |uid, pid| pidfd::Peer {
            uid,
            pid,
            process: Err(io::Error::from_raw_os_error(libc::EBADF)),
        };
        let refused = check_client(&peer(1000, 42), HOST_UID_MAP).unwrap_err();
        assert_eq!(refused, ClientRefusal::NotRoot { uid: 1000, pid: 42 });
        assert!(
            refused.to_string().contains("uid 1000 (pid 42)"),
            "{refused}"
        );
        let hidden = check_client(&peer(0, 0), HOST_UID_MAP).unwrap_err();
        assert!(hidden.to_string().contains("hostPID: true"), "{hidden}");
        let gone = pidfd::Peer {
            uid: 0,
            pid: 42,
            process: Err(io::Error::from_raw_os_error(libc::ESRCH)),
        };
        assert_eq!(
            check_client(&gone, HOST_UID_MAP),
            Err(ClientRefusal::Gone { pid: 42, uid: 0 })
        );
    }
}
