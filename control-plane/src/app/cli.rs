//! The `sensei-control-plane` command line: flags, environment, and what each command does.
//! Every bad value stops the program with a message naming the flag or variable at fault.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
pub use sensei_shared::logging::LogFormat;

use crate::app::server::{open_database, ControlPlane, DatabaseSource, ServeOptions};
use crate::identity::signup::SignupPolicy;
use crate::secrets::field_crypto::FieldKeys;
use crate::secrets::key_provider::{Hsm, KeyProvider};

/// Default API address.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:8443";
/// Default agent gateway address (UDP).
pub const DEFAULT_AGENT_ADDR: &str = "127.0.0.1:7443";

#[derive(Parser)]
#[command(
    name = "sensei-control-plane",
    version,
    about = "The Sensei control plane"
)]
pub struct Cli {
    /// Where the control plane keeps its files (and the embedded database when DATABASE_URL
    /// is unset). Default: /var/lib/sensei as root, ~/.local/share/sensei otherwise; the
    /// quickstart uses sensei-quickstart in the same places, so that trying it never touches
    /// the directory of the packaged control plane.
    #[arg(long, env = "SENSEI_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Log format on standard error: text or json (one JSON object a line).
    #[arg(long, env = "SENSEI_LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Clone)]
pub struct ServeArgs {
    /// Address of the HTTPS API [default: 127.0.0.1:8443].
    #[arg(long, env = "SENSEI_API_ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// Host names and addresses the API certificate is issued for.
    #[arg(
        long = "api-name",
        env = "SENSEI_API_NAMES",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1,::1"
    )]
    pub api_names: Vec<String>,
    /// UDP address of the agent gateway (QUIC) [default: 127.0.0.1:7443].
    #[arg(long, env = "SENSEI_AGENT_ADDR")]
    pub agent_addr: Option<SocketAddr>,
    /// The `HOST:PORT` agents are told to connect to, when it differs from --agent-addr
    /// (a load balancer, a public name). Must be one of the --api-name names.
    #[arg(long, env = "SENSEI_AGENT_ENDPOINT")]
    pub agent_endpoint: Option<String>,
    /// Seconds between agent heartbeats.
    #[arg(long, env = "SENSEI_AGENT_HEARTBEAT_SECS", default_value_t = sensei_shared::protocol::DEFAULT_HEARTBEAT_SECS.into(),
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub agent_heartbeat_secs: u64,
    /// Seconds an agent connection may stay silent before both sides end it: how long the
    /// agents of a crashed replica take to notice and move to another, and how long a network
    /// outage a connection survives. Must exceed the heartbeat by 15 s.
    #[arg(long, env = "SENSEI_AGENT_IDLE_TIMEOUT_SECS",
          default_value_t = sensei_shared::protocol::AGENT_IDLE_TIMEOUT_SECS.into(),
          value_parser = clap::value_parser!(u64)
              .range(16..=u64::from(sensei_shared::protocol::AGENT_IDLE_TIMEOUT_SECS)))]
    pub agent_idle_timeout_secs: u64,
    /// New agent handshakes admitted per second; past it a new connection's first packet
    /// goes unanswered and the agent sends it again about a second later [default: measured
    /// at start from the cost of a handshake on this machine, with 50 % headroom].
    #[arg(long, env = "SENSEI_AGENT_HANDSHAKE_RATE",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub agent_handshake_rate: Option<u32>,
    /// Days the agent certificates issued are valid; agents renew them at about two thirds
    /// of that, over their connection.
    #[arg(long, env = "SENSEI_AGENT_CERT_DAYS", default_value_t = crate::app::server::AGENT_CERT_DAYS,
          value_parser = clap::value_parser!(u64).range(1..=825))]
    pub agent_cert_days: u64,
    /// Seconds a queued deployment waits for its server's agent before failing as offline.
    #[arg(long, env = "SENSEI_DISPATCH_TIMEOUT_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub dispatch_timeout_secs: u64,
    /// Largest number of database connections.
    #[arg(long, env = "SENSEI_DB_POOL_SIZE", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub db_pool_size: u16,
    /// SMTP server for password-reset and invitation emails: `smtp://host:25`,
    /// `smtp://user:pass@host:587?tls=required` or `smtps://host:465`. Never logged.
    #[arg(long, env = "SENSEI_SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// The From address of those emails.
    #[arg(long, env = "SENSEI_SMTP_FROM")]
    pub smtp_from: Option<String>,
    /// The API's URL as users reach it, for links in emails [default: https://<api addr>].
    #[arg(long, env = "SENSEI_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Load balancers in front of the API (CIDRs, comma-separated): only from these peers are
    /// `X-Forwarded-For` (the client's address, for throttles and API-key
    /// allowlists) and `x-request-id` believed.
    #[arg(long, env = "SENSEI_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Password hashes run at once (each takes 19 MiB and a core) [default: one per core,
    /// fewer if a quarter of the available memory would not hold them].
    #[arg(long, env = "SENSEI_MAX_CONCURRENT_HASHES",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_concurrent_hashes: Option<u16>,
    /// Serve /metrics on this address (HTTPS, the API's certificate) instead of the API's.
    #[arg(long, env = "SENSEI_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Require `Authorization: Bearer <token>` on /metrics. Never logged.
    #[arg(long, env = "SENSEI_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// The longest an SSH deploy may run, whatever its hook timeouts add up to (seconds).
    #[arg(long, env = "SENSEI_SSH_JOB_TIMEOUT_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub ssh_job_timeout_secs: u64,
    /// Networks SSH targets may not resolve to (CIDRs, comma-separated), besides the control
    /// plane's own listening addresses [default: the cloud metadata addresses (link-local
    /// 169.254.0.0/16 and fe80::/10, fd00:ec2::254, 100.100.100.200) and "this host"
    /// (0.0.0.0/8, ::)].
    #[arg(long, env = "SENSEI_SSH_DENY_NETWORKS", value_delimiter = ',')]
    pub ssh_deny_networks: Vec<ipnet::IpNet>,
    /// Who may create an account through the API: `closed` (accounts come from
    /// `create-owner`), `invite-only` (with a signup invitation from `invite-signup`) or
    /// `open` (anyone, throttled per address). Members join accounts by invitation in every
    /// mode.
    #[arg(long, env = "SENSEI_SIGNUP", value_enum, default_value_t = SignupPolicy::Closed)]
    pub signup: SignupPolicy,
    /// Live-follow streams (deployment logs, rollout events, agents' presence) this replica
    /// holds open at most; each user may hold 8.
    #[arg(long, env = "SENSEI_MAX_LIVE_STREAMS", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_live_streams: u32,
}

