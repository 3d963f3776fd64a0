//! Every e2e test runs under a deadline ([`crate::run`]): a test added without one fails here.

use std::path::Path;

use crate::run;

#[test]
fn every_test_runs_under_a_deadline() {
    run(async {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
        let mut offenders = Vec::new();
        let mut tests = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            tests += source.lines().filter(|l| l.trim() == "#[test]").count();
            offenders.extend(without_deadline(&file, &source));
        }
        assert!(tests > 100, "found only {tests} tests in {}", dir.display());
        assert!(
            offenders.is_empty(),
            "these tests have no deadline: write each as \
             `#[test] fn name() {{ run(async {{ .. }}); }}` \
             (or `run_within(limit, async {{ .. }})` for one that needs longer):\n{}",
            offenders.join("\n")
        );
    });
}

#[test]
fn the_check_finds_a_tokio_test_and_a_test_that_does_not_run_its_body_under_a_deadline() {
    run(async {
        // Each line of the sample starts with `|`: the check of the real files passes over it.
        let source = "
            |#[tokio::test]
            |async fn hangs_forever() {
            |    std::future::pending::<()>().await;
            |}
            |
            |#[test]
            |fn also_unbounded() {
            |    tokio::runtime::Runtime::new().unwrap().block_on(async {});
            |}
            |
            |#[test]
            |fn bounded() {
            |    run(async {});
            |}
            |
            |mod inner {
            |    #[test]
            |    fn bounded_too() {
            |        run_within(LONG, async {});
            |    }
            |}"
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix('|'))
        .collect::<Vec<_>>()
        .join("\n");
        assert_eq!(
            without_deadline("sample.rs", &source),
            ["sample.rs:1 (#[tokio::test])", "sample.rs:6 (no run)"]
        );
    });
}

/// The tests in `source` that run without a deadline, as `file:line (why)`: a `#[tokio::test]`,
/// or a `#[test]` whose body does not go through `run(..)` or `run_within(..)`.
fn without_deadline(file: &str, source: &str) -> Vec<String> {
    let lines: Vec<&str> = source.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let attribute = line.trim_start();
        if attribute.starts_with("#[tokio::test") {
            found.push(format!("{file}:{} (#[tokio::test])", i + 1));
        } else if attribute == "#[test]" {
            // The function's lines up to the brace that closes it, at the attribute's indent.
            let indent = &line[..line.len() - attribute.len()];
            let end = format!("{indent}}}");
            let wrapped = lines[i + 1..]
                .iter()
                .take_while(|l| **l != end)
                .filter_map(|l| l.strip_prefix(indent))
                .any(|l| l.starts_with("    run(") || l.starts_with("    run_within("));
            if !wrapped {
                found.push(format!("{file}:{} (no run)", i + 1));
            }
        }
    }
    found
}
