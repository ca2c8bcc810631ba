//! The `sensei-agent` executable. Besides these checks, this test makes `cargo test` build the
//! real binary for the end-to-end tests.

use std::process::{Command, Stdio};

use sensei_agent::identity::{Identity, IdentityMeta, StateDir};

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sensei-agent"));
    cmd.stdin(Stdio::null())
        .env_remove("SENSEI_AGENT_STATE_DIR");
    cmd
}

fn stored_identity(dir: &std::path::Path) -> StateDir {
    let state = StateDir::new(dir.join("state"));
    state
        .save(&Identity {
            meta: IdentityMeta {
                server_id: uuid::Uuid::new_v4(),
                control_plane: "127.0.0.1:9".into(),
                ca_fingerprint: "SHA256:00".into(),
                job_signing_public_key: "00".repeat(32),
                agent_version: "0".into(),
                job_signing_keys: Vec::new(),
            },
            key_pem: "k".into(),
            cert_pem: "c".into(),
            ca_pem: "a".into(),
        })
        .expect("save");
    state
}

#[test]
fn version_names_the_release() {
    let out = bin().arg("--version").output().expect("run");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("sensei-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn run_without_identity_says_how_to_enroll() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = bin()
        .args(["run", "--allow-root", "--state-dir"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no agent identity") && stderr.contains("sensei-agent enroll"),
        "{stderr}"
    );
}

#[test]
fn run_as_root_is_refused_without_allow_root() {
    // SAFETY: geteuid cannot fail.
    #[allow(unsafe_code)]
    if unsafe { libc::geteuid() } != 0 {
        // Only root can be refused for being root.
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let out = bin()
        .args(["run", "--state-dir"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to run as root"), "{stderr}");
    assert!(stderr.contains("--allow-root"), "{stderr}");
}

#[test]
fn an_unknown_or_root_deploy_user_is_refused_before_connecting() {
    let dir = tempfile::tempdir().expect("tmp");
    for (user, says) in [
        ("no-such-deploy-user", "does not exist"),
        ("root", "never run as root"),
    ] {
        let out = bin()
            .args(["run", "--allow-root", "--deploy-user", user, "--state-dir"])
            .arg(dir.path())
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{user}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{user}: {stderr}");
    }
}

#[test]
fn revoke_needs_confirmation_then_deletes_the_identity() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = stored_identity(dir.path());
    let out = bin()
        .args(["revoke", "--state-dir"])
        .arg(state.path())
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(2),
        "no tty and no --yes must refuse"
    );
    assert!(
        state.load().is_ok(),
        "identity must be kept without confirmation"
    );

    let out = bin()
        .args(["revoke", "--yes", "--state-dir"])
        .arg(state.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!state.has_identity());
    let out = bin()
        .args(["revoke", "--yes", "--state-dir"])
        .arg(state.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to revoke"));
}

#[test]
fn bad_fingerprint_and_address_are_usage_or_clear_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = bin()
        .args([
            "enroll",
            "--control-plane",
            "127.0.0.1:7443",
            "--token",
            "t",
            "--ca-fingerprint",
            "MD5:abc",
            "--state-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHA256:"));
    let fp = format!("SHA256:{}", "ab".repeat(32));
    let out = bin()
        .args([
            "enroll",
            "--control-plane",
            "no-port",
            "--token",
            "t",
            "--ca-fingerprint",
            &fp,
            "--state-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HOST:PORT"));
}

#[test]
fn config_file_mistakes_are_usage_errors_naming_the_fix() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "state_dir = \"/tmp/x\"\n").expect("write");
    // Neither a flag nor the file names the control plane.
    let out = bin()
        .arg("--config")
        .arg(&config)
        .args(["enroll", "--token", "t"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--control-plane"), "{stderr}");
    // The file names it, but not the CA fingerprint.
    std::fs::write(&config, "control_plane = \"127.0.0.1:9\"\n").expect("write");
    let out = bin()
        .arg("--config")
        .arg(&config)
        .args(["enroll", "--token", "t"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-fingerprint"));
    // A fingerprint in the file that is not one.
    std::fs::write(
        &config,
        "control_plane = \"127.0.0.1:9\"\nca_fingerprint = \"MD5:ab\"\n",
    )
    .expect("write");
    let out = bin()
        .arg("--config")
        .arg(&config)
        .args(["enroll", "--token", "t"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca_fingerprint in the config file"));
    // An unknown key, and a file that is not there.
    std::fs::write(&config, "control_plan = \"x:1\"\n").expect("write");
    let out = bin()
        .arg("--config")
        .arg(&config)
        .arg("run")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent.toml"));
    let out = bin()
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .arg("run")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
    // Nothing was written anywhere.
    assert!(!std::path::Path::new("/tmp/x/identity.key").exists());
}
