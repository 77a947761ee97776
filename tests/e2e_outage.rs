//! End-to-end test of a Vault outage seen by several volumes of one `vaultfs csi` daemon: the
//! first volume to find Vault not answering finds it for every volume on that server. The real
//! `vaultfs` binary, real FUSE, real OpenBao (frozen with SIGSTOP).
//!
//! Ignored by default (needs root, `/dev/fuse` and `bao`); `scripts/test.sh` runs them with
//! `--include-ignored`.

pub mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::csi::*;
use common::k8s::*;
use common::*;

/// How long `path` takes to read, and what the read gave.
fn timed_read(path: &Path) -> (Duration, std::io::Result<Vec<u8>>) {
    let started = Instant::now();
    let result = read(path);
    (started.elapsed(), result)
}

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn once_one_pod_finds_vault_down_other_pods_get_stale_values_or_eio_at_once_and_recover_with_it() {
    let (bao, key) = app_cluster(&[
        ("secret/app/a", &[("v", "a-1")]),
        ("secret/app/b", &[("v", "b-1")]),
        ("secret/app/cold", &[("v", "cold-1")]),
    ]);

    let node = CsiNode::new("node-outage");
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    // The default --vault-timeout (5 s): what a read waits before the outage is known.
    let daemon = node
        .daemon(&bao)
        .args(["--metrics-addr", &metrics_addr])
        .start();
    let client = daemon.client();
    let publish = |name: &str, secrets: &str| {
        let (request, target) = jwt_publish(
            &node,
            &Pod::new("ns", name, "app"),
            &key,
            "app",
            secrets,
            &[("cacheTTL", "1s")],
        );
        client
            .publish(request)
            .unwrap_or_else(|s| panic!("publish {name}: {}\n{}", describe(&s), daemon.logs()));
        target
    };
    let pod_a = publish("app-a", "- {name: a, path: secret/app/a, key: v}\n");
    let pod_b = publish(
        "app-b",
        "- {name: b, path: secret/app/b, key: v}\n- {name: cold, path: secret/app/cold, key: v}\n",
    );
    assert_eq!(read_string(pod_a.join("a")), "a-1");
    assert_eq!(read_string(pod_b.join("b")), "b-1");
    let series = format!(
        "vaultfs_vault_server_up{{server=\"{}\"}}",
        bao.addr().trim_end_matches('/')
    );
    let up = |text: &str| metric_value(text, &series);
    assert_eq!(up(&http_get(&metrics_addr, "/metrics")), 1.0);

    bao.pause();
    std::thread::sleep(Duration::from_millis(1500)); // past the 1 s cacheTTL
    let (a_took, a_read) = timed_read(&pod_a.join("a"));
    // Pod A's volume found the outage; pod B's volume has its own identity and cache, but
    // shares the server.
    let (b_took, b_read) = timed_read(&pod_b.join("b"));
    let (cold_took, cold_read) = timed_read(&pod_b.join("cold"));
    let metrics_down = http_get(&metrics_addr, "/metrics");
    eprintln!(
        "with Vault frozen: pod A's first read took {a_took:?}, then pod B's cached read \
         {b_took:?} and its uncached read {cold_took:?}"
    );
    bao.resume();
    let resumed = Instant::now();

    assert_eq!(
        a_read.ok().as_deref(),
        Some(&b"a-1"[..]),
        "pod A gets its stale value; logs:\n{}",
        daemon.logs()
    );
    assert_eq!(
        b_read.ok().as_deref(),
        Some(&b"b-1"[..]),
        "pod B gets its stale value"
    );
    let err = cold_read.expect_err("a never-read file cannot be served while Vault is down");
    assert_eq!(errno_of(&err), libc::EIO, "{err}");
    // Generous bounds, to stay clear of scheduling noise: without shared server state each
    // of these reads waited the full 5 s --vault-timeout.
    assert!(
        b_took < Duration::from_secs(2),
        "cached read took {b_took:?}"
    );
    assert!(
        cold_took < Duration::from_secs(2),
        "uncached read took {cold_took:?}"
    );
    assert_eq!(up(&metrics_down), 0.0, "vaultfs_vault_server_up while down");

    // Vault is back: a rotated value and the uncached file are read within a few seconds
    // (the health probe runs every second).
    bao.kv_put("secret/app/b", &[("v", "b-2")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut rotated, mut cold) = (None, None);
    while rotated.is_none() || cold.is_none() {
        assert!(
            Instant::now() < deadline,
            "no recovery within 10 s of Vault answering again (rotated: {rotated:?}, cold: \
             {cold:?}); logs:\n{}",
            daemon.logs()
        );
        if rotated.is_none() && read(pod_b.join("b")).is_ok_and(|v| v == b"b-2") {
            rotated = Some(resumed.elapsed());
        }
        if cold.is_none() && read(pod_b.join("cold")).is_ok_and(|v| v == b"cold-1") {
            cold = Some(resumed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "after Vault resumed: rotated value read after {rotated:?}, uncached file after {cold:?}"
    );
    assert_eq!(read_string(pod_a.join("a")), "a-1");
    assert_eq!(up(&http_get(&metrics_addr, "/metrics")), 1.0);
}
