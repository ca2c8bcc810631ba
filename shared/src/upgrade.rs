//! Agent upgrades through rollouts, without I/O: what a package version may look like, the
//! systemd unit an agent starts to upgrade itself, what the agent reports about its host,
//! and where an upgrade rollout's target stands given the time and what its server reported.
//!
//! The version string travels from an API request, through a signed job, to an agent, to a
//! systemd instance name, to a root script, to `apt-get`: every hop checks it with
//! [`check_package_version`] (the root script with the same rule in shell), so nothing but a
//! Debian version ever reaches the privileged side.

use crate::rollout::TargetStatus;

/// The longest package version accepted (Debian allows more; no Sensei version comes near).
pub const MAX_PACKAGE_VERSION_LEN: usize = 64;

/// The template unit the package ships; the instance is the escaped version.
pub const UPGRADE_UNIT_PREFIX: &str = "sensei-agent-upgrade@";

/// How long an upgrade target waits for its agent to come back on the new version, unless
/// the strategy says otherwise.
pub const DEFAULT_UPGRADE_DEADLINE_SECS: u32 = 600;
/// The longest an upgrade target may wait.
pub const MAX_UPGRADE_DEADLINE_SECS: u32 = 86_400;

/// Why a package version is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("the version is empty")]
    Empty,
    #[error("the version is longer than {MAX_PACKAGE_VERSION_LEN} characters")]
    TooLong,
    #[error(
        "the version must be a Debian package version such as 0.1.1-1: digits first, then only \
         letters, digits and . + ~ - (an epoch as N: at the start)"
    )]
    Malformed,
}

/// Checks that `version` is a Debian package version Sensei will hand to apt: at most
/// [`MAX_PACKAGE_VERSION_LEN`] characters, an optional numeric epoch (`N:`), an upstream
/// version starting with a digit, an optional revision after the last `-`, and nothing but
/// `[A-Za-z0-9.+~-]` besides the epoch's colon. No space, slash, quote, `=` or option-like
/// leading dash can pass, so the value is safe as a unit instance and an apt argument.
pub fn check_package_version(version: &str) -> Result<(), VersionError> {
    if version.is_empty() {
        return Err(VersionError::Empty);
    }
    if version.len() > MAX_PACKAGE_VERSION_LEN {
        return Err(VersionError::TooLong);
    }
    let rest = match version.split_once(':') {
        Some((epoch, rest)) => {
            if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
                return Err(VersionError::Malformed);
            }
            rest
        }
        None => version,
    };
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'~' | b'-');
    if !rest.bytes().all(allowed) {
        return Err(VersionError::Malformed);
    }
    let (upstream, revision) = match rest.rsplit_once('-') {
        Some((upstream, revision)) => (upstream, Some(revision)),
        None => (rest, None),
    };
    if !upstream.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
        return Err(VersionError::Malformed);
    }
    if revision.is_some_and(|r| r.is_empty() || r.contains('-')) {
        return Err(VersionError::Malformed);
    }
    Ok(())
}

/// The upstream part of a package version (no epoch, no revision): what the agent built from
/// that package reports as its own version. `1:0.1.1-1` → `0.1.1`.
pub fn upstream_version(version: &str) -> &str {
    let rest = version.split_once(':').map_or(version, |(_, rest)| rest);
    rest.rsplit_once('-').map_or(rest, |(upstream, _)| upstream)
}

/// The name of the unit that upgrades the agent to `version` (already checked), its instance
/// escaped as `systemd-escape` does: every byte but `[A-Za-z0-9:_.]` becomes `\xNN`, so that
/// `%I` in the unit gives the version back exactly (a bare `-` would come back as `/`).
pub fn upgrade_unit(version: &str) -> String {
    let mut unit = String::from(UPGRADE_UNIT_PREFIX);
    for (i, b) in version.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b':' || b == b'_' || (b == b'.' && i > 0) {
            unit.push(char::from(b));
        } else {
            unit.push_str(&format!("\\x{b:02x}"));
        }
    }
    unit.push_str(".service");
    unit
}

/// The longest operating-system description kept (`PRETTY_NAME` of os-release).
pub const MAX_OS_LEN: usize = 100;
/// The longest architecture name kept (`x86_64`, `aarch64`, `riscv64`...).
pub const MAX_ARCH_LEN: usize = 32;

/// Why an agent's description of its host is refused (nothing of it is stored).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostFactsError {
    #[error("the operating system must be 1 to {MAX_OS_LEN} printable ASCII characters")]
    Os,
    #[error("the architecture must be 1 to {MAX_ARCH_LEN} characters among a-z, 0-9 and _")]
    Arch,
}

/// Checks what an agent says about its host before the control plane stores it: the OS as
/// printable ASCII (no control character, nothing a terminal or a page could take for
/// markup once escaped), the architecture as Rust names them.
pub fn check_host_facts(os: &str, arch: &str) -> Result<(), HostFactsError> {
    if os.is_empty()
        || os.len() > MAX_OS_LEN
        || !os.bytes().all(|b| (0x20..0x7f).contains(&b))
        || os.trim().is_empty()
    {
        return Err(HostFactsError::Os);
    }
    if arch.is_empty()
        || arch.len() > MAX_ARCH_LEN
        || !arch
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(HostFactsError::Arch);
    }
    Ok(())
}

