//! Reading a file of matchups (CSV or JSON) and checking all of it, with the API's own name
//! rules, before anything is submitted.

mod csv;
mod json;

use std::fmt;
use std::path::Path;

use serde::Serialize;
use versus_shared::key::Matchup;

/// One matchup as the file gives it; the API trims and normalises the names again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pair {
    pub a: String,
    pub b: String,
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
    let bytes = std::fs::read(path)
        .map_err(|e| vec![Problem::whole_file(format!("cannot read the file: {e}"))])?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = 1 + valid.iter().filter(|&&c| c == b'\n').count();
        vec![Problem::at(line, "not UTF-8 text")]
    })?;
    parse(path, &text)
}

/// Parses the text of `path`: JSON when the name ends in `.json` or, unless it ends in `.csv`,
/// when the text starts with `[` or `{`; CSV otherwise.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Pair>, Vec<Problem>> {
    // Spreadsheets often save CSV with a byte-order mark; it is not part of the first name.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let looks_json = text.trim_start().starts_with(['[', '{']);
    let pairs = match extension.as_deref() {
        Some("json") => json::parse(text)?,
        Some("csv") => csv::parse(text)?,
        _ if looks_json => json::parse(text)?,
        _ => csv::parse(text)?,
    };
    if pairs.is_empty() {
        return Err(vec![Problem::whole_file("the file holds no matchups")]);
    }
    Ok(pairs)
}

/// Checks one matchup with exactly the API's rules.
fn check(line: usize, a: Option<&str>, b: Option<&str>) -> Result<Pair, Problem> {
    match Matchup::parse(a, b) {
        Ok(_) => Ok(Pair {
            a: a.unwrap_or_default().to_owned(),
            b: b.unwrap_or_default().to_owned(),
        }),
        Err(e) => Err(Problem::at(line, e.to_string())),
    }
}

/// Collects the matchups, or all the problems if there is any.
fn all_or_problems(
    results: impl IntoIterator<Item = Result<Pair, Problem>>,
) -> Result<Vec<Pair>, Vec<Problem>> {
    let (pairs, problems): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    if problems.is_empty() {
        Ok(pairs.into_iter().flatten().collect())
    } else {
        Err(problems.into_iter().filter_map(Result::err).collect())
    }
}

#[cfg(test)]
mod tests;
