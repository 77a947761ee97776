//! The audit trail: one structured event per open (cached mode: per file and kernel timeout),
//! on the `vaultfs::audit` tracing target, and refused accesses aggregated per file, uid and
//! errno. Events name the volume, the pod (under
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

/// What the audit trail records of an access.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// The file was opened and served content `version` (every open of a strict-mode file).
    Open { version: &'a str },
    /// The file was reached through the kernel's name or attribute cache lapsing (`op`:
    /// `lookup` or `getattr`) on a cached-mode volume, and will be read at content `version`
    /// until the next lapse: the first access per timeout per file.
    Access { op: &'a str, version: &'a str },
    /// Vault refused or failed to give the secret during `op` (`lookup`, `getattr` or `open`),
    /// answered with `errno`. Repeats of one refusal are aggregated by the caller (`fs`):
    /// `repeats` is how many identical refusals (same file, uid and errno) came since the
    /// previous event of that kind, so a looped forbidden read costs a bounded number of lines
    /// and no refusal goes uncounted.
    Refused {
        op: &'a str,
        errno: &'a str,
        repeats: u64,
    },
}

/// Records `event` of `caller` at `place`: one line on the `vaultfs::audit` target, with the
/// fields the event has (an open has no `op`; a refusal an `errno` and `repeats` instead of a
/// `version`).
pub fn record(event: Event<'_>, place: Place<'_>, caller: Caller) {
    let (name, op, version, errno, repeats, message) = match event {
        Event::Open { version } => (
            "open",
            None,
            Some(version),
            None,
            None,
            "secret file opened",
        ),
        Event::Access { op, version } => (
            "access",
            Some(op),
            Some(version),
            None,
            None,
            "secret file accessed",
        ),
        Event::Refused { op, errno, repeats } => (
            "refused",
            Some(op),
            None,
            Some(errno),
            Some(repeats),
            "secret file access refused",
        ),
    };
    tracing::info!(
        target: "vaultfs::audit",
        event = name,
        op,
        volume = place.volume,
        pod = place.pod.unwrap_or("-"),
        file = place.file,
        vault_path = place.path,
        version,
        errno,
        pid = caller.pid,
        uid = caller.uid,
        gid = caller.gid,
        repeats,
        "{message}"
    );
}
