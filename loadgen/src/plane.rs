//! The control plane under test: the real `sensei-control-plane serve` binary as a child
//! process (so that its memory and CPU are its own), on a PostgreSQL cluster of ours.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where to find the binaries built next to this one.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .map(|dir| dir.join(name))
        .context("no directory around this executable")?;
    if !path.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p sensei-control-plane -p sensei-agent -p sensei-loadgen`",
            path.display()
        );
    }
    Ok(path)
}

/// A free loopback port (TCP or UDP).
pub fn free_port(udp: bool) -> anyhow::Result<u16> {
    Ok(if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    })
}

/// How to start (and restart) the control plane.
#[derive(Clone)]
pub struct PlaneConfig {
    pub binary: PathBuf,
    pub database_url: String,
    /// The owner role's connection string (migrations).
    pub owner_url: String,
    pub field_key: String,
    pub data_dir: PathBuf,
    pub api_addr: SocketAddr,
    pub agent_addr: SocketAddr,
    pub heartbeat_secs: u64,
    /// The agents' QUIC idle timeout the control plane asks for (`--agent-idle-timeout-secs`).
    pub idle_timeout_secs: u64,
    pub log: PathBuf,
    /// Run the control plane on these CPUs only (`taskset -c`), to see how it behaves with
    /// less than the whole machine.
    pub cpus: Option<String>,
}

impl PlaneConfig {
    /// The URL the load generator calls the API at (the certificate names `localhost`).
    pub fn public_url(&self) -> String {
        format!("https://localhost:{}", self.api_addr.port())
    }
}

pub struct Plane {
    child: Child,
    pub started: Instant,
}

impl Plane {
    pub fn start(config: &PlaneConfig) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.log)?;
        // A profiler to run the plane under (e.g. `heaptrack -o /tmp/plane`), for finding
        // where its memory goes; not for figures (it slows the plane down).
        let wrapper = std::env::var("SENSEI_LOADGEN_PLANE_WRAPPER").unwrap_or_default();
        let mut words: Vec<String> = wrapper.split_whitespace().map(str::to_owned).collect();
        if let Some(cpus) = &config.cpus {
            words.splice(0..0, ["taskset".to_owned(), "-c".to_owned(), cpus.clone()]);
        }
        let mut command = match words.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&config.binary);
                c
            }
            None => Command::new(&config.binary),
        };
        let child = command
            .arg("serve")
            .arg("--api-addr")
            .arg(config.api_addr.to_string())
            .arg("--agent-addr")
            .arg(config.agent_addr.to_string())
            .arg("--agent-heartbeat-secs")
            .arg(config.heartbeat_secs.to_string())
            .arg("--agent-idle-timeout-secs")
            .arg(config.idle_timeout_secs.to_string())
            .arg("--public-url")
            .arg(config.public_url())
            // The load generator speaks for many clients (the logins scenario) through
            // X-Forwarded-For, as a load balancer would.
            .arg("--trusted-proxies")
            .arg("127.0.0.0/8")
            .env("DATABASE_URL", &config.database_url)
            .env("DATABASE_OWNER_URL", &config.owner_url)
            .env("SENSEI_SIGNUP", "open")
            .env("CODESENSEI_FIELD_KEY", &config.field_key)
            .env("SENSEI_DATA_DIR", &config.data_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", config.binary.display()))?;
        Ok(Self {
            child,
            started: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_rss_kib(self.pid())
    }

    /// CPU time used so far (user + system).
    pub fn cpu(&self) -> Duration {
        proc_cpu(self.pid())
    }

    /// SIGTERM (the graceful path: agents are told when to come back), then wait. Answers the
    /// process's CPU time at its exit.
    pub fn terminate(mut self) -> anyhow::Result<Duration> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut cpu = self.cpu();
        while Instant::now() < deadline {
            // Read while the process exists; after it is reaped /proc has nothing.
            let now = self.cpu();
            if now > cpu {
                cpu = now;
            }
            if self.child.try_wait()?.is_some() {
                return Ok(cpu);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("the control plane did not stop within 30 s of SIGTERM")
    }
}

impl Plane {
    /// SIGKILL: the replica dies without a word (no close to its agents, no leaving
    /// heartbeat). Answers the process's CPU time at its death.
    pub fn kill(mut self) -> anyhow::Result<Duration> {
        let cpu = self.cpu();
        self.child.kill()?;
        self.child.wait()?;
        Ok(cpu)
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// VmRSS of a process, KiB (0 if it is gone).
pub fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Datagrams the kernel dropped so far on the IPv4 UDP sockets bound to these local ports,
/// mostly for a full receive buffer: the last column of `/proc/net/udp`. A side that cannot
/// drain its socket in time shows here first.
pub fn udp_drops(ports: &[u16]) -> u64 {
    let Ok(table) = std::fs::read_to_string("/proc/net/udp") else {
        return 0;
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = u16::from_str_radix(fields.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let drops: u64 = fields.last()?.parse().ok()?;
            ports.contains(&port).then_some(drops)
        })
        .sum()
}

/// User + system CPU time of a process.
pub fn proc_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may contain spaces, so split after the ')').
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the ')'.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    // Linux reports CPU times in USER_HZ, 100 on every mainstream architecture.
    100.0
}

/// A temporary directory the `postgres` user can enter when we run as root.
pub fn open_tempdir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
    Ok(dir)
}

/// Waits for `/healthz` to answer.
pub async fn wait_healthy(
    http: &reqwest::Client,
    api: SocketAddr,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let ok = http
            .get(format!("https://localhost:{}/healthz", api.port()))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the control plane did not become healthy within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An HTTPS client trusting the control plane's CA, once the CA file exists, that says it
/// comes from the plane's own origin (as the plane's own pages would: cookie requests from
/// anywhere else are refused).
pub async fn client_for(data_dir: &Path, origin: &str) -> anyhow::Result<reqwest::Client> {
    let ca = data_dir.join("ca.pem");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ca.exists() {
        if Instant::now() > deadline {
            bail!("{} never appeared", ca.display());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let pem = std::fs::read_to_string(&ca)?;
    let tls = sensei_certs::tls::client_config_trusting(&pem)?;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::ORIGIN, origin.parse()?);
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .default_headers(headers)
        .build()?)
}
