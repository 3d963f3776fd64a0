//! `versus-xtask dev|cluster|bench|test` (`cargo xtask dev`): runs a Versus system on this machine
//! until Ctrl-C, or the benchmarks against one. See `lib.rs`.

use std::process::ExitCode;

use versus_xtask::System;

const USAGE: &str =
    "usage: versus-xtask dev | cluster | bench [--quick] [--only P1,P4] [--no-write]
       | test [CARGO TEST ARGS...]
  (scripts/dev, scripts/cluster, scripts/bench and scripts/test run it after building; see
  README.md)";

enum Task {
    Run(System),
    Bench(versus_xtask::bench::Args),
    Test(Vec<String>),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = match args.first().map(String::as_str) {
        Some("dev") if args.len() == 1 => Task::Run(System::Dev),
        Some("cluster") if args.len() == 1 => Task::Run(System::Cluster),
        Some("bench") => match versus_xtask::bench::Args::parse(&args[1..]) {
            Ok(args) => Task::Bench(args),
            Err(e) => {
                eprintln!("{e:#}");
                return ExitCode::from(2);
            }
        },
        Some("test") => Task::Test(args[1..].to_vec()),
        Some("-h" | "--help") => {
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
    let status = runtime.block_on(async {
        match task {
            Task::Run(system) => versus_xtask::run(system).await,
            Task::Test(args) => versus_xtask::test::run(args).await,
            Task::Bench(args) => match versus_xtask::repo() {
                Ok(repo) => versus_xtask::bench::run(args, &repo).await,
                Err(e) => {
                    eprintln!("{e:#}");
                    1
                }
            },
        }
    });
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}
