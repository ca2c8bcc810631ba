//! The `sensei-agent` command line. Exit codes: 0 done, 1 failed, 2 usage, 3 revoked (the
//! service manager must not restart the agent).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sensei_certs::Fingerprint;
use uuid::Uuid;

use crate::enroll::{enroll, EnrollOptions};
use crate::identity::{StateDir, DEFAULT_STATE_DIR};
use crate::session::{run, RunOutcome};

/// Exit code of a revoked agent.
pub const EXIT_REVOKED: i32 = 3;

#[derive(Parser)]
#[command(name = "sensei-agent", version, about = "The Sensei agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Enroll this server: make a key pair here and obtain a certificate from the control plane.
    Enroll {
        /// The control plane's agent gateway, HOST:PORT.
        #[arg(long)]
        control_plane: String,
        /// The enrollment token from `POST /v1/servers`.
        #[arg(long, env = "SENSEI_ENROLLMENT_TOKEN", hide_env_values = true)]
        token: String,
        /// The control plane's CA fingerprint, `SHA256:…`, from the API or its start-up log.
        #[arg(long)]
        ca_fingerprint: Fingerprint,
        /// The server id the token was issued for (refuses a token meant for another server).
        #[arg(long)]
        server_id: Option<Uuid>,
        #[arg(long, env = "SENSEI_AGENT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Connect to the control plane and wait for work.
    Run {
        #[arg(long, env = "SENSEI_AGENT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Only deploy below this directory (repeatable). Without it, anywhere the agent's
        /// user can write.
        #[arg(
            long = "allow-deploy-root",
            env = "SENSEI_AGENT_DEPLOY_ROOTS",
            value_delimiter = ','
        )]
        allow_deploy_roots: Vec<PathBuf>,
    },
    /// Delete this server's agent identity: the agent can no longer connect.
    Revoke {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[arg(long, env = "SENSEI_AGENT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SENSEI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Runs a command; returns the exit code.
pub async fn execute(cli: Cli) -> i32 {
    match cli.command {
        Command::Enroll {
            control_plane,
            token,
            ca_fingerprint,
            server_id,
            state_dir,
        } => {
            let state_dir = StateDir::new(state_dir);
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
        } => {
            let policy = crate::jobs::JobPolicy {
                allowed_roots: allow_deploy_roots,
            };
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
        Command::Revoke { yes, state_dir } => revoke(&StateDir::new(state_dir), yes),
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
