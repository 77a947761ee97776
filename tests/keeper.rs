//! `vaultfs keeper` as the daemon will use it: the built binary, run as `deploy/base` runs it
//! (root without capabilities), on a socket in a tempdir, driven by `KeeperClient` (and by raw
//! packets for what the client would never send). Pipes stand in for `/dev/fuse` descriptors:
//! the keeper treats every descriptor alike. Every test needs root: the keeper serves only root
//! with `CAP_SYS_ADMIN`. Attackers are `tests/common/keeper_peer.py` run as root without
//! capabilities (`setpriv`).

pub mod common;

use std::fs::File;
use std::io::{self, PipeReader, PipeWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{stop_child, stop_child_on_drop, wait_until};
use vaultfs::keeper::KeeperClient;

const LIMIT: Duration = Duration::from_secs(10);
/// How long a wait that must not finish is watched before the test moves on.
const STILL_WAITING: Duration = Duration::from_millis(300);

/// A running `vaultfs keeper`, its stderr collected; stopped on drop.
struct Keeper {
    child: Child,
    exit: Option<ExitStatus>,
    log: Arc<Mutex<String>>,
    socket: PathBuf,
}

impl Keeper {
    /// Starts a keeper on `socket`, root without capabilities, and waits until it listens there.
    fn start(socket: &Path) -> Keeper {
        Keeper::start_with(
            common::without_capabilities(env!("CARGO_BIN_EXE_vaultfs")),
            socket,
            &[],
        )
    }

    /// Starts `vaultfs keeper --socket SOCKET ARGS` as `command` (the binary, or a wrapper
    /// that runs it) and waits until it listens.
    fn start_with(mut command: Command, socket: &Path, args: &[&str]) -> Keeper {
        let keeper = Keeper::spawn(&mut command, socket, args);
        keeper.wait_for_log("keeper listening");
        keeper
    }

    fn spawn(command: &mut Command, socket: &Path, args: &[&str]) -> Keeper {
        let mut child = command
            .args(["keeper", "--socket"])
            .arg(socket)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vaultfs keeper");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        thread::spawn(move || {
            let mut stderr = stderr;
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Keeper {
            child,
            exit: None,
            log,
            socket: socket.to_path_buf(),
        }
    }

    fn logs(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_for_log(&self, text: &str) {
        wait_until(&format!("{text:?} in the keeper's log"), LIMIT, || {
            let logs = self.logs();
            if logs.contains(text) {
                Ok(())
            } else {
                Err(format!("its log so far:\n{logs}"))
            }
        });
    }

    fn client(&self) -> KeeperClient {
        KeeperClient::connect(&self.socket).expect("connect to the keeper")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the keeper to exit on its own.
    fn wait_exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        wait_until("the keeper to exit", LIMIT, || match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            other => Err(format!("{other:?}")),
        });
        let status = self.child.wait().expect("wait for the keeper");
        self.exit = Some(status);
        status
    }

    fn terminate(&mut self) -> ExitStatus {
        let log = self.log.clone();
        stop_child(
            &mut self.child,
            &mut self.exit,
            libc::SIGTERM,
            LIMIT,
            "vaultfs keeper",
            move || log.lock().unwrap().clone(),
        )
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        stop_child_on_drop(&mut self.child, self.exit);
    }
}

fn pipe() -> (PipeReader, PipeWriter) {
    io::pipe().expect("pipe")
}

/// Device and inode of an open file.
fn identity(fd: impl AsFd) -> (u64, u64) {
    let file = File::from(fd.as_fd().try_clone_to_owned().expect("dup"));
    let meta = file.metadata().expect("fstat");
    (meta.dev(), meta.ino())
}

/// Whether the read end of `writer`'s pipe is closed everywhere (a write fails with EPIPE).
fn readers_gone(writer: &mut PipeWriter) -> bool {
    match writer.write_all(b"x") {
        Err(e) => e.kind() == io::ErrorKind::BrokenPipe,
        Ok(()) => false,
    }
}

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("run").join("k.sock")
}

