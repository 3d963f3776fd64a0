//! The `versus` operator CLI, as a library under a thin `main.rs`:
//!
//! - [`args`]: the command line;
//! - [`input`]: reading and checking a file of matchups or aliases (CSV or JSON);
//! - [`admin`]: the API's admin routes, as a typed client;
//! - [`prewarm`], [`purge`], [`popular`], [`reports`], [`alias`]: the commands.

pub mod admin;
pub mod alias;
pub mod args;
pub mod input;
pub mod popular;
pub mod prewarm;
pub mod purge;
pub mod reports;

use std::process::ExitCode;

use args::{AliasCommand, Cli, Command, ReportsCommand};

/// How a command failed. The variants are the exit statuses operators script against.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input was refused before anything was sent (exit 2).
    #[error("{0}")]
    BadInput(String),
    /// Something failed on the way or in the API (exit 1).
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::BadInput(_) => ExitCode::from(2),
            Error::Failed(_) => ExitCode::FAILURE,
        }
    }
}

pub async fn run(cli: Cli) -> Result<(), Error> {
    match &cli.command {
        Command::Prewarm(args) => prewarm::run(&cli.api, args).await,
        Command::Purge { key } => purge::run(&cli.api, key).await,
        Command::Popular { limit, pending } => popular::run(&cli.api, *limit, *pending).await,
        Command::Reports(ReportsCommand::List) => reports::list(&cli.api).await,
        Command::Reports(ReportsCommand::Settle { kind, key, action }) => {
            reports::settle(&cli.api, *kind, key, *action).await
        }
        Command::Alias(AliasCommand::Add { alias, canonical }) => {
            alias::add(&cli.api, alias, canonical).await
        }
        Command::Alias(AliasCommand::Rm { alias }) => alias::rm(&cli.api, alias).await,
        Command::Alias(AliasCommand::List) => alias::list(&cli.api).await,
        Command::Alias(AliasCommand::Import(args)) => alias::import(&cli.api, args).await,
    }
}
