//! The kernel-in-the-loop tier: real FUSE mounts of volumes built with `Volume::build` over
//! `MockSource`, in the test process, with no OpenBao and no daemon binary. It runs the same
//! consistency semantics as the end-to-end tier (`tests/common/semantics.rs`), which runs them
//! over OpenBao and `vaultfs mount` (`tests/e2e_cached.rs`, `tests/e2e_mount.rs`), and counts
//! the requests that reach the store per path, as that tier counts them in OpenBao's audit log.
//!
//! Ignored by default (needs root and `/dev/fuse`); `scripts/test.sh` runs them with
//! `--include-ignored`.

pub mod common;

use common::backend::MockBackend;
use common::semantics;

#[test]
#[ignore = "needs root and /dev/fuse (run by scripts/test.sh)"]
fn cached_rotation_reaches_path_bind_mount_and_old_descriptor_within_ttl_and_deletion_gives_enoent()
{
    semantics::cached_rotation_reaches_path_bind_mount_and_old_descriptor_within_ttl_and_deletion_gives_enoent(
        &MockBackend::start(),
    );
}

#[test]
#[ignore = "needs root and /dev/fuse (run by scripts/test.sh)"]
fn concurrent_readers_ask_the_store_at_most_once_per_secret_per_ttl_in_cached_and_strict_mode() {
    let backend = MockBackend::start();
    for mode in ["cached", "strict"] {
        semantics::concurrent_readers_ask_vault_at_most_once_per_secret_per_ttl(&backend, mode);
    }
}

#[test]
#[ignore = "needs root and /dev/fuse (run by scripts/test.sh)"]
fn with_the_store_frozen_a_stale_value_is_served_until_max_stale_then_eio_through_path_and_old_descriptor(
) {
    let backend = MockBackend::start();
    for mode in ["cached", "strict"] {
        semantics::stale_values_are_served_until_max_stale_and_never_after(&backend, mode);
    }
}

#[test]
#[ignore = "needs root and /dev/fuse (run by scripts/test.sh)"]
fn strict_mode_every_open_reaches_the_filesystem_and_old_descriptors_keep_their_version() {
    semantics::strict_mode_is_unchanged_every_open_reaches_the_daemon_and_old_descriptors_keep_their_version(
        &MockBackend::start(),
    );
}

#[test]
#[ignore = "needs root and /dev/fuse (run by scripts/test.sh)"]
fn a_rotated_secret_is_seen_by_new_opens_while_an_open_fd_keeps_the_old_value() {
    semantics::a_rotated_secret_is_seen_by_new_opens_while_an_open_fd_keeps_the_old_value(
        &MockBackend::start(),
    );
}
