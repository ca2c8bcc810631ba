//! The tools users would pick instead of Sensei, for the side-by-side benchmarks: Capistrano
//! and Ansible, run from their Debian packages with the configuration committed in
//! `loadgen/peers/` and an inventory written here (hosts, ports, key, known hosts). Also the
//! CPU accounting those benchmarks report: a process's own CPU, a process tree's, and a
//! cgroup's for a peer (whose OpenSSH connection masters leave its process tree).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

/// The peers, in the order the benchmarks run them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Capistrano,
    Ansible,
}

impl Peer {
    pub const ALL: [Peer; 2] = [Peer::Capistrano, Peer::Ansible];

    pub fn name(self) -> &'static str {
        match self {
            Peer::Capistrano => "Capistrano",
            Peer::Ansible => "Ansible",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Peer::Capistrano => "cap",
            Peer::Ansible => "ansible-playbook",
        }
    }

    /// Where its committed configuration lives.
    pub fn config_dir(self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../loadgen/peers")
            .join(match self {
                Peer::Capistrano => "capistrano",
                Peer::Ansible => "ansible",
            })
    }

    /// Deploys to every host of `inventory` (Ansible with `forks` forks; Capistrano runs
    /// every host at once, its default), waiting for the tool to exit. With `watch`, also
    /// the time until that `current` link changed. Panics with the tool's output if it
    /// failed.
    pub async fn deploy(
        self,
        inventory: &Inventory,
        forks: usize,
        cpu: Option<&CpuGroup>,
        watch: Option<&Path>,
    ) -> PeerRun {
        let config = self.config_dir();
        let mut args: Vec<OsString> = Vec::new();
        match self {
            Peer::Capistrano => args.extend(["bench".into(), "deploy".into()]),
            Peer::Ansible => {
                args.push("-i".into());
                args.push(inventory.ini.clone().into());
                args.push("-f".into());
                args.push(forks.to_string().into());
                args.push(config.join("deploy.yml").into());
            }
        }
        let output = inventory.dir.join(format!("{}.out", self.program()));
        let out = std::fs::File::create(&output).expect("peer output file");
        let err = out.try_clone().expect("peer output file");
        // The tool starts inside the cgroup (the shell moves itself there, then execs it),
        // so everything it starts is counted, detached SSH masters included.
        let mut command = match cpu {
            Some(group) => {
                let mut c = tokio::process::Command::new("sh");
                c.args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
                    .arg(group.procs_file())
                    .arg(self.program());
                c
            }
            None => tokio::process::Command::new(self.program()),
        };
        command
            .args(&args)
            .current_dir(&config)
            .env("SENSEI_PEER_INVENTORY", &inventory.json)
            .env("ANSIBLE_CONFIG", config.join("ansible.cfg"))
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let before = watch.map(|link| std::fs::read_link(link).ok());
        let cpu_before = cpu.map(CpuGroup::usage);
        let started = Instant::now();
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!("{} ({}): {e}", self.program(), self.name());
        });
        let mut switched = None;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the peer") {
                break status;
            }
            if let (Some(link), Some(before), None) = (watch, &before, switched) {
                let now = std::fs::read_link(link).ok();
                if now.is_some() && &now != before {
                    switched = Some(started.elapsed());
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "{} ran for 10 minutes",
                self.name()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let wall = started.elapsed();
        let cpu = cpu
            .zip(cpu_before)
            .map(|(g, b)| g.usage().saturating_sub(b));
        assert!(
            status.success(),
            "{} failed ({status}):\n{}",
            self.name(),
            std::fs::read_to_string(&output).unwrap_or_default()
        );
        PeerRun {
            wall,
            switched,
            cpu,
        }
    }
}

/// One run of a peer.
pub struct PeerRun {
    /// From start to exit.
    pub wall: Duration,
    /// From start to the watched `current` link changing (when one was watched and it did).
    pub switched: Option<Duration>,
    /// The CPU the tool and everything it started used (when a cgroup counted it).
    pub cpu: Option<Duration>,
}

/// Whether both peers can run; when not, says so on standard output (the benchmarks then
/// measure Sensei alone).
pub fn installed() -> bool {
    let missing = missing();
    if !missing.is_empty() {
        println!(
            "Capistrano and Ansible skipped: {} not installed (apt-get install capistrano \
             ansible; see loadgen/peers/README.md)",
            missing.join(", ")
        );
    }
    missing.is_empty()
}

/// The peer programs that are not on `PATH`.
fn missing() -> Vec<&'static str> {
    Peer::ALL
        .iter()
        .map(|p| p.program())
        .filter(|program| {
            !std::process::Command::new("sh")
                .args(["-c", "command -v \"$0\" >/dev/null", *program])
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect()
}

/// The key the peers log in with (the deploy user's authorized_keys line is `public`).
pub struct PeerKey {
    pub private: PathBuf,
    pub public: String,
}

impl PeerKey {
    pub fn generate(dir: &Path) -> Self {
        let private = dir.join("peer_ed25519");
        let out = std::process::Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "sensei-bench-peer",
                "-f",
            ])
            .arg(&private)
            .output()
            .expect("ssh-keygen");
        assert!(out.status.success(), "{out:?}");
        let public = std::fs::read_to_string(dir.join("peer_ed25519.pub"))
            .expect("public key")
            .trim()
            .to_owned();
        Self { private, public }
    }
}

/// An inventory both peers read: `inventory.json` (Capistrano's stage) and `inventory.ini`
/// (Ansible), with a known_hosts file holding each sshd's host key.
pub struct Inventory {
    pub dir: PathBuf,
    pub json: PathBuf,
    pub ini: PathBuf,
}

