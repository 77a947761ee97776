//! End-to-end: a pod author's hostile `secrets` volume attribute (a YAML alias bomb, 1 MiB of
//! text, a Vault path that would change the request URL) sent to the real `vaultfs csi` daemon
//! is refused with `InvalidArgument` naming the problem, without logging in or reading
//! anything, and without growing the daemon; a good volume publishes fine afterwards. Ignored
//! by default because it needs root, `/dev/fuse` and the `bao` binary; `scripts/test.sh` runs
//! it with `--include-ignored`.

pub mod common;

use std::time::Instant;

use common::csi::*;
use common::k8s::*;
use common::*;
use tonic::Code;

const PASSWORD: &str = "hostile-test-pa55w0rd";

/// Largest resident set the daemon may have after refusing the hostile volumes.
const MAX_RSS_KIB: u64 = 64 << 10;

/// A classic "billion laughs": each level is ten of the one before, so the last line would be
/// a billion entries once expanded, from under 500 bytes of text.
fn alias_bomb() -> String {
    let mut bomb = String::from("- &a {name: a, path: secret/app/db}\n");
    let levels = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for pair in levels.windows(2) {
        let refs = vec![format!("*{}", pair[0]); 10].join(", ");
        bomb.push_str(&format!("- &{} [{refs}]\n", pair[1]));
    }
    bomb.push_str("- [*i, *i, *i, *i, *i, *i, *i, *i, *i, *i]\n");
    bomb
}

/// 1 MiB of entries, each valid on its own.
fn one_mib_spec() -> String {
    let mut text = String::from("secrets:\n");
    let mut n = 0;
    while text.len() < 1 << 20 {
        text.push_str(&format!("  - {{name: f{n}, path: secret/app/db}}\n"));
        n += 1;
    }
    text
}

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn hostile_secrets_attributes_are_refused_as_invalid_argument_and_leave_the_daemon_small() {
    let (bao, key) = app_cluster(&[("secret/app/db", &[("password", PASSWORD)])]);

    let node = CsiNode::new("node-hostile");
    let daemon = node.daemon(&bao).start();
    let client = daemon.client();
    let pid = daemon.pid();
    eprintln!("daemon RSS at start: {} KiB", rss_kib(pid));

    let cases = [
        (
            "alias bomb",
            alias_bomb(),
            "YAML anchors and aliases are not allowed in a volume spec",
        ),
        (
            "1 MiB of text",
            one_mib_spec(),
            "over the limit of 65536 bytes (64 KiB)",
        ),
        (
            "percent-encoded path",
            "- {name: x, path: secret/%2e%2e/sys/seal-status}\n".to_string(),
            "'%'",
        ),
        (
            "LIST through the query string",
            "- {name: x, path: \"secret/app?list=true\"}\n".to_string(),
            "'?'",
        ),
    ];
    let before = bao.audit_entries().len();
    for (i, (label, secrets, must_mention)) in cases.iter().enumerate() {
        let pod = Pod::new("ns", &format!("hostile-{i}"), "app");
        let (request, target) = jwt_publish(&node, &pod, &key, "app", secrets, &[]);
        let (started, cpu_before) = (Instant::now(), cpu_time(pid));
        let result = client.publish(request);
        let (elapsed, cpu) = (started.elapsed(), cpu_time(pid) - cpu_before);
        let status = match result {
            Ok(()) => panic!(
                "{label}: the volume was published; daemon output:\n{}",
                daemon.logs()
            ),
            Err(s) => s,
        };
        let rss = rss_kib(pid);
        eprintln!(
            "{label} ({} bytes): refused in {elapsed:?} using {cpu:?} of daemon CPU, daemon RSS {rss} KiB: {}",
            secrets.len(),
            describe(&status)
        );
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{label}: {}",
            describe(&status)
        );
        assert!(
            status.message().contains("volumeAttributes.secrets")
                && status.message().contains(must_mention),
            "{label}: the message does not name the problem ({must_mention:?}): {}",
            describe(&status)
        );
        assert!(
            rss < MAX_RSS_KIB,
            "{label}: the daemon's RSS grew to {rss} KiB (limit {MAX_RSS_KIB} KiB)"
        );
        assert!(
            mounts_at(&target).is_empty(),
            "{label}: something is mounted at {}",
            target.display()
        );
    }
    let after = bao.audit_entries().len();
    assert_eq!(
        after, before,
        "OpenBao received requests (a login or a read) for refused volumes"
    );

    // The daemon is unharmed: a good volume publishes and reads.
    let pod = Pod::new("ns", "good", "app");
    let (request, target) = jwt_publish(
        &node,
        &pod,
        &key,
        "app",
        "- {name: password, path: secret/app/db, key: password}\n",
        &[],
    );
    if let Err(s) = client.publish(request) {
        panic!(
            "the good volume failed with {}; daemon output:\n{}",
            describe(&s),
            daemon.logs()
        );
    }
    assert_eq!(read_string(target.join("password")), PASSWORD);
    eprintln!("daemon RSS after the good volume: {} KiB", rss_kib(pid));
    client
        .unpublish(&pod.volume_id("secrets"), &target)
        .unwrap_or_else(|s| panic!("unpublish: {}", describe(&s)));
}
