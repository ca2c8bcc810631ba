//! What `sensei-agent status` reports: the local identity (server, certificate, pinned CA),
//! whether the running agent is connected, and the last job it ran with its result.
//!
//! The running agent writes [`Liveness`] into its state directory when it connects, when a
//! session ends and when a job finishes; `status` reads it with the identity. The file names
//! the agent's process, so a status left behind by an agent that died says "not running"
//! rather than a stale "connected".

use std::path::Path;

use sensei_certs::Fingerprint;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::identity::{IdentityError, StateDir};

/// What the running agent last said about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Liveness {
    /// The agent's process.
    pub pid: u32,
    pub connected: bool,
    /// When `connected` last changed (Unix seconds).
    pub since: i64,
    /// Why the last session ended, when it did.
    pub detail: Option<String>,
    pub last_job: Option<LastJob>,
}

/// The last job the agent ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastJob {
    pub id: Uuid,
    pub succeeded: bool,
    /// The release it made, on success; the failing step and why, on failure.
    pub summary: String,
    pub finished_at: i64,
}

/// The answer of `sensei-agent status`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub server_id: Uuid,
    pub control_plane: String,
    pub agent_version: String,
    pub certificate_fingerprint: String,
    pub certificate_expires_at: Option<String>,
    pub ca_fingerprint: String,
    /// An agent process is running on this state directory.
    pub running: bool,
    /// It is connected to the control plane now.
    pub connected: bool,
    /// Since when it is (or is not) connected.
    pub since: Option<String>,
    /// Why the last session ended.
    pub detail: Option<String>,
    pub last_job: Option<ReportedJob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReportedJob {
    pub id: Uuid,
    pub result: &'static str,
    pub summary: String,
    pub finished_at: Option<String>,
}

pub fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn rfc3339(unix: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
}

/// Whether the process `pid` is alive (Linux: it has an entry under /proc).
fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Records what the running agent is doing; a failure to write is logged, never fatal (the
/// status is for people, the work goes on without it).
pub fn record(state: &StateDir, change: impl FnOnce(&mut Liveness)) {
    let mut liveness = state
        .liveness()
        .filter(|l| l.pid == std::process::id())
        .unwrap_or(Liveness {
            pid: std::process::id(),
            connected: false,
            since: now(),
            detail: None,
            last_job: None,
        });
    // The last job survives a restart of the agent: it is still the last one it ran.
    if liveness.last_job.is_none() {
        liveness.last_job = state.liveness().and_then(|l| l.last_job);
    }
    change(&mut liveness);
    if let Err(e) = state.store_liveness(&liveness) {
        tracing::warn!(error = %e, "cannot record the agent's status");
    }
}

/// Reads the identity and the running agent's status from `state`.
pub fn report(state: &StateDir) -> Result<Report, IdentityError> {
    let identity = state.load()?;
    let fingerprint = |pem: &str| {
        sensei_certs::tls::first_cert_der(pem)
            .map(|der| Fingerprint::of_der(&der).to_string())
            .unwrap_or_else(|_| "unreadable".into())
    };
    let liveness = state.liveness();
    let running = liveness.as_ref().is_some_and(|l| alive(l.pid));
    let connected = running && liveness.as_ref().is_some_and(|l| l.connected);
    Ok(Report {
        server_id: identity.meta.server_id,
        control_plane: identity.meta.control_plane.clone(),
        agent_version: crate::version().into(),
        certificate_fingerprint: fingerprint(&identity.cert_pem),
        certificate_expires_at: sensei_certs::not_after(&identity.cert_pem)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok()),
        ca_fingerprint: fingerprint(&identity.ca_pem),
        running,
        connected,
        since: liveness
            .as_ref()
            .filter(|_| running)
            .and_then(|l| rfc3339(l.since)),
        detail: liveness
            .as_ref()
            .filter(|_| running)
            .and_then(|l| l.detail.clone()),
        last_job: liveness.and_then(|l| l.last_job).map(|j| ReportedJob {
            id: j.id,
            result: if j.succeeded { "succeeded" } else { "failed" },
            summary: j.summary,
            finished_at: rfc3339(j.finished_at),
        }),
    })
}

/// The report for a person.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    // The close reason and a failed job's message come from elsewhere (the control plane, a
    // hook's output): no control character reaches the terminal.
    let mut line = |k: &str, v: &str| {
        let v: String = v
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        out.push_str(&format!("{k:<22} {v}\n"))
    };
    line("server", &r.server_id.to_string());
    line("control plane", &r.control_plane);
    line("agent version", &r.agent_version);
    line("certificate", &r.certificate_fingerprint);
    line(
        "certificate expires",
        r.certificate_expires_at.as_deref().unwrap_or("unreadable"),
    );
    line("pinned CA", &r.ca_fingerprint);
    let state = match (r.running, r.connected) {
        (false, _) => "not running".to_owned(),
        (true, true) => format!("connected since {}", r.since.as_deref().unwrap_or("?")),
        (true, false) => format!(
            "running, not connected{}{}",
            r.since
                .as_deref()
                .map(|s| format!(" since {s}"))
                .unwrap_or_default(),
            r.detail
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ),
    };
    line("agent", &state);
    match &r.last_job {
        Some(j) => line(
            "last job",
            &format!(
                "{} {} at {}: {}",
                j.id,
                j.result,
                j.finished_at.as_deref().unwrap_or("?"),
                j.summary
            ),
        ),
        None => line("last job", "none yet"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_status_file_is_not_followed_nor_read_whole_and_prints_no_escapes() {
        let dir = tempfile::tempdir().expect("dir");
        let state = StateDir::new(dir.path());
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("status.json")).expect("link");
        assert_eq!(state.liveness(), None, "a symlink is not followed");
        std::fs::remove_file(dir.path().join("status.json")).expect("rm");
        let huge = format!(
            "{{\"pid\":1,\"connected\":true,\"since\":0,\"detail\":\"{}\",\"last_job\":null}}",
            "x".repeat(100_000)
        );
        std::fs::write(dir.path().join("status.json"), huge).expect("write");
        assert_eq!(state.liveness(), None, "only the first 64 KiB are read");
        let report = Report {
            server_id: Uuid::nil(),
            control_plane: "cp:4433".into(),
            agent_version: "0".into(),
            certificate_fingerprint: "SHA256:x".into(),
            certificate_expires_at: None,
            ca_fingerprint: "SHA256:y".into(),
            running: true,
            connected: false,
            since: None,
            detail: Some("closed: \u{1b}]0;owned\u{7}\u{1b}[2J".into()),
            last_job: None,
        };
        let text = render(&report);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
    }

    #[test]
    fn a_status_left_by_a_dead_agent_is_not_running() {
        // PID 0 is never a process under /proc.
        assert!(!alive(0));
        assert!(alive(std::process::id()));
    }
}
