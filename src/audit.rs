//! The audit trail: one structured event per open, on the `vaultfs::audit` tracing target.
//! Events name the volume, file, Vault path, version and caller; never the value.

use crate::spec::SecretPath;

/// Who opened a file, as the kernel reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Records that `caller` opened `file` (Vault `path`, content `version`) in `volume`.
pub fn open_event(volume: &str, file: &str, path: &SecretPath, version: &str, caller: Caller) {
    tracing::info!(
        target: "vaultfs::audit",
        event = "open",
        volume,
        file,
        vault_path = %path,
        version,
        pid = caller.pid,
        uid = caller.uid,
        gid = caller.gid,
        "secret file opened"
    );
}
