//! The command line, as clap reads it. The completions and the man pages are generated from
//! these definitions too, so they cannot drift from what the binary accepts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "sensei",
    version,
    about = "The command-line client of a Sensei control plane",
    long_about = "The command-line client of a Sensei control plane: sign in, add servers, deploy \
                  and follow the log, steer rollouts, roll back. It uses the public HTTPS API only.\n\n\
                  Exit codes: 0 done; 1 a deploy or rollout it waited for failed; 2 usage; \
                  3 not signed in, or the session or API key is no longer valid; 4 the control \
                  plane refused the request; 5 the control plane cannot be reached or trusted, \
                  or failed.",
    after_help = "Credentials: `sensei login` stores them in $XDG_CONFIG_HOME/sensei/credentials.json \
                  (mode 0600). For CI set SENSEI_URL, SENSEI_API_KEY and SENSEI_CA_FINGERPRINT instead."
)]
pub struct Cli {
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Sign in to a control plane and store the session (or an API key) for the next commands.
    Login(LoginArgs),
    /// Sign out: end the stored session on the control plane and forget it here.
    Logout,
    /// Who the stored credentials are, on which control plane.
    Whoami,
    /// The account's servers.
    #[command(subcommand)]
    Servers(ServersCommand),
    /// The account's projects.
    #[command(subcommand)]
    Projects(ProjectsCommand),
    /// A project's environment variables (values are write-only: never shown).
    #[command(subcommand)]
    Env(EnvCommand),
    /// Deploy a project to servers, follow the log, and exit 0 only if every deploy succeeded.
    Deploy(DeployArgs),
    /// Fleet rollouts in batches, with canary, approval, pause and abort.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Switch a server back to an earlier release of a project.
    Rollback(RollbackArgs),
    /// A deployment's log.
    Logs {
        /// The deployment id.
        deployment: String,
        /// Keep following until the deployment ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// A project's recent deployments, newest first.
    History {
        /// The project's name or id.
        project: String,
        /// Only this server's (name or id).
        #[arg(long)]
        server: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=500))]
        limit: u16,
    },
    /// The account's audit log, newest first.
    Audit {
        /// Only events at or after this time (RFC 3339, or a duration back such as 2h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Only this action (e.g. deployment.queued).
        #[arg(long)]
        action: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=500))]
        limit: u16,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages into a directory (for packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Args)]
pub struct LoginArgs {
    /// The control plane, e.g. https://sensei.example:8443 [default: the stored one].
    pub url: Option<String>,
    /// The email to sign in with [default: asked].
    #[arg(long)]
    pub email: Option<String>,
    /// Read the password from standard input instead of asking.
    #[arg(long)]
    pub password_stdin: bool,
    /// The current TOTP code [default: asked when the account has a second factor].
    #[arg(long)]
    pub totp: Option<String>,
    /// Store an API key (read from standard input) instead of signing in with a password.
    #[arg(long)]
    pub api_key: bool,
    /// The control plane's CA fingerprint, SHA256:…, as its operator gives it. Without it the
    /// fingerprint presented is shown and you are asked to confirm it.
    #[arg(long)]
    pub ca_fingerprint: Option<String>,
}

