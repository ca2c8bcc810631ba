//! The real fleet (SENSEI_BENCH_FLEET=N): see the benchmark's header.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sensei_e2e::peers::{self, quantile, CpuGroup, Inventory, Peer, PeerKey};
use sensei_e2e::{
    eventually, git_repo, give_to_deploy_user, open_tempdir, workspace_binary, SshServer,
    TestPlane, DEPLOY_USER,
};
use serde_json::json;

/// Where each tool deploys, below the mount point every server sees its own disk at.
const SENSEI_DIR: &str = "sensei";

/// What one deploy of the whole fleet by one tool cost.
#[derive(Clone, Copy, Default)]
struct Cost {
    /// Start to every target switched and the deploy recorded as done.
    wall: Duration,
    /// The deploying side: the control plane's process (with this benchmark driving it), or
    /// the peer and everything it started.
    control_cpu: Option<Duration>,
    /// PostgreSQL's, for Sensei.
    postgres_cpu: Option<Duration>,
    /// The servers' side: the agents and their deploys, or the sshd and their sessions.
    target_cpu: Duration,
}

#[derive(Clone, Copy, PartialEq)]
enum Tool {
    Agents,
    SshRunner,
    Peer(Peer),
}

impl Tool {
    fn label(self, n: usize) -> String {
        match self {
            Tool::Agents => format!("Sensei rollout, {n} agents"),
            Tool::SshRunner => format!("Sensei rollout, SSH runner, {n} sshd"),
            Tool::Peer(Peer::Ansible) => format!("Ansible -f {n}, {n} sshd"),
            Tool::Peer(Peer::Capistrano) => format!("Capistrano, {n} sshd"),
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Tool::Agents | Tool::SshRunner => SENSEI_DIR,
            Tool::Peer(Peer::Ansible) => "ansible",
            Tool::Peer(Peer::Capistrano) => "capistrano",
        }
    }
}

/// An agent process: the release binary in a mount namespace of its own.
struct AgentProcess {
    child: tokio::process::Child,
    disk: PathBuf,
}