#[test]
#[ignore = "needs root: the keeper serves only root with CAP_SYS_ADMIN"]
fn a_taken_descriptor_is_the_same_open_file_as_the_one_put() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let keeper = Keeper::start(&socket_in(&dir));
    let (reader, mut writer) = pipe();
    let put_file = identity(&reader);
    let owner = keeper.client();
    owner
        .put("node", b"\x28\x00\x00\x00init", reader.as_fd())
        .unwrap();
    drop(reader);
    assert!(
        !readers_gone(&mut writer),
        "the keeper's duplicate keeps the read end open"
    );

    let successor = keeper.client();
    let mut taken = successor.take().unwrap();
    assert_eq!(taken.len(), 1);
    let taken = taken.pop().unwrap();
    assert_eq!(taken.name, "node");
    assert_eq!(taken.init, b"\x28\x00\x00\x00init");
    assert_eq!(identity(&taken.fd), put_file);

    writer.write_all(b"through the keeper").unwrap();
    let mut got = [0u8; 19];
    let mut received = File::from(taken.fd);
    received.read_exact(&mut got).unwrap();
    assert_eq!(
        &got, b"xthrough the keeper",
        "one byte of the probe, then ours"
    );
}

#[test]
#[ignore = "needs root: the keeper serves only root with CAP_SYS_ADMIN"]
fn wait_predecessor_blocks_while_the_owner_is_connected_and_returns_when_it_hangs_up() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let keeper = Keeper::start(&socket_in(&dir));
    let (reader, _writer) = pipe();
    let owner = keeper.client();
    owner.put("node", b"", reader.as_fd()).unwrap();
    let successor = keeper.client();
    assert_eq!(successor.take().unwrap().len(), 1);

    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(successor.wait_predecessor());
    });
    assert!(
        matches!(
            rx.recv_timeout(STILL_WAITING),
            Err(mpsc::RecvTimeoutError::Timeout)
        ),
        "wait_predecessor answered while the predecessor was still connected"
    );
    drop(owner);
    let unserved = rx.recv_timeout(LIMIT).expect("answered").unwrap();
    assert_eq!(
        unserved,
        Duration::ZERO,
        "the owner was connected at the take"
    );
}

#[test]
#[ignore = "needs root: the keeper serves only root with CAP_SYS_ADMIN"]
fn unserved_time_counts_from_the_owner_hanging_up_to_the_take() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let keeper = Keeper::start(&socket_in(&dir));
    let (reader, _writer) = pipe();
    let owner = keeper.client();
    owner.put("node", b"", reader.as_fd()).unwrap();
    drop(owner);
    keeper.wait_for_log("the owner of a held connection hung up");
    // The gap being measured: nobody owns the connection for at least this long.
    let gap = Duration::from_millis(200);
    thread::sleep(gap);

    let successor = keeper.client();
    assert_eq!(successor.take().unwrap().len(), 1);
    let started = Instant::now();
    let unserved = successor.wait_predecessor().unwrap();
    assert!(
        started.elapsed() < LIMIT / 2,
        "no predecessor: answered at once"
    );
    assert!(
        unserved >= gap && unserved < LIMIT,
        "unserved {unserved:?}, expected at least {gap:?}"
    );

    let nothing_taken = keeper.client();
    assert_eq!(nothing_taken.wait_predecessor().unwrap(), Duration::ZERO);
}

#[test]
#[ignore = "needs root: the keeper serves only root with CAP_SYS_ADMIN"]
fn a_put_replaces_an_earlier_connection_of_the_same_name_and_closes_it() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let keeper = Keeper::start(&socket_in(&dir));
    let client = keeper.client();
    let (first, mut first_writer) = pipe();
    client.put("node", b"1", first.as_fd()).unwrap();
    drop(first);
    let (second, _second_writer) = pipe();
    let second_file = identity(&second);
    client.put("node", b"2", second.as_fd()).unwrap();
    assert!(
        readers_gone(&mut first_writer),
        "the keeper closed its duplicate of the replaced connection"
    );

    let taken = keeper.client().take().unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(
        (taken[0].name.as_str(), taken[0].init.as_slice()),
        ("node", &b"2"[..])
    );
    assert_eq!(identity(&taken[0].fd), second_file);
}

#[test]
#[ignore = "needs root: the keeper serves only root with CAP_SYS_ADMIN"]
fn release_closes_the_keepers_duplicate() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let keeper = Keeper::start(&socket_in(&dir));
    let client = keeper.client();
    let (reader, mut writer) = pipe();
    client.put("vol", b"", reader.as_fd()).unwrap();
    drop(reader);
    assert!(!readers_gone(&mut writer));
    client.release("vol").unwrap();
    assert!(readers_gone(&mut writer));
    assert!(keeper.client().take().unwrap().is_empty());
    client
        .release("vol")
        .expect("releasing what is not held is not an error");
}

