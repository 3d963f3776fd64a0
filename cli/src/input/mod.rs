//! Reading a file of matchups or aliases (CSV or JSON) and checking all of it, with the API's
//! own name rules, before anything is submitted.

mod csv;
mod json;

use std::fmt;
use std::path::Path;

use serde::Serialize;
use versus_shared::key::Name;

use crate::Error;

/// One matchup as the file gives it; the API trims and normalises the names again. In a file
/// of aliases, `a` is the alias and `b` its canonical name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pair {
    pub a: String,
    pub b: String,
}

/// One pair of names and the line of the file it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub line: usize,
    pub pair: Pair,
}

/// What a file lists: both are two names a line, under other names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Matchups: `a,b` (`versus prewarm`).
    Matchups,
    /// Aliases: `alias,canonical` (`versus alias import`); `a,b` is taken too, as in a file
    /// of matchups.
    Aliases,
}

impl Format {
    /// What the file lists, in messages; also the member of a JSON file's wrapping object.
    pub fn list(self) -> &'static str {
        match self {
            Format::Matchups => "matchups",
            Format::Aliases => "aliases",
        }
    }

    /// The two names, as messages, a CSV header and JSON members name them.
    pub fn fields(self) -> [&'static str; 2] {
        match self {
            Format::Matchups => ["a", "b"],
            Format::Aliases => ["alias", "canonical"],
        }
    }

    /// How each name may be spelled in a CSV header or as a JSON member: as
    /// [`Format::fields`] names it, or (aliases) `a` and `b`.
    fn spellings(self) -> [&'static [&'static str]; 2] {
        match self {
            Format::Matchups => [&["a"], &["b"]],
            Format::Aliases => [&["alias", "a"], &["canonical", "b"]],
        }
    }
}

/// Something wrong with one line of the file (or, without a line, with the whole file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    pub message: String,
}

impl Problem {
    fn at(line: usize, message: impl Into<String>) -> Problem {
        Problem {
            line: Some(line),
            message: message.into(),
        }
    }

    fn whole_file(message: impl Into<String>) -> Problem {
        Problem {
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Reads `path`: every matchup, or every problem found (never only the first).
pub fn read(path: &Path) -> Result<Vec<Pair>, Vec<Problem>> {
    let entries = read_as(path, Format::Matchups)?;
    Ok(entries.into_iter().map(|e| e.pair).collect())
}

/// Reads `path` as a file of `format`: every pair with its line, or every problem found.
pub fn read_as(path: &Path, format: Format) -> Result<Vec<Entry>, Vec<Problem>> {
    let bytes = std::fs::read(path)
        .map_err(|e| vec![Problem::whole_file(format!("cannot read the file: {e}"))])?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = 1 + valid.iter().filter(|&&c| c == b'\n').count();
        vec![Problem::at(line, "not UTF-8 text")]
    })?;
    parse_as(path, &text, format)
}

/// Parses the text of `path` as matchups.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Pair>, Vec<Problem>> {
    let entries = parse_as(path, text, Format::Matchups)?;
    Ok(entries.into_iter().map(|e| e.pair).collect())
}

/// Parses the text of `path` as a file of `format`: JSON when the name ends in `.json` or,
/// unless it ends in `.csv`, when the text starts with `[` or `{`; CSV otherwise.
pub fn parse_as(path: &Path, text: &str, format: Format) -> Result<Vec<Entry>, Vec<Problem>> {
    // Spreadsheets often save CSV with a byte-order mark; it is not part of the first name.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let looks_json = text.trim_start().starts_with(['[', '{']);
    let entries = match extension.as_deref() {
        Some("json") => json::parse(text, format)?,
        Some("csv") => csv::parse(text, format)?,
        _ if looks_json => json::parse(text, format)?,
        _ => csv::parse(text, format)?,
    };
    if entries.is_empty() {
        return Err(vec![Problem::whole_file(format!(
            "the file holds no {}",
            format.list()
        ))]);
    }
    Ok(entries)
}

/// Prints every problem of `path` and turns them into the refusal (nothing was submitted).
pub fn refuse(path: &Path, problems: &[Problem]) -> Error {
    for problem in problems {
        eprintln!("{}: {problem}", path.display());
    }
    let count = match problems.len() {
        1 => "a problem".to_owned(),
        n => format!("{n} problems"),
    };
    Error::BadInput(format!(
        "{} has {count}: nothing was submitted",
        path.display()
    ))
}

/// Checks the two names of one line with exactly the API's rules (those of
/// `Matchup::parse`, the first name, then the second), named as `format` names them.
fn check(format: Format, line: usize, a: Option<&str>, b: Option<&str>) -> Result<Entry, Problem> {
    let [first, second] = format.fields();
    let checked = Name::parse(first, a).and_then(|_| Name::parse(second, b));
    match checked {
        Ok(_) => Ok(Entry {
            line,
            pair: Pair {
                a: a.unwrap_or_default().to_owned(),
                b: b.unwrap_or_default().to_owned(),
            },
        }),
        Err(e) => Err(Problem::at(line, e.to_string())),
    }
}

/// Collects the entries, or all the problems if there is any.
fn all_or_problems(
    results: impl IntoIterator<Item = Result<Entry, Problem>>,
) -> Result<Vec<Entry>, Vec<Problem>> {
    let (pairs, problems): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    if problems.is_empty() {
        Ok(pairs.into_iter().flatten().collect())
    } else {
        Err(problems.into_iter().filter_map(Result::err).collect())
    }
}

#[cfg(test)]
mod tests;
