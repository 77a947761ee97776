//! The consistency semantics of a volume, each written once over a [`Backend`] and run over
//! both `MockSource` (the kernel-in-the-loop tier, `tests/fuse_mock.rs`) and OpenBao with the
//! `vaultfs mount` binary (`tests/e2e_cached.rs`, `tests/e2e_mount.rs`): cached rotations and
//! deletions through a path, a bind mount and an old descriptor; at most one request per
//! secret per TTL under concurrent readers; stale values bounded by max-stale while the store
//! is frozen; strict opens and descriptors.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use super::backend::{Backend, Settings};
use super::files::{metadata, pread_start, read_string, FS_OP_TIMEOUT};
use super::mounts::{lazy_unmount, sys_mount};
use super::poll::{poll, wait_until, within};
use super::probe::{sample_reads, Probe};

fn bind_file(source: &Path, target: &Path) {
    sys_mount(Some(source), target, libc::MS_BIND)
        .unwrap_or_else(|e| panic!("bind {source:?} on {target:?}: {e}"));
}

fn pread_all(f: &File) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0).expect("pread");
    buf.truncate(n);
    buf
}

/// A cached volume (`--cache-ttl 1s`): a rotation reaches the path, a bind mount of the file
/// and an old descriptor within the TTL plus a second, keeping the inode number; a deletion
/// gives `ENOENT` and stops the cached pages.
pub fn cached_rotation_reaches_path_bind_mount_and_old_descriptor_within_ttl_and_deletion_gives_enoent(
    backend: &dyn Backend,
) {
    backend.put("secret/app/db", &[("password", "v1")]);
    let ttl = Duration::from_secs(1);
    let m = backend.mount(&["db=secret/app/db#password"], Settings::new("cached", ttl));
    let file = m.file("db");
    assert_eq!(read_string(&file), "v1");
    let ino = metadata(&file).unwrap().ino();
    // A subPath-like bind of the file itself onto a regular file.
    let dir = tempfile::tempdir().unwrap();
    let bound = dir.path().join("db");
    fs::write(&bound, "").unwrap();
    bind_file(&file, &bound);
    assert_eq!(fs::read_to_string(&bound).unwrap(), "v1");
    let old = File::open(&file).unwrap();
    assert_eq!(pread_all(&old), b"v1");

    backend.put("secret/app/db", &[("password", "v2-longer")]);
    let rotated = Instant::now();
    let limit = ttl + Duration::from_secs(1);
    let seen = |what: &str, probe: &mut dyn FnMut() -> Vec<u8>| {
        let got = poll(limit, Duration::from_millis(20), || {
            let v = probe();
            if v == b"v2-longer" {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&v).into_owned())
            }
        });
        assert!(
            got.is_ok(),
            "{what} still showed {got:?} {:?} after the rotation",
            rotated.elapsed()
        );
        rotated.elapsed()
    };
    let by_path = seen("the path", &mut || fs::read(&file).unwrap_or_default());
    let by_bind = seen("the bind mount", &mut || {
        fs::read(&bound).unwrap_or_default()
    });
    let by_fd = seen("the old descriptor", &mut || pread_all(&old));
    eprintln!("rotation seen after: path {by_path:?}, bind {by_bind:?}, old descriptor {by_fd:?}");
    assert!(by_path.max(by_bind).max(by_fd) <= limit);
    assert_eq!(
        metadata(&file).unwrap().ino(),
        ino,
        "the inode number changed"
    );
    assert_eq!(fs::metadata(&bound).unwrap().len(), 9);

    // Deleted in Vault: ENOENT after the timeout, and the cached pages stop serving.
    backend.delete("secret/app/db");
    let deleted = Instant::now();
    let gone = poll(limit, Duration::from_millis(20), || match fs::read(&file) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    assert!(
        gone.is_ok(),
        "still readable {:?} after deletion: {gone:?}",
        deleted.elapsed()
    );
    let fd_gone = poll(limit, Duration::from_millis(20), || {
        let mut buf = [0u8; 64];
        match old.read_at(&mut buf, 0) {
            Err(e) => Ok(e),
            Ok(n) => Err(String::from_utf8_lossy(&buf[..n]).into_owned()),
        }
    });
    assert!(
        fd_gone.is_ok(),
        "the old descriptor still reads {fd_gone:?} after deletion"
    );
    eprintln!(
        "after deletion the old descriptor gets {:?}",
        fd_gone.unwrap()
    );
    drop(old);
    lazy_unmount(&bound).unwrap();
}