pub async fn run(n: usize, rounds: usize) {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("fleet@example.com", "correct horse battery").await;
    let dir = open_tempdir();
    let root = dir.path();
    std::fs::create_dir_all(root.join("r")).expect("dir");
    let repo = git_repo(&root.join("r"), &["v1"]);
    give_to_deploy_user(&root.join("r"));
    // Every server sees its own disk at `srv` (a bind mount in its mount namespace): the
    // same deploy path everywhere, as on a fleet of machines.
    let srv = root.join("srv");
    std::fs::create_dir_all(&srv).expect("mount point");
    let disks = root.join("disks");
    // The agents' identities: root's only (the deploy user must not read them).
    let states = root.join("agents");
    std::fs::create_dir_all(&states).expect("states");
    std::fs::set_permissions(&states, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let new_disk = |name: String| {
        let d = disks.join(name);
        std::fs::create_dir_all(&d).expect("disk");
        give_to_deploy_user(&d);
        d
    };

    let started = Instant::now();
    let agent_bin = workspace_binary("sensei-agent");
    let mut agents = Vec::new();
    let mut agent_ids = Vec::new();
    for i in 0..n {
        let (status, server) = t
            .post(
                "/v1/servers",
                &cookie,
                json!({"name": format!("agent-{i}"), "host": format!("agent-{i}.example"),
                       "transport": "agent", "labels": {"fleet": "agents"}}),
            )
            .await;
        assert_eq!(status, 201, "{server}");
        agent_ids.push(
            server["id"]
                .as_str()
                .expect("id")
                .parse::<uuid::Uuid>()
                .expect("uuid"),
        );
        // The command the API gives, as an operator runs it.
        let words: Vec<&str> = server["enroll_command"]
            .as_str()
            .expect("enroll command")
            .split_whitespace()
            .skip(1)
            .collect();
        let state = states.join(i.to_string());
        let enrolled = tokio::process::Command::new(&agent_bin)
            .args(&words)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .await
            .expect("sensei-agent enroll");
        assert!(enrolled.status.success(), "{enrolled:?}");
        let disk = new_disk(format!("agent-{i}"));
        let log = std::fs::File::create(states.join(format!("{i}.log"))).expect("log");
        let child = tokio::process::Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount --bind \"$0\" \"$1\" && exec \"$2\" --log-format json run --allow-root \
                 --deploy-user \"$3\" --state-dir \"$4\"",
            ])
            .arg(&disk)
            .arg(&srv)
            .arg(&agent_bin)
            .arg(DEPLOY_USER)
            .arg(&state)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("sensei-agent run");
        agents.push(AgentProcess { child, disk });
    }
    for (i, id) in agent_ids.iter().enumerate() {
        assert!(
            eventually(Duration::from_secs(60), || t.agent_connected(&cookie, *id)).await,
            "agent {i} never connected:\n{}",
            std::fs::read_to_string(states.join(format!("{i}.log"))).unwrap_or_default()
        );
    }

    let key = PeerKey::generate(root);
    let mut sshds = Vec::new();
    let mut hosts = Vec::new();
    for i in 0..n {
        let disk = new_disk(format!("ssh-{i}"));
        let sshd = SshServer::start_seeing(&disk, &srv);
        let (status, server) = t
            .post(
                "/v1/servers",
                &cookie,
                json!({"name": format!("ssh-{i}"), "host": "127.0.0.1", "port": sshd.port,
                       "username": DEPLOY_USER, "transport": "ssh", "auth": "key",
                       "host_key": sshd.host_key_public, "labels": {"fleet": "ssh"}}),
            )
            .await;
        assert_eq!(status, 201, "{server}");
        // Sensei's key for this server and the peers' key: the same user, the same sshd.
        sshd.set_authorized_keys(&format!(
            "{}\n{}\n",
            server["public_key"].as_str().expect("key"),
            key.public
        ));
        hosts.push((sshd.port, sshd.host_key_public.clone()));
        sshds.push((sshd, disk));
    }
    println!(
        "fleet of {n} agents and {n} sshd up in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "fleet", "repo_url": repo.display().to_string(),
                   "deploy_path": srv.join(SENSEI_DIR).display().to_string()}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let project = project["id"].as_str().expect("id").to_owned();

    let mut tools = vec![Tool::Agents, Tool::SshRunner];
    let mut peer_setup = Vec::new();
    if peers::installed() {
        for peer in Peer::ALL {
            let inventory = Inventory::write(
                &root.join(peer.name()),
                &key,
                &repo,
                &srv.join(Tool::Peer(peer).dir()),
                &hosts,
            );
            peer_setup.push((peer, inventory, CpuGroup::create()));
            tools.push(Tool::Peer(peer));
        }
    }

    let agent_disks: Vec<PathBuf> = agents.iter().map(|a| a.disk.clone()).collect();
    let agent_pids: Vec<u32> = agents.iter().filter_map(|a| a.child.id()).collect();
    let ssh_disks: Vec<PathBuf> = sshds.iter().map(|(_, d)| d.clone()).collect();
    let ssh_pids: Vec<u32> = sshds.iter().map(|(s, _)| s.pid()).collect();
    let db = t.db().await;
    let mut costs: Vec<Vec<Cost>> = vec![Vec::new(); tools.len()];
    let (mut job_times, mut completion_times, mut marked) = (Vec::new(), Vec::new(), Vec::new());
    // Round 0 is the warm-up (first clone, first login), not counted.
    for round in 0..=rounds {
        for (k, &tool) in tools.iter().enumerate() {
            let (disks, pids) = match tool {
                Tool::Agents => (&agent_disks, &agent_pids),
                _ => (&ssh_disks, &ssh_pids),
            };
            let before = currents(disks, tool.dir());
            let target_before = peers::trees_cpu(pids.iter().copied());
            let mut cost = match tool {
                Tool::Agents | Tool::SshRunner => {
                    let fleet = if tool == Tool::Agents {
                        "agents"
                    } else {
                        "ssh"
                    };
                    let r = rollout(&t, &db, &cookie, &project, fleet, n).await;
                    if tool == Tool::Agents && round > 0 {
                        job_times.extend(r.job_times);
                        completion_times.extend(r.completion_times);
                    }
                    if round > 0 {
                        marked.push((tool, r.marked_succeeded));
                    }
                    r.cost
                }
                Tool::Peer(peer) => {
                    let (_, inventory, cpu) = peer_setup
                        .iter()
                        .find(|(p, _, _)| *p == peer)
                        .expect("set up");
                    let run = peer.deploy(inventory, n, cpu.as_ref(), None).await;
                    Cost {
                        wall: run.wall,
                        control_cpu: run.cpu,
                        ..Cost::default()
                    }
                }
            };
            cost.target_cpu = peers::trees_cpu(pids.iter().copied()).saturating_sub(target_before);
            check_switched(tool, disks, &before);
            if round > 0 {
                costs[k].push(cost);
            }
            println!(
                "  round {round}{}: {:<40} {:>7.2} s",
                if round == 0 { " (warm-up)" } else { "" },
                tool.label(n),
                cost.wall.as_secs_f64()
            );
        }
    }

    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let median = |v: Vec<Duration>| quantile(&v, 0.5);
    println!(
        "\nfan-out to {n} servers, all at once, one real git repository, median of {rounds} rounds \
         (after a warm-up round; every target's `current` checked switched):"
    );
    println!(
        "  {:<40} {:>9} {:>13} {:>12} {:>11}",
        "", "wall", "control CPU", "PostgreSQL", "target CPU"
    );
    for (tool, c) in tools.iter().zip(&costs) {
        let opt = |f: fn(&Cost) -> Option<Duration>| {
            let v: Vec<Duration> = c.iter().filter_map(f).collect();
            if v.is_empty() {
                "-".to_owned()
            } else {
                secs(median(v))
            }
        };
        println!(
            "  {:<40} {:>9} {:>13} {:>12} {:>11}",
            tool.label(n),
            secs(median(c.iter().map(|c| c.wall).collect())),
            opt(|c| c.control_cpu),
            opt(|c| c.postgres_cpu),
            secs(median(c.iter().map(|c| c.target_cpu).collect()))
        );
    }
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    println!(
        "  Sensei agents, per target over {} deploys: job (started -> finished) p50 {} p99 {}; \
         rollout created -> target finished p50 {} p99 {}",
        job_times.len(),
        ms(quantile(&job_times, 0.5)),
        ms(quantile(&job_times, 0.99)),
        ms(quantile(&completion_times, 0.5)),
        ms(quantile(&completion_times, 0.99))
    );
    for tool in [Tool::Agents, Tool::SshRunner] {
        let v: Vec<Duration> = marked
            .iter()
            .filter(|(t, _)| *t == tool)
            .map(|(_, d)| *d)
            .collect();
        println!(
            "  {}: POST -> the rollout marked succeeded, median {}",
            tool.label(n),
            secs(median(v))
        );
    }
    println!(
        "  control CPU: Sensei's is this process (the control plane in-process, and this \
         benchmark polling PostgreSQL every 20 ms); a peer's is its cgroup (it and everything it \
         started). Target CPU: the agents and their deploys, or the sshd and their sessions."
    );
    drop(agents);
    drop(sshds);
    t.plane.shutdown().await;
}

