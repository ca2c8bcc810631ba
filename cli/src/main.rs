//! `sensei`: the command-line client of a Sensei control plane. See docs/cli.md.

mod args;
mod client;
mod commands;
mod config;
mod error;
mod output;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::args::{Cli, Command};
use crate::client::Api;
use crate::commands::Ctx;
use crate::error::{CliError, Result};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(error::exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    sensei_certs::tls::install_default_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sensei: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sensei: {e}");
            e.exit_code()
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    // What needs no configuration at all (packaging runs these).
    let command = match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "sensei", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man { dir } => return write_man_pages(&dir),
        other => other,
    };
    let store = config::Store::default_location()?;
    // What needs no credentials.
    let command = match command {
        Command::Login(args) => return commands::auth::login(args, &store, json).await,
        Command::Logout => return commands::auth::logout(&store).await,
        other => other,
    };
    let credentials = config::current(&store)?;
    let ctx = Ctx {
        api: Api::from_credentials(&credentials)?,
        json,
    };
    match command {
        Command::Whoami => commands::auth::whoami(&ctx.api, &credentials, json).await,
        Command::Servers(c) => commands::servers::run(&ctx, c).await,
        Command::Projects(c) => commands::projects::run(&ctx, c).await,
        Command::Env(c) => commands::projects::env(&ctx, c).await,
        Command::Deploy(args) => commands::deploy::deploy(&ctx, args).await,
        Command::Rollout(c) => commands::rollout::run(&ctx, c).await,
        Command::Rollback(args) => commands::deploy::rollback(&ctx, args).await,
        Command::Logs { deployment, follow } => {
            commands::deploy::logs(&ctx, &deployment, follow).await
        }
        Command::History {
            project,
            server,
            limit,
        } => commands::deploy::history(&ctx, &project, server.as_deref(), limit).await,
        Command::Audit {
            since,
            action,
            limit,
        } => commands::audit::run(&ctx, since.as_deref(), action.as_deref(), limit).await,
        Command::Login(_) | Command::Logout | Command::Completions { .. } | Command::Man { .. } => {
            Ok(())
        }
    }
}

/// One page for `sensei` and one for each subcommand (`sensei-deploy.1`, …).
fn write_man_pages(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| CliError::local(format!("{}: {e}", dir.display())))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .map_err(|e| CliError::local(format!("writing man pages: {e}")))
}
