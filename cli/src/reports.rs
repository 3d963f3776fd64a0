//! `versus reports list` and `versus reports settle`: the answers and pictures users reported,
//! and the operator's decision on one (keep, purge or refuse).

use std::fmt::Write;

use anyhow::anyhow;

use crate::Error;
use crate::admin::{Admin, Report};
use crate::args::{ReportKind, Settlement};
use crate::purge::parse_key;

pub async fn list(api: &str) -> Result<(), Error> {
    let admin = Admin::from_env(api)?;
    let reports = admin.reports().await?;
    print!("{}", table(&reports));
    Ok(())
}

pub async fn settle(
    api: &str,
    kind: ReportKind,
    key: &str,
    action: Settlement,
) -> Result<(), Error> {
    let key = parse_key(key)?;
    let admin = Admin::from_env(api)?;
    if admin.settle(kind.as_str(), &key, action.as_str()).await? {
        println!("{}", settled(kind, &key.to_string(), action));
        Ok(())
    } else {
        Err(anyhow!(
            "no such report: nobody reported the {} under {key}",
            what(kind)
        )
        .into())
    }
}

const LAST_REPORT: &str = "last report";

/// The reports as a table, one line each, in the API's order (hidden first).
fn table(reports: &[Report]) -> String {
    if reports.is_empty() {
        return "no answer or picture has been reported\n".to_owned();
    }
    // The time as the API writes it (RFC 3339, with or without a fraction): as wide as needed.
    let at = reports
        .iter()
        .map(|r| r.last_at.len())
        .chain([LAST_REPORT.len()])
        .max()
        .unwrap_or_default();
    let mut out = format!(
        "{:<7}  {:<5}  {:<32}  {:>6}  {:>5}  {:>4}  {:>5}  {LAST_REPORT:<at$}  matchup\n",
        "state", "kind", "key", "unsafe", "wrong", "poor", "other"
    );
    for r in reports {
        let c = r.counts;
        let _ = writeln!(
            out,
            "{:<7}  {:<5}  {:<32}  {:>6}  {:>5}  {:>4}  {:>5}  {:<at$}  {} vs {}",
            r.state, r.kind, r.key, c.unsafe_, c.wrong, c.poor, c.other, r.last_at, r.a, r.b
        );
    }
    out
}

fn what(kind: ReportKind) -> &'static str {
    match kind {
        ReportKind::Text => "answer",
        ReportKind::Image => "picture",
    }
}

/// What settling did, in the operator's words.
fn settled(kind: ReportKind, key: &str, action: Settlement) -> String {
    let what = what(kind);
    match action {
        Settlement::Keep => format!(
            "kept the {what} {key}: it is served to everyone, and reports no longer hide it"
        ),
        Settlement::Purge => format!(
            "purged the {what} {key} from every cache; the next request generates it afresh"
        ),
        Settlement::Refuse => {
            format!("refused the {what} {key} for good: it is never served or generated again")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::Counts;

    fn report(state: &str, kind: &str, unsafe_: u64, wrong: u64) -> Report {
        Report {
            kind: kind.to_owned(),
            key: "0123456789abcdef0123456789abcdef".to_owned(),
            a: "Batman".to_owned(),
            b: "Superman".to_owned(),
            state: state.to_owned(),
            counts: Counts {
                unsafe_,
                wrong,
                ..Counts::default()
            },
            last_at: "2026-12-07T10:00:00Z".to_owned(),
        }
    }

    #[test]
    fn the_table_lists_each_report_in_the_apis_order_with_its_counts() {
        let text = table(&[
            report("hidden", "text", 3, 0),
            report("open", "image", 0, 2),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("state    kind   key"), "{text}");
        assert!(
            lines[0].ends_with("last report           matchup"),
            "{text}"
        );
        assert_eq!(
            lines[1],
            "hidden   text   0123456789abcdef0123456789abcdef       3      0     0      0  \
             2026-12-07T10:00:00Z  Batman vs Superman"
        );
        assert!(lines[2].starts_with("open     image  0123"), "{text}");
        // The columns line up under their headings.
        let at = |line: &str, word: &str| line.find(word).unwrap() + word.len();
        assert_eq!(at(lines[0], "wrong"), at(lines[2], "     2"), "{text}");
    }

    #[test]
    fn no_report_says_so_rather_than_printing_an_empty_table() {
        assert_eq!(table(&[]), "no answer or picture has been reported\n");
    }

    #[test]
    fn the_list_reads_the_apis_answer() {
        let list: Report = serde_json::from_value(serde_json::json!({
            "kind": "image", "key": "0123456789abcdef0123456789abcdef", "a": "Cat", "b": "Dog",
            "state": "kept", "counts": {"unsafe": 4, "wrong": 1, "poor": 0, "other": 2},
            "last_at": "2026-12-07T10:00:00Z",
        }))
        .unwrap();
        assert_eq!(
            list.counts,
            Counts {
                unsafe_: 4,
                wrong: 1,
                poor: 0,
                other: 2
            }
        );
        assert_eq!((list.kind.as_str(), list.state.as_str()), ("image", "kept"));
    }

    #[test]
    fn each_decision_says_what_became_of_the_answer() {
        let key = "0123456789abcdef0123456789abcdef";
        assert!(
            settled(ReportKind::Text, key, Settlement::Keep).starts_with("kept the answer 0123")
        );
        assert!(
            settled(ReportKind::Image, key, Settlement::Purge).starts_with("purged the picture")
        );
        assert!(settled(ReportKind::Text, key, Settlement::Refuse).contains("for good"));
    }

    #[test]
    fn a_bad_key_is_bad_input_before_anything_is_sent() {
        // No token is set here: the key is checked first.
        assert!(matches!(parse_key("not-a-key"), Err(Error::BadInput(_))));
        let upper = "0123456789ABCDEF0123456789ABCDEF";
        assert_eq!(
            parse_key(upper).unwrap().as_str(),
            upper.to_ascii_lowercase()
        );
    }
}
