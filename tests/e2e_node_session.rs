//! End-to-end tests of the node-wide FUSE connection: every CSI volume of the node is a
//! directory of one FUSE filesystem, bind-mounted at its pod's target. The real `vaultfs csi`
//! binary, real FUSE and bind mounts, real OpenBao with JWT logins.
//!
//! Ignored by default (needs root, `/dev/fuse` and `bao`); `scripts/test.sh` runs them with
//! `--include-ignored`.

pub mod common;

use std::fs;

use common::csi::*;
use common::k8s::*;
use common::*;

/// The `/dev/fuse` descriptors of a daemon with one connection: the session's, and the
/// duplicate kept to hand the connection over (`mount::Connection`).
const FUSE_DESCRIPTORS: usize = 2;

/// `Threads:` of process `pid`.
fn threads(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn every_volume_shares_one_connection_and_a_pod_cannot_walk_out_of_its_own() {
    let (bao, key) = app_cluster(&[]);
    for i in 0..20 {
        bao.kv_put(&format!("secret/app/s{i}"), &[("v", &format!("value-{i}"))]);
    }
    let node = CsiNode::new("node-session");
    let daemon = node.daemon(&bao).start();
    let client = daemon.client();
    let pid = daemon.pid();

    let mut targets = Vec::new();
    let mut threads_at_one = 0;
    for i in 0..20 {
        let secrets = format!("- {{name: f, path: secret/app/s{i}, key: v}}\n");
        let pod = Pod::new("ns", &format!("app-{i}"), "app");
        let (request, target) = jwt_publish(&node, &pod, &key, "app", &secrets, &[]);
        client
            .publish(request.clone())
            .unwrap_or_else(|s| panic!("publish {i}: {}\n{}", describe(&s), daemon.logs()));
        targets.push((request, target));
        if i == 0 {
            assert_eq!(read_string(targets[0].1.join("f")), "value-0");
            threads_at_one = threads(pid);
        }
    }
    for (i, (_, target)) in targets.iter().enumerate() {
        assert_eq!(read_string(target.join("f")), format!("value-{i}"));
    }
    let threads_at_twenty = threads(pid);
    eprintln!("threads: {threads_at_one} with the first volume read, {threads_at_twenty} with 20; /dev/fuse descriptors: {}", fuse_descriptors(pid));
    assert_eq!(
        fuse_descriptors(pid),
        FUSE_DESCRIPTORS,
        "one FUSE connection for every volume"
    );
    // Constant in the number of volumes (a pool thread may come and go, hence the slack).
    assert!(
        threads_at_twenty <= (threads_at_one + 2).min(16),
        "{threads_at_one} threads with one volume, {threads_at_twenty} with 20"
    );
    for (_, target) in &targets {
        let mount = mounts_at(target).pop().expect("the target is mounted");
        assert_eq!(mount.fstype, "fuse.vaultfs", "{mount:?}");
    }

    // `..` from a volume's root leaves the bind mount: it is kubelet's volume directory, not
    // the connection's root, so no other volume is reachable by name from inside a pod.
    let (_, own) = &targets[3];
    let up = fs::read_dir(own.join(".."))
        .expect("list the target's parent")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert_eq!(
        up,
        vec!["mount".to_string()],
        "the parent of a target is kubelet's, not vaultfs's"
    );
    for slot in 1..=25 {
        let other = own.join("..").join(slot.to_string()).join("f");
        assert!(read(&other).is_err(), "{} is reachable", other.display());
    }
    assert_eq!(
        fs::read_dir(own).expect("list the volume").count(),
        1,
        "a volume lists only its own files"
    );

    // Unpublishing one volume leaves the others serving.
    let (request, target) = &targets[5];
    client
        .unpublish(&request.volume_id, target)
        .expect("unpublish one volume");
    assert!(!is_mounted(target), "{} still mounted", target.display());
    assert_eq!(read_string(targets[6].1.join("f")), "value-6");
    assert_eq!(fuse_descriptors(pid), FUSE_DESCRIPTORS);
}
