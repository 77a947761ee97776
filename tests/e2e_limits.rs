//! End-to-end tests of the limits that keep one volume from hurting the others: rate-limited
//! failure logs next to complete audit trails. The real `vaultfs` binary, real FUSE, real
//! OpenBao.
//!
//! Ignored by default (needs root, `/dev/fuse` and `bao`); `scripts/test.sh` runs them with
//! `--include-ignored`.

pub mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn a_looped_forbidden_read_costs_a_bounded_number_of_log_lines_while_every_open_is_audited() {
    require_root();
    let bao = Bao::start();
    bao.kv_put("secret/app/db", &[("password", "db-pass")]);
    bao.kv_put("secret/other/ok", &[("value", "allowed-value")]);
    bao.put_policy(
        "only-other",
        r#"path "secret/data/other/*" { capabilities = ["read"] }"#,
    );
    let token = bao.create_token(&["only-other"]);
    let m = Mount::builder(&bao)
        .token(&token)
        .secret("denied=secret/app/db#password")
        .secret("allowed=secret/other/ok#value")
        // Every open is audited in strict mode only (cached: once per TTL per file).
        .args(["--cache-ttl", "1s", "--consistency", "strict"])
        .start();

    let run_for = Duration::from_secs(3);
    let started = Instant::now();
    let (mut refused, mut opened) = (0, 0);
    while started.elapsed() < run_for {
        let err = read(m.file("denied")).expect_err("the secret is outside the token's policy");
        assert_eq!(errno_of(&err), libc::EACCES, "{err}");
        refused += 1;
        if refused % 10 == 0 {
            assert_eq!(read_string(m.file("allowed")), "allowed-value");
            opened += 1;
        }
    }
    let count_in = |logs: &str, pattern: &[&str]| {
        logs.lines()
            .filter(|l| pattern.iter().all(|p| l.contains(p)))
            .count()
    };
    const OPEN_EVENT: &[&str] = &["vaultfs::audit", "event=\"open\"", "file=\"allowed\""];
    // The daemon writes its log lines as it answers: wait for the last open's audit event (a
    // missing one is reported by the assert below, with the counts).
    let logs = poll(Duration::from_secs(5), POLL_INTERVAL, || {
        let logs = m.logs();
        if count_in(&logs, OPEN_EVENT) >= opened {
            Ok(logs)
        } else {
            Err(logs)
        }
    })
    .unwrap_or_else(|logs| logs);
    let count = |pattern: &[&str]| count_in(&logs, pattern);
    let warnings = count(&["WARN", "request failed"]);
    let refusal_events = count(&["vaultfs::audit", "event=\"refused\""]);
    let open_events = count(OPEN_EVENT);
    let lines = logs.lines().count();
    eprintln!(
        "{refused} forbidden reads and {opened} allowed ones in {run_for:?}: {lines} log lines, \
         {warnings} warnings, {refusal_events} refusal audit events, {open_events} open events"
    );
    assert!(
        refused > 100,
        "only {refused} attempts: the loop did not hammer"
    );
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} warning lines for {refused} identical failures in {run_for:?}"
    );
    assert!(
        (1..=2).contains(&refusal_events),
        "{refusal_events} refusal audit lines for {refused} identical refusals"
    );
    assert_eq!(
        open_events, opened,
        "every open of a readable file is one audit event, never rate-limited"
    );
    assert!(
        lines < 50 + opened,
        "{lines} log lines: the forbidden loop flooded the log"
    );
    assert!(
        logs.lines().any(|l| l.contains("request failed")
            && l.contains("file=\"denied\"")
            && l.contains("vault_path=\"secret/app/db\"")),
        "the warning names the file and Vault path:\n{logs}"
    );
}

