//! End-to-end: hostile volume specs given to the real `vaultfs mount` (Vault paths that would
//! change the request URL's meaning, bad keys, YAML alias bombs, oversized specs) are refused
//! with exit code 2 before anything is mounted, and a real OpenBao dev server receives no
//! request at all for them (checked in its audit log). Ignored by default because it needs
//! root, `/dev/fuse` and the `bao` binary; `scripts/test.sh` runs it with `--include-ignored`.

pub mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// One refused configuration: `--secret` arguments and/or a `--spec` file, and what the error
/// output must say.
struct Hostile {
    label: &'static str,
    secrets: Vec<&'static str>,
    spec: Option<String>,
    must_mention: &'static str,
}

fn arg(label: &'static str, secret: &'static str, must_mention: &'static str) -> Hostile {
    Hostile {
        label,
        secrets: vec![secret],
        spec: None,
        must_mention,
    }
}

fn spec(label: &'static str, text: impl Into<String>, must_mention: &'static str) -> Hostile {
    Hostile {
        label,
        secrets: vec![],
        spec: Some(text.into()),
        must_mention,
    }
}

/// A spec of one entry whose path is `path`, written as a YAML double-quoted scalar (so YAML
/// escapes such as `\0` or `\u202E` put those characters in the path).
fn path_spec(path_yaml: &str) -> String {
    format!("secrets:\n  - name: x\n    path: \"{path_yaml}\"\n")
}

/// Request paths in audit entries, for failure messages.
fn paths(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e["type"] == "request")
        .map(|e| format!("{} {}", e["request"]["operation"], e["request"]["path"]))
        .collect()
}

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn hostile_specs_exit_2_before_mounting_and_send_openbao_nothing() {
    require_root();
    let bao = Bao::start();
    bao.kv_put("secret/app/db", &[("password", "hunter2")]);

    let oversized = {
        let mut t = String::from("secrets:\n");
        while t.len() <= 65 << 10 {
            t.push_str("  - {name: a, path: secret/app/db}\n");
        }
        t
    };
    let mut bomb = String::from("secrets:\n  - &a [x, x, x, x, x, x, x, x, x, x]\n");
    for (level, prev) in ["b", "c", "d", "e", "f", "g", "h"]
        .into_iter()
        .zip(["a", "b", "c", "d", "e", "f", "g"])
    {
        let refs = vec![format!("*{prev}"); 10].join(", ");
        bomb.push_str(&format!("  - &{level} [{refs}]\n"));
    }

    let allowed = "ASCII letters, digits and - _ . + @ = : ,";
    let cases = [
        arg(
            "percent-encoded dots",
            "x=secret/%2e%2e/sys/seal-status",
            "'%'",
        ),
        arg("percent-encoded slash", "x=secret/app%2fdb", "'%'"),
        arg("backslash", "x=secret\\app\\db", "'\\\\'"),
        arg("list query", "x=secret/app/db?list=true", "'?'"),
        arg("fragment", "x=secret/app#frag#password", "'#'"),
        arg("space", "x=secret/my app", "a space"),
        arg("tab", "x=secret/app\tdb", "U+0009"),
        arg("newline", "x=secret/app\ndb", "U+000A"),
        arg("bidi override", "x=secret/\u{202e}bd/ppa", "U+202E"),
        arg("zero-width space", "x=secret/app\u{200b}/db", "U+200B"),
        arg("non-ASCII letter", "x=secret/\u{430}pp/db", "U+0430"),
        arg("dot segment", "x=secret/./app/db", "\".\" segment"),
        arg(
            "dot-dot segment",
            "x=secret/app/../../sys/seal-status",
            "\"..\" segment",
        ),
        arg("empty segment", "x=secret//app/db", "empty segment"),
        arg(
            "bidi in the key",
            "x=secret/app/db#pass\u{202e}word",
            "U+202E",
        ),
        spec("fragment in a spec", path_spec("secret/app/db#frag"), "'#'"),
        spec("NUL in a spec", path_spec("secret/app\\0db"), "U+0000"),
        spec(
            "bidi override in a spec",
            path_spec("secret/\\u202Eapp"),
            "U+202E",
        ),
        spec(
            "alias bomb",
            bomb,
            "YAML anchors and aliases are not allowed in a volume spec",
        ),
        spec(
            "merge key",
            "- &x {name: a, path: secret/app/db}\n- <<: *x\n  name: b\n",
            "anchors and aliases are not allowed",
        ),
        spec(
            "oversized spec",
            oversized,
            "over the limit of 65536 bytes (64 KiB)",
        ),
    ];

    let specdir = tempfile::tempdir().expect("tempdir");
    let before = bao.audit_entries();
    for (i, case) in cases.iter().enumerate() {
        let mut b = Mount::builder(&bao);
        for s in &case.secrets {
            b = b.secret(s);
        }
        if let Some(text) = &case.spec {
            let file = specdir.path().join(format!("spec-{i}.yaml"));
            fs::write(&file, text).expect("write spec");
            b = b.args(["--spec", file.to_str().expect("utf-8 path")]);
        }
        let started = Instant::now();
        let out = b.run_to_exit(Duration::from_secs(20));
        eprintln!("{}: refused in {:?}", case.label, started.elapsed());
        assert!(
            !out.timed_out,
            "{}: vaultfs kept running instead of refusing the spec; output:\n{}",
            case.label, out.output
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}: expected exit code 2; output:\n{}",
            case.label,
            out.output
        );
        assert!(
            out.output.contains(case.must_mention),
            "{}: the error does not mention {:?}:\n{}",
            case.label,
            case.must_mention,
            out.output
        );
        if case.spec.is_none() || case.label.contains("in a spec") {
            assert!(
                out.output.contains("Vault path") || out.output.contains("key"),
                "{}: the error does not say which part is wrong:\n{}",
                case.label,
                out.output
            );
        }
        if out.output.contains("Vault path") && out.output.contains("at character") {
            assert!(
                out.output.contains(allowed),
                "{}: {}",
                case.label,
                out.output
            );
        }
        assert!(
            !out.mounted_after_exit,
            "{}: something was left mounted",
            case.label
        );
    }
    let after = bao.audit_entries();
    assert_eq!(
        after.len(),
        before.len(),
        "OpenBao received requests while vaultfs refused hostile specs: {:?}",
        paths(&after[before.len().min(after.len())..])
    );

    // The audit log does see vaultfs: a good mount reading the same secret shows up in it.
    let mount = Mount::builder(&bao)
        .secret("db/password=secret/app/db#password")
        .start();
    assert_eq!(read_string(mount.file("db/password")), "hunter2");
    assert!(
        bao.secret_reads("secret/app/db") >= 1,
        "the good mount's read is missing from the audit log, so the check above proves nothing"
    );
}
