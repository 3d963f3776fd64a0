//! JSON matchups or aliases: an array of `{"a","b"}` objects (`{"alias","canonical"}` for
//! aliases, or `{"a","b"}` too), or `{"matchups":[…]}` (the body of `POST /v1/admin/prewarm`)
//! or `{"aliases":[…]}` (the answer of `GET /v1/admin/aliases`). Other fields are ignored, so
//! a saved `popular` or alias list works too.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::{Entry, Format, Problem, all_or_problems, check};

/// The wrapping object, with whichever list it holds.
#[derive(Deserialize)]
struct Wrapped<'a> {
    #[serde(borrow)]
    matchups: Option<Vec<&'a RawValue>>,
    #[serde(borrow)]
    aliases: Option<Vec<&'a RawValue>>,
}

impl<'a> Wrapped<'a> {
    fn list(self, format: Format) -> Option<Vec<&'a RawValue>> {
        match format {
            Format::Matchups => self.matchups,
            Format::Aliases => self.aliases,
        }
    }
}

pub(super) fn parse(text: &str, format: Format) -> Result<Vec<Entry>, Vec<Problem>> {
    let [first, second] = format.fields();
    let not_expected = |line: usize, e: &dyn std::fmt::Display| {
        vec![Problem::at(
            line,
            format!(
                "not the JSON expected (an array of {{\"{first}\",\"{second}\"}} objects, or \
                 {{\"{}\":[…]}}): {e}",
                format.list()
            ),
        )]
    };
    // Raw values borrow from `text`, so each entry knows where it starts: its line number.
    let items = if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<&RawValue>>(text)
            .map_err(|e| not_expected(e.line().max(1), &e))?
    } else {
        let wrapped =
            serde_json::from_str::<Wrapped>(text).map_err(|e| not_expected(e.line().max(1), &e))?;
        let missing = format!("missing field `{}`", format.list());
        wrapped
            .list(format)
            .ok_or_else(|| not_expected(1, &missing))?
    };
    all_or_problems(items.into_iter().map(|raw| {
        let line = line_of(text, raw.get());
        match serde_json::from_str::<Value>(raw.get()) {
            Ok(Value::Object(object)) => {
                let [a, b] = format.spellings();
                let a = name(line, &object, a)?;
                let b = name(line, &object, b)?;
                check(format, line, a, b)
            }
            _ => Err(Problem::at(
                line,
                format!("expected an object {{\"{first}\",\"{second}\"}}"),
            )),
        }
    }))
}

/// The name under the first of `spellings` the object holds: absent is `None` (the API's
/// "missing"), a non-string a problem.
fn name<'a>(
    line: usize,
    object: &'a serde_json::Map<String, Value>,
    spellings: &[&str],
) -> Result<Option<&'a str>, Problem> {
    let found = spellings
        .iter()
        .find_map(|&field| object.get(field).map(|value| (field, value)));
    match found {
        None | Some((_, Value::Null)) => Ok(None),
        Some((_, Value::String(s))) => Ok(Some(s)),
        Some((field, _)) => Err(Problem::at(
            line,
            format!("opponent `{field}` is not a string"),
        )),
    }
}

/// The 1-based line where `part`, a slice of `text`, starts.
fn line_of(text: &str, part: &str) -> usize {
    let offset = (part.as_ptr().addr())
        .saturating_sub(text.as_ptr().addr())
        .min(text.len());
    1 + text.as_bytes()[..offset]
        .iter()
        .filter(|&&c| c == b'\n')
        .count()
}
