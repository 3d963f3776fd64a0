//! CSV matchups or aliases: `a,b` (or `alias,canonical`) per line, an optional header naming
//! the two, names in double quotes when they hold commas (`""` is a quote inside them), blank
//! lines ignored.
//!
//! One line is one matchup (or alias). A name can never span lines (a line break is a control
//! character, which the API refuses), so splitting lines first lets one unclosed quote be
//! reported on its own line rather than swallow the rest of the file, as a general CSV reader
//! would.

use super::{Entry, Format, Problem, all_or_problems, check};

pub(super) fn parse(text: &str, format: Format) -> Result<Vec<Entry>, Vec<Problem>> {
    let mut first = true;
    let mut results = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let is_first = std::mem::replace(&mut first, false);
        let fields = match fields(line) {
            Ok(fields) => fields,
            Err(message) => {
                results.push(Err(Problem::at(number, message)));
                continue;
            }
        };
        if is_first && is_header(&fields, format) {
            continue;
        }
        results.push(match fields.as_slice() {
            [a, b] => check(format, number, Some(a), Some(b)),
            _ => Err(Problem::at(
                number,
                format!(
                    "expected two names separated by a comma (`{}`), found {} field{}",
                    format.fields().join(","),
                    fields.len(),
                    if fields.len() == 1 { "" } else { "s" }
                ),
            )),
        });
    }
    all_or_problems(results)
}

fn is_header(fields: &[String], format: Format) -> bool {
    let [first, second] = format.spellings();
    let names = |field: &str, spellings: &[&str]| {
        spellings
            .iter()
            .any(|s| field.trim().eq_ignore_ascii_case(s))
    };
    matches!(fields, [a, b] if names(a, first) && names(b, second))
}

/// Splits one line into its fields. A field that starts (after blanks) with `"` runs to the
/// matching quote; an unquoted field may hold quotes only in pairs (`Dwayne "The Rock" Johnson`).
fn fields(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut rest = line;
    loop {
        let blanks = rest.len() - rest.trim_start_matches([' ', '\t']).len();
        let (field, after) = if rest[blanks..].starts_with('"') {
            quoted(&rest[blanks + 1..])?
        } else {
            unquoted(rest)?
        };
        fields.push(field);
        match after {
            Some(next) => rest = next,
            None => return Ok(fields),
        }
    }
}

/// A quoted field, from just after its opening quote: its value and what follows the comma
/// after it (`None` at the end of the line).
fn quoted(s: &str) -> Result<(String, Option<&str>), String> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '"' {
            value.push(c);
            continue;
        }
        if s[i + 1..].starts_with('"') {
            value.push('"');
            chars.next();
            continue;
        }
        let after = s[i + 1..].trim_start_matches([' ', '\t']);
        return match after.strip_prefix(',') {
            Some(next) => Ok((value, Some(next))),
            None if after.is_empty() => Ok((value, None)),
            None => Err("unbalanced quotes: text follows a closing quote".to_owned()),
        };
    }
    Err("unbalanced quotes: a quoted name is not closed".to_owned())
}

/// An unquoted field: up to the next comma.
fn unquoted(s: &str) -> Result<(String, Option<&str>), String> {
    let (value, after) = match s.split_once(',') {
        Some((value, next)) => (value, Some(next)),
        None => (s, None),
    };
    if value.matches('"').count() % 2 == 1 {
        return Err(
            "unbalanced quotes: put a name with quotes or commas in double quotes, \
                    with each quote inside it doubled"
                .to_owned(),
        );
    }
    Ok((value.to_owned(), after))
}
