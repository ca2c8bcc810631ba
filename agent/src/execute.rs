//! Runs a release-engine script on this machine: `sh` reads the script from its standard
//! input, in a process group of its own (a cancel kills every hook it started), and dies with
//! the agent (a parent-death signal), so that an agent killed mid-deploy leaves no deploy
//! running behind it. Output is read as bytes and turned into log lines and an outcome the way
//! the SSH runner turns it too (`sensei_shared::release::ScriptOutput`).

#![allow(unsafe_code)]

use std::process::Stdio;

use sensei_shared::protocol::LogLine;
use sensei_shared::release::{Outcome, OutputStream, ScriptExit, ScriptOutput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// How a script run ended.
#[derive(Debug, Clone)]
pub struct Report {
    pub outcome: Outcome,
    /// Exit status; `None` when killed by a signal.
    pub status: Option<i32>,
    pub cancelled: bool,
}

impl Report {
    /// How the script's process ended, for the release engine's verdict.
    pub fn exit(&self) -> ScriptExit {
        if self.cancelled {
            ScriptExit::Cancelled
        } else {
            ScriptExit::from_status(self.status)
        }
    }

    pub fn verdict(&self) -> Result<(), (String, String)> {
        self.outcome.verdict(self.exit())
    }
}

struct KillOnDrop(Option<libc::pid_t>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(sid) = self.0 {
            kill_session(sid);
        }
    }
}

