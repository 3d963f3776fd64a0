//! Reading matchup files: both formats, both JSON shapes, and every problem with its line.

use std::path::Path;

use super::{Entry, Format, Pair, Problem, parse, parse_as};

fn pair(a: &str, b: &str) -> Pair {
    Pair {
        a: a.to_owned(),
        b: b.to_owned(),
    }
}

fn csv(text: &str) -> Result<Vec<Pair>, Vec<Problem>> {
    parse(Path::new("matchups.csv"), text)
}

fn json(text: &str) -> Result<Vec<Pair>, Vec<Problem>> {
    parse(Path::new("matchups.json"), text)
}

/// The problems as the CLI prints them.
fn problems<T: std::fmt::Debug>(result: Result<T, Vec<Problem>>) -> Vec<String> {
    result
        .expect_err("the file has problems")
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn csv_without_a_header_is_one_matchup_per_line_and_blank_lines_are_skipped() {
    let text = "Batman,Superman\n\n  \nGodzilla , King Kong\r\nBatman,Superman\n";
    assert_eq!(
        csv(text).unwrap(),
        [
            pair("Batman", "Superman"),
            pair("Godzilla ", " King Kong"),
            pair("Batman", "Superman"),
        ]
    );
}

#[test]
fn a_first_line_a_b_in_any_case_is_a_header() {
    assert_eq!(
        csv("\u{feff}A, b\nBatman,Superman\n").unwrap(),
        [pair("Batman", "Superman")]
    );
    assert_eq!(csv("a,b\nx,y").unwrap(), [pair("x", "y")]);
    // Only the first line can be a header.
    assert_eq!(csv("x,y\na,b").unwrap(), [pair("x", "y"), pair("a", "b")]);
}

#[test]
fn quoted_names_may_hold_commas_and_doubled_quotes() {
    let text = "\"Smith, John\",Batman\n \"Dwayne \"\"The Rock\"\" Johnson\" , \"\"\"Q\"\"\"\n\
                Dwayne \"The Rock\" Johnson,X\n";
    assert_eq!(
        csv(text).unwrap(),
        [
            pair("Smith, John", "Batman"),
            pair("Dwayne \"The Rock\" Johnson", "\"Q\""),
            pair("Dwayne \"The Rock\" Johnson", "X"),
        ]
    );
}

#[test]
fn every_malformed_csv_line_is_reported_with_its_number() {
    let text = "a,b\n\
                Batman,Superman\n\
                Batman\n\
                \"Smith, John,Batman\n\
                x,y,z\n\
                ok,fine\n\
                Batman,\n\
                \"Smith\" John,X\n\
                O\"Neil,X\n\
                Batman,Superman,\n";
    assert_eq!(
        problems(csv(text)),
        [
            "line 3: expected two names separated by a comma (`a,b`), found 1 field",
            "line 4: unbalanced quotes: a quoted name is not closed",
            "line 5: expected two names separated by a comma (`a,b`), found 3 fields",
            "line 7: opponent `b` is empty",
            "line 8: unbalanced quotes: text follows a closing quote",
            "line 9: unbalanced quotes: put a name with quotes or commas in double quotes, \
             with each quote inside it doubled",
            "line 10: expected two names separated by a comma (`a,b`), found 3 fields",
        ]
    );
}

#[test]
fn invalid_names_are_reported_with_the_apis_rules_and_their_lines() {
    let long = "x".repeat(101);
    let hundred = "é".repeat(100);
    let text = format!(
        "  ,Batman\n{long},Batman\nBat\u{7}man,Robin\n{hundred},Batman\nBatman,\"\tRobin\"\n"
    );
    assert_eq!(
        problems(csv(&text)),
        [
            "line 1: opponent `a` is empty",
            "line 2: opponent `a` is longer than 100 characters",
            "line 3: opponent `a` contains control characters",
        ]
    );
    // 100 characters is the limit, and a tab at either end is trimmed as the API does.
    assert!(csv(&format!("{hundred},Batman\nBatman,\"\tRobin\"\n")).is_ok());
}

#[test]
fn a_file_without_matchups_is_refused() {
    assert_eq!(problems(csv("a,b\n\n")), ["the file holds no matchups"]);
    assert_eq!(problems(json("[]")), ["the file holds no matchups"]);
}

#[test]
fn json_is_an_array_of_pairs_or_an_object_with_matchups() {
    let list = r#"[{"a": "Batman", "b": "Superman"}, {"b": "Kong", "a": "Godzilla", "key": "x"}]"#;
    let expected = [pair("Batman", "Superman"), pair("Godzilla", "Kong")];
    assert_eq!(json(list).unwrap(), expected);
    let wrapped = format!(r#"{{"matchups": {list}, "images": true}}"#);
    assert_eq!(json(&wrapped).unwrap(), expected);
}

#[test]
fn json_is_recognised_by_its_text_when_the_name_does_not_say() {
    let path = Path::new("matchups.txt");
    assert_eq!(
        parse(path, "\n [{\"a\":\"x\",\"b\":\"y\"}]").unwrap(),
        [pair("x", "y")]
    );
    assert_eq!(parse(path, "x,y").unwrap(), [pair("x", "y")]);
    // A .csv file is CSV even when a name starts with a bracket.
    assert_eq!(csv("[REDACTED],y").unwrap(), [pair("[REDACTED]", "y")]);
}

#[test]
fn every_bad_json_matchup_is_reported_with_the_line_it_starts_on() {
    let long = "x".repeat(101);
    let text = format!(
        "[\n  {{\"a\": \"Batman\", \"b\": \"Superman\"}},\n  {{\"a\": \"\", \"b\": \"Robin\"}},\n  \
         {{\"a\": \"Batman\"}},\n  {{\"a\": \"{long}\",\n   \"b\": \"x\"}},\n  {{\"a\": 7, \"b\": \"x\"}},\n  \
         \"Batman vs Superman\",\n  {{\"a\": \"Bat\\u0007man\", \"b\": \"x\"}}\n]"
    );
    assert_eq!(
        problems(json(&text)),
        [
            "line 3: opponent `a` is empty",
            "line 4: opponent `b` is missing",
            "line 5: opponent `a` is longer than 100 characters",
            "line 7: opponent `a` is not a string",
            "line 8: expected an object {\"a\",\"b\"}",
            "line 9: opponent `a` contains control characters",
        ]
    );
}

#[test]
fn malformed_json_is_reported_with_its_line() {
    let found = problems(json(
        "[\n {\"a\": \"x\", \"b\": \"y\"},\n {\"a\": \"x\" \"b\": 1}\n]",
    ));
    assert_eq!(found.len(), 1);
    assert!(
        found[0].starts_with("line 3: not the JSON expected"),
        "{found:?}"
    );
    let found = problems(json("{\"fights\": []}"));
    assert!(found[0].contains("missing field `matchups`"), "{found:?}");
}

fn aliases(text: &str, extension: &str) -> Result<Vec<Entry>, Vec<Problem>> {
    parse_as(
        Path::new(&format!("aliases.{extension}")),
        text,
        Format::Aliases,
    )
}

fn entry(line: usize, alias: &str, canonical: &str) -> Entry {
    Entry {
        line,
        pair: pair(alias, canonical),
    }
}

#[test]
fn aliases_are_read_with_their_lines_under_either_header() {
    let text = "alias,canonical\nKakarot,Goku\n\n\"Kal-El, son of Jor-El\",Superman\n";
    assert_eq!(
        aliases(text, "csv").unwrap(),
        [
            entry(2, "Kakarot", "Goku"),
            entry(4, "Kal-El, son of Jor-El", "Superman")
        ]
    );
    assert_eq!(
        aliases("A,B\nKakarot,Goku\n", "csv").unwrap(),
        [entry(2, "Kakarot", "Goku")]
    );
    // Matchups take only their own header.
    assert_eq!(
        csv("alias,canonical\nx,y\n").unwrap(),
        [pair("alias", "canonical"), pair("x", "y")]
    );
}

#[test]
fn bad_alias_lines_name_the_alias_and_its_canonical_name() {
    let text = "Kakarot,Goku\nKakarot\n  ,Goku\nKal-El,Bat\u{7}man\n";
    assert_eq!(
        problems(aliases(text, "csv")),
        [
            "line 2: expected two names separated by a comma (`alias,canonical`), found 1 field",
            "line 3: opponent `alias` is empty",
            "line 4: opponent `canonical` contains control characters",
        ]
    );
    assert_eq!(
        problems(aliases("alias,canonical\n", "csv")),
        ["the file holds no aliases"]
    );
}

#[test]
fn json_aliases_are_alias_and_canonical_or_a_and_b_or_wrapped() {
    let list = "[\n  {\"alias\": \"Kakarot\", \"canonical\": \"Goku\"},\n  \
                {\"a\": \"Kal-El\", \"b\": \"Superman\"}\n]";
    let expected = [entry(2, "Kakarot", "Goku"), entry(3, "Kal-El", "Superman")];
    assert_eq!(aliases(list, "json").unwrap(), expected);
    // What `GET /v1/admin/aliases` answers reads back.
    let wrapped = format!("{{\"aliases\": {list}}}");
    assert_eq!(aliases(&wrapped, "txt").unwrap(), expected);
    let found = problems(aliases("{\"matchups\": []}", "json"));
    assert!(found[0].contains("missing field `aliases`"), "{found:?}");
    let found = problems(aliases("[{\"alias\": \"Kakarot\"}, 7]", "json"));
    assert_eq!(
        found,
        [
            "line 1: opponent `canonical` is missing",
            "line 1: expected an object {\"alias\",\"canonical\"}"
        ]
    );
}
