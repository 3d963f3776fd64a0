//! The results section of `BENCHMARKS.md`: a table per scenario (measured, baseline, ratio,
//! goal, met?), a summary of the goals, and the machine and commit they came from. It is
//! rebuilt from the raw JSON files of one run and replaces whatever stood between the
//! markers.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;

use crate::{
    capacity, coalesce, edge, fallback, far, hits, memory, miss, prewarm, refuse, streams, suggest,
    viral,
};

pub const START: &str = "<!-- results:start -->";
pub const END: &str = "<!-- results:end -->";

#[derive(clap::Args)]
pub struct Args {
    /// The folder of raw results of one run.
    #[arg(long)]
    pub results: PathBuf,
    /// The file whose results section is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub file: PathBuf,
    /// Print the section instead of writing it.
    #[arg(long)]
    pub dry_run: bool,
    /// `full` or `quick`, for the header.
    #[arg(long, default_value = "full")]
    pub mode: String,
    /// Versions of the tools used, for the header.
    #[arg(long, default_value = "")]
    pub tools: String,
    /// Load average when the run started (from /proc/loadavg).
    #[arg(long, default_value = "")]
    pub load_at_start: String,
    /// The settings the script started the system with, for the header.
    #[arg(long, default_value = "")]
    pub settings: String,
}

/// One scenario's table.
pub struct Section {
    pub id: &'static str,
    pub title: &'static str,
    /// What is compared with what, and how it is measured.
    pub method: String,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    /// Why the scenario did not run, when it did not.
    pub skipped: Option<String>,
    /// Markdown printed after the notes (a profile, say).
    pub appendix: String,
}

impl Section {
    pub fn skipped(id: &'static str, title: &'static str, why: impl Into<String>) -> Section {
        Section {
            id,
            title,
            method: String::new(),
            rows: Vec::new(),
            notes: Vec::new(),
            skipped: Some(why.into()),
            appendix: String::new(),
        }
    }
}

pub struct Row {
    pub what: String,
    pub measured: String,
    pub baseline: String,
    pub ratio: String,
    pub goal: String,
    /// None: a figure without a goal.
    pub met: Option<bool>,
}

impl Row {
    pub fn info(what: impl Into<String>, measured: impl Into<String>) -> Row {
        Row {
            what: what.into(),
            measured: measured.into(),
            baseline: String::new(),
            ratio: String::new(),
            goal: String::new(),
            met: None,
        }
    }
}

/// Sizes of a scenario this machine could not hold, and why (`versus-bench skipped`).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub sizes: Vec<usize>,
    pub why: String,
}

impl Skipped {
    /// A row per size, `N UNIT: not measured: why`.
    pub fn rows(&self, unit: &str) -> Vec<Row> {
        self.sizes
            .iter()
            .map(|n| {
                Row::info(
                    format!("{} {unit}", crate::stats::fmt_count(*n as f64)),
                    format!("not measured: {}", self.why),
                )
            })
            .collect()
    }
}

#[derive(clap::Args)]
pub struct SkippedArgs {
    #[arg(long)]
    pub out_dir: PathBuf,
    /// The scenario's file prefix (`m2`, `viral`).
    #[arg(long)]
    pub scenario: String,
    /// Sizes not measured, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    #[arg(long)]
    pub why: String,
}

fn skipped_file(scenario: &str) -> String {
    format!("{scenario}-skipped.json")
}

/// `versus-bench skipped`: records the sizes a scenario could not run at.
pub fn record_skipped(args: SkippedArgs) -> anyhow::Result<()> {
    crate::write_json(
        &args.out_dir.join(skipped_file(&args.scenario)),
        &Skipped {
            sizes: args.sizes,
            why: args.why,
        },
    )
}

/// Every run of a scenario that writes a file per size (`SCENARIO-*.json`), and the sizes it
/// could not run at.
pub fn load_runs<T: DeserializeOwned>(
    dir: &Path,
    scenario: &str,
) -> anyhow::Result<(Vec<T>, Option<Skipped>)> {
    let skipped = skipped_file(scenario);
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{scenario}-")) && name.ends_with(".json") && name != skipped {
            runs.extend(load::<T>(dir, &name)?);
        }
    }
    Ok((runs, load(dir, &skipped)?))
}