#[derive(Subcommand)]
pub enum Command {
    /// Write the man pages into a directory (for packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Serve the API (needs CODESENSEI_FIELD_KEY).
    Serve(ServeArgs),
    /// Everything on one machine with nothing configured: embedded database, a development
    /// field key, the API. With --once: check it works end to end, then exit.
    Quickstart {
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Re-encrypt every encrypted field under the first key of CODESENSEI_FIELD_KEY.
    RotateFieldKey,
    /// The agents' CA: rotate it, see who has moved, retire the old one (docs/agent.md).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The job-signing key: rotate it, see which agents acknowledged the new one, retire the
    /// old one (docs/agent.md).
    JobKey {
        #[command(subcommand)]
        command: JobKeyCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print a new random field key for CODESENSEI_FIELD_KEY: plain, or wrapped by the HSM
    /// when SENSEI_FIELD_KEY_PROVIDER names one.
    GenerateFieldKey {
        /// A plain key even when an HSM is configured (for SENSEI_AUDIT_KEY).
        #[arg(long)]
        plain: bool,
    },
    /// Create the key that wraps the field keys inside the HSM named by
    /// SENSEI_FIELD_KEY_PROVIDER (AES-256, never extractable); does nothing if it exists.
    HsmCreateKey,
    /// Apply database migrations as the owner role (DATABASE_OWNER_URL) and grant the
    /// application role (the user of DATABASE_URL, or --app-role) what it needs.
    Migrate {
        /// The role the control plane serves as [default: the user of DATABASE_URL].
        #[arg(long)]
        app_role: Option<String>,
    },
    /// Create an account and its first owner (signup is closed by default). Prints a
    /// single-use token that sets the owner's password, valid 24 hours, or reads the password
    /// from standard input with --password-stdin. With the embedded database, run it before
    /// `serve` or while the service is stopped.
    CreateOwner {
        #[arg(long)]
        email: String,
        /// The account's name.
        #[arg(long)]
        account: String,
        /// Read the owner's password (one line) from standard input instead.
        #[arg(long)]
        password_stdin: bool,
        /// The API's URL as users reach it, for the printed instructions.
        #[arg(long, env = "SENSEI_PUBLIC_URL")]
        public_url: Option<String>,
    },
    /// Issue a single-use signup invitation (for `--signup invite-only`) and print it.
    InviteSignup {
        /// Hours it stays valid (at most 720).
        #[arg(long, default_value_t = 72, value_parser = clap::value_parser!(u64).range(1..=720))]
        valid_hours: u64,
        /// Who it is for, kept with it in the audit log.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Write a new Ed25519 key for signing audit exports to FILE (0600) and print its public
    /// half, which auditors pin.
    GenerateAuditSigningKey {
        #[arg(long)]
        out: PathBuf,
    },
    /// Upgrade the embedded database to the PostgreSQL major version installed now, with
    /// pg_upgrade (the control plane must be stopped; docs/operations.md).
    UpgradeEmbeddedDb {
        /// The binaries of the version the database was made with [default:
        /// /usr/lib/postgresql/<its version>/bin]. Naming them runs pg_upgrade even when the
        /// versions match.
        #[arg(long)]
        old_bindir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a new CA. Until `ca retire`, agent certificates from both are accepted, every
    /// certificate is issued by the new one, and connected agents pin it and renew under it.
    Rotate,
    /// The CAs, and the agents that have not moved to the current one yet.
    Status,
    /// Retire the previous CA: its key is destroyed and its certificates stop working (their
    /// servers must enroll again). Refused while a connected agent still holds only a
    /// certificate from it, unless --force.
    Retire {
        /// Retire even though connected agents have not moved: they are disconnected.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum JobKeyCommand {
    /// Create a new job-signing key. Connected agents are sent it endorsed by the current
    /// one and pin it; each server's jobs are signed by it once its agent acknowledged it, by
    /// the previous key until then (or until `job-key retire`).
    Rotate,
    /// The keys, and the agents that have not acknowledged the current one yet.
    Status,
    /// Retire the previous key: it is destroyed and every job is signed by the new one
    /// (agents that never acknowledged it refuse them and must enroll again). Refused while a
    /// connected agent has not acknowledged it, unless --force.
    Retire {
        /// Retire even though connected agents have not acknowledged the new key.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check every audit chain; exit 1 if a row was changed or removed (needs
    /// CODESENSEI_FIELD_KEY: the chain is keyed).
    Verify,
    /// Print one chain as retained, signed with the key in --signing-key (made by
    /// `generate-audit-signing-key`), for an auditor to check without the database.
    Export {
        /// The account whose chain to export (the nil UUID: events outside any account).
        #[arg(long)]
        chain: uuid::Uuid,
        #[arg(long)]
        signing_key: PathBuf,
    },
    /// Check a signed export: its signature under --public-key (hex) and that its rows link
    /// without a gap. Needs no database. Exit 1 when it does not hold.
    CheckExport {
        file: PathBuf,
        #[arg(long)]
        public_key: String,
    },
    /// Expire rows past each account's retention now (the control plane also does this
    /// hourly), leaving a checkpoint so that the chains still verify.
    Expire,
}

/// The data directory when none is given, named `name` (`sensei`, or `sensei-quickstart`).
pub fn default_data_dir(name: &str) -> PathBuf {
    if crate::store::postgres_cluster::running_as_root() {
        return PathBuf::from("/var/lib").join(name);
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join(name);
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share").join(name),
        None => PathBuf::from(format!("{name}-data")),
    }
}

/// The quickstart's own data directory, apart from the packaged control plane's.
pub const QUICKSTART_DIR_NAME: &str = "sensei-quickstart";

/// `DATABASE_URL`, or the embedded cluster when it is unset or empty.
pub fn database_source() -> DatabaseSource {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => DatabaseSource::Url(url),
        _ => DatabaseSource::Embedded,
    }
}

/// Runs the parsed command; the error is what the user sees.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let dir_name = match cli.command {
        Command::Quickstart { .. } => QUICKSTART_DIR_NAME,
        _ => "sensei",
    };
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| default_data_dir(dir_name));
    match cli.command {
        Command::Man { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(Cli::command(), &dir)?;
            Ok(0)
        }
        Command::GenerateFieldKey { plain } => {
            let provider = if plain {
                KeyProvider::Environment
            } else {
                KeyProvider::from_env()?
            };
            println!("{}", provider.generate_key()?);
            Ok(0)
        }
        Command::HsmCreateKey => {
            let provider = KeyProvider::from_env()?;
            anyhow::ensure!(
                matches!(provider, KeyProvider::Pkcs11 { .. }),
                "hsm-create-key needs SENSEI_FIELD_KEY_PROVIDER=pkcs11:token=LABEL;key=LABEL"
            );
            let created = Hsm::open(&provider)?.create_wrapping_key()?;
            println!(
                "{}",
                if created {
                    "created the wrapping key in the HSM"
                } else {
                    "the wrapping key already exists in the HSM"
                }
            );
            Ok(0)
        }
        Command::UpgradeEmbeddedDb { old_bindir } => {
            anyhow::ensure!(
                matches!(database_source(), DatabaseSource::Embedded),
                "upgrade-embedded-db upgrades the embedded database; DATABASE_URL names an \
                 external server, which is upgraded with that server's own tools"
            );
            let root = data_dir.join("postgres");
            match crate::store::postgres_cluster::upgrade(&root, old_bindir.as_deref())? {
                None => println!(
                    "upgrade-embedded-db: the embedded database in {} already matches the \
                     installed PostgreSQL; nothing to do",
                    root.display()
                ),
                Some(report) => println!(
                    "upgrade-embedded-db: upgraded PostgreSQL {} -> {}; the previous data \
                     directory is kept at {} (remove it once the control plane runs well)",
                    report.from,
                    report.to,
                    report.previous.display()
                ),
            }
            Ok(0)
        }
        Command::Serve(args) => {
            let keys = FieldKeys::from_env()?;
            let plane =
                ControlPlane::start(serve_options(&args, data_dir.clone(), keys, false)).await?;
            announce(&plane, &data_dir);
            wait_for_signal().await;
            tracing::info!("shutting down");
            plane.shutdown().await;
            Ok(0)
        }
        Command::Quickstart { once, serve } => {
            crate::app::quickstart::run(&serve, data_dir, once).await
        }
        Command::RotateFieldKey => {
            let keys = FieldKeys::from_env()?;
            let db = open_for_command(&keys, &data_dir).await?;
            let report = crate::secrets::rotate::rotate(&db.pool, &keys).await?;
            println!(
                "rotate-field-key: rewrote {} field(s) under the first key; {} already were",
                report.rewritten, report.already_current
            );
            close(db);
            Ok(0)
        }
        Command::Ca { command } => {
            let keys = FieldKeys::from_env()?;
            let db = open_for_command(&keys, &data_dir).await?;
            let code = ca_command(&db.pool, &keys, command).await;
            close(db);
            code
        }
        Command::JobKey { command } => {
            let keys = FieldKeys::from_env()?;
            let db = open_for_command(&keys, &data_dir).await?;
            let code = job_key_command(&db.pool, &keys, command).await;
            close(db);
            code
        }
        Command::Migrate { app_role } => {
            let owner = owner_url().ok_or_else(|| {
                anyhow::anyhow!(
                    "migrate runs as the database owner: set DATABASE_OWNER_URL to the owner \
                     role's connection string"
                )
            })?;
            let app_role = match app_role {
                Some(role) => role,
                None => match database_source() {
                    DatabaseSource::Url(url) => crate::store::db::role_of(&url)?,
                    DatabaseSource::Embedded => anyhow::bail!(
                        "name the application role with --app-role, or set DATABASE_URL to \
                         its connection string"
                    ),
                },
            };
            let pool = crate::store::db::connect(&owner, 1).await?;
            crate::store::db::migrate(&pool, Some(&app_role)).await?;
            println!(
                "migrate: schema at migration {}; {app_role} granted the application's rights",
                crate::store::db::applied_migration(&pool).await?
            );
            pool.close();
            Ok(0)
        }
        Command::CreateOwner {
            email,
            account,
            password_stdin,
            public_url,
        } => {
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                Some(line.trim_end_matches(['\n', '\r']).to_owned())
            } else {
                None
            };
            let keys = FieldKeys::from_env()?;
            let db = open_for_command(&keys, &data_dir).await?;
            let created =
                crate::identity::signup::create_owner(&db.pool, &keys, &email, &account, password)
                    .await;
            close(db);
            let created = created?;
            println!(
                "create-owner: account {} with owner {email} ({})",
                created.account.account_id, created.account.user_id
            );
            if let Some(token) = created.password_link {
                let url = public_url
                    .as_deref()
                    .unwrap_or("https://<control plane>")
                    .trim_end_matches('/');
                println!(
                    "The owner sets a password within {} hours with this single-use token:\n\n\
                     {}",
                    crate::identity::signup::OWNER_LINK_HOURS,
                    crate::api::password_reset::confirm_instructions(url, &token)
                );
            }
            Ok(0)
        }
        Command::InviteSignup { valid_hours, note } => {
            let keys = FieldKeys::from_env()?;
            let db = open_for_command(&keys, &data_dir).await?;
            let issued = crate::identity::signup::issue_invitation(
                &db.pool,
                &keys,
                std::time::Duration::from_secs(valid_hours * 3600),
                note.trim(),
            )
            .await;
            close(db);
            println!("{}", issued?);
            Ok(0)
        }
        Command::GenerateAuditSigningKey { out } => {
            use base64::Engine;
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
            writeln!(
                file,
                "{}",
                base64::engine::general_purpose::STANDARD.encode(key.to_bytes())
            )?;
            println!("{}", hex::encode(key.verifying_key().to_bytes()));
            Ok(0)
        }
        Command::Audit {
            command: AuditCommand::Verify,
        } => {
            let keys = FieldKeys::from_env()?;
            let db = open_for_command(&keys, &data_dir).await?;
            let client = db.pool.get().await?;
            let report = crate::audit::verify(&**client, keys.audit_keys()).await?;
            drop(client);
            close(db);
            for problem in &report.problems {
                println!("TAMPERED: {problem}");
            }
            println!(
                "audit verify: {} chain(s), {} row(s) ({} from before the chain was keyed), {} \
                 problem(s)",
                report.chains,
                report.rows,
                report.unkeyed_rows,
                report.problems.len()
            );
            Ok(if report.problems.is_empty() { 0 } else { 1 })
        }
        Command::Audit {
            command: AuditCommand::Expire,
        } => {
            let keys = FieldKeys::from_env()?;
            let db = open_for_command(&keys, &data_dir).await?;
            let report = crate::audit::expire(&db.pool, keys.audit_keys()).await?;
            close(db);
            println!(
                "audit expire: {} row(s) expired from {} chain(s)",
                report.rows, report.chains
            );
            Ok(0)
        }
        Command::Audit {
            command: AuditCommand::Export { chain, signing_key },
        } => {
            let signing = read_signing_key(&signing_key)?;
            let keys = FieldKeys::from_env()?;
            let db = open_for_command(&keys, &data_dir).await?;
            let client = db.pool.get().await?;
            let export = crate::audit::signed_export(&**client, chain, &signing).await;
            drop(client);
            close(db);
            println!("{}", serde_json::to_string_pretty(&export?)?);
            Ok(0)
        }
        Command::Audit {
            command: AuditCommand::CheckExport { file, public_key },
        } => {
            let key: [u8; 32] = hex::decode(public_key.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| anyhow::anyhow!("--public-key must be 64 hex digits"))?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&key)
                .map_err(|_| anyhow::anyhow!("--public-key is not an Ed25519 public key"))?;
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let document: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", file.display()))?;
            match crate::audit::check_export(&document, &key) {
                Ok(check) => {
                    println!(
                        "audit check-export: chain {}, {} row(s) (seq {}..{}), signature good, \
                         links unbroken",
                        check.chain_id,
                        check.rows,
                        check.first_seq.unwrap_or(0),
                        check.last_seq.unwrap_or(0)
                    );
                    Ok(0)
                }
                Err(e) => {
                    println!("TAMPERED: {e}");
                    Ok(1)
                }
            }
        }
    }
}

