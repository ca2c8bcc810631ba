//! A private PostgreSQL cluster started from the system's PostgreSQL binaries.
//!
//! This is the control plane's embedded default (no `DATABASE_URL`) and the test harness's
//! throwaway database. The cluster lives in a directory of its own and listens on a Unix
//! socket inside it; TCP is off unless asked for. PostgreSQL refuses to run as root, so when
//! we are root the server runs as the `postgres` system user.
//!
//! The postmaster is started from a dedicated thread that waits on it, with a parent-death
//! signal: if the control plane dies without stopping it, the kernel stops the cluster too,
//! so no orphaned database is left holding the data directory.

#![allow(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why the cluster could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No PostgreSQL server binaries on this machine.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) were not found on PATH, through \
         `pg_config --bindir`, or under /usr/lib/postgresql/*/bin. Install them (Debian/Ubuntu: \
         `apt-get install postgresql`), or set DATABASE_URL to an existing PostgreSQL server"
    )]
    BinariesMissing,
    /// We are root and there is no `postgres` user to run the server as.
    #[error(
        "running as root, but there is no `postgres` system user to run PostgreSQL as \
         (PostgreSQL refuses to run as root); install the postgresql package, which creates it"
    )]
    NoPostgresUser,
    /// We are root and the `postgres` user cannot reach the cluster directory.
    #[error(
        "PostgreSQL runs as the `postgres` user, which cannot reach {dir}: {blocking} \
         (mode {mode:o}) does not let it pass. Choose a data directory it can reach \
         (for example under /var/lib, with --data-dir), or let it through with \
         `chmod o+x {blocking}`"
    )]
    Unreachable {
        dir: String,
        blocking: String,
        mode: u32,
    },
    /// The data directory was made by another major version of PostgreSQL.
    #[error(
        "the embedded database in {dir} was created by PostgreSQL {data_version}, but the \
         PostgreSQL binaries found here are version {binaries_version}. Keep PostgreSQL \
         {data_version} installed beside {binaries_version} and run \
         `sensei-control-plane upgrade-embedded-db` (it uses pg_upgrade; docs/operations.md), \
         or install PostgreSQL {data_version} again"
    )]
    VersionMismatch {
        dir: String,
        data_version: String,
        binaries_version: String,
    },
    /// A step failed; the message carries PostgreSQL's own output.
    #[error("{step} failed: {detail}")]
    Step { step: &'static str, detail: String },
}

fn step_err(step: &'static str) -> impl Fn(std::io::Error) -> ClusterError {
    move |e| ClusterError::Step {
        step,
        detail: e.to_string(),
    }
}

/// How the cluster is set up.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Also listen on `127.0.0.1:<port>` (tests of TLS connections).
    pub tcp_port: Option<u16>,
    /// Serve TLS with this certificate and key (PEM), for `tcp_port`.
    pub tls: Option<(String, String)>,
    /// Trade durability for speed (tests): fsync and synchronous commit off.
    pub throwaway: bool,
    /// More server settings (`-c name=value`), e.g. the load generator's
    /// `shared_preload_libraries=pg_stat_statements` to count the plane's statements.
    pub settings: Vec<(String, String)>,
}

/// A running private cluster. Dropping it stops the server (fast shutdown).
pub struct PostgresCluster {
    root: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    pid: u32,
    exited: Mutex<Option<mpsc::Receiver<()>>>,
}

/// The port number only names the socket file (`.s.PGSQL.<port>`); the socket lives in a
/// directory of our own, so the usual number cannot clash with another server.
const SOCKET_PORT: u16 = 5432;

impl PostgresCluster {
    /// Finds the directory holding `initdb`, `postgres` and `pg_isready`. A PATH entry may
    /// hold symlinks only (Debian links a few into /usr/local/bin), so the real directory is
    /// the one the `postgres` link resolves to.
    pub fn find_binaries() -> Result<PathBuf, ClusterError> {
        let has_both = |dir: &Path| {
            ["initdb", "postgres", "pg_isready"]
                .iter()
                .all(|b| dir.join(b).is_file())
        };
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let real = dir
                    .join("postgres")
                    .canonicalize()
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf));
                if let Some(real) = real.filter(|r| has_both(r)) {
                    return Ok(real);
                }
            }
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_both(&dir) {
                return Ok(dir);
            }
        }
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path().join("bin"))
                    .collect()
            })
            .unwrap_or_default();
        // Newest major version first.
        versions.sort_by_key(|p| {
            std::cmp::Reverse(
                p.parent()
                    .and_then(|v| v.file_name())
                    .and_then(|v| v.to_str())
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0),
            )
        });
        versions
            .into_iter()
            .find(|dir| has_both(dir))
            .ok_or(ClusterError::BinariesMissing)
    }

    /// Initialises (first time) and starts a cluster under `root`.
    pub fn start(root: &Path, options: &ClusterOptions) -> Result<Self, ClusterError> {
        let bin = Self::find_binaries()?;
        let run_as = postgres_user_if_root()?;
        let data = root.join("pgdata");
        let socket_dir = root.join("socket");
        std::fs::create_dir_all(root).map_err(step_err("creating the cluster directory"))?;
        std::fs::create_dir_all(&socket_dir).map_err(step_err("creating the socket directory"))?;
        // Only the server's user may reach the socket: with it, trust authentication on the
        // socket is as private as the directory.
        std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(step_err("securing the socket directory"))?;
        if let Some((uid, gid)) = run_as {
            check_reachable(root, uid, gid)?;
            // The postgres user must be able to enter the cluster root; the root stays closed
            // to everyone else (0710 with the postgres group).
            std::os::unix::fs::chown(root, Some(uid), Some(gid))
                .map_err(step_err("handing the cluster directory to postgres"))?;
            std::os::unix::fs::chown(&socket_dir, Some(uid), Some(gid))
                .map_err(step_err("handing the socket directory to postgres"))?;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
                .map_err(step_err("securing the cluster directory"))?;
        }

        let binaries_version = major_version_of(&bin)?;
        if let Ok(recorded) = std::fs::read_to_string(data.join("PG_VERSION")) {
            // initdb records the major version in PG_VERSION; a server of another major
            // version would refuse the directory with a message that does not say what to do.
            let recorded = recorded.trim().to_owned();
            if recorded != binaries_version {
                return Err(ClusterError::VersionMismatch {
                    dir: data.display().to_string(),
                    data_version: recorded,
                    binaries_version,
                });
            }
        }
        if !data.join("PG_VERSION").exists() {
            initdb(&bin, &data, run_as)?;
        }

        let mut args: Vec<String> = vec![
            "-D".into(),
            data.display().to_string(),
            "-k".into(),
            socket_dir.display().to_string(),
            "-p".into(),
            options.tcp_port.unwrap_or(SOCKET_PORT).to_string(),
        ];
        let mut set = |k: &str, v: &str| {
            args.push("-c".into());
            args.push(format!("{k}={v}"));
        };
        match options.tcp_port {
            Some(_) => set("listen_addresses", "127.0.0.1"),
            None => set("listen_addresses", ""),
        }
        if options.throwaway {
            set("fsync", "off");
            set("synchronous_commit", "off");
            set("full_page_writes", "off");
            set("max_connections", "300");
        }
        for (name, value) in &options.settings {
            set(name, value);
        }
        if let Some((cert, key)) = &options.tls {
            let cert_path = root.join("server.crt");
            let key_path = root.join("server.key");
            std::fs::write(&cert_path, cert).map_err(step_err("writing the TLS certificate"))?;
            std::fs::write(&key_path, key).map_err(step_err("writing the TLS key"))?;
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
                .map_err(step_err("securing the TLS key"))?;
            if let Some((uid, gid)) = run_as {
                for p in [&cert_path, &key_path] {
                    std::os::unix::fs::chown(p, Some(uid), Some(gid))
                        .map_err(step_err("handing the TLS files to postgres"))?;
                }
            }
            set("ssl", "on");
            set("ssl_cert_file", &cert_path.display().to_string());
            set("ssl_key_file", &key_path.display().to_string());
        }

        // The running server writes its log through its own collector into log/, one file
        // per weekday, each truncated when its day comes round again: a week of history in
        // bounded space. Only what it says before the collector starts (and if it cannot
        // start) goes to postgres.log, which is appended to and rotated here.
        let collector_dir = root.join("log");
        std::fs::create_dir_all(&collector_dir).map_err(step_err("creating the log directory"))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&collector_dir, Some(uid), Some(gid))
                .map_err(step_err("handing the log directory to postgres"))?;
        }
        set("logging_collector", "on");
        set("log_directory", &collector_dir.display().to_string());
        set("log_filename", "postgresql-%a.log");
        set("log_rotation_age", "1d");
        set("log_rotation_size", "0");
        set("log_truncate_on_rotation", "on");
        let log_path = root.join("postgres.log");
        rotate_log(&log_path, LOG_ROTATE_BYTES, LOG_KEEP);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(step_err("opening the server log"))?;
        let log_err = log
            .try_clone()
            .map_err(step_err("creating the server log"))?;
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some((uid, gid)) = run_as {
            cmd.uid(uid).gid(gid);
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. It runs after
        // std has switched uid, so the kernel keeps the death signal (a credential change would
        // otherwise clear it).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }

        let (pid_tx, pid_rx) = mpsc::channel();
        let (exit_tx, exit_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("postgres-supervisor".into())
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    let _ = pid_tx.send(Ok(child.id()));
                    let _ = child.wait();
                    let _ = exit_tx.send(());
                }
                Err(e) => {
                    let _ = pid_tx.send(Err(e));
                }
            })
            .map_err(step_err("starting the supervisor thread"))?;
        let pid = pid_rx
            .recv()
            .map_err(|_| ClusterError::Step {
                step: "starting postgres",
                detail: "supervisor thread vanished".into(),
            })?
            .map_err(step_err("starting postgres"))?;

        let cluster = Self {
            root: root.to_owned(),
            socket_dir,
            port: options.tcp_port.unwrap_or(SOCKET_PORT),
            pid,
            exited: Mutex::new(Some(exit_rx)),
        };
        cluster.wait_ready(&bin, &log_path)?;
        Ok(cluster)
    }

    fn wait_ready(&self, bin: &Path, log_path: &Path) -> Result<(), ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.socket_dir)
                .args(["-p", &self.port.to_string(), "-U", "postgres", "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            let died = self
                .exited
                .lock()
                .map(|rx| rx.as_ref().is_some_and(|rx| rx.try_recv().is_ok()))
                .unwrap_or(false);
            if died || Instant::now() > deadline {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                return Err(ClusterError::Step {
                    step: "starting postgres",
                    detail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A libpq-style connection string for `dbname` over the private socket.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={dbname}",
            self.socket_dir.display(),
            self.port
        )
    }

    /// [`Self::conninfo`] connecting as `user` instead of the superuser.
    pub fn conninfo_as(&self, dbname: &str, user: &str) -> String {
        format!(
            "host={} port={} user={user} dbname={dbname}",
            self.socket_dir.display(),
            self.port
        )
    }

    /// The TCP port, when the cluster listens on one.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Fast shutdown: clients are disconnected, the server checkpoints and exits.
    pub fn stop(&self) {
        let Ok(mut guard) = self.exited.lock() else {
            return;
        };
        let Some(rx) = guard.take() else {
            return;
        };
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return;
        };
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child, reaped
        // only by the supervisor thread, which has not reported its exit yet.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGQUIT);
            }
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates an empty cluster in `data` with the binaries in `bin`.
fn initdb(bin: &Path, data: &Path, run_as: Option<(u32, u32)>) -> Result<(), ClusterError> {
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
        ])
        .stdin(Stdio::null());
    if let Some((uid, gid)) = run_as {
        initdb.uid(uid).gid(gid);
    }
    let out = initdb.output().map_err(step_err("running initdb"))?;
    if !out.status.success() {
        return Err(ClusterError::Step {
            step: "initdb",
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Why `upgrade-embedded-db` could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    #[error("there is no embedded database in {0} to upgrade")]
    NoCluster(String),
    #[error(
        "the embedded database is PostgreSQL {version}, and pg_upgrade needs that version's \
         binaries, which are not in {bindir}: install them (Debian/Ubuntu: `apt-get install \
         postgresql-{version}`) or name them with --old-bindir"
    )]
    OldBinariesMissing { version: String, bindir: String },
    #[error("--old-bindir holds PostgreSQL {found}, but the embedded database is {recorded}")]
    OldBinariesMismatch { found: String, recorded: String },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// What `upgrade-embedded-db` did.
#[derive(Debug)]
pub struct UpgradeReport {
    pub from: String,
    pub to: String,
    /// The previous data directory, kept until the operator has checked the new one.
    pub previous: PathBuf,
}

/// Upgrades the cluster under `root` to the major version of the binaries found on this
/// machine with `pg_upgrade`. `None` when it already is that version (and no `old_bindir`
/// was named, which forces a run). The cluster must be stopped; the old data directory is
/// kept beside the new one.
pub fn upgrade(
    root: &Path,
    old_bindir: Option<&Path>,
) -> Result<Option<UpgradeReport>, UpgradeError> {
    let data = root.join("pgdata");
    let recorded = std::fs::read_to_string(data.join("PG_VERSION"))
        .map_err(|_| UpgradeError::NoCluster(root.display().to_string()))?
        .trim()
        .to_owned();
    let new_bin = PostgresCluster::find_binaries()?;
    let new_version = major_version_of(&new_bin)?;
    if old_bindir.is_none() && recorded == new_version {
        return Ok(None);
    }
    let old_bin = old_bindir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("/usr/lib/postgresql/{recorded}/bin")));
    if !old_bin.join("postgres").is_file() {
        return Err(UpgradeError::OldBinariesMissing {
            version: recorded,
            bindir: old_bin.display().to_string(),
        });
    }
    let old_version = major_version_of(&old_bin)?;
    if old_version != recorded {
        return Err(UpgradeError::OldBinariesMismatch {
            found: old_version,
            recorded,
        });
    }
    let run_as = postgres_user_if_root()?;
    let next = root.join("pgdata.upgrading");
    if next.exists() {
        // Left by an upgrade that failed: it never replaced the live directory.
        std::fs::remove_dir_all(&next).map_err(step_err("removing a failed upgrade"))?;
    }
    initdb(&new_bin, &next, run_as)?;
    let socket_dir = root.join("socket");
    let mut pg_upgrade = Command::new(new_bin.join("pg_upgrade"));
    pg_upgrade
        .arg("--old-bindir")
        .arg(&old_bin)
        .arg("--new-bindir")
        .arg(&new_bin)
        .arg("--old-datadir")
        .arg(&data)
        .arg("--new-datadir")
        .arg(&next)
        .arg("--socketdir")
        .arg(&socket_dir)
        .args(["--username", "postgres"])
        // pg_upgrade writes its reports into the working directory on older versions.
        .current_dir(root)
        .stdin(Stdio::null());
    if let Some((uid, gid)) = run_as {
        pg_upgrade.uid(uid).gid(gid);
    }
    let out = pg_upgrade
        .output()
        .map_err(step_err("running pg_upgrade"))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        return Err(ClusterError::Step {
            step: "pg_upgrade",
            detail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        }
        .into());
    }
    let previous = root.join(format!(
        "pgdata.pg{recorded}.{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S")
    ));
    std::fs::rename(&data, &previous).map_err(step_err("moving the old data directory"))?;
    std::fs::rename(&next, &data).map_err(step_err("moving the new data directory"))?;
    Ok(Some(UpgradeReport {
        from: recorded,
        to: new_version,
        previous,
    }))
}

/// postgres.log is rotated at start once it is larger than this.
const LOG_ROTATE_BYTES: u64 = 1024 * 1024;
/// How many rotated postgres.log files are kept (`postgres.log.1` is the newest).
const LOG_KEEP: u32 = 3;

/// Moves `path` to `path.1` (and `.1` to `.2`, …, dropping the oldest) when it has grown
/// past `limit` bytes. Rotation is best effort: a log that cannot be moved is appended to.
fn rotate_log(path: &Path, limit: u64, keep: u32) {
    let big = std::fs::metadata(path).is_ok_and(|m| m.len() > limit);
    if !big || keep == 0 {
        return;
    }
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    for n in (1..keep).rev() {
        let _ = std::fs::rename(numbered(n), numbered(n + 1));
    }
    let _ = std::fs::rename(path, numbered(1));
}

/// The PostgreSQL major version of the binaries in `bin` (`15`, `16`, …), from
/// `postgres --version`.
pub fn major_version_of(bin: &Path) -> Result<String, ClusterError> {
    let out = Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .map_err(step_err("running postgres --version"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "postgres (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)": the first number's major part.
    text.split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
        .ok_or_else(|| ClusterError::Step {
            step: "reading the PostgreSQL version",
            detail: text.trim().to_owned(),
        })
}

/// Checks that the user `uid`/`gid` may pass through every existing ancestor of `dir` (the
/// part that does not exist yet is created by us and handed over).
fn check_reachable(dir: &Path, uid: u32, gid: u32) -> Result<(), ClusterError> {
    use std::os::unix::fs::MetadataExt;
    let absolute = std::path::absolute(dir).map_err(step_err("resolving the data directory"))?;
    for ancestor in absolute.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        let mode = meta.mode() & 0o7777;
        let passes = if meta.uid() == uid {
            mode & 0o100 != 0
        } else if meta.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !passes {
            return Err(ClusterError::Unreachable {
                dir: absolute.display().to_string(),
                blocking: ancestor.display().to_string(),
                mode,
            });
        }
    }
    Ok(())
}

/// Whether this process runs as root.
pub fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `Some((uid, gid))` of the `postgres` user when we are root; `None` otherwise.
fn postgres_user_if_root() -> Result<Option<(u32, u32)>, ClusterError> {
    if !running_as_root() {
        return Ok(None);
    }
    let id = |flag: &str| -> Result<u32, ClusterError> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|_| ClusterError::NoPostgresUser)?;
        if !out.status.success() {
            return Err(ClusterError::NoPostgresUser);
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| ClusterError::NoPostgresUser)
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_rotated_past_its_limit_and_old_ones_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("postgres.log");
        for round in 1..=5 {
            std::fs::write(&log, format!("round {round} {}", "x".repeat(20))).expect("write");
            rotate_log(&log, 10, 3);
        }
        assert!(!log.exists(), "the big log was moved aside");
        let read = |n: u32| std::fs::read_to_string(dir.path().join(format!("postgres.log.{n}")));
        assert!(read(1).expect(".1").starts_with("round 5"));
        assert!(read(2).expect(".2").starts_with("round 4"));
        assert!(read(3).expect(".3").starts_with("round 3"));
        assert!(read(4).is_err(), "only three are kept");
        // A small log stays where it is.
        std::fs::write(&log, "small").expect("write");
        rotate_log(&log, 10, 3);
        assert_eq!(std::fs::read_to_string(&log).expect("kept"), "small");
    }

    #[test]
    fn a_closed_ancestor_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let closed = dir.path().join("closed");
        std::fs::create_dir(&closed).expect("mkdir");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        // A uid and gid that own nothing here: only the "other" bits count for them.
        let err = check_reachable(&closed.join("data"), 4_000_000, 4_000_000)
            .expect_err("0700 blocks others");
        match err {
            ClusterError::Unreachable { blocking, mode, .. } => {
                assert_eq!(PathBuf::from(blocking), closed);
                assert_eq!(mode, 0o700);
            }
            other => panic!("unexpected {other}"),
        }
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        check_reachable(&closed.join("data"), 4_000_000, 4_000_000).expect("o+x passes");
    }
}