/// A SOCK_SEQPACKET connection without the client library, for messages it never sends.
struct Raw(OwnedFd);

impl Raw {
    fn connect(path: &Path) -> Raw {
        // SAFETY: socket takes no pointers; the result is checked and then owned here.
        let fd =
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: fd was just created.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let (addr, len) = sockaddr(path);
        // SAFETY: addr is a valid sockaddr_un of length len.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        assert_eq!(rc, 0, "connect: {}", io::Error::last_os_error());
        Raw(fd)
    }

    /// Sends `message`, returns the reply's text.
    fn ask(&self, message: &[u8]) -> String {
        // SAFETY: message is valid for reads of its length.
        let sent = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        assert_eq!(
            sent,
            message.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
        self.recv()
    }

    /// The next message's text ("" once the keeper has closed the connection).
    fn recv(&self) -> String {
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(n >= 0, "recv: {}", io::Error::last_os_error());
        String::from_utf8_lossy(&buf[..n as usize]).into_owned()
    }
}

fn sockaddr(path: &Path) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    (addr, len as libc::socklen_t)
}

#[test]
#[ignore = "needs root: the keeper serves only root with CAP_SYS_ADMIN"]
fn malformed_messages_get_an_error_and_the_keeper_keeps_serving() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let keeper = Keeper::start(&socket_in(&dir));
    let (reader, _writer) = pipe();
    let good = keeper.client();
    good.put("node", b"", reader.as_fd()).unwrap();

    let raw = Raw::connect(&keeper.socket);
    let oversized = vec![b' '; 70 * 1024];
    let cases: &[(&[u8], &str)] = &[
        (b"not json", "not a JSON object"),
        (&oversized, "over the limit of 65536 bytes"),
        (
            br#"{"version":9,"type":"take"}"#,
            "protocol version 9 is not supported",
        ),
        (
            br#"{"version":1,"type":"steal"}"#,
            "unknown variant `steal`",
        ),
        (
            br#"{"version":1,"type":"put","name":"node","init":""}"#,
            "put carries 1 descriptor(s), got 0",
        ),
        (
            br#"{"version":1,"type":"put","name":"../x","init":""}"#,
            "carries 1 descriptor(s)",
        ),
    ];
    for (message, expected) in cases {
        let reply = raw.ask(message);
        assert!(
            reply.contains(r#""type":"error""#) && reply.contains(expected),
            "{:.80?}: expected an error with {expected:?}, got {reply}",
            String::from_utf8_lossy(message)
        );
    }
    assert!(
        raw.ask(br#"{"version":1,"type":"take"}"#)
            .contains(r#""type":"held""#),
        "the same client is still served after its bad messages"
    );
    let taken = keeper.client().take().unwrap();
    assert_eq!(taken.len(), 1, "others are served too");
    keeper.wait_for_log("refused a request: the message is not a JSON object");
    keeper.wait_for_log("refused a request: the message is over the limit");
}

#[test]
#[ignore = "needs root: the keeper serves only root with CAP_SYS_ADMIN"]
fn a_client_past_the_limit_is_told_so_and_the_others_are_served() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let keeper = Keeper::start(&socket_in(&dir));
    let clients: Vec<KeeperClient> = (0..vaultfs::keeper::MAX_CLIENTS)
        .map(|_| keeper.client())
        .collect();
    // All of them are served.
    for c in &clients {
        assert!(c.take().unwrap().is_empty());
    }
    let refused = Raw::connect(&keeper.socket);
    let reply = refused.recv();
    assert!(
        reply.contains("the keeper serves at most 16 clients at once"),
        "{reply}"
    );
    assert_eq!(refused.recv(), "", "then the connection is closed");
    drop(clients);
    wait_until("a client slot to free up", LIMIT, || {
        keeper.client().take().map(|_| ())
    });
}

#[test]
#[ignore = "needs root: the keeper serves only root with CAP_SYS_ADMIN"]
fn a_new_keeper_takes_the_path_over_and_the_daemon_hands_its_connections_to_it() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let mut old = Keeper::start(&socket);
    let (reader, _writer) = pipe();
    let file = identity(&reader);
    let link = Arc::new(old.client());
    link.put("node", b"init", reader.as_fd()).unwrap();

    let new = Keeper::start(&socket);
    new.wait_for_log("taking the socket path over");
    let (tx, rx) = mpsc::channel();
    let waiting = link.clone();
    thread::spawn(move || {
        let _ = tx.send(waiting.wait_closed());
    });
    assert!(
        matches!(
            rx.recv_timeout(STILL_WAITING),
            Err(mpsc::RecvTimeoutError::Timeout)
        ),
        "wait_closed returned while the old keeper runs"
    );

    let status = old.terminate();
    assert_eq!(status.code(), Some(0), "{}", old.logs());
    assert!(old.logs().contains("held=1"), "{}", old.logs());
    assert!(
        old.logs()
            .contains("belongs to a newer keeper now; leaving it"),
        "{}",
        old.logs()
    );
    rx.recv_timeout(LIMIT)
        .expect("wait_closed returns once the old keeper is gone")
        .unwrap();
    assert!(socket.exists(), "the old keeper left the new one's socket");

    let relinked = KeeperClient::connect(&socket).unwrap();
    relinked.put("node", b"init", reader.as_fd()).unwrap();
    let taken = KeeperClient::connect(&socket).unwrap().take().unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(identity(&taken[0].fd), file);
    drop(link);

    let mut new = new;
    assert_eq!(new.terminate().code(), Some(0), "{}", new.logs());
    assert!(!socket.exists(), "a keeper removes its own socket on exit");
}

