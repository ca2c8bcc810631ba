use clap::Parser;
use sensei_agent::cli::{self, Cli};

fn main() {
    sensei_certs::tls::install_default_provider();
    let cli = Cli::parse();
    cli::init_logging();
    let code = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(cli::execute(cli)),
        Err(e) => {
            eprintln!("sensei-agent: cannot start the async runtime: {e}");
            1
        }
    };
    std::process::exit(code);
}
