//! The command line: what `versus --help` documents.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const AFTER_HELP: &str = "\
Environment:
  VERSUS_ADMIN_TOKEN  the API's admin token, sent as a bearer token (required by every command
                      that calls the API; never printed)
  VERSUS_API_URL      the API's base URL (as --api)

Exit status:
  0  everything succeeded
  1  a matchup failed, there is no answer to purge, no report to settle or no alias to remove,
     an alias was refused, or the API was unreachable or refused
  2  bad input, nothing sent: a malformed file or name, a bad key, no token, a bad argument";

/// Operate Versus: pre-warm answers before traffic arrives, list popular matchups, purge answers,
/// settle users' reports, declare aliases.
#[derive(Debug, Parser)]
#[command(name = "versus", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// The API's base URL.
    #[arg(
        long,
        global = true,
        env = "VERSUS_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate answers (and pictures) ahead of traffic, from a file or the most requested.
    ///
    /// The whole file is checked first, with the API's rules: every malformed line or invalid
    /// name is reported with its line number, and then nothing is submitted (exit 2). Matchups
    /// already cached cost nothing; running the same file twice generates nothing the second
    /// time. A progress bar follows the batches (on a terminal), then a summary is printed;
    /// the exit status is 1 if any matchup failed (run the same command again to retry those).
    #[command(after_help = AFTER_HELP)]
    Prewarm(PrewarmArgs),
    /// Remove an answer and its picture from every cache layer; the next request regenerates.
    #[command(after_help = AFTER_HELP)]
    Purge {
        /// The answer's key: 32 hexadecimal digits, as in the `meta` event or `versus popular`.
        key: String,
    },
    /// List the most requested matchups, most requested first.
    #[command(after_help = AFTER_HELP)]
    Popular {
        /// How many to list.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// Only those whose answer is not complete yet (what `prewarm --popular` warms).
        #[arg(long)]
        pending: bool,
    },
    /// The answers and pictures users reported, and what to do with them.
    #[command(subcommand)]
    Reports(ReportsCommand),
    /// Aliases: names the API takes for another (`Kakarot` for `Goku`).
    ///
    /// A request that names an alias is answered as if it named the canonical name, under its
    /// key and with its name. Aliases never chain: a canonical name cannot be an alias, nor an
    /// alias the canonical name of another; the API refuses both.
    #[command(subcommand)]
    Alias(AliasCommand),
}

#[derive(Debug, Subcommand)]
pub enum AliasCommand {
    /// Make ALIAS stand for CANONICAL (or, if it is an alias already, for CANONICAL instead).
    #[command(after_help = AFTER_HELP)]
    Add {
        /// The name to take for another, as users write it (`Kakarot`).
        alias: String,
        /// The name it stands for (`Goku`).
        canonical: String,
    },
    /// Remove an alias: requests that name it are answered under its own name again.
    #[command(after_help = AFTER_HELP)]
    Rm {
        /// The alias, in any spelling with the same match key (`kakarot` is `Kakarot`).
        alias: String,
    },
    /// List the aliases, one `alias → canonical` per line.
    #[command(after_help = AFTER_HELP)]
    List,
    /// Add the aliases of a file, in order.
    ///
    /// The whole file is checked first, with the API's name rules: every malformed line or
    /// invalid name is reported with its line number, and then nothing is submitted (exit 2).
    /// Each alias is then added in turn; one the API refuses (it would chain or make a cycle)
    /// is reported with its line number and the rest go on. A summary is printed; the exit
    /// status is 1 if any was refused.
    #[command(after_help = AFTER_HELP)]
    Import(AliasImportArgs),
}

#[derive(Debug, Args)]
pub struct AliasImportArgs {
    /// The aliases. CSV: `alias,canonical` per line, an optional `alias,canonical` (or `a,b`)
    /// header, names with commas in double quotes, blank lines ignored. JSON:
    /// `[{"alias":…,"canonical":…}, …]` (or `"a"` and `"b"`), or `{"aliases":[…]}` as
    /// `GET /v1/admin/aliases` answers. JSON when the name ends in `.json` or the text starts
    /// with `[` or `{`; CSV otherwise.
    pub file: PathBuf,
    /// Only check the file and report its problems; submit nothing (no token needed).
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Subcommand)]
pub enum ReportsCommand {
    /// List the reported answers and pictures, with the count of each reason.
    ///
    /// Hidden ones first (enough clients reported them unsafe: they are served as refused
    /// until settled), then the most reported unsafe.
    #[command(after_help = AFTER_HELP)]
    List,
    /// Decide on a reported answer or picture: keep, purge or refuse it.
    ///
    /// `keep` serves it again if it was hidden, and reports never hide it again; `purge` removes
    /// it from every cache layer, as `versus purge` does (the next request generates it
    /// afresh); `refuse` refuses it for good.
    #[command(after_help = AFTER_HELP)]
    Settle {
        /// What was reported: the answer's text or its picture.
        kind: ReportKind,
        /// Its key: 32 hexadecimal digits, as `versus reports list` shows it.
        key: String,
        /// What to do with it.
        action: Settlement,
    },
}

