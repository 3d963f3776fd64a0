//! `versus`: parse the command line, run the command, turn the outcome into the exit status.

use std::process::ExitCode;

use clap::Parser;
use versus_cli::args::Cli;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match versus_cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            e.exit_code()
        }
    }
}
