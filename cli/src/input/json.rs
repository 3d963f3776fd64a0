//! JSON matchups: an array of `{"a","b"}` objects, or `{"matchups":[…]}` (the body of
//! `POST /v1/admin/prewarm`). Other fields are ignored, so a saved `popular` list works too.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::{Pair, Problem, all_or_problems, check};

#[derive(Deserialize)]
struct Wrapped<'a> {
    #[serde(borrow)]
    matchups: Vec<&'a RawValue>,
}

pub(super) fn parse(text: &str) -> Result<Vec<Pair>, Vec<Problem>> {
    // Raw values borrow from `text`, so each matchup knows where it starts: its line number.
    let items = if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<&RawValue>>(text)
    } else {
        serde_json::from_str::<Wrapped>(text).map(|w| w.matchups)
    };
    let items = items.map_err(|e| {
        vec![Problem::at(
            e.line().max(1),
            format!(
                "not the JSON expected (an array of {{\"a\",\"b\"}} objects, or \
                 {{\"matchups\":[…]}}): {e}"
            ),
        )]
    })?;
    all_or_problems(items.into_iter().map(|raw| {
        let line = line_of(text, raw.get());
        match serde_json::from_str::<Value>(raw.get()) {
            Ok(Value::Object(object)) => {
                let a = name(line, &object, "a")?;
                let b = name(line, &object, "b")?;
                check(line, a, b)
            }
            _ => Err(Problem::at(line, "expected an object {\"a\",\"b\"}")),
        }
    }))
}

/// The field `field` as a name: absent is `None` (the API's "missing"), a non-string a problem.
fn name<'a>(
    line: usize,
    object: &'a serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, Problem> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Problem::at(
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
