//! `versus-xtask dev|cluster` (`cargo xtask dev`): runs a Versus system on this machine until
//! Ctrl-C. See `lib.rs`.

use std::process::ExitCode;

use versus_xtask::System;

const USAGE: &str = "usage: versus-xtask dev|cluster|test [CARGO TEST ARGS...]   (scripts/dev, scripts/cluster and scripts/test run it after building; see README.md)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let system = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["dev"] => System::Dev,
        ["cluster"] => System::Cluster,
        ["test", ..] => return versus_xtask::test::main(args[1..].to_vec()),
        ["-h" | "--help"] => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let status = runtime.block_on(versus_xtask::run(system));
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}