/// Reads `dir/name`, or None if this run did not write it.
pub fn load<T: DeserializeOwned>(dir: &Path, name: &str) -> anyhow::Result<Option<T>> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?,
    ))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = &args.results;
    let mut sections = Vec::new();
    sections.extend(hits::sections(dir)?);
    sections.extend(miss::sections(dir)?);
    sections.extend(coalesce::sections(dir)?);
    sections.extend(capacity::sections(dir)?);
    sections.extend(prewarm::sections(dir)?);
    sections.extend(memory::sections(dir)?);
    sections.extend(streams::sections(dir)?);
    sections.extend(refuse::sections(dir)?);
    sections.extend(suggest::sections(dir)?);
    sections.extend(edge::sections(dir)?);
    sections.extend(far::sections(dir)?);
    sections.extend(viral::sections(dir)?);
    sections.extend(fallback::sections(dir)?);
    let text = render(&args, &sections);
    if args.dry_run {
        print!("{text}");
        return Ok(());
    }
    let old = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let new = replace_between_markers(&old, &text)?;
    std::fs::write(&args.file, new)?;
    eprintln!("rewrote the results in {}", args.file.display());
    Ok(())
}

fn replace_between_markers(old: &str, section: &str) -> anyhow::Result<String> {
    let (Some(start), Some(end)) = (old.find(START), old.find(END)) else {
        bail!("the file has no {START} … {END} markers");
    };
    if end < start {
        bail!("{END} comes before {START}");
    }
    Ok(format!(
        "{}{START}\n{section}{}",
        &old[..start],
        &old[end..]
    ))
}

fn render(args: &Args, sections: &[Section]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n## Latest results\n");
    let _ = writeln!(
        s,
        "- **When**: {} ({} run of `scripts/bench`{})",
        utc_now(),
        args.mode,
        if args.mode == "quick" {
            ": fewer requests and shorter loads; the committed figures come from a full run"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "- **Commit**: {}", git_commit());
    let _ = writeln!(s, "- **Machine**: {}", machine());
    if !args.load_at_start.is_empty() {
        let _ = writeln!(
            s,
            "- **Load average at the start**: {} (anything well above 0 means other work \
             shared the cores)",
            args.load_at_start
        );
    }
    if !args.tools.is_empty() {
        let _ = writeln!(s, "- **Tools**: {}", args.tools);
    }
    if !args.settings.is_empty() {
        let _ = writeln!(s, "- **System under test**: {}", args.settings);
    }
    let _ = writeln!(s, "\n### Goals at a glance\n");
    let _ = writeln!(s, "| scenario | what | measured | goal | met? |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for section in sections {
        if let Some(why) = &section.skipped {
            let _ = writeln!(
                s,
                "| {} {} | not run: {} | | | — |",
                section.id,
                section.title,
                cell(why)
            );
            continue;
        }
        for row in section.rows.iter().filter(|r| r.met.is_some()) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                section.id,
                cell(&row.what),
                cell(&row.measured),
                cell(&row.goal),
                met(row.met)
            );
        }
    }
    for section in sections {
        let _ = writeln!(s, "\n### {} {}\n", section.id, section.title);
        if let Some(why) = &section.skipped {
            let _ = writeln!(s, "Not run: {why}");
            continue;
        }
        if !section.method.is_empty() {
            let _ = writeln!(s, "{}\n", section.method);
        }
        let _ = writeln!(s, "| what | measured | baseline | ratio | goal | met? |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for row in &section.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                cell(&row.what),
                cell(&row.measured),
                cell(&row.baseline),
                cell(&row.ratio),
                cell(&row.goal),
                met(row.met)
            );
        }
        if !section.notes.is_empty() {
            let _ = writeln!(s);
            for note in &section.notes {
                let _ = writeln!(s, "- {note}");
            }
        }
        if !section.appendix.is_empty() {
            let _ = writeln!(s, "\n{}", section.appendix.trim_end());
        }
    }
    let _ = writeln!(s);
    s
}

fn met(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "",
    }
}

/// Table cells cannot hold a `|` or a line break.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn utc_now() -> String {
    command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "unknown date".to_owned())
}

fn git_commit() -> String {
    let Some(commit) = command("git", &["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown (not a git checkout)".to_owned();
    };
    let dirty = command("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("`{commit}` with uncommitted changes")
    } else {
        format!("`{commit}`")
    }
}

/// "2 cores (AMD EPYC), 23.5 GiB memory, Linux 6.1.0".
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    let kernel = command("uname", &["-sr"]).unwrap_or_default();
    format!("{cores} cores ({model}), {mem_gib:.1} GiB memory, {kernel}")
}

fn command(program: &str, args: &[&str]) -> Option<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_text_between_the_markers_is_replaced() {
        let old = format!("# B\nintro\n{START}\nold figures\n{END}\nafter\n");
        let new = replace_between_markers(&old, "new figures\n").expect("markers");
        assert_eq!(
            new,
            format!("# B\nintro\n{START}\nnew figures\n{END}\nafter\n")
        );
    }

    #[test]
    fn a_file_without_markers_is_refused() {
        assert!(replace_between_markers("# B\n", "x").is_err());
    }
}
