//! The `sensei-control-plane` executable itself. Besides checking the basics, this test makes
//! `cargo test` build the real binary, which the end-to-end tests in `tests/` then run.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sensei-control-plane"))
}

#[test]
fn version_names_the_release() {
    let out = bin().arg("--version").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!("sensei-control-plane {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_lists_the_commands() {
    let out = bin().arg("--help").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for command in [
        "serve",
        "quickstart",
        "rotate-field-key",
        "audit",
        "generate-field-key",
    ] {
        assert!(text.contains(command), "--help lacks {command}:\n{text}");
    }
}

#[test]
fn generated_field_key_is_a_fernet_key() {
    let out = bin().arg("generate-field-key").output().expect("run");
    assert!(out.status.success());
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(key.len(), 44);
    assert!(sensei_control_plane::secrets::field_crypto::FieldKeys::parse(&key).is_ok());
}

#[test]
fn unknown_command_is_a_usage_error() {
    let out = bin().arg("deploy-everything").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("deploy-everything"));
}