struct Rollout {
    cost: Cost,
    marked_succeeded: Duration,
    job_times: Vec<Duration>,
    completion_times: Vec<Duration>,
}

/// One rollout of `main` to the servers labelled `fleet=<fleet>`, all at once; returns when
/// the rollout is marked succeeded (fails at the first failed target).
async fn rollout(
    t: &TestPlane,
    db: &tokio_postgres::Client,
    cookie: &str,
    project: &str,
    fleet: &str,
    n: usize,
) -> Rollout {
    let postgres = peers::postgres_pid();
    let (cpu_before, pg_before) = (peers::own_cpu(), postgres.map(peers::tree_cpu));
    let started = Instant::now();
    let (status, rollout) = t
        .post(
            "/v1/rollouts",
            cookie,
            json!({"project_id": project, "ref": "main", "selector": {"labels": {"fleet": fleet}},
                   "strategy": {"canary": 0, "batch_percent": 100}}),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id: uuid::Uuid = rollout["id"].as_str().expect("id").parse().expect("uuid");
    let mut all_succeeded = None;
    let marked_succeeded = loop {
        let row = db
            .query_one(
                "SELECT r.state, \
                        count(*) FILTER (WHERE d.status = 'succeeded'), \
                        count(*) FILTER (WHERE d.status = 'failed' OR rt.status IN ('failed', 'unreachable', 'skipped')) \
                 FROM rollouts r JOIN rollout_targets rt ON rt.rollout_id = r.id \
                 LEFT JOIN deployments d ON d.id = rt.deployment_id \
                 WHERE r.id = $1 GROUP BY r.state",
                &[&id],
            )
            .await
            .expect("rollout progress");
        let (state, succeeded, failed): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if failed > 0 || !["running", "succeeded"].contains(&state.as_str()) {
            let (_, body) = t.get(&format!("/v1/rollouts/{id}"), cookie).await;
            panic!("the rollout to {fleet} failed ({state}, {failed} failed): {body}");
        }
        if succeeded as usize == n && all_succeeded.is_none() {
            all_succeeded = Some(started.elapsed());
        }
        if state == "succeeded" {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the rollout to {fleet} hangs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cost = Cost {
        wall: all_succeeded.expect("every target succeeded"),
        control_cpu: Some(peers::own_cpu().saturating_sub(cpu_before)),
        postgres_cpu: postgres
            .map(peers::tree_cpu)
            .zip(pg_before)
            .map(|(after, before)| after.saturating_sub(before)),
        target_cpu: Duration::ZERO,
    };
    let rows = db
        .query(
            "SELECT extract(epoch FROM d.finished_at - d.started_at)::float8, \
                    extract(epoch FROM d.finished_at - r.created_at)::float8 \
             FROM rollout_targets rt JOIN deployments d ON d.id = rt.deployment_id \
             JOIN rollouts r ON r.id = rt.rollout_id WHERE rt.rollout_id = $1",
            &[&id],
        )
        .await
        .expect("job times");
    let secs = |v: f64| Duration::from_secs_f64(v.max(0.0));
    Rollout {
        cost,
        marked_succeeded,
        job_times: rows.iter().map(|r| secs(r.get(0))).collect(),
        completion_times: rows.iter().map(|r| secs(r.get(1))).collect(),
    }
}

/// Each disk's `<dir>/current`, as it points now.
fn currents(disks: &[PathBuf], dir: &str) -> Vec<Option<PathBuf>> {
    disks
        .iter()
        .map(|d| std::fs::read_link(d.join(dir).join("current")).ok())
        .collect()
}

/// Every target's `current` moved to a new release that holds the repository's content.
fn check_switched(tool: Tool, disks: &[PathBuf], before: &[Option<PathBuf>]) {
    for ((disk, was), now) in disks.iter().zip(before).zip(currents(disks, tool.dir())) {
        let now = now.unwrap_or_else(|| panic!("no current on {}", disk.display()));
        assert!(
            Some(&now) != was.as_ref(),
            "{}: current did not switch on {}",
            tool.label(disks.len()),
            disk.display()
        );
        let release = release_on(disk, tool.dir(), &now);
        assert_eq!(
            std::fs::read_to_string(release.join("index.html"))
                .ok()
                .as_deref(),
            Some("v1"),
            "{}: {} on {}",
            tool.label(disks.len()),
            now.display(),
            disk.display()
        );
    }
}

/// The release a `current` link names, on that server's disk (the link is relative for
/// Sensei, absolute below the mount point for the peers).
fn release_on(disk: &Path, dir: &str, link: &Path) -> PathBuf {
    disk.join(dir)
        .join("releases")
        .join(link.file_name().expect("release name"))
}
