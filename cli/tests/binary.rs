//! The `sensei` binary without a control plane: usage errors, the exit codes, what it says
//! when nobody is signed in, and the completions and man pages generated from its clap
//! definitions. (Against a real control plane: tests/tests/e2e/sensei_cli.rs.)

use std::process::Command;

fn sensei(config: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sensei"));
    cmd.env("XDG_CONFIG_HOME", config)
        .env_remove("SENSEI_URL")
        .env_remove("SENSEI_API_KEY")
        .env_remove("SENSEI_CA_FINGERPRINT")
        .stdin(std::process::Stdio::null());
    cmd
}

#[test]
fn a_usage_error_exits_2_and_no_credentials_exits_3_with_the_fix() {
    let dir = tempfile::tempdir().expect("dir");
    let out = sensei(dir.path()).args(["deploy"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    let out = sensei(dir.path())
        .args(["servers", "list"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("run `sensei login URL`"), "{stderr}");

    // A key without a pinned CA is refused before anything is sent.
    let out = sensei(dir.path())
        .env("SENSEI_URL", "https://127.0.0.1:9")
        .env("SENSEI_API_KEY", "sk_test")
        .args(["servers", "list"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("SENSEI_CA_FINGERPRINT"));
}

#[test]
fn login_off_a_terminal_without_a_fingerprint_refuses_to_trust_anything() {
    let dir = tempfile::tempdir().expect("dir");
    // Nothing listens there: the probe sees no CA, and nothing is stored.
    let out = sensei(dir.path())
        .args([
            "login",
            "https://127.0.0.1:9",
            "--email",
            "a@example.com",
            "--password-stdin",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(!dir.path().join("sensei/credentials.json").exists());
    let out = sensei(dir.path())
        .args(["login", "http://127.0.0.1:9"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("https"));
}

#[test]
fn completions_and_man_pages_come_from_the_command_definitions() {
    let dir = tempfile::tempdir().expect("dir");
    for shell in ["bash", "zsh", "fish"] {
        let out = sensei(dir.path())
            .args(["completions", shell])
            .output()
            .expect("run");
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["rollout", "rollback", "ca-fingerprint"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let man = dir.path().join("man");
    let out = sensei(dir.path())
        .args(["man", &man.display().to_string()])
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let page = std::fs::read_to_string(man.join("sensei.1")).expect("sensei.1");
    assert!(
        page.contains("Exit codes"),
        "the exit codes are documented in the man page"
    );
    let deploy = std::fs::read_to_string(man.join("sensei-deploy.1")).expect("sensei-deploy.1");
    assert!(deploy.contains("idempotency"), "{deploy}");
}

#[test]
fn sensei_url_without_a_key_naming_another_plane_than_the_login_is_refused_not_ignored() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let stored = dir.path().join("sensei");
    std::fs::create_dir_all(&stored).expect("mkdir");
    std::fs::set_permissions(&stored, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let file = stored.join("credentials.json");
    std::fs::write(
        &file,
        format!(
            r#"{{"url": "https://production.example:8443", "ca_fingerprint": "SHA256:{}", "secret": {{"kind": "session", "value": "x"}}}}"#,
            "ab".repeat(32)
        ),
    )
    .expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = sensei(dir.path())
        .env("SENSEI_URL", "https://staging.example:8443")
        .args(["servers", "list"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the stored login is for https://production.example:8443"),
        "{stderr}"
    );
}