/// `DATABASE_OWNER_URL`, when set and not empty.
pub fn owner_url() -> Option<String> {
    std::env::var("DATABASE_OWNER_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
}

/// Prints the servers whose agents have not followed a CA or job-key rotation, one a line.
fn list_lagging(servers: &[crate::runners::agent::ca_rotation::LaggingServer]) {
    for s in servers {
        println!(
            "  {} {} ({})",
            s.id,
            s.name,
            if s.connected { "connected" } else { "offline" }
        );
    }
}

/// `ca rotate | status | retire`.
async fn ca_command(
    pool: &deadpool_postgres::Pool,
    keys: &FieldKeys,
    command: CaCommand,
) -> anyhow::Result<i32> {
    use crate::runners::agent::ca_rotation::{self, CaRotationError};
    match command {
        CaCommand::Rotate => match ca_rotation::rotate(pool, keys).await {
            Ok(rotated) => {
                println!(
                    "ca rotate: new CA {}; the previous CA {} stays accepted until `ca retire`. \
                     Connected agents now pin the new CA and renew under it; follow them with \
                     `ca status`.",
                    rotated.current, rotated.previous
                );
                Ok(0)
            }
            Err(e @ CaRotationError::AlreadyRotating(_)) => {
                eprintln!("ca rotate: {e}");
                Ok(1)
            }
            Err(e) => Err(e.into()),
        },
        CaCommand::Status => {
            let ring = ca_rotation::load(pool, keys).await?;
            println!("current CA: {}", ring.current.fingerprint());
            match &ring.previous {
                None => println!("no rotation under way"),
                Some(previous) => {
                    println!("previous CA (still accepted): {}", previous.fingerprint());
                    let client = pool.get().await?;
                    let old = ca_rotation::servers_on_old_ca(
                        &**client,
                        &ring.current.fingerprint(),
                        None,
                    )
                    .await?;
                    println!("{} agent(s) not on the current CA yet:", old.len());
                    list_lagging(&old);
                }
            }
            Ok(0)
        }
        CaCommand::Retire { force } => match ca_rotation::retire(pool, keys, force).await {
            Ok(retired) => {
                println!(
                    "ca retire: the CA {} is retired ({} certificate(s)); {} is the only CA.",
                    retired.retired, retired.certificates_retired, retired.current
                );
                if !retired.stranded.is_empty() {
                    println!(
                        "{} server(s) never moved and must enroll again \
                         (POST /v1/servers/{{id}}/enrollment-token, then `sensei-agent enroll`):",
                        retired.stranded.len()
                    );
                    list_lagging(&retired.stranded);
                }
                Ok(0)
            }
            Err(e @ (CaRotationError::NotRotating | CaRotationError::StillConnected(_))) => {
                eprintln!("ca retire: {e}");
                Ok(1)
            }
            Err(e) => Err(e.into()),
        },
    }
}

/// `job-key rotate | status | retire`.
async fn job_key_command(
    pool: &deadpool_postgres::Pool,
    keys: &FieldKeys,
    command: JobKeyCommand,
) -> anyhow::Result<i32> {
    use crate::runners::agent::job_key_rotation::{self, public_hex, JobKeyRotationError};
    match command {
        JobKeyCommand::Rotate => match job_key_rotation::rotate(pool, keys).await {
            Ok(rotated) => {
                println!(
                    "job-key rotate: new job-signing key {}; the previous key {} keeps signing \
                     for each agent until it acknowledged the new one, and until `job-key \
                     retire`. Connected agents are sent the new key now; follow them with \
                     `job-key status`.",
                    rotated.current, rotated.previous
                );
                Ok(0)
            }
            Err(e @ JobKeyRotationError::AlreadyRotating(_)) => {
                eprintln!("job-key rotate: {e}");
                Ok(1)
            }
            Err(e) => Err(e.into()),
        },
        JobKeyCommand::Status => {
            let ring = job_key_rotation::load(pool, keys).await?;
            println!("current job-signing key: {}", public_hex(&ring.current));
            match &ring.previous {
                None => println!("no rotation under way"),
                Some(previous) => {
                    println!(
                        "previous key (still signs for agents that have not acknowledged): {}",
                        public_hex(previous)
                    );
                    let client = pool.get().await?;
                    let old = job_key_rotation::servers_on_old_job_key(
                        &**client,
                        &ring.current_public(),
                        None,
                    )
                    .await?;
                    println!(
                        "{} agent(s) have not acknowledged the current key:",
                        old.len()
                    );
                    list_lagging(&old);
                }
            }
            Ok(0)
        }
        JobKeyCommand::Retire { force } => {
            match job_key_rotation::retire(pool, keys, force).await {
                Ok(retired) => {
                    println!(
                        "job-key retire: the key {} is retired; {} signs every job.",
                        retired.retired, retired.current
                    );
                    if !retired.stranded.is_empty() {
                        println!(
                            "{} server(s) never acknowledged it: their agents refuse every job \
                             until they enroll again (POST /v1/servers/{{id}}/enrollment-token, \
                             then `sensei-agent enroll`):",
                            retired.stranded.len()
                        );
                        list_lagging(&retired.stranded);
                    }
                    Ok(0)
                }
                Err(
                    e @ (JobKeyRotationError::NotRotating | JobKeyRotationError::StillConnected(_)),
                ) => {
                    eprintln!("job-key retire: {e}");
                    Ok(1)
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

async fn open_for_command(
    keys: &FieldKeys,
    data_dir: &std::path::Path,
) -> Result<crate::app::server::OpenedDatabase, crate::app::server::StartError> {
    open_database(
        &database_source(),
        owner_url().as_deref(),
        keys,
        data_dir,
        2,
    )
    .await
}

fn close(db: crate::app::server::OpenedDatabase) {
    db.pool.close();
    drop(db.cluster);
}

/// Reads an audit signing key written by `generate-audit-signing-key`.
fn read_signing_key(path: &std::path::Path) -> anyhow::Result<ed25519_dalek::SigningKey> {
    use base64::Engine;
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let seed: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} is not an audit signing key (generate-audit-signing-key makes one)",
                path.display()
            )
        })?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
}

/// Options for `serve` and `quickstart` from the flags.
pub fn serve_options(
    args: &ServeArgs,
    data_dir: PathBuf,
    keys: FieldKeys,
    ephemeral_port: bool,
) -> ServeOptions {
    // --once runs beside whatever else is on the machine: any free port will do.
    let pick = |given: Option<SocketAddr>, default: &str| {
        given.unwrap_or_else(|| {
            if ephemeral_port {
                SocketAddr::from(([127, 0, 0, 1], 0))
            } else {
                default
                    .parse()
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
            }
        })
    };
    ServeOptions {
        api_addr: pick(args.api_addr, DEFAULT_API_ADDR),
        agent_addr: pick(args.agent_addr, DEFAULT_AGENT_ADDR),
        agent_endpoint: args.agent_endpoint.clone(),
        agent_heartbeat: std::time::Duration::from_secs(args.agent_heartbeat_secs),
        agent_idle_timeout: std::time::Duration::from_secs(args.agent_idle_timeout_secs),
        agent_cert_lifetime: std::time::Duration::from_secs(args.agent_cert_days * 86_400),
        dispatch_timeout: std::time::Duration::from_secs(args.dispatch_timeout_secs),
        api_names: args
            .api_names
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect(),
        pool_size: usize::from(args.db_pool_size),
        mail: crate::identity::mailer::MailSettings {
            smtp_url: args.smtp_url.clone(),
            from: args.smtp_from.clone(),
            log_when_unset: false,
        },
        public_url: args.public_url.clone(),
        trusted_proxies: args.trusted_proxies.clone(),
        max_concurrent_hashes: args.max_concurrent_hashes.map(usize::from),
        metrics_addr: args.metrics_addr,
        metrics_token: args.metrics_token.clone().filter(|t| !t.is_empty()),
        ssh_job_timeout: std::time::Duration::from_secs(args.ssh_job_timeout_secs),
        ssh_deny_networks: if args.ssh_deny_networks.is_empty() {
            crate::egress::default_denied_networks()
        } else {
            args.ssh_deny_networks.clone()
        },
        database_owner_url: owner_url(),
        signup: args.signup,
        max_live_streams: args.max_live_streams as usize,
        agent_handshake_rate: args.agent_handshake_rate.map(f64::from),
        ..ServeOptions::new(data_dir, database_source(), Arc::new(keys))
    }
}

/// Prints where the API is, the CA fingerprint to pin and where the CA certificate is.
pub fn announce(plane: &ControlPlane, data_dir: &std::path::Path) {
    println!(
        "Sensei control plane listening on https://{}",
        plane.api_addr()
    );
    println!("CA certificate: {}", data_dir.join("ca.pem").display());
    println!("CA fingerprint: {}", plane.ca_fingerprint());
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = Cli::try_parse_from(["sensei-control-plane", "serve"].iter().chain(extra))?;
        match cli.command {
            Command::Serve(args) => Ok(args),
            _ => unreachable!("parsed as serve"),
        }
    }

    #[test]
    fn agent_certificates_last_90_days_unless_told_otherwise_within_bounds() {
        let keys = || FieldKeys::parse(&FieldKeys::generate_key()).expect("a generated key parses");
        let days = |args: &ServeArgs| {
            serve_options(args, PathBuf::from("/tmp/unused"), keys(), true).agent_cert_lifetime
        };
        let default = serve(&[]).expect("defaults");
        assert_eq!(days(&default), std::time::Duration::from_secs(90 * 86_400));
        let week = serve(&["--agent-cert-days", "7"]).expect("7 days");
        assert_eq!(days(&week), std::time::Duration::from_secs(7 * 86_400));
        for refused in ["0", "826", "soon"] {
            assert!(serve(&["--agent-cert-days", refused]).is_err(), "{refused}");
        }
    }

    /// A shorter idle timeout is taken only with a heartbeat that leaves 15 s after it; a
    /// control plane told otherwise refuses to start, before it touches anything.
    #[tokio::test]
    async fn an_idle_timeout_the_heartbeat_cannot_keep_is_refused() {
        let keys = || FieldKeys::parse(&FieldKeys::generate_key()).expect("a generated key parses");
        let options = |args: &ServeArgs| {
            serve_options(args, PathBuf::from("/nonexistent/sensei"), keys(), true)
        };
        let default = serve(&[]).expect("defaults");
        assert_eq!(
            options(&default).agent_idle_timeout,
            std::time::Duration::from_secs(60)
        );
        let fast = serve(&[
            "--agent-idle-timeout-secs",
            "30",
            "--agent-heartbeat-secs",
            "15",
        ])
        .expect("30 s with heartbeats every 15 s");
        assert_eq!(
            options(&fast).agent_idle_timeout,
            std::time::Duration::from_secs(30)
        );
        for refused in ["15", "61", "0"] {
            assert!(
                serve(&["--agent-idle-timeout-secs", refused]).is_err(),
                "{refused}"
            );
        }
        let slow_heartbeat =
            serve(&["--agent-idle-timeout-secs", "30"]).expect("parses; checked at start");
        let Err(refused) = ControlPlane::start(options(&slow_heartbeat)).await else {
            panic!("started with heartbeats every 30 s and a 30 s idle timeout");
        };
        assert!(
            refused
                .to_string()
                .contains("an idle timeout of 30 s needs agents heard from every 15 s at most"),
            "{refused}"
        );
        assert!(!std::path::Path::new("/nonexistent/sensei").exists());
    }
}