#[derive(Subcommand)]
pub enum ServersCommand {
    /// List servers.
    List {
        /// Only servers with this label (repeatable: all must match).
        #[arg(long, value_name = "KEY=VALUE")]
        label: Vec<String>,
    },
    /// One server, with its agent's state.
    Show { server: String },
    /// Add a server: an agent server (prints the enroll command) or an SSH server (prints the
    /// public key to install).
    Add(AddServerArgs),
    /// Delete a server.
    Remove {
        server: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Revoke a server's agent certificate: its agent is cut off at once.
    Revoke {
        server: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// A new enrollment command for an agent server (the old token stops working).
    Enroll { server: String },
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("transport").required(true).args(["agent", "ssh"]))]
pub struct AddServerArgs {
    pub name: String,
    /// A server that runs sensei-agent.
    #[arg(long)]
    pub agent: bool,
    /// A server reached over SSH at this host (name or address).
    #[arg(long, value_name = "HOST")]
    pub ssh: Option<String>,
    /// The agent server's host name, for display [default: the name].
    #[arg(long, requires = "agent")]
    pub host: Option<String>,
    /// SSH port.
    #[arg(long, requires = "ssh")]
    pub port: Option<u16>,
    /// SSH login user.
    #[arg(long, requires = "ssh", default_value = "deploy")]
    pub user: String,
    /// The SSH server's host key (an OpenSSH public key line); without it the first key seen
    /// is pinned.
    #[arg(long, requires = "ssh")]
    pub host_key: Option<String>,
    /// A label (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub label: Vec<String>,
}

#[derive(Subcommand)]
pub enum ProjectsCommand {
    /// List projects.
    List,
    /// One project.
    Show { project: String },
    /// Create a project.
    Create(CreateProjectArgs),
    /// Change a project: only the options given change.
    Edit(EditProjectArgs),
}

#[derive(Args)]
pub struct CreateProjectArgs {
    pub name: String,
    /// What `git clone` accepts on the server.
    #[arg(long)]
    pub repo: String,
    /// The absolute deploy directory on the servers.
    #[arg(long)]
    pub path: String,
    #[command(flatten)]
    pub settings: ProjectSettings,
}

#[derive(Args)]
pub struct EditProjectArgs {
    pub project: String,
    /// A new name.
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub repo: Option<String>,
    #[arg(long)]
    pub path: Option<String>,
    #[command(flatten)]
    pub settings: ProjectSettings,
}

#[derive(Args)]
pub struct ProjectSettings {
    /// Successful releases kept on each server.
    #[arg(long)]
    pub keep_releases: Option<i32>,
    /// A path kept across releases (repeatable; a trailing / marks a directory).
    #[arg(long = "shared", value_name = "PATH")]
    pub shared_paths: Vec<String>,
    /// A build hook command (repeatable, run in order).
    #[arg(long = "build", value_name = "COMMAND")]
    pub build: Vec<String>,
    /// A command run before the switch (repeatable).
    #[arg(long = "pre-switch", value_name = "COMMAND")]
    pub pre_switch: Vec<String>,
    /// A command run after the switch (repeatable).
    #[arg(long = "post-switch", value_name = "COMMAND")]
    pub post_switch: Vec<String>,
    /// A command that must succeed in the new release before the switch.
    #[arg(long)]
    pub health_check: Option<String>,
    /// Longest one hook may run, in seconds.
    #[arg(long)]
    pub hook_timeout: Option<i32>,
}

#[derive(Subcommand)]
pub enum EnvCommand {
    /// The names of the project's variables.
    List { project: String },
    /// Set one variable; the value is read from standard input (or --file), never from the
    /// command line, and never shown.
    Set {
        project: String,
        name: String,
        /// Read the value from this file instead of standard input.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Remove variables.
    Unset {
        project: String,
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Args)]
pub struct DeployArgs {
    /// The project's name or id (an id needs no projects:read scope).
    pub project: String,
    /// A server to deploy to (name or id; repeatable; an id needs no servers:read scope).
    #[arg(long, required_unless_present = "label")]
    pub server: Vec<String>,
    /// Deploy to every server with this label (repeatable: all must match).
    #[arg(long, value_name = "KEY=VALUE", conflicts_with = "server")]
    pub label: Vec<String>,
    /// The branch, tag or commit.
    #[arg(long = "ref", default_value = "main")]
    pub git_ref: String,
    /// Queue and print the deployment ids; do not wait.
    #[arg(long)]
    pub no_wait: bool,
    /// Makes a retried run queue nothing new: the same key (for the same project, servers and
    /// ref) answers the deploys the first run queued [default: one per run].
    #[arg(long, env = "SENSEI_IDEMPOTENCY_KEY")]
    pub idempotency_key: Option<String>,
}

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Start a rollout to every server matching the labels: a deploy of a project, or
    /// (`--upgrade-agent VERSION`) an upgrade of their agents' package.
    Start(RolloutStartArgs),
    /// A rollout's state, batches and targets.
    Status {
        id: String,
        /// Follow it live until it ends (exit 1 unless it succeeded).
        #[arg(long)]
        watch: bool,
    },
    /// The account's rollouts, newest first.
    List,
    /// Stop starting new batches (running deploys finish).
    Pause { id: String },
    /// Resume a paused rollout.
    Resume { id: String },
    /// Let a rollout waiting after its canary go on.
    Approve { id: String },
    /// End the rollout; targets not started are skipped.
    Abort { id: String },
}

#[derive(Args)]
pub struct RolloutStartArgs {
    /// The project's name or id (not with --upgrade-agent).
    #[arg(required_unless_present = "upgrade_agent")]
    pub project: Option<String>,
    /// Upgrade the servers' agent package to this exact version (e.g. 0.1.1-1) instead of
    /// deploying a project.
    #[arg(long, value_name = "VERSION", conflicts_with = "project")]
    pub upgrade_agent: Option<String>,
    /// With --upgrade-agent: seconds an agent has to come back on the new version before its
    /// server counts as failed [default: 600].
    #[arg(long, value_name = "SECONDS", requires = "upgrade_agent")]
    pub upgrade_deadline: Option<u32>,
    /// The servers: every one with this label (repeatable: all must match).
    #[arg(long, value_name = "KEY=VALUE", required = true)]
    pub label: Vec<String>,
    /// The branch, tag or commit (resolved once, on the canary).
    #[arg(long = "ref", default_value = "main")]
    pub git_ref: String,
    /// Servers deployed first, alone.
    #[arg(long, default_value_t = 1)]
    pub canary: u32,
    /// Batch size after the canary: a number of servers, or a percentage such as 10%.
    #[arg(long, default_value = "10%")]
    pub batch: String,
    /// Failed targets tolerated; one more halts the rollout.
    #[arg(long, default_value_t = 0)]
    pub max_failures: u32,
    /// Seconds to wait between batches.
    #[arg(long, default_value_t = 0)]
    pub pause: u32,
    /// Wait after the canary until `sensei rollout approve`.
    #[arg(long)]
    pub approve: bool,
    /// What a halted rollout does with the servers it already switched.
    #[arg(long, value_enum, default_value_t = OnHalt::Stop)]
    pub on_halt: OnHalt,
    /// Follow it live until it ends (exit 1 unless it succeeded).
    #[arg(long)]
    pub watch: bool,
    /// As for `sensei deploy`.
    #[arg(long, env = "SENSEI_IDEMPOTENCY_KEY")]
    pub idempotency_key: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OnHalt {
    /// Leave them on the new release.
    Stop,
    /// Switch them back to their previous release.
    Rollback,
}

#[derive(Args)]
pub struct RollbackArgs {
    /// The project's name or id.
    pub project: String,
    /// The server (name or id).
    #[arg(long)]
    pub server: String,
    /// The release to return to (a release id from `sensei history`). Without it, in a
    /// terminal, pick from the server's recent good releases; otherwise the previous one.
    #[arg(long)]
    pub to: Option<String>,
    /// Do not ask: roll back to the previous good release.
    #[arg(long, conflicts_with = "to")]
    pub previous: bool,
}