impl Inventory {
    /// Writes into `dir` (created): every host is `127.0.0.1:<port>` with the host key
    /// given, logged into as [`crate::DEPLOY_USER`] with `key`, deploying `repo` to
    /// `deploy_to`.
    pub fn write(
        dir: &Path,
        key: &PeerKey,
        repo: &Path,
        deploy_to: &Path,
        hosts: &[(u16, String)],
    ) -> Self {
        std::fs::create_dir_all(dir).expect("inventory dir");
        let known_hosts = dir.join("known_hosts");
        let lines: String = hosts
            .iter()
            .map(|(port, host_key)| format!("[127.0.0.1]:{port} {host_key}\n"))
            .collect();
        std::fs::write(&known_hosts, lines).expect("known_hosts");
        let json_path = dir.join("inventory.json");
        let inventory = json!({
            "repo_url": repo, "deploy_to": deploy_to, "user": crate::DEPLOY_USER,
            "key": key.private, "known_hosts": known_hosts,
            "hosts": hosts.iter().map(|(port, _)| json!({"host": "127.0.0.1", "port": port})).collect::<Vec<_>>(),
        });
        std::fs::write(&json_path, inventory.to_string()).expect("inventory.json");
        let ini_path = dir.join("inventory.ini");
        let mut ini: String = hosts
            .iter()
            .enumerate()
            .map(|(i, (port, _))| format!("h{i} ansible_host=127.0.0.1 ansible_port={port}\n"))
            .collect();
        ini.push_str(&format!(
            "[all:vars]\nansible_user={}\nansible_ssh_private_key_file={}\n\
             ansible_ssh_common_args='-o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null'\n\
             deploy_to={}\nrepo_url={}\n",
            crate::DEPLOY_USER,
            key.private.display(),
            known_hosts.display(),
            deploy_to.display(),
            repo.display()
        ));
        std::fs::write(&ini_path, ini).expect("inventory.ini");
        Self {
            dir: dir.to_owned(),
            json: json_path,
            ini: ini_path,
        }
    }
}

/// A cgroup counting the CPU of the processes put in it (cgroup v1 `cpuacct`, or v2).
pub struct CpuGroup {
    dir: PathBuf,
    parent_procs: PathBuf,
    v2: bool,
}

impl CpuGroup {
    /// A new cgroup, or nothing where this machine has none we may create.
    pub fn create() -> Option<Self> {
        let name = format!("sensei-bench-{}", uuid::Uuid::new_v4().simple());
        let (root, v2) = if Path::new("/sys/fs/cgroup/cpuacct/cpuacct.usage").exists() {
            (PathBuf::from("/sys/fs/cgroup/cpuacct"), false)
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (PathBuf::from("/sys/fs/cgroup"), true)
        } else {
            return None;
        };
        let dir = root.join(name);
        std::fs::create_dir(&dir).ok()?;
        Some(Self {
            dir,
            parent_procs: root.join("cgroup.procs"),
            v2,
        })
    }

    fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// CPU used by everything that ran in it so far.
    pub fn usage(&self) -> Duration {
        if self.v2 {
            let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
            let usec = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            Duration::from_micros(usec)
        } else {
            let ns = std::fs::read_to_string(self.dir.join("cpuacct.usage"))
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            Duration::from_nanos(ns)
        }
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        // What is still in it (an SSH master waiting out its ControlPersist) goes back to the
        // root group, so that the directory can be removed; it ends on its own.
        let left = std::fs::read_to_string(self.procs_file()).unwrap_or_default();
        for pid in left.lines() {
            let _ = std::fs::write(&self.parent_procs, pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A process's stat fields after its name: `[0]` is the state, `[1]` the parent pid,
/// `[11..15]` utime, stime, cutime, cstime (in clock ticks).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

fn ticks(n: u64) -> Duration {
    // SAFETY: sysconf only reads a constant of the system.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(n * 1_000_000_000 / hz)
}

/// CPU used by this process's own threads (not its children): the in-process control plane
/// and the benchmark driving it.
pub fn own_cpu() -> Duration {
    let f = stat_fields(std::process::id()).unwrap_or_default();
    ticks(f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0))
}

/// CPU used by `pid`, its children that ended (and were waited for), and its live
/// descendants: a PostgreSQL postmaster with its backends, an sshd with its sessions, an
/// agent with its deploys.
pub fn tree_cpu(pid: u32) -> Duration {
    let mut children: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some(parent) = stat_fields(p).and_then(|f| f.get(1).copied()) {
                children.entry(parent as u32).or_default().push(p);
            }
        }
    }
    let mut total = 0;
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if let Some(f) = stat_fields(p) {
            total += f.get(11..15).map(|t| t.iter().sum::<u64>()).unwrap_or(0);
        }
        todo.extend(children.get(&p).into_iter().flatten());
    }
    ticks(total)
}

/// The sum of [`tree_cpu`] over `pids`.
pub fn trees_cpu(pids: impl IntoIterator<Item = u32>) -> Duration {
    pids.into_iter().map(tree_cpu).sum()
}

/// The test PostgreSQL cluster's postmaster, for [`tree_cpu`].
pub fn postgres_pid() -> Option<u32> {
    let root = crate::cluster().root();
    std::fs::read_to_string(root.join("pgdata/postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
}

/// The `q`-quantile (0..=1) of `values`, nearest rank.
pub fn quantile(values: &[Duration], q: f64) -> Duration {
    let mut v = values.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}
