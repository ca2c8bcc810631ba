//! The `sensei-agent` command line. Exit codes: 0 done, 1 failed, 2 usage, 3 revoked (the
//! service manager must not restart the agent).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sensei_certs::Fingerprint;
use uuid::Uuid;

use crate::config::{AgentConfig, DEFAULT_CONFIG};
use crate::enroll::{enroll, EnrollOptions};
use crate::identity::{StateDir, DEFAULT_STATE_DIR};
use crate::session::{run, RunOutcome};

/// Exit code of a revoked agent.
pub const EXIT_REVOKED: i32 = 3;

#[derive(Parser)]
#[command(name = "sensei-agent", version, about = "The Sensei agent")]
pub struct Cli {
    /// The configuration file; flags override it.
    #[arg(long, env = "SENSEI_AGENT_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Log format on standard error: text or json (one JSON object a line, for a log
    /// pipeline).
    #[arg(long, env = "SENSEI_LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: sensei_shared::logging::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Enroll this server: make a key pair here and obtain a certificate from the control plane.
    Enroll {
        /// The control plane's agent gateway, HOST:PORT [default: from the config file].
        #[arg(long)]
        control_plane: Option<String>,
        /// The enrollment token from `POST /v1/servers`.
        #[arg(long, env = "SENSEI_ENROLLMENT_TOKEN", hide_env_values = true)]
        token: String,
        /// The control plane's CA fingerprint, `SHA256:…`, from the API or its start-up log
        /// [default: from the config file].
        #[arg(long)]
        ca_fingerprint: Option<Fingerprint>,
        /// The server id the token was issued for (refuses a token meant for another server).
        #[arg(long)]
        server_id: Option<Uuid>,
        /// Where the identity lives [default: the config file's, or /var/lib/sensei-agent].
        #[arg(long, env = "SENSEI_AGENT_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Connect to the control plane and wait for work.
    Run {
        /// Where the identity lives [default: the config file's, or /var/lib/sensei-agent].
        #[arg(long, env = "SENSEI_AGENT_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Only deploy below this directory (repeatable) [default: the config file's
        /// allowed_deploy_roots]. Without either, anywhere the agent's user can write.
        #[arg(
            long = "allow-deploy-root",
            env = "SENSEI_AGENT_DEPLOY_ROOTS",
            value_delimiter = ','
        )]
        allow_deploy_roots: Vec<PathBuf>,
        /// Run deploys and their hooks as this user [default: the config file's
        /// deploy_user]. It must not be able to read the agent's state directory.
        #[arg(long, env = "SENSEI_AGENT_DEPLOY_USER")]
        deploy_user: Option<String>,
        /// Run even as root (hooks then run as root unless a deploy user is set).
        #[arg(long)]
        allow_root: bool,
    },
    /// Show this server's identity (server id, certificate expiry, pinned CA), whether the
    /// running agent is connected, and the last job it ran with its result.
    Status {
        /// One JSON object, for scripts.
        #[arg(long)]
        json: bool,
        /// Where the identity lives [default: the config file's, or /var/lib/sensei-agent].
        #[arg(long, env = "SENSEI_AGENT_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Write the man pages into a directory (for packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Write a copy of an agent binary stamped with a package version (for packaging: the
    /// copy's `--version` and hello report the version's upstream part).
    #[command(hide = true)]
    StampVersion {
        /// The package version, e.g. 0.1.1-1.
        #[arg(long)]
        version: String,
        /// The binary to stamp.
        #[arg(long)]
        input: PathBuf,
        /// Where to write the stamped copy (may be the input).
        #[arg(long)]
        output: PathBuf,
    },
    /// Delete this server's agent identity: the agent can no longer connect.
    Revoke {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Where the identity lives [default: the config file's, or /var/lib/sensei-agent].
        #[arg(long, env = "SENSEI_AGENT_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
}

/// Runs a command; returns the exit code.
pub async fn execute(cli: Cli) -> i32 {
    if let Command::Man { dir } = &cli.command {
        return match write_man_pages(dir) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("sensei-agent: writing man pages to {}: {e}", dir.display());
                1
            }
        };
    }
    if let Command::StampVersion {
        version,
        input,
        output,
    } = &cli.command
    {
        return match crate::version::stamp_file(input, output, version) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("sensei-agent: stamp-version: {e}");
                1
            }
        };
    }
    let config = match &cli.config {
        Some(path) => AgentConfig::load(path, true),
        None => AgentConfig::load(std::path::Path::new(DEFAULT_CONFIG), false),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sensei-agent: {e}");
            return 2;
        }
    };
    let state_dir_of = |flag: Option<PathBuf>| {
        flag.or_else(|| config.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    };
    match cli.command {
        Command::Enroll {
            control_plane,
            token,
            ca_fingerprint,
            server_id,
            state_dir,
        } => {
            let Some(control_plane) = control_plane.or_else(|| config.control_plane.clone()) else {
                eprintln!(
                    "sensei-agent: give --control-plane, or control_plane in the config file"
                );
                return 2;
            };
            let ca_fingerprint = match (ca_fingerprint, &config.ca_fingerprint) {
                (Some(fp), _) => fp,
                (None, Some(text)) => match text.parse::<Fingerprint>() {
                    Ok(fp) => fp,
                    Err(e) => {
                        eprintln!("sensei-agent: ca_fingerprint in the config file: {e}");
                        return 2;
                    }
                },
                (None, None) => {
                    eprintln!(
                        "sensei-agent: give --ca-fingerprint, or ca_fingerprint in the config file"
                    );
                    return 2;
                }
            };
            let state_dir = StateDir::new(state_dir_of(state_dir));
            if let Ok(existing) = state_dir.load() {
                eprintln!(
                    "sensei-agent: replacing the identity of server {}",
                    existing.meta.server_id
                );
            }
            let options = EnrollOptions {
                control_plane,
                token,
                ca_fingerprint,
                expected_server_id: server_id,
                state_dir,
            };
            match enroll(&options).await {
                Ok(identity) => {
                    println!(
                        "enrolled as server {}; identity written to {}",
                        identity.meta.server_id,
                        options.state_dir.path().display()
                    );
                    0
                }
                Err(e) => {
                    eprintln!("sensei-agent: {e}");
                    1
                }
            }
        }
        Command::Run {
            state_dir,
            allow_deploy_roots,
            deploy_user,
            allow_root,
        } => {
            let allowed_roots = if allow_deploy_roots.is_empty() {
                config.allowed_deploy_roots.clone()
            } else {
                allow_deploy_roots
            };
            let deploy_user = match deploy_user.or_else(|| config.deploy_user.clone()) {
                None => None,
                Some(name) => match crate::policy::DeployUser::lookup(&name)
                    .and_then(|u| u.check_switchable().map(|()| u))
                {
                    Ok(user) => Some(user),
                    Err(e) => {
                        eprintln!("sensei-agent: {e}");
                        return 2;
                    }
                },
            };
            // SAFETY: geteuid cannot fail.
            #[allow(unsafe_code)]
            let root = unsafe { libc::geteuid() } == 0;
            if root && !allow_root {
                eprintln!(
                    "sensei-agent: refusing to run as root: deploy hooks would run with every \
                     privilege. Run it as its own user (the package's sensei-agent service), \
                     or pass --allow-root{}",
                    if deploy_user.is_none() {
                        " (and set deploy_user so that hooks do not run as root)"
                    } else {
                        ""
                    }
                );
                return 2;
            }
            if root {
                tracing::warn!(
                    deploy_user = deploy_user.as_ref().map(|u| u.name.as_str()),
                    "running as root (--allow-root); {}",
                    if deploy_user.is_some() {
                        "deploys run as the deploy user"
                    } else {
                        "deploys and hooks run as root"
                    }
                );
            }
            let policy = crate::jobs::JobPolicy {
                allowed_roots,
                allowed_repositories: config.allowed_repositories.clone(),
                deploy_user,
                upgrade_command: config.upgrade_command.clone(),
            };
            let state_dir = state_dir_of(state_dir);
            let (stop, stopped) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                wait_for_signal().await;
                let _ = stop.send(true);
            });
            match run(&StateDir::new(state_dir), policy, stopped).await {
                Ok(RunOutcome::Shutdown) => 0,
                Ok(RunOutcome::Revoked) => {
                    eprintln!(
                        "sensei-agent: this agent's certificate was revoked; not reconnecting"
                    );
                    EXIT_REVOKED
                }
                Err(e) => {
                    eprintln!("sensei-agent: {e}");
                    1
                }
            }
        }
        Command::Revoke { yes, state_dir } => revoke(&StateDir::new(state_dir_of(state_dir)), yes),
        Command::Status { json, state_dir } => {
            status(&StateDir::new(state_dir_of(state_dir)), json)
        }
        Command::Man { .. } | Command::StampVersion { .. } => 0,
    }
}

