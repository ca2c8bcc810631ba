use clap::{CommandFactory, FromArgMatches};
use sensei_agent::cli::{self, Cli};

fn main() {
    sensei_certs::tls::install_default_provider();
    // `--version` shows the binary's own (possibly stamped) version, like the hello.
    let matches = Cli::command()
        .version(sensei_agent::version())
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    sensei_shared::logging::init(cli.log_format);
    // One thread: the agent holds one connection and runs one job at a time, and every extra
    // worker thread costs memory (its stack, its malloc arena) on every server of the fleet.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let code = match runtime {
        Ok(runtime) => runtime.block_on(cli::execute(cli)),
        Err(e) => {
            eprintln!("sensei-agent: cannot start the async runtime: {e}");
            1
        }
    };
    std::process::exit(code);
}