/// The agent's side: `PRETTY_NAME` from the text of `/etc/os-release` (or `NAME`, or
/// "Linux"), unquoted, with anything [`check_host_facts`] would refuse replaced or cut, so
/// that an honest agent's description is always accepted.
pub fn os_from_release(os_release: &str) -> String {
    let field = |key: &str| {
        os_release.lines().find_map(|line| {
            let value = line.trim().strip_prefix(key)?.strip_prefix('=')?;
            let value = value.trim();
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            Some(unquoted.to_owned())
        })
    };
    let name = field("PRETTY_NAME")
        .or_else(|| field("NAME"))
        .unwrap_or_default();
    let cleaned: String = name
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(MAX_OS_LEN)
        .collect();
    if cleaned.trim().is_empty() {
        "Linux".into()
    } else {
        cleaned
    }
}

/// Where a running upgrade target's job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeJob<'a> {
    /// Queued or running on the agent.
    Open,
    /// The agent checked the job and triggered its upgrade (then restarts).
    Triggered,
    /// The agent refused or failed the job, saying why.
    Failed(&'a str),
    /// No agent collected the job in time.
    Undelivered,
}

/// What the scheduler knows about one running upgrade target.
#[derive(Debug, Clone, Copy)]
pub struct UpgradeTarget<'a> {
    /// The package version asked for (checked).
    pub wanted: &'a str,
    /// The version the server's agent last reported in its hello, if any.
    pub reported: Option<&'a str>,
    pub job: UpgradeJob<'a>,
    /// When the target's job was queued (unix seconds).
    pub started_at: i64,
    /// How long the agent has to come back on the wanted version.
    pub deadline_secs: u32,
    pub now: i64,
}

/// Whether a server whose agent reports `reported` already runs `wanted`; the reason a
/// target then succeeds at once, without a job.
pub fn already_current(wanted: &str, reported: Option<&str>) -> Option<String> {
    let upstream = upstream_version(wanted);
    (reported == Some(upstream))
        .then(|| format!("already on version {upstream}: nothing to upgrade"))
}

