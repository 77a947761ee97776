//! The audit trail: one structured event per open (cached mode: per file and kernel timeout), on the `vaultfs::audit` tracing target, and
//! refused accesses aggregated per file, uid and errno. Events name the volume, the pod (under
//! CSI), file, Vault path, version or errno and caller; never the value. Open events are never
//! rate-limited.

/// Who opened a file, as the kernel reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Where an open happened: the volume and, under CSI, its pod (`namespace/name/uid`).
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    pub volume: &'a str,
    pub pod: Option<&'a str>,
    pub file: &'a str,
    /// The Vault path the file shows; a template's are the paths it read, comma-separated.
    pub path: &'a str,
}

/// Records that `caller` opened `place` and was served content `version`.
pub fn open_event(place: Place<'_>, version: &str, caller: Caller) {
    tracing::info!(
        target: "vaultfs::audit",
        event = "open",
        volume = place.volume,
        pod = place.pod.unwrap_or("-"),
        file = place.file,
        vault_path = place.path,
        version,
        pid = caller.pid,
        uid = caller.uid,
        gid = caller.gid,
        "secret file opened"
    );
}

/// Records that `caller` reached `place` through the kernel's name or attribute cache lapsing
/// (`op`: `lookup` or `getattr`) on a cached-mode volume, and will read content `version` until
/// the next lapse: the first access per timeout per file.
pub fn access_event(place: Place<'_>, op: &str, version: &str, caller: Caller) {
    tracing::info!(
        target: "vaultfs::audit",
        event = "access",
        op,
        volume = place.volume,
        pod = place.pod.unwrap_or("-"),
        file = place.file,
        vault_path = place.path,
        version,
        pid = caller.pid,
        uid = caller.uid,
        gid = caller.gid,
        "secret file accessed"
    );
}

/// Records that Vault refused or failed to give `caller` the secret of `place` during `op`
/// (`lookup`, `getattr` or `open`), answered with `errno`. Repeats of one refusal are
/// aggregated by the caller (`fs`): `repeats` is how many identical refusals (same file, uid
/// and errno) came since the previous event of that kind, so a looped forbidden read costs a
/// bounded number of lines and no refusal goes uncounted.
pub fn refused(place: Place<'_>, op: &str, errno: &str, caller: Caller, repeats: u64) {
    tracing::info!(
        target: "vaultfs::audit",
        event = "refused",
        op,
        volume = place.volume,
        pod = place.pod.unwrap_or("-"),
        file = place.file,
        vault_path = place.path,
        errno,
        pid = caller.pid,
        uid = caller.uid,
        gid = caller.gid,
        repeats,
        "secret file access refused"
    );
}
