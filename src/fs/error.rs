//! `FsError`: why a filesystem request failed, with the errno the kernel is answered and the
//! level the failure is logged at, in one place. Messages never carry secret values.

use thiserror::Error;

use crate::source::SourceError;
use crate::template::{self, RenderError};

/// An error with its errno and log level: the single place where vaultfs errors become kernel
/// errors and where it is decided how loudly a failed request is logged.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum FsError {
    /// No such file, in the spec or in Vault.
    #[error("no such file")]
    NotFound,
    #[error("the secret has no field {0:?}")]
    MissingField(String),
    /// A template read a secret or field that does not exist.
    #[error("template: {0}")]
    TemplateMissing(String),
    /// A template stopped: out of fuel or depth, past the output cap, or misused.
    #[error("template: {0}")]
    TemplateFailed(String),
    /// The secret source refused or failed to give the secret (its not-found is `NotFound`).
    #[error(transparent)]
    Source(SourceError),
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    /// The volume is quarantined after consecutive daemon crashes (`quarantine`); nothing of
    /// it runs until its back-off ends.
    #[error("the volume is quarantined")]
    Quarantined,
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound | FsError::MissingField(_) | FsError::TemplateMissing(_) => {
                libc::ENOENT
            }
            FsError::Source(err) => match err {
                SourceError::NotFound => libc::ENOENT,
                // A volume being unmounted answers as a refused login did before `Closed`.
                SourceError::PermissionDenied
                | SourceError::LoginRefused(_)
                | SourceError::Closed => libc::EACCES,
                SourceError::Unavailable(_) | SourceError::Invalid(_) => libc::EIO,
                SourceError::TooLarge(_) => libc::EFBIG,
            },
            FsError::TemplateFailed(_) | FsError::Quarantined => libc::EIO,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotADirectory => libc::ENOTDIR,
            FsError::IsADirectory => libc::EISDIR,
        }
    }

    /// How loudly a request failing with this is logged: everyday answers (a name that does
    /// not exist, a write, a quarantined volume, whose quarantine is logged once when it
    /// starts) at debug; everything else at warn, rate-limited by the caller.
    pub fn level(&self) -> tracing::Level {
        match self {
            FsError::NotFound
            | FsError::Source(SourceError::NotFound)
            | FsError::ReadOnly
            | FsError::Quarantined => tracing::Level::DEBUG,
            _ => tracing::Level::WARN,
        }
    }

    /// Whether Vault refused or failed to give the secret (denied, unavailable, bad answer):
    /// the failures an audit trail records. Not-found and local errors are not refusals.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            FsError::Source(
                SourceError::PermissionDenied
                    | SourceError::LoginRefused(_)
                    | SourceError::Closed
                    | SourceError::Unavailable(_)
                    | SourceError::Invalid(_)
            )
        )
    }

    /// The errno's name, for metrics labels.
    pub fn errno_name(&self) -> &'static str {
        match self.errno() {
            libc::ENOENT => "ENOENT",
            libc::EACCES => "EACCES",
            libc::EROFS => "EROFS",
            libc::ENOTDIR => "ENOTDIR",
            libc::EISDIR => "EISDIR",
            libc::EFBIG => "EFBIG",
            _ => "EIO",
        }
    }
}

impl From<SourceError> for FsError {
    fn from(err: SourceError) -> Self {
        match err {
            SourceError::NotFound => FsError::NotFound,
            other => FsError::Source(other),
        }
    }
}

impl From<RenderError> for FsError {
    fn from(err: RenderError) -> Self {
        match err {
            RenderError::MissingField(m) => FsError::TemplateMissing(format!("no field {m}")),
            RenderError::Needs(p) => FsError::TemplateFailed(format!(
                "reads more than {} secrets (stopped at {p})",
                template::MAX_SECRETS
            )),
            RenderError::BadPath(m)
            | RenderError::Limit(m)
            | RenderError::Failed(m)
            | RenderError::Unavailable(m) => FsError::TemplateFailed(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_errors_keep_their_errnos_and_are_wrapped_not_copied() {
        let cases = [
            (SourceError::NotFound, libc::ENOENT, "ENOENT"),
            (SourceError::PermissionDenied, libc::EACCES, "EACCES"),
            (
                SourceError::LoginRefused("role gone".into()),
                libc::EACCES,
                "EACCES",
            ),
            (SourceError::Unavailable("down".into()), libc::EIO, "EIO"),
            (SourceError::Invalid("bad json".into()), libc::EIO, "EIO"),
            (
                SourceError::TooLarge("over 1 MiB".into()),
                libc::EFBIG,
                "EFBIG",
            ),
        ];
        for (source, errno, name) in cases {
            let err = FsError::from(source.clone());
            assert_eq!((err.errno(), err.errno_name()), (errno, name), "{source:?}");
            if source != SourceError::NotFound {
                assert_eq!(err, FsError::Source(source.clone()));
                assert_eq!(
                    err.to_string(),
                    source.to_string(),
                    "the cause's own message"
                );
            }
        }
        assert_eq!(FsError::from(SourceError::NotFound), FsError::NotFound);
    }

    #[test]
    fn only_vault_refusals_are_audited_and_everyday_answers_are_logged_at_debug() {
        let refusals = [
            SourceError::PermissionDenied,
            SourceError::LoginRefused("role gone".into()),
            SourceError::Unavailable("down".into()),
            SourceError::Invalid("bad json".into()),
        ];
        for source in refusals {
            let err = FsError::from(source);
            assert!(err.is_refusal(), "{err:?}");
            assert_eq!(err.level(), tracing::Level::WARN, "{err:?}");
        }
        assert!(!FsError::from(SourceError::TooLarge("big".into())).is_refusal());
        for everyday in [FsError::NotFound, FsError::ReadOnly, FsError::Quarantined] {
            assert!(!everyday.is_refusal());
            assert_eq!(everyday.level(), tracing::Level::DEBUG, "{everyday:?}");
        }
        for local in [
            FsError::IsADirectory,
            FsError::NotADirectory,
            FsError::MissingField("pasword".into()),
            FsError::TemplateFailed("out of fuel".into()),
        ] {
            assert!(!local.is_refusal());
            assert_eq!(local.level(), tracing::Level::WARN, "{local:?}");
        }
        assert_eq!(FsError::Quarantined.errno(), libc::EIO);
        assert_eq!(FsError::IsADirectory.errno_name(), "EISDIR");
        assert_eq!(FsError::NotADirectory.errno_name(), "ENOTDIR");
        assert_eq!(FsError::ReadOnly.errno_name(), "EROFS");
    }
}
