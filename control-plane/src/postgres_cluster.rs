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

use std::fs::File;
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
            // The postgres user must be able to enter the cluster root; the root stays closed
            // to everyone else (0710 with the postgres group).
            std::os::unix::fs::chown(root, Some(uid), Some(gid))
                .map_err(step_err("handing the cluster directory to postgres"))?;
            std::os::unix::fs::chown(&socket_dir, Some(uid), Some(gid))
                .map_err(step_err("handing the socket directory to postgres"))?;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
                .map_err(step_err("securing the cluster directory"))?;
        }

        if !data.join("PG_VERSION").exists() {
            let mut initdb = Command::new(bin.join("initdb"));
            initdb
                .arg("-D")
                .arg(&data)
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

        let log_path = root.join("postgres.log");
        let log = File::create(&log_path).map_err(step_err("creating the server log"))?;
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