/// 8 readers on two secrets for 3.5 s with `--cache-ttl 1s` in `mode`: each secret costs
/// Vault at most one request per TTL (plus the first).
pub fn concurrent_readers_ask_vault_at_most_once_per_secret_per_ttl(
    backend: &dyn Backend,
    mode: &str,
) {
    let (a, b) = (format!("secret/{mode}/a"), format!("secret/{mode}/b"));
    backend.put(&a, &[("value", "aaaa")]);
    backend.put(&b, &[("value", "bbbb")]);
    let m = backend.mount(
        &[&format!("a={a}#value"), &format!("b={b}#value")],
        Settings::new(mode, Duration::from_secs(1)),
    );
    let run = Duration::from_millis(3500);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(9));
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let (path, stop, start) = (
                m.file(if i % 2 == 0 { "a" } else { "b" }),
                stop.clone(),
                start.clone(),
            );
            thread::spawn(move || {
                start.wait();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(fs::read(&path).unwrap().len(), 4);
                    n += 1;
                }
                n
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    let total: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    let elapsed = began.elapsed();
    let bound = (elapsed.as_secs_f64() / 1.0).ceil() as usize + 1;
    for p in [&a, &b] {
        let n = backend.requests(p);
        eprintln!("{mode}: {total} reads in {elapsed:?}: {n} Vault requests for {p}");
        assert!(
            n <= bound,
            "{mode}: {n} Vault requests for {p} in {elapsed:?} (at most {bound})"
        );
    }
}

/// While Vault is frozen, `mode`'s file keeps its value stale for `--max-stale` (4 s) after the
/// last successful check and fails with `EIO` from then on, through the path and (cached mode)
/// an old descriptor; reads recover once Vault answers again.
pub fn stale_values_are_served_until_max_stale_and_never_after(backend: &dyn Backend, mode: &str) {
    let (ttl, max_stale, vault_timeout) = (
        Duration::from_secs(1),
        Duration::from_secs(4),
        Duration::from_secs(1),
    );
    let vault_path = format!("secret/stale/{mode}");
    backend.put(&vault_path, &[("password", "pw")]);
    let m = backend.mount(
        &[&format!("db={vault_path}#password")],
        Settings::new(mode, ttl)
            .max_stale(max_stale)
            .vault_timeout(vault_timeout),
    );
    let file = m.file("db");
    // The first read is the only successful check of Vault: it happens between `origin` and
    // `checked_by` (mounting reads no secret), and Vault is frozen before the TTL ends.
    let origin = Instant::now();
    assert_eq!(read_string(&file), "pw");
    let checked_by = origin.elapsed();
    let old = Arc::new(File::open(&file).unwrap());
    assert_eq!(pread_start(&old).unwrap(), b"pw");
    let paused = backend.freeze();
    assert!(
        origin.elapsed() < ttl,
        "{mode}: Vault was frozen {:?} after the read, past the TTL (another check may have \
         happened)",
        origin.elapsed()
    );

    let mut probes = vec![Probe::path("the path", &file)];
    // A strict descriptor keeps the version it opened (documented), so only cached ones.
    if mode == "cached" {
        probes.push(Probe::descriptor("the old descriptor", &old));
    }
    sample_reads(
        origin,
        max_stale + vault_timeout + Duration::from_millis(1500),
        Duration::from_millis(20),
        &mut probes,
    );
    // The kernel's attribute timeout may end a little after the daemon computed it (the reply
    // is applied when the requesting thread runs again).
    let timer_slack = Duration::from_millis(250);
    for p in &probes {
        let cut = p.cut_off(b"pw", libc::EIO);
        let (Some(served), Some(failed)) = (cut.last_served, cut.first_failed) else {
            panic!(
                "{mode}: {}: last served {:?}, first failure {:?}; vaultfs log:\n{}",
                p.what,
                cut.last_served,
                cut.first_failed,
                m.logs()
            );
        };
        eprintln!(
            "{mode}: {} served stale until the read started {:?} (ended {:?}) after the \
             successful read (started at 0, ended {checked_by:?}), EIO from the read started \
             {:?} (returned at {:?}); max-stale {max_stale:?}",
            p.what, served.started, served.ended, failed.started, failed.ended
        );
        assert!(
            served.ended > ttl + vault_timeout,
            "{mode}: {} was not served stale: last served by the read ended at {:?}",
            p.what,
            served.ended
        );
        // A failure is answered once more than max-stale has passed since the check, which
        // was after `origin`.
        assert!(
            failed.ended >= max_stale,
            "{mode}: {} failed at {:?}, before max-stale {max_stale:?} had passed since the \
             last successful check",
            p.what,
            failed.ended
        );
        // Nothing is served once max-stale has passed since the check (before `checked_by`).
        assert!(
            served.started <= checked_by + max_stale + timer_slack,
            "{mode}: {} still served by the read started at {:?}, past max-stale \
             {max_stale:?} after the last successful check (by {checked_by:?})",
            p.what,
            served.started
        );
        assert!(
            failed.started <= checked_by + max_stale + Duration::from_secs(1),
            "{mode}: {} first failed by the read started at {:?}, more than 1 s past \
             max-stale {max_stale:?} after the last successful check (by {checked_by:?})",
            p.what,
            failed.started
        );
    }

    drop(paused);
    let resumed = Instant::now();
    for p in &mut probes {
        let back = poll(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || match p.read() {
                Ok(v) if v == b"pw" => Ok(resumed.elapsed()),
                other => Err(format!("{other:?}")),
            },
        );
        match back {
            Ok(after) => eprintln!(
                "{mode}: {} served again {after:?} after Vault resumed",
                p.what
            ),
            Err(last) => panic!(
                "{mode}: {} not served 5 s after Vault resumed: {last}; vaultfs log:\n{}",
                p.what,
                m.logs()
            ),
        }
    }
}