#[test]
#[ignore = "needs root: the keeper serves only root with CAP_SYS_ADMIN"]
fn the_keeper_holds_no_file_on_disk_besides_its_socket() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let keeper = Keeper::start(&socket);
    let (reader, _writer) = pipe();
    let client = keeper.client();
    client.put("node", b"", reader.as_fd()).unwrap();

    let fds = std::fs::read_dir(format!("/proc/{}/fd", keeper.pid())).unwrap();
    for fd in fds {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap();
        let target = target.to_string_lossy();
        assert!(
            ["socket:[", "pipe:[", "anon_inode:"]
                .iter()
                .any(|p| target.starts_with(p))
                || target == "/dev/null",
            "the keeper has {target} open"
        );
    }
    let mut files: Vec<_> = walk(dir.path());
    files.sort();
    assert_eq!(files, std::slice::from_ref(&socket));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
#[ignore = "needs root: connects to the keeper as another uid"]
fn a_client_of_another_uid_is_refused() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let keeper = Keeper::start(&socket);
    // Open the path to everyone, so only the keeper's own check stands in the way.
    for path in [dir.path(), socket.parent().unwrap(), &socket] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let (addr, len) = sockaddr(&socket);
    let take = br#"{"version":1,"type":"take"}"#;
    let expected = b"may not use the keeper";
    // SAFETY: the child calls only async-signal-safe functions (setgid, setuid, socket,
    // connect, send, recv, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(10);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
            if fd < 0 || libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                libc::_exit(11);
            }
            // The refusal is waiting before anything is asked; then the connection is closed.
            let mut buf = [0u8; 1024];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            let n = if n > 0 { n as usize } else { 0 };
            let refused = buf[..n].windows(expected.len()).any(|w| w == expected);
            libc::send(fd, take.as_ptr().cast(), take.len(), libc::MSG_NOSIGNAL);
            if libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) > 0 {
                libc::_exit(13);
            }
            libc::_exit(if refused { 0 } else { 12 });
        }
    }
    let mut status = 0;
    // SAFETY: status is valid for writes; pid is our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the uid 65534 client was not refused as expected (status {status}); keeper log:\n{}",
        keeper.logs()
    );
    keeper.wait_for_log("refused a client: uid 65534");
}