/// Kills every process of session `sid` (the script and all it started).
fn kill_session(sid: libc::pid_t) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name (which may contain spaces, and ends at the last ')'):
        // state, ppid, pgrp, session.
        let session = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(3))
            .and_then(|s| s.parse::<libc::pid_t>().ok());
        if session == Some(sid) {
            // SAFETY: kill has no memory-safety preconditions; these processes are ours.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The kernel's capability header and data (`capset(2)`, version 3: two 32-bit words).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// In the child, before exec: become `uid`/`gid` (and only its primary group). Only
/// async-signal-safe calls.
fn switch_user(uid: u32, gid: u32) -> std::io::Result<()> {
    let groups = [gid];
    // SAFETY: plain system calls on values owned by this frame.
    unsafe {
        if libc::setgroups(1, groups.as_ptr()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// In the child, before exec: hold no capability at all, ambient ones included, and let
/// nothing exec'd later gain one. Done for every deploy except the one case where the
/// operator chose root all the way (an agent run as root with `--allow-root` and no deploy
/// user). The packaged agent has CAP_SETUID, CAP_SETGID and CAP_KILL to run and stop deploys;
/// a hook must never have them, with a deploy user or without.
fn drop_capabilities() -> std::io::Result<()> {
    // SAFETY: plain system calls on values owned by this frame.
    unsafe {
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let none = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &header as *const CapHeader, none.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs `script` (as `deploy_user` when given), sending every log line to `log`, until it
/// exits or `cancel` turns true. The script gets a clean environment: nothing of the
/// agent's (an enrollment token, a proxy password) is passed on.
pub async fn run_script(
    script: &str,
    nonce: &str,
    deploy_user: Option<&crate::policy::DeployUser>,
    log: mpsc::UnboundedSender<LogLine>,
    mut cancel: watch::Receiver<bool>,
) -> std::io::Result<Report> {
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-s")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .env(
            "PATH",
            "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
        )
        .env("LC_ALL", "C")
        .kill_on_drop(true);
    // Proxy settings are the one part of the agent's environment a fetch may need.
    for name in [
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
    ] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    match deploy_user {
        Some(user) => {
            command
                .env("HOME", &user.home)
                .env("USER", &user.name)
                .env("LOGNAME", &user.name)
                .current_dir("/");
        }
        None => {
            if let Some(home) = std::env::var_os("HOME") {
                command.env("HOME", home);
            }
        }
    }
    let switch = deploy_user.map(|u| (u.uid, u.gid));
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let drop_caps = switch.is_some() || !root;
    // SAFETY: setsid, prctl and the calls in switch_user and drop_capabilities are
    // async-signal-safe and touch no
    // memory of the parent. A session of its own: `timeout` moves hooks into process groups
    // of their own, but never out of the session, so the session is what a cancel kills.
    // The death signal is set after the user switch, which would clear it.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid)) = switch {
                switch_user(uid, gid)?;
            }
            if drop_caps {
                drop_capabilities()?;
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let session = child.id().and_then(|id| libc::pid_t::try_from(id).ok());
    // If this future is dropped mid-run (the connection died, the agent is stopping), every
    // process of the script goes with it.
    let mut guard = KillOnDrop(session);
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await?;
        // Closing stdin tells sh the script is complete.
        drop(stdin);
    }
    let mut output = ScriptOutput::new(nonce);
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (mut out_buf, mut err_buf) = (vec![0u8; 8192], vec![0u8; 8192]);
    let mut cancelled = false;
    // Listening for a cancel makes sense while someone can still send one.
    let mut cancellable = true;
    while stdout.is_some() || stderr.is_some() {
        let lines = tokio::select! {
            read = async { stdout.as_mut()?.read(&mut out_buf).await.ok() }, if stdout.is_some() => match read {
                Some(n) if n > 0 => output.read(OutputStream::Stdout, &out_buf[..n]),
                _ => { stdout = None; output.end(OutputStream::Stdout) }
            },
            read = async { stderr.as_mut()?.read(&mut err_buf).await.ok() }, if stderr.is_some() => match read {
                Some(n) if n > 0 => output.read(OutputStream::Stderr, &err_buf[..n]),
                _ => { stderr = None; output.end(OutputStream::Stderr) }
            },
            changed = cancel.changed(), if cancellable && !cancelled => {
                match changed {
                    Ok(()) if *cancel.borrow() => {
                        cancelled = true;
                        if let Some(session) = session {
                            kill_session(session);
                        }
                    }
                    Ok(()) => {}
                    Err(_) => cancellable = false,
                }
                continue;
            }
        };
        for line in lines {
            let _ = log.send(line);
        }
    }
    let status = child.wait().await?;
    guard.0 = None;
    Ok(Report {
        outcome: output.into_outcome(),
        status: status.code(),
        cancelled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensei_shared::job::{DeploySpec, Hooks, RollbackSpec};
    use sensei_shared::release::{deploy_script, rollback_script};
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .current_dir(dir)
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A repository with one commit per given `index.html` content; returns it and the commits.
    fn repo(dir: &Path, versions: &[&str]) -> (PathBuf, Vec<String>) {
        let repo = dir.join("repo");
        std::fs::create_dir_all(&repo).expect("mkdir");
        git(&repo, &["init", "-q", "-b", "main"]);
        let mut commits = Vec::new();
        for v in versions {
            std::fs::write(repo.join("index.html"), v).expect("write");
            git(&repo, &["add", "."]);
            git(&repo, &["commit", "-q", "-m", v]);
            commits.push(git(&repo, &["rev-parse", "HEAD"]));
        }
        (repo, commits)
    }

    fn spec(repo: &Path, deploy: &Path, id: &str) -> DeploySpec {
        DeploySpec {
            repo_url: repo.display().to_string(),
            git_ref: "main".into(),
            release_id: id.into(),
            deploy_path: deploy.display().to_string(),
            keep_releases: 2,
            shared_paths: vec!["storage/".into()],
            hooks: Hooks {
                build: vec!["echo building $(cat index.html)".into()],
                pre_switch: vec![],
                post_switch: vec![],
            },
            health_check: Some("test -s index.html".into()),
            env: vec![("SECRET".into(), "hunter2".into())],
            hook_timeout_secs: 30,
            expected_commit: None,
        }
    }

    async fn run(script: &str) -> (Report, Vec<LogLine>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_cancel, cancelled) = watch::channel(false);
        let report = run_script(script, "t3st", None, tx, cancelled)
            .await
            .expect("spawn");
        let mut lines = Vec::new();
        while let Ok(line) = rx.try_recv() {
            lines.push(line);
        }
        (report, lines)
    }

    async fn deploy(spec: &DeploySpec) -> (Report, Vec<LogLine>) {
        run(&deploy_script(spec, "job", "t3st").expect("script")).await
    }

    fn current(deploy: &Path) -> String {
        std::fs::read_link(deploy.join("current"))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn deploy_switches_current_links_shared_and_writes_env() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (repo, commits) = repo(tmp.path(), &["v1"]);
        let d = tmp.path().join("app");
        let (report, lines) = deploy(&spec(&repo, &d, "20270101000000-aaaaaa")).await;
        assert_eq!(report.verdict(), Ok(()), "{lines:?}");
        assert_eq!(report.outcome.commit.as_deref(), Some(commits[0].as_str()));
        assert_eq!(current(&d), "releases/20270101000000-aaaaaa");
        assert_eq!(
            std::fs::read_to_string(d.join("current/index.html")).expect("read"),
            "v1"
        );
        assert!(d.join("current/storage").is_symlink());
        let env = d.join("shared/.env");
        assert_eq!(
            std::fs::metadata(&env).expect("env").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_to_string(&env).expect("env"),
            "SECRET=\"hunter2\"\n"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("current/.env")).expect("linked env"),
            "SECRET=\"hunter2\"\n"
        );
        assert!(
            lines.iter().any(|l| l.text == "building v1"),
            "hook output streamed"
        );
        assert!(
            !lines.iter().any(|l| l.text.contains("hunter2")),
            "env value in the log"
        );
    }

    #[tokio::test]
    async fn an_emptied_environment_removes_the_old_env_file_once_the_new_release_is_live() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (repo, _) = repo(tmp.path(), &["v1"]);
        let d = tmp.path().join("app");
        let env = d.join("shared/.env");
        deploy(&spec(&repo, &d, "20270101000000-aaaaaa"))
            .await
            .0
            .verdict()
            .expect("with env");
        assert!(env.exists());
        // Emptied, but the deploy fails: the running release keeps what it reads.
        let mut emptied = spec(&repo, &d, "20270101000001-bbbbbb");
        emptied.env.clear();
        emptied.hooks.build = vec!["exit 3".into()];
        deploy(&emptied).await.0.verdict().expect_err("must fail");
        assert_eq!(
            std::fs::read_to_string(&env).expect("kept"),
            "SECRET=\"hunter2\"\n"
        );
        // Emptied, and the deploy succeeds: the secrets are gone from the server.
        emptied.release_id = "20270101000002-cccccc".into();
        emptied.hooks.build.clear();
        let (report, lines) = deploy(&emptied).await;
        assert_eq!(report.verdict(), Ok(()), "{lines:?}");
        assert!(!env.exists() && !env.is_symlink(), "the old .env stayed");
        assert!(!d.join("current/.env").exists());
        assert!(lines
            .iter()
            .any(|l| l.text.contains("removed") && l.text.contains(".env")));
        // A `.env` the operator put there by hand (Sensei did not write it) is theirs: linked
        // into the release as before, never removed.
        std::fs::write(&env, "BY_HAND=1\n").expect("write");
        let mut kept = spec(&repo, &d, "20270101000004-eeeeee");
        kept.env.clear();
        deploy(&kept).await.0.verdict().expect("deploy");
        assert_eq!(
            std::fs::read_to_string(d.join("current/.env")).expect("linked"),
            "BY_HAND=1\n"
        );
        // And so is one listed as a shared path.
        let mut by_hand = spec(&repo, &d, "20270101000005-dddddd");
        by_hand.env.clear();
        by_hand.shared_paths.push(".env".into());
        deploy(&by_hand).await.0.verdict().expect("deploy");
        assert_eq!(std::fs::read_to_string(&env).expect("kept"), "BY_HAND=1\n");
        assert_eq!(
            std::fs::read_to_string(d.join("current/.env")).expect("linked"),
            "BY_HAND=1\n"
        );
    }

    #[tokio::test]
    async fn failing_build_leaves_current_untouched() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (repo, _) = repo(tmp.path(), &["v1"]);
        let d = tmp.path().join("app");
        deploy(&spec(&repo, &d, "20270101000000-aaaaaa"))
            .await
            .0
            .verdict()
            .expect("first");
        let mut bad = spec(&repo, &d, "20270101000001-bbbbbb");
        bad.hooks.build = vec!["echo about to fail; exit 3".into()];
        let (report, lines) = deploy(&bad).await;
        let (step, message) = report.verdict().expect_err("must fail");
        assert_eq!(step, "build");
        assert!(message.contains("status 3"), "{message}");
        assert!(lines.iter().any(|l| l.text == "about to fail"));
        assert_eq!(current(&d), "releases/20270101000000-aaaaaa");
        assert!(
            !d.join("releases/20270101000001-bbbbbb").exists(),
            "failed release left behind"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("current/index.html")).expect("read"),
            "v1"
        );
    }

    #[tokio::test]
    async fn failing_health_check_and_missing_ref_leave_current_untouched() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (repo, _) = repo(tmp.path(), &["v1"]);
        let d = tmp.path().join("app");
        deploy(&spec(&repo, &d, "20270101000000-aaaaaa"))
            .await
            .0
            .verdict()
            .expect("first");
        let mut unhealthy = spec(&repo, &d, "20270101000001-bbbbbb");
        unhealthy.health_check = Some("test -f missing.txt".into());
        let (report, _) = deploy(&unhealthy).await;
        assert_eq!(report.verdict().expect_err("fails").0, "health_check");
        let mut missing = spec(&repo, &d, "20270101000002-cccccc");
        missing.git_ref = "no-such-branch".into();
        let (report, _) = deploy(&missing).await;
        let (step, message) = report.verdict().expect_err("fails");
        assert_eq!(step, "fetch");
        assert!(message.contains("no-such-branch"), "{message}");
        assert_eq!(current(&d), "releases/20270101000000-aaaaaa");
    }

    #[tokio::test]
    async fn rollback_returns_to_the_previous_good_release() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (repo, _) = repo(tmp.path(), &["v1"]);
        let d = tmp.path().join("app");
        deploy(&spec(&repo, &d, "20270101000000-aaaaaa"))
            .await
            .0
            .verdict()
            .expect("v1");
        std::fs::write(repo.join("index.html"), "v2").expect("write");
        git(&repo, &["commit", "-qam", "v2"]);
        deploy(&spec(&repo, &d, "20270101000001-bbbbbb"))
            .await
            .0
            .verdict()
            .expect("v2");
        let mut failed = spec(&repo, &d, "20270101000002-cccccc");
        failed.hooks.build = vec!["false".into()];
        assert!(deploy(&failed).await.0.verdict().is_err());

        let back = RollbackSpec {
            deploy_path: d.display().to_string(),
            to_release: None,
        };
        let (report, lines) = run(&rollback_script(&back, "job", "t3st").expect("script")).await;
        assert_eq!(report.verdict(), Ok(()), "{lines:?}");
        assert_eq!(current(&d), "releases/20270101000000-aaaaaa");
        assert_eq!(
            std::fs::read_to_string(d.join("current/index.html")).expect("read"),
            "v1"
        );
        // Nothing older is good: a second rollback says so and changes nothing.
        let (report, _) = run(&rollback_script(&back, "job", "t3st").expect("script")).await;
        let (step, message) = report.verdict().expect_err("nothing to roll back to");
        assert_eq!(step, "rollback");
        assert!(message.contains("no earlier good release"), "{message}");
        assert_eq!(current(&d), "releases/20270101000000-aaaaaa");
    }

    #[tokio::test]
    async fn pruning_keeps_n_good_releases_and_never_current_or_previous() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (repo, _) = repo(tmp.path(), &["v1"]);
        let d = tmp.path().join("app");
        for i in 0..5 {
            let mut s = spec(&repo, &d, &format!("2027010100000{i}-aaaaaa"));
            s.keep_releases = 2;
            deploy(&s).await.0.verdict().expect("deploy");
        }
        let mut left: Vec<String> = std::fs::read_dir(d.join("releases"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["20270101000003-aaaaaa", "20270101000004-aaaaaa"]);
        // Roll back, then deploy with keep 1: current and the previous good one both stay.
        let back = RollbackSpec {
            deploy_path: d.display().to_string(),
            to_release: None,
        };
        run(&rollback_script(&back, "j", "t3st").expect("script"))
            .await
            .0
            .verdict()
            .expect("rollback");
        let mut s = spec(&repo, &d, "20270101000009-aaaaaa");
        s.keep_releases = 1;
        deploy(&s).await.0.verdict().expect("deploy");
        assert!(
            d.join("releases/20270101000003-aaaaaa").exists(),
            "previous good release pruned"
        );
        assert!(d.join("releases/20270101000009-aaaaaa").exists());
    }

    #[tokio::test]
    async fn a_held_lock_refuses_a_second_deploy_and_names_the_owner() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (repo, _) = repo(tmp.path(), &["v1"]);
        let d = tmp.path().join("app");
        let mut slow = spec(&repo, &d, "20270101000000-aaaaaa");
        slow.hooks.build = vec!["sleep 3".into()];
        let script = deploy_script(&slow, "first-job", "t3st").expect("script");
        let first = tokio::spawn(async move { run(&script).await });
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let (report, _) = deploy(&spec(&repo, &d, "20270101000001-bbbbbb")).await;
        let (step, message) = report
            .verdict()
            .expect_err("second deploy ran under the lock");
        assert_eq!(step, "lock");
        assert!(message.contains("first-job"), "{message}");
        assert_eq!(first.await.expect("join").0.verdict(), Ok(()));
    }

    #[tokio::test]
    async fn a_hook_that_runs_too_long_is_stopped() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (repo, _) = repo(tmp.path(), &["v1"]);
        let d = tmp.path().join("app");
        let mut s = spec(&repo, &d, "20270101000000-aaaaaa");
        s.hooks.build = vec!["sleep 30".into()];
        s.hook_timeout_secs = 1;
        let (report, _) = deploy(&s).await;
        let (step, message) = report.verdict().expect_err("timeout");
        assert_eq!(step, "build");
        assert!(message.contains("timed out"), "{message}");
        assert!(!d.join("current").exists());
    }

    #[tokio::test]
    async fn cancelling_mid_deploy_keeps_current_complete_and_the_next_deploy_works() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (repo, _) = repo(tmp.path(), &["v1"]);
        let d = tmp.path().join("app");
        deploy(&spec(&repo, &d, "20270101000000-aaaaaa"))
            .await
            .0
            .verdict()
            .expect("first");
        let mut slow = spec(&repo, &d, "20270101000001-bbbbbb");
        slow.hooks.build = vec!["sleep 30".into()];
        let script = deploy_script(&slow, "job", "t3st").expect("script");
        let (tx, _rx) = mpsc::unbounded_channel();
        let (cancel, cancelled) = watch::channel(false);
        let running =
            tokio::spawn(async move { run_script(&script, "t3st", None, tx, cancelled).await });
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        cancel.send(true).expect("cancel");
        let report = tokio::time::timeout(std::time::Duration::from_secs(5), running)
            .await
            .expect("cancel did not stop the hook")
            .expect("join")
            .expect("run");
        assert!(report.cancelled);
        assert!(report.verdict().is_err());
        assert_eq!(current(&d), "releases/20270101000000-aaaaaa");
        assert_eq!(
            std::fs::read_to_string(d.join("current/index.html")).expect("read"),
            "v1"
        );
        deploy(&spec(&repo, &d, "20270101000002-cccccc"))
            .await
            .0
            .verdict()
            .expect("next deploy");
        assert_eq!(current(&d), "releases/20270101000002-cccccc");
    }

    /// A repository that commits a symlink out of the release, under a shared path's parent.
    #[tokio::test]
    async fn a_committed_symlink_cannot_redirect_a_shared_path_outside_the_release() {
        let tmp = tempfile::tempdir().expect("tmp");
        let outside = tmp.path().join("other-app/shared");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("local.ini"), "precious").expect("victim");
        let (repo, _) = repo(tmp.path(), &["v1"]);
        std::os::unix::fs::symlink(&outside, repo.join("config")).expect("symlink");
        git(&repo, &["add", "config"]);
        git(&repo, &["commit", "-q", "-m", "config -> elsewhere"]);
        let d = tmp.path().join("app");
        let mut hostile = spec(&repo, &d, "20270101000000-aaaaaa");
        hostile.shared_paths = vec!["config/local.ini".into()];
        let (report, _) = deploy(&hostile).await;
        let (step, message) = report.verdict().expect_err("refused");
        assert_eq!(step, "link");
        assert!(message.contains("config is a symbolic link"), "{message}");
        assert!(
            message.contains("config/local.ini"),
            "names the path: {message}"
        );
        assert_eq!(
            std::fs::read_to_string(outside.join("local.ini")).expect("victim"),
            "precious",
            "a file outside the release was replaced"
        );
        assert!(!d.join("current").exists());
    }

    /// A hook that reads standard input would swallow the rest of the script (health check,
    /// switch, prune) and the deploy would look finished without having switched.
    #[tokio::test]
    async fn a_hook_reading_stdin_cannot_swallow_the_rest_of_the_script() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (repo, _) = repo(tmp.path(), &["v1"]);
        let d = tmp.path().join("app");
        let mut greedy = spec(&repo, &d, "20270101000000-aaaaaa");
        greedy.hooks.build =
            vec!["cat > swallowed.txt; echo read $(wc -c < swallowed.txt) bytes".into()];
        let (report, lines) = deploy(&greedy).await;
        report.verdict().expect("the deploy ran to its end");
        assert!(lines.iter().any(|l| l.text == "read 0 bytes"), "{lines:?}");
        assert_eq!(current(&d), "releases/20270101000000-aaaaaa");
    }

    #[tokio::test]
    async fn a_script_that_stops_before_its_final_marker_is_a_failure() {
        let (report, _) = run("echo '@@sensei:t3st step build'\nexit 0\n").await;
        let (_, message) = report.verdict().expect_err("not a success");
        assert!(message.contains("without finishing"), "{message}");
    }

    /// Endless output without a newline, and bytes that are not UTF-8: memory stays bounded,
    /// the stream goes on, the line is kept lossily.
    #[tokio::test]
    async fn endless_lines_and_invalid_utf8_are_bounded_and_kept() {
        let script = "head -c 50000000 /dev/zero | tr '\\0' 'x'; echo\n\
                      printf 'bad \\377\\376 bytes\\n'\n\
                      echo after\n";
        let (report, lines) = run(script).await;
        assert_eq!(report.status, Some(0));
        let long = &lines[0].text;
        assert!(long.starts_with(&"x".repeat(sensei_shared::lines::MAX_LINE)));
        assert!(
            long.ends_with(&format!(
                " …[{} bytes cut]",
                50_000_000 - sensei_shared::lines::MAX_LINE
            )),
            "{}",
            &long[long.len() - 40..]
        );
        assert_eq!(lines[1].text, "bad \u{fffd}\u{fffd} bytes");
        assert_eq!(
            lines[2].text, "after",
            "the stream went on after invalid UTF-8"
        );
    }

    /// The control plane pinned a commit; the branch has moved on since. The server must
    /// refuse to deploy anything else.
    #[tokio::test]
    async fn a_fetched_commit_other_than_the_pinned_one_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (repo, commits) = repo(tmp.path(), &["approved", "pushed later"]);
        // A commit on another branch: never in main's history.
        git(&repo, &["checkout", "-q", "-b", "unreviewed", &commits[0]]);
        std::fs::write(repo.join("index.html"), "unreviewed").expect("write");
        git(&repo, &["commit", "-q", "-am", "unreviewed"]);
        let unreviewed = git(&repo, &["rev-parse", "HEAD"]);
        git(&repo, &["checkout", "-q", "main"]);
        let d = tmp.path().join("app");
        let mut pinned = spec(&repo, &d, "20270101000000-aaaaaa");
        pinned.expected_commit = Some(unreviewed.clone());
        let (report, _) = deploy(&pinned).await;
        let (step, message) = report.verdict().expect_err("refused");
        assert_eq!(step, "fetch");
        assert!(message.contains("commit mismatch"), "{message}");
        assert!(
            message.contains(&unreviewed) && message.contains(&commits[1]),
            "{message}"
        );
        assert!(!d.join("current").exists());
        // The approved commit, though the branch has moved on: exactly that one deploys.
        pinned.expected_commit = Some(commits[0].clone());
        pinned.release_id = "20270101000001-bbbbbb".into();
        deploy(&pinned)
            .await
            .0
            .verdict()
            .expect("the pinned commit deploys");
        assert_eq!(
            std::fs::read_to_string(d.join("current/index.html")).expect("page"),
            "approved"
        );
    }

    /// Whatever the agent may hold (the packaged unit gives it CAP_SETUID, CAP_SETGID and
    /// CAP_KILL; a root agent holds everything), the script holds no capability: as root with
    /// a deploy user (here `nobody`), and as any other user without one.
    #[tokio::test]
    async fn a_script_holds_no_capability_and_cannot_gain_one() {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let user = root.then(|| crate::policy::DeployUser::lookup("nobody").expect("nobody"));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_cancel, cancelled) = watch::channel(false);
        let script = "grep -E '^(Uid|CapEff|CapPrm|CapAmb|NoNewPrivs)' /proc/self/status\n";
        let report = run_script(script, "t3st", user.as_ref(), tx, cancelled)
            .await
            .expect("spawn");
        let mut lines = Vec::new();
        while let Ok(line) = rx.try_recv() {
            lines.push(line);
        }
        assert_eq!(report.status, Some(0));
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        for cap in ["CapEff", "CapPrm", "CapAmb"] {
            assert!(
                texts
                    .iter()
                    .any(|l| l.starts_with(cap) && l.ends_with("0000000000000000")),
                "{cap}: {texts:?}"
            );
        }
        assert!(
            texts
                .iter()
                .any(|l| l.starts_with("NoNewPrivs") && l.ends_with('1')),
            "{texts:?}"
        );
        if let Some(user) = &user {
            assert!(
                texts
                    .iter()
                    .any(|l| l.starts_with("Uid:") && l.contains(&user.uid.to_string())),
                "{texts:?}"
            );
        }
    }
}
