use clap::Parser;
use sensei_control_plane::app::cli::{self, Cli};

fn main() {
    sensei_certs::tls::install_default_provider();
    let cli = Cli::parse();
    sensei_shared::logging::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sensei-control-plane: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // Our error types already carry their causes in their messages.
            eprintln!("sensei-control-plane: {e}");
            1
        }
    };
    std::process::exit(code);
}