/// Where a running upgrade target ends, if it has: succeeded once its agent reports the
/// wanted version (after its job triggered the upgrade, or even if the job's report was
/// lost), failed when the job failed or the deadline passed without that version, unreachable
/// when no agent collected the job. `None`: still running. The reason goes with the status.
pub fn upgrade_outcome(t: &UpgradeTarget<'_>) -> Option<(TargetStatus, String)> {
    let upstream = upstream_version(t.wanted);
    if t.reported == Some(upstream) {
        return Some((
            TargetStatus::Succeeded,
            format!("the agent came back reporting version {upstream}"),
        ));
    }
    match t.job {
        UpgradeJob::Failed(why) => return Some((TargetStatus::Failed, why.to_owned())),
        UpgradeJob::Undelivered => {
            return Some((
                TargetStatus::Unreachable,
                "no agent collected the upgrade job".into(),
            ))
        }
        UpgradeJob::Open | UpgradeJob::Triggered => {}
    }
    let deadline = t.started_at + i64::from(t.deadline_secs);
    if t.now >= deadline {
        let now_on = t.reported.unwrap_or("an unknown version");
        return Some((
            TargetStatus::Failed,
            format!(
                "the agent did not come back reporting version {upstream} within {} s (it reports {now_on})",
                t.deadline_secs
            ),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_versions_are_accepted() {
        for v in [
            "0.1.1-1",
            "0.1.1",
            "1:2.0~rc1-3",
            "0.1.1+deb12u1-1",
            "10.0.0-1ubuntu2.1",
        ] {
            assert_eq!(check_package_version(v), Ok(()), "{v}");
        }
    }

    #[test]
    fn anything_else_is_refused() {
        assert_eq!(check_package_version(""), Err(VersionError::Empty));
        assert_eq!(
            check_package_version(&"1".repeat(65)),
            Err(VersionError::TooLong)
        );
        for v in [
            "-1",
            "--reinstall",
            "a1.0",
            "1.0 2",
            "1.0;reboot",
            "1.0/../x",
            "1.0=2",
            "1.0-",
            "x:1.0",
            ":1.0",
            "1:",
            "1.0\n",
            "1.0$(id)",
            "1.0'",
            "1.0\u{e9}",
            "1:2:3",
        ] {
            assert_eq!(
                check_package_version(v),
                Err(VersionError::Malformed),
                "{v:?}"
            );
        }
    }

    #[test]
    fn upstream_drops_epoch_and_revision() {
        assert_eq!(upstream_version("0.1.1-1"), "0.1.1");
        assert_eq!(upstream_version("1:0.1.1-2"), "0.1.1");
        assert_eq!(upstream_version("0.1.1"), "0.1.1");
        assert_eq!(upstream_version("1.0-rc1-3"), "1.0-rc1");
    }

    #[test]
    fn unit_names_are_escaped_like_systemd_escape() {
        assert_eq!(
            upgrade_unit("0.1.1-1"),
            "sensei-agent-upgrade@0.1.1\\x2d1.service"
        );
        assert_eq!(
            upgrade_unit("1:2.0~rc1+b1-3"),
            "sensei-agent-upgrade@1:2.0\\x7erc1\\x2bb1\\x2d3.service"
        );
    }

    #[test]
    fn host_facts_are_bounded() {
        assert_eq!(
            check_host_facts("Debian GNU/Linux 12 (bookworm)", "x86_64"),
            Ok(())
        );
        assert_eq!(check_host_facts("", "x86_64"), Err(HostFactsError::Os));
        assert_eq!(check_host_facts("   ", "x86_64"), Err(HostFactsError::Os));
        assert_eq!(
            check_host_facts("a\u{1b}[31m", "x86_64"),
            Err(HostFactsError::Os)
        );
        assert_eq!(
            check_host_facts("caf\u{e9}", "x86_64"),
            Err(HostFactsError::Os)
        );
        assert_eq!(
            check_host_facts(&"a".repeat(MAX_OS_LEN + 1), "x86_64"),
            Err(HostFactsError::Os)
        );
        assert_eq!(check_host_facts("Linux", "X86"), Err(HostFactsError::Arch));
        assert_eq!(
            check_host_facts("Linux", "x86 64"),
            Err(HostFactsError::Arch)
        );
        assert_eq!(check_host_facts("Linux", ""), Err(HostFactsError::Arch));
        assert_eq!(
            check_host_facts("Linux", &"a".repeat(MAX_ARCH_LEN + 1)),
            Err(HostFactsError::Arch)
        );
    }

    #[test]
    fn os_release_is_read_and_made_acceptable() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(os_from_release(text), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os_from_release("NAME=Alpine\n"), "Alpine");
        assert_eq!(os_from_release(""), "Linux");
        let hostile = format!("PRETTY_NAME=\"\u{1b}[2J{}\u{e9}\"", "x".repeat(500));
        let os = os_from_release(&hostile);
        assert_eq!(os.len(), MAX_OS_LEN);
        assert!(os.starts_with("?[2J"));
        assert_eq!(check_host_facts(&os, std::env::consts::ARCH), Ok(()));
    }

    fn target(
        job: UpgradeJob<'static>,
        reported: Option<&'static str>,
        now: i64,
    ) -> UpgradeTarget<'static> {
        UpgradeTarget {
            wanted: "0.1.1-1",
            reported,
            job,
            started_at: 1_000,
            deadline_secs: 600,
            now,
        }
    }

    #[test]
    fn a_target_already_on_the_version_needs_nothing() {
        assert_eq!(
            already_current("0.1.1-1", Some("0.1.1")).as_deref(),
            Some("already on version 0.1.1: nothing to upgrade")
        );
        assert_eq!(already_current("0.1.1-1", Some("0.1.0")), None);
        assert_eq!(already_current("0.1.1-1", None), None);
    }

    #[test]
    fn an_upgrade_succeeds_when_the_agent_comes_back_on_the_version() {
        // Triggered, agent restarting: still running until the deadline.
        assert_eq!(
            upgrade_outcome(&target(UpgradeJob::Triggered, Some("0.1.0"), 1_300)),
            None
        );
        assert_eq!(
            upgrade_outcome(&target(UpgradeJob::Open, Some("0.1.0"), 1_599)),
            None
        );
        let (status, why) =
            upgrade_outcome(&target(UpgradeJob::Triggered, Some("0.1.1"), 1_300)).expect("ended");
        assert_eq!(status, TargetStatus::Succeeded);
        assert!(why.contains("0.1.1"), "{why}");
        // The job's own report may be lost with the restart: the version is what counts.
        assert_eq!(
            upgrade_outcome(&target(UpgradeJob::Open, Some("0.1.1"), 1_300)).map(|o| o.0),
            Some(TargetStatus::Succeeded)
        );
    }

    #[test]
    fn an_upgrade_fails_at_its_deadline_or_with_its_job() {
        let (status, why) =
            upgrade_outcome(&target(UpgradeJob::Triggered, Some("0.1.0"), 1_600)).expect("ended");
        assert_eq!(status, TargetStatus::Failed);
        assert_eq!(
            why,
            "the agent did not come back reporting version 0.1.1 within 600 s (it reports 0.1.0)"
        );
        assert_eq!(
            upgrade_outcome(&target(
                UpgradeJob::Failed("apt said no"),
                Some("0.1.0"),
                1_001
            )),
            Some((TargetStatus::Failed, "apt said no".into()))
        );
        assert_eq!(
            upgrade_outcome(&target(UpgradeJob::Undelivered, None, 1_001)).map(|o| o.0),
            Some(TargetStatus::Unreachable)
        );
        assert!(TargetStatus::Failed.is_failure() && TargetStatus::Unreachable.is_failure());
    }
}