/// Exit codes: 0 connected, 1 not connected (or not running), 2 no identity here.
fn status(state_dir: &StateDir, json: bool) -> i32 {
    let report = match crate::status::report(state_dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sensei-agent: {e}");
            return 2;
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("sensei-agent: {e}");
                return 1;
            }
        }
    } else {
        print!("{}", crate::status::render(&report));
    }
    if report.connected {
        0
    } else {
        1
    }
}

fn revoke(state_dir: &StateDir, yes: bool) -> i32 {
    let who = match state_dir.load() {
        Ok(identity) => format!("server {}", identity.meta.server_id),
        Err(_) if state_dir.has_identity() => "a damaged identity".into(),
        Err(_) => {
            eprintln!(
                "sensei-agent: no agent identity in {}; nothing to revoke",
                state_dir.path().display()
            );
            return 1;
        }
    };
    if !yes {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            eprintln!(
                "sensei-agent: refusing to delete the identity without confirmation; pass --yes"
            );
            return 2;
        }
        print!(
            "Delete the agent identity of {who} in {}? The agent will no longer be able to \
             connect. [y/N] ",
            state_dir.path().display()
        );
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        let _ = stdin.lock().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("sensei-agent: kept the identity");
            return 1;
        }
    }
    match state_dir.delete() {
        Ok(_) => {
            println!(
                "deleted the agent identity of {who}; also revoke it on the control plane \
                 (DELETE /v1/servers/{{id}}/agent-certificate) so that it shows as revoked there"
            );
            0
        }
        Err(e) => {
            eprintln!("sensei-agent: {e}");
            1
        }
    }
}

async fn wait_for_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// One page for `sensei-agent` and one per subcommand, generated from these definitions.
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
}
