//! `sensei-agent`. Enrollment and the job loop arrive with the agent-identity work; until then
//! the binary answers `--version` and `--help` only, and says so.

use clap::Parser;

/// The Sensei agent. Enrollment (`enroll`), the job loop (`run`) and `revoke` are not part of
/// this build yet.
#[derive(Parser)]
#[command(name = "sensei-agent", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!("sensei-agent: no command given; see --help");
    std::process::exit(2);
}