/// The most requests OpenBao was handling at once (from its audit log: each request entry opens
/// an interval, the response entry with the same id closes it), among entries `keep` selects.
fn max_concurrent(
    entries: &[serde_json::Value],
    keep: impl Fn(&serde_json::Value) -> bool,
) -> usize {
    let mut events: Vec<(f64, i32)> = entries
        .iter()
        .filter(|e| keep(e))
        .filter_map(|e| match e["type"].as_str() {
            Some("request") => Some((audit_time(e), 1)),
            Some("response") => Some((audit_time(e), -1)),
            _ => None,
        })
        .collect();
    // At equal times a response closes before the next request opens.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0i32, 0i32);
    for (_, delta) in events {
        now += delta;
        most = most.max(now);
    }
    most as usize
}

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn five_hundred_readers_on_one_volume_cost_vault_one_request_per_secret_per_ttl_and_other_volumes_keep_answering(
) {
    use common::csi::*;
    use common::jwt::SigningKey;
    use common::k8s::*;

    const FILES: usize = 200;
    const READERS: usize = 500;
    const TTL_SECS: u64 = 5; // vaultfs csi's --min-cache-ttl default: the lowest a pod may ask
    const RUN_FOR: Duration = Duration::from_secs(10);

    require_root();
    let bao = Bao::start();
    let key = SigningKey::generate();
    enable_jwt_auth(&bao, "jwt", &key);
    for team in ["hostile", "victim"] {
        bao.put_policy(
            team,
            &format!(
                r#"path "secret/data/{team}/*" {{ capabilities = ["read"] }}
path "secret/metadata/{team}/*" {{ capabilities = ["read"] }}"#
            ),
        );
        jwt_role(&bao, "jwt", team, team, team, &[team], "1h");
    }
    for i in 0..FILES {
        bao.kv_put(
            &format!("secret/hostile/s{i}"),
            &[("v", &format!("value-{i}"))],
        );
    }
    bao.kv_put("secret/victim/warm", &[("v", "victim-warm")]);
    bao.kv_put("secret/victim/cold", &[("v", "victim-cold")]);

    let node = CsiNode::new("node-hammer");
    // The production floor, not the harness's 1 s.
    let daemon = node.daemon(&bao).args(["--min-cache-ttl", "5s"]).start();
    let client = daemon.client();
    let publish = |pod: &Pod, secrets: &str| {
        let ttl = format!("{TTL_SECS}s");
        let (request, target) = jwt_publish(
            &node,
            pod,
            &key,
            &pod.namespace,
            secrets,
            &[("cacheTTL", &ttl)],
        );
        client.publish(request).unwrap_or_else(|s| {
            panic!("publish {}: {}\n{}", pod.name, describe(&s), daemon.logs())
        });
        target
    };
    let hostile_spec: String = (0..FILES)
        .map(|i| format!("- {{name: s{i}, path: secret/hostile/s{i}, key: v}}\n"))
        .collect();
    let hostile = publish(&Pod::new("hostile", "hammer-0", "hostile"), &hostile_spec);
    let victim = publish(
        &Pod::new("victim", "app-0", "victim"),
        "- {name: warm, path: secret/victim/warm, key: v}\n- {name: cold, path: secret/victim/cold, key: v}\n",
    );
    assert_eq!(read_string(victim.join("warm")), "victim-warm");
    let audit_before = bao.audit_entries().len();

    let (started, cpu_before) = (Instant::now(), cpu_time(daemon.pid()));
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (dir, failures, reads) = (hostile.clone(), failures.clone(), reads.clone());
            std::thread::spawn(move || {
                let mut x = r as u64 * 2_654_435_761 + 1;
                while started.elapsed() < RUN_FOR {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let i = (x >> 33) as usize % FILES;
                    match read(dir.join(format!("s{i}"))) {
                        Ok(v) if v == format!("value-{i}").as_bytes() => {}
                        _ => {
                            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();

    // Meanwhile the other pod's volume: warm reads, and one cold read half way.
    let mut slowest_warm = Duration::ZERO;
    let mut cold = None;
    while started.elapsed() < RUN_FOR {
        let t = Instant::now();
        assert_eq!(read_string(victim.join("warm")), "victim-warm");
        slowest_warm = slowest_warm.max(t.elapsed());
        if cold.is_none() && started.elapsed() > RUN_FOR / 2 {
            let t = Instant::now();
            assert_eq!(read_string(victim.join("cold")), "victim-cold");
            cold = Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for r in readers {
        r.join().expect("reader thread");
    }
    let (reads, failures) = (
        reads.load(std::sync::atomic::Ordering::Relaxed),
        failures.load(std::sync::atomic::Ordering::Relaxed),
    );
    let cold = cold.expect("the cold read ran");
    let rss = rss_kib(daemon.pid());
    let cpu = cpu_time(daemon.pid()) - cpu_before;

    let entries: Vec<serde_json::Value> = bao.audit_entries().split_off(audit_before);
    let hostile_requests = |e: &serde_json::Value| {
        e["request"]["path"]
            .as_str()
            .is_some_and(|p| p.contains("/hostile/"))
    };
    let mut per_secret = std::collections::HashMap::<String, usize>::new();
    for e in entries
        .iter()
        .filter(|e| e["type"] == "request" && hostile_requests(e))
    {
        let path = e["request"]["path"].as_str().unwrap_or_default();
        let name = path.rsplit('/').next().unwrap_or_default().to_string();
        *per_secret.entry(name).or_default() += 1;
    }
    let busiest = per_secret.values().copied().max().unwrap_or(0);
    let total: usize = per_secret.values().sum();
    let concurrent_hostile = max_concurrent(&entries, hostile_requests);
    let concurrent_all = max_concurrent(&entries, |_| true);
    eprintln!(
        "{reads} reads by {READERS} readers in {RUN_FOR:?} ({failures} failed); Vault: {total} requests for {} secrets, at most {busiest} per secret, at most {concurrent_hostile} at once for the volume ({concurrent_all} overall); other volume: slowest warm read {slowest_warm:?}, cold read {cold:?}; daemon RSS {rss} KiB, CPU {cpu:?}",
        per_secret.len()
    );
    assert_eq!(failures, 0, "reads failed under load:\n{}", daemon.logs());
    assert!(rss < 64 << 10, "daemon RSS {rss} KiB under load");
    // The first read plus at most one re-check per TTL in the run.
    let allowed = 1 + (RUN_FOR.as_secs() / TTL_SECS) as usize;
    assert!(
        busiest <= allowed,
        "a secret cost {busiest} Vault requests in {RUN_FOR:?} with a {TTL_SECS} s TTL (allowed {allowed}): {per_secret:?}"
    );
    assert!(
        concurrent_hostile <= vaultfs::source::vault::DEFAULT_MAX_REQUESTS_PER_IDENTITY,
        "{concurrent_hostile} Vault requests at once for one volume"
    );
    assert!(
        concurrent_all <= vaultfs::source::vault::DEFAULT_MAX_CONCURRENT_REQUESTS,
        "{concurrent_all} Vault requests at once"
    );
    // The other volume's reads above returned their content while the first was hammered: an
    // uncached read that waited past the Vault timeout would have failed with EIO instead.
}

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn a_publish_past_max_volumes_is_resource_exhausted_and_kubelet_learns_the_limit() {
    use common::csi::*;
    use common::k8s::*;

    let (bao, key) = app_cluster(&[("secret/app/db", &[("password", "db-pass")])]);
    let node = CsiNode::new("node-max");
    let daemon = node.daemon(&bao).args(["--max-volumes", "2"]).start();
    let client = daemon.client();
    assert_eq!(
        client
            .node_info()
            .expect("NodeGetInfo")
            .max_volumes_per_node,
        2
    );
    let publish = |name: &str| {
        let secrets = "- {name: pw, path: secret/app/db, key: password}\n";
        let (request, target) = jwt_publish(
            &node,
            &Pod::new("ns", name, "app"),
            &key,
            "app",
            secrets,
            &[],
        );
        (client.publish(request.clone()), request, target)
    };
    let (first, first_request, target) = publish("app-0");
    first.expect("first volume");
    publish("app-1").0.expect("second volume");
    let (third, request, third_target) = publish("app-2");
    let status = third.expect_err("a third volume is past --max-volumes 2");
    assert_eq!(
        status.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        describe(&status)
    );
    assert!(
        status.message().contains("--max-volumes 2"),
        "{}",
        status.message()
    );
    assert!(
        !is_mounted(&third_target),
        "nothing mounted for the refused volume"
    );
    assert_eq!(
        read_string(target.join("pw")),
        "db-pass",
        "served volumes are unaffected"
    );
    client
        .unpublish(&first_request.volume_id, &target)
        .expect("unpublish the first");
    client.publish(request).expect("the freed slot is taken");
    assert_eq!(read_string(third_target.join("pw")), "db-pass");
}