/// `tests/common/keeper_peer.py MODE ARG [REQUEST...]`, as root without capabilities unless
/// `capabilities`: one JSON object per attempt.
fn peer(mode: &str, arg: &str, requests: &[&str], capabilities: bool) -> Vec<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/keeper_peer.py");
    let mut command = if capabilities {
        Command::new("python3")
    } else {
        common::without_capabilities("python3")
    };
    let output = command
        .arg(script)
        .args([mode, arg])
        .args(requests)
        .output()
        .expect("run python3 tests/common/keeper_peer.py (and setpriv, util-linux)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "keeper_peer.py {mode} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A keeper holding a connection (a pipe) and a stashed record, put there by this test
/// process (root with every capability, as the plugin runs).
struct Victim {
    keeper: Keeper,
    /// The daemon that put them, still connected.
    _owner: KeeperClient,
    file: (u64, u64),
    _writer: PipeWriter,
    _dir: tempfile::TempDir,
}

const RECORD: &str = r#"{"token":"s.victims-token"}"#;

impl Victim {
    fn start() -> Victim {
        let dir = tempfile::tempdir().unwrap();
        let keeper = Keeper::start(&socket_in(&dir));
        let (reader, writer) = pipe();
        let owner = keeper.client();
        owner.put("node", b"init", reader.as_fd()).unwrap();
        owner
            .stash("victim", &vaultfs::keeper::Sealed::new(RECORD.into()))
            .unwrap();
        Victim {
            file: identity(&reader),
            keeper,
            _owner: owner,
            _writer: writer,
            _dir: dir,
        }
    }

    fn socket(&self) -> &str {
        self.keeper.socket.to_str().unwrap()
    }

    /// What the keeper held before the attack, it still holds: the same connection, the same
    /// record.
    fn still_intact(&self) {
        let successor = self.keeper.client();
        let taken = successor.take().unwrap();
        assert_eq!(taken.len(), 1, "the connection is still held");
        assert_eq!(identity(&taken[0].fd), self.file);
        let record = successor.unstash("victim").unwrap().expect("still stashed");
        assert_eq!(record.expose(), RECORD);
    }
}

/// Every reply `attempts` got, asserting each attempt got exactly one, an error containing
/// `expected`, no descriptor, and was then disconnected.
fn assert_refused(attempts: &[serde_json::Value], expected: &str) {
    assert_eq!(attempts.len(), 7, "every request was tried: {attempts:?}");
    for a in attempts {
        let replies = a["replies"].as_array().unwrap();
        assert_eq!(replies.len(), 1, "one reply, then the hang-up: {a}");
        assert_eq!(replies[0]["type"], "error", "{a}");
        let message = replies[0]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{a}");
        assert!(
            message.contains(&format!("pid {} (uid 0)", a["pid"])),
            "{a}"
        );
        assert_eq!(a["descriptors"], 0, "{a}");
        assert!(a.get("timeout").is_none(), "the keeper hung up: {a}");
        assert!(!a.to_string().contains("victims-token"), "{a}");
    }
}

#[test]
#[ignore = "needs root: the keeper serves only root with CAP_SYS_ADMIN; setpriv, python3"]
fn a_root_process_without_capabilities_is_refused_every_request_and_changes_nothing() {
    common::require_root();
    let victim = Victim::start();
    let attempts = peer("requests", victim.socket(), &[], false);
    assert_eq!(attempts[0]["cap_eff"], "0000000000000000");
    assert_refused(
        &attempts,
        "its effective capabilities lack CAP_SYS_ADMIN, which the plugin holds",
    );
    let pid = &attempts[0]["pid"];
    victim.keeper.wait_for_log(&format!(
        "refused a client: pid {pid} (uid 0) may not use the keeper"
    ));
    let logs = victim.keeper.logs();
    assert!(
        logs.contains(&format!("pid={pid} uid=0 missing=\"CAP_SYS_ADMIN\"")),
        "{logs}"
    );
    assert_eq!(
        logs.matches("refused a client").count(),
        1,
        "seven refusals within the log window: one line\n{logs}"
    );
    victim.still_intact();

    // The same script, with the capabilities the plugin holds, is served: the refusals above
    // are the keeper's doing, not the script's.
    let served = peer("requests", victim.socket(), &["take", "unstash"], true);
    assert_eq!(served[0]["replies"][0]["type"], "held", "{served:?}");
    assert_eq!(served[0]["descriptors"], 1, "{served:?}");
    assert_eq!(served[1]["replies"][0]["type"], "stashed", "{served:?}");
}

#[test]
#[ignore = "needs root: the keeper serves only root with CAP_SYS_ADMIN; setpriv, python3"]
fn capabilities_a_root_process_gave_itself_in_a_user_namespace_do_not_count() {
    common::require_root();
    let victim = Victim::start();
    let attempts = peer("userns", victim.socket(), &[], false);
    assert_eq!(
        attempts[0]["cap_eff"], "000001ffffffffff",
        "unshare(CLONE_NEWUSER) gave every capability, there"
    );
    assert_refused(
        &attempts,
        "it runs in a user namespace other than the keeper's",
    );
    victim.keeper.wait_for_log(&format!(
        "pid={} uid=0 missing=\"CAP_SYS_ADMIN in the keeper's user namespace\"",
        attempts[0]["pid"]
    ));
    victim.still_intact();
}

#[test]
#[ignore = "needs root: reads another root process's memory; setpriv, python3"]
fn a_root_process_without_capabilities_cannot_read_the_keepers_memory_and_it_dumps_no_core() {
    common::require_root();
    let victim = Victim::start();
    let keeper = victim.keeper.pid().to_string();
    let limits = std::fs::read_to_string(format!("/proc/{keeper}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core limit");
    eprintln!("keeper {core}");
    assert_eq!(
        core.split_whitespace().collect::<Vec<_>>()[4..6],
        ["0", "0"],
        "soft and hard core limits: {core}"
    );
    let read = peer("mem", &keeper, &[], false);
    assert_eq!(
        read[0]["open"], "EACCES",
        "the keeper is not dumpable: {read:?}"
    );

    // The same process reads a dumpable process of root without capabilities (the keeper
    // before this change): the refusal above is the keeper's doing.
    let mut dumpable = common::without_capabilities("sleep")
        .arg("60")
        .spawn()
        .expect("run sleep under setpriv");
    let control = peer("mem", &dumpable.id().to_string(), &[], false);
    let _ = dumpable.kill();
    let _ = dumpable.wait();
    assert_eq!(control[0]["open"], "ok", "{control:?}");
    assert_eq!(control[0]["read_bytes"], 4096, "{control:?}");
}

#[test]
#[ignore = "needs root: the keeper serves only root with CAP_SYS_ADMIN; unshare"]
fn a_client_the_keeper_cannot_see_is_refused_naming_host_pid() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    // The keeper in a pid namespace of its own, as in a pod without hostPID: the test process
    // (every capability) is out of its sight.
    let mut command = Command::new("unshare");
    command
        .args(["--pid", "--fork", "--kill-child=SIGTERM", "setpriv"])
        .args(common::NO_CAPABILITIES)
        .arg(env!("CARGO_BIN_EXE_vaultfs"));
    let keeper = Keeper::start_with(command, &socket_in(&dir), &[]);
    let err = keeper.client().take().unwrap_err().to_string();
    assert!(
        err.contains("in a pid namespace the keeper cannot see") && err.contains("hostPID: true"),
        "{err}"
    );
    keeper.wait_for_log("refused a client: a client (uid 0) in a pid namespace");
}

#[test]
#[ignore = "needs root: runs the keeper with and without CAP_IPC_LOCK (setpriv)"]
fn lock_memory_needs_cap_ipc_lock_or_an_unlimited_memlock_and_then_locks() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut refused = Keeper::spawn(
        &mut common::without_capabilities(env!("CARGO_BIN_EXE_vaultfs")),
        &socket_in(&dir),
        &["--lock-memory"],
    );
    let status = refused.wait_exit();
    refused.wait_for_log("locking memory (--lock-memory): without CAP_IPC_LOCK");
    assert_eq!(status.code(), Some(1), "{}", refused.logs());
    assert!(
        refused.logs().contains("RLIMIT_MEMLOCK"),
        "{}",
        refused.logs()
    );
    assert!(!socket_in(&dir).exists(), "it refused before listening");

    let mut ipc_lock = Command::new("setpriv");
    ipc_lock
        .args([
            "--inh-caps=-all,+ipc_lock",
            "--ambient-caps=-all,+ipc_lock",
            "--bounding-set=-all,+ipc_lock",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_vaultfs"));
    let keeper = Keeper::start_with(ipc_lock, &socket_in(&dir), &["--lock-memory"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", keeper.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in {status}"))
    };
    let (locked, resident) = (field("VmLck:"), field("VmRSS:"));
    eprintln!("keeper with --lock-memory and CAP_IPC_LOCK: VmLck {locked} kB, VmRSS {resident} kB");
    assert!(locked >= resident, "every resident page is locked");
    assert!(keeper.client().take().unwrap().is_empty(), "and it serves");
}