/// What a report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportKind {
    /// The answer's text.
    Text,
    /// The answer's picture.
    Image,
}

impl ReportKind {
    /// As the API names it in routes and lists.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportKind::Text => "text",
            ReportKind::Image => "image",
        }
    }
}

/// An operator's decision on a reported answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Settlement {
    /// Serve it (again, if it was hidden), and let reports never hide it again.
    Keep,
    /// Remove it from every cache layer; the next request generates it afresh.
    Purge,
    /// Refuse it for good: served as refused, never generated again.
    Refuse,
}

impl Settlement {
    /// As the API names it (`{"action": …}`).
    pub fn as_str(self) -> &'static str {
        match self {
            Settlement::Keep => "keep",
            Settlement::Purge => "purge",
            Settlement::Refuse => "refuse",
        }
    }
}

#[derive(Debug, Args)]
pub struct PrewarmArgs {
    /// The matchups. CSV: `a,b` per line, an optional `a,b` header, names with commas in
    /// double quotes (`"Smith, John",Batman`), blank lines ignored. JSON: `[{"a":…,"b":…}, …]`
    /// or `{"matchups":[…]}`. JSON when the name ends in `.json` or the text starts with `[` or
    /// `{`; CSV otherwise.
    #[arg(required_unless_present = "popular", conflicts_with = "popular")]
    pub file: Option<PathBuf>,
    /// Instead of a file: the N most requested matchups whose answer is not complete yet.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub popular: Option<u32>,
    /// Also generate the pictures.
    #[arg(long)]
    pub images: bool,
    /// How many matchups one request carries (the API takes up to 10000); a longer list goes
    /// as several batches, all followed to the end.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch_size: u64,
    /// Only check the file and report its problems; submit nothing (no token needed).
    #[arg(long, requires = "file")]
    pub check: bool,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn reports_settle_takes_a_kind_a_key_and_an_action() {
        let cli = Cli::try_parse_from(["versus", "reports", "settle", "image", "ab12", "keep"])
            .expect("a valid command line");
        let Command::Reports(ReportsCommand::Settle { kind, key, action }) = cli.command else {
            panic!("not reports settle: {:?}", cli.command);
        };
        assert_eq!(
            (kind, key.as_str(), action),
            (ReportKind::Image, "ab12", Settlement::Keep)
        );
        assert_eq!((kind.as_str(), action.as_str()), ("image", "keep"));
        for bad in [
            ["versus", "reports", "settle", "video", "ab12", "keep"],
            ["versus", "reports", "settle", "text", "ab12", "hide"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    fn alias(args: &[&str]) -> AliasCommand {
        let cli = Cli::try_parse_from(["versus", "alias"].iter().chain(args))
            .expect("a valid command line");
        match cli.command {
            Command::Alias(command) => command,
            other => panic!("not alias: {other:?}"),
        }
    }

    #[test]
    fn alias_add_takes_the_alias_then_its_canonical_name() {
        let AliasCommand::Add {
            alias: a,
            canonical,
        } = alias(&["add", "Kakarot", "Son Goku"])
        else {
            panic!("not alias add");
        };
        assert_eq!((a.as_str(), canonical.as_str()), ("Kakarot", "Son Goku"));
        for bad in [
            &["versus", "alias", "add", "Kakarot"][..],
            &["versus", "alias", "add", "Kakarot", "Goku", "Vegeta"],
            &["versus", "alias"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn alias_rm_and_list() {
        let AliasCommand::Rm { alias: a } = alias(&["rm", "Kakarot"]) else {
            panic!("not alias rm");
        };
        assert_eq!(a, "Kakarot");
        assert!(matches!(alias(&["list"]), AliasCommand::List));
        assert!(Cli::try_parse_from(["versus", "alias", "rm"]).is_err());
        assert!(Cli::try_parse_from(["versus", "alias", "list", "x"]).is_err());
    }

    #[test]
    fn alias_import_takes_a_file_and_check() {
        let AliasCommand::Import(args) = alias(&["import", "aliases.csv"]) else {
            panic!("not alias import");
        };
        assert_eq!(args.file, Path::new("aliases.csv"));
        assert!(!args.check);
        let AliasCommand::Import(args) = alias(&["import", "--check", "a.json"]) else {
            panic!("not alias import");
        };
        assert!(args.check && args.file == Path::new("a.json"));
        assert!(Cli::try_parse_from(["versus", "alias", "import", "--check"]).is_err());
    }
}