/// A strict volume (`--cache-ttl 1s`): every open reaches the daemon, a rotation is seen by
/// new opens, and a descriptor keeps the version it opened.
pub fn strict_mode_is_unchanged_every_open_reaches_the_daemon_and_old_descriptors_keep_their_version(
    backend: &dyn Backend,
) {
    backend.put("secret/app/db", &[("password", "v1")]);
    let m = backend.mount(
        &["db=secret/app/db#password"],
        Settings::new("strict", Duration::from_secs(1)),
    );
    let file = m.file("db");
    let old = File::open(&file).unwrap();
    assert_eq!(pread_all(&old), b"v1");
    let opens = m.fuse_ops("open");
    for _ in 0..5 {
        assert_eq!(read_string(&file), "v1");
    }
    assert_eq!(
        m.fuse_ops("open"),
        opens + 5,
        "strict opens must reach the daemon"
    );
    backend.put("secret/app/db", &[("password", "v2")]);
    wait_until("the new version", Duration::from_secs(3), || {
        let v = read_string(&file);
        if v == "v2" {
            Ok(())
        } else {
            Err(v)
        }
    });
    assert_eq!(
        pread_all(&old),
        b"v1",
        "a strict descriptor must keep the version it opened"
    );
}

/// A strict volume: after a rotation new opens see the new value and size, while a descriptor
/// opened before keeps reading the old value, in the middle and from the start.
pub fn a_rotated_secret_is_seen_by_new_opens_while_an_open_fd_keeps_the_old_value(
    backend: &dyn Backend,
) {
    let old = "old-value-0123456789";
    let new = "new-value-after-rotation-abcdefghijklmnop";
    assert_ne!(old.len(), new.len());
    backend.put("secret/app/rot", &[("value", old)]);

    // Descriptors keep their version in strict mode (cached: tests/e2e_cached.rs).
    let m = backend.mount(
        &["rot=secret/app/rot#value"],
        Settings::new("strict", Duration::from_secs(1)),
    );
    let path = m.file("rot");

    // fd A: open and read the first 7 bytes.
    let p = path.clone();
    let (fd_a, head) = within("open and read fd A", FS_OP_TIMEOUT, move || {
        let mut f = File::open(&p).expect("open fd A");
        let mut head = [0u8; 7];
        f.read_exact(&mut head).expect("read head of fd A");
        (f, head)
    });
    assert_eq!(&head, &old.as_bytes()[..7]);
    assert_eq!(metadata(&path).expect("stat").len(), old.len() as u64);

    backend.put("secret/app/rot", &[("value", new)]);
    thread::sleep(Duration::from_millis(1600));

    assert_eq!(
        read_string(&path),
        new,
        "a new open after the TTL must see the rotated value"
    );
    assert_eq!(
        metadata(&path).expect("stat after rotation").len(),
        new.len() as u64,
        "stat must report the new size"
    );

    let (rest, whole) = within("read fd A again", FS_OP_TIMEOUT, move || {
        let mut f = fd_a;
        let mut rest = Vec::new();
        f.read_to_end(&mut rest).expect("read rest of fd A");
        f.seek(SeekFrom::Start(0)).expect("seek fd A");
        let mut whole = Vec::new();
        f.read_to_end(&mut whole).expect("re-read fd A");
        (rest, whole)
    });
    assert_eq!(
        String::from_utf8_lossy(&rest),
        &old[7..],
        "fd A must continue with the old value"
    );
    assert_eq!(
        String::from_utf8_lossy(&whole),
        old,
        "fd A must still read the old value in full"
    );

    // And still the new value for new opens.
    assert_eq!(read_string(&path), new);
}
