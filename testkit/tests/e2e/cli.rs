//! The `versus` operator CLI, run as a binary against the running system: pre-warming from a
//! file (and again), refusing a malformed file or a missing token before anything is sent,
//! failures in the exit status, purging, users' reports listed and settled, and aliases added,
//! listed, imported and removed.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use versus_testkit::{System, bin_path, eventually};

use crate::{fight, http, json_of, quick, run};

const TOKEN: &str = "t0ken-for-the-cli-0123456789abcdef";

/// What one run of `versus` left behind.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `versus ARGS` against `sys` with `token` as `VERSUS_ADMIN_TOKEN` (none: unset), in an
/// environment free of the test's own `VERSUS_*` settings.
async fn versus(sys: &System, token: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(bin_path("versus"));
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("VERSUS_")) {
            cmd.env_remove(&key);
        }
    }
    if let Some(token) = token {
        cmd.env("VERSUS_ADMIN_TOKEN", token);
    }
    cmd.env("VERSUS_API_URL", sys.api_url())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("versus finishes within 2 minutes")
        .expect("versus runs");
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "versus {args:?} exited {:?}\n--- stdout\n{}--- stderr\n{}",
        run.code, run.stdout, run.stderr
    );
    run
}

/// A file under the temp dir, removed on drop.
struct File(PathBuf);

impl File {
    fn new(extension: &str, text: &str) -> File {
        let name = format!("versus-cli-{}.{extension}", uuid::Uuid::new_v4().simple());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, text).unwrap();
        File(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn batches(sys: &System) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM prewarm_batches")
        .fetch_one(&sys.db.pool().await)
        .await
        .unwrap()
}

#[test]
fn prewarm_generates_each_unique_matchup_once_and_a_second_run_is_all_cached() {
    run(async {
        let sys = quick().env("VERSUS_ADMIN_TOKEN", TOKEN).start().await;
        // One matchup is answered before the run.
        let before = fight(&sys, "Mothra", "Rodan").await;
        assert_eq!(before[0].json()["cached"], json!(false));
        assert_eq!(sys.sim.chat_calls().await, 1);

        // Seven matchups, four unique and uncached: repeats in other spellings and orders, a
        // quoted name with a comma, a header and a blank line.
        let csv = File::new(
            "csv",
            "A,B\nBatman,Superman\n\"Smith, John\",Godzilla\n\nsuperman, BATMAN\n\
             King Kong,Godzilla\nRodan,Mothra\nBatman,Superman\nGodzilla,\"Smith,  John\"\n\
             Zorro,Robin Hood\n",
        );
        let run = versus(&sys, Some(TOKEN), &["prewarm", csv.path()]).await;
        assert_eq!(run.code, Some(0));
        assert!(
            run.stdout
                .contains("8 matchups: 1 already cached, 7 generated, 0 failed, in "),
            "{}",
            run.stdout
        );
        assert_eq!(sys.sim.chat_calls().await, 1 + 4);
        // The answers are ready: a user's request is a hit.
        let hit = fight(&sys, "Superman", "Batman").await;
        assert_eq!(hit[0].json()["cached"], json!(true));

        let again = versus(&sys, Some(TOKEN), &["prewarm", csv.path()]).await;
        assert_eq!(again.code, Some(0));
        assert!(
            again
                .stdout
                .contains("8 matchups: 8 already cached, 0 generated, 0 failed, in "),
            "{}",
            again.stdout
        );
        // The same matchups as JSON, in batches of three: all cached too, and nothing generated.
        let json = File::new(
            "json",
            &json!({"matchups": [
                {"a": "Batman", "b": "Superman"}, {"a": "Smith, John", "b": "Godzilla"},
                {"a": "King Kong", "b": "Godzilla"}, {"a": "Zorro", "b": "Robin Hood"},
                {"a": "Mothra", "b": "Rodan"},
            ]})
            .to_string(),
        );
        let batched = versus(
            &sys,
            Some(TOKEN),
            &["prewarm", "--batch-size", "3", json.path()],
        )
        .await;
        assert_eq!(batched.code, Some(0));
        assert!(
            batched
                .stdout
                .contains("5 matchups: 5 already cached, 0 generated, 0 failed"),
            "{}",
            batched.stdout
        );
        assert_eq!(sys.sim.chat_calls().await, 1 + 4);
    });
}

#[test]
fn a_malformed_file_is_reported_line_by_line_and_nothing_is_submitted() {
    run(async {
        let sys = quick().env("VERSUS_ADMIN_TOKEN", TOKEN).start().await;
        let long = "x".repeat(101);
        let csv = File::new(
            "csv",
            &format!(
                "a,b\nBatman,Superman\nBatman,\nx,y,z\n\"Smith, John,Batman\nKing Kong,Godzilla\n\
                 {long},Robin\n"
            ),
        );
        let run = versus(&sys, Some(TOKEN), &["prewarm", csv.path()]).await;
        assert_eq!(run.code, Some(2));
        for expected in [
            "line 3: opponent `b` is empty",
            "line 4: expected two names",
            "line 5: unbalanced quotes",
            "line 7: opponent `a` is longer than 100 characters",
        ] {
            assert!(
                run.stderr.contains(expected),
                "{expected:?} in {}",
                run.stderr
            );
        }
        assert!(
            run.stderr.contains("nothing was submitted"),
            "{}",
            run.stderr
        );
        assert!(!run.stderr.contains("line 2:") && !run.stderr.contains("line 6:"));
        assert_eq!(batches(&sys).await, 0, "no batch was created");
        assert_eq!(sys.sim.chat_calls().await, 0);
    });
}

#[test]
fn without_the_right_token_the_cli_says_so_and_never_prints_it() {
    run(async {
        let sys = quick().env("VERSUS_ADMIN_TOKEN", TOKEN).start().await;
        let csv = File::new("csv", "Batman,Superman\n");

        let unset = versus(&sys, None, &["prewarm", csv.path()]).await;
        assert_eq!(unset.code, Some(2));
        assert!(
            unset.stderr.contains("VERSUS_ADMIN_TOKEN is not set"),
            "{}",
            unset.stderr
        );

        let secret = "wrong-s3cret-value";
        let wrong = versus(&sys, Some(secret), &["prewarm", csv.path()]).await;
        assert_eq!(wrong.code, Some(1));
        assert!(wrong.stderr.contains("401"), "{}", wrong.stderr);
        assert!(!wrong.stderr.contains(secret) && !wrong.stdout.contains(secret));
        let purge = versus(&sys, Some(secret), &["purge", &"0".repeat(32)]).await;
        assert_eq!(purge.code, Some(1));
        assert!(purge.stderr.contains("401"), "{}", purge.stderr);

        assert_eq!(batches(&sys).await, 0);
        assert_eq!(sys.sim.chat_calls().await, 0);
    });
}

#[test]
fn a_matchup_that_fails_is_counted_and_makes_the_exit_status_1() {
    run(async {
        let sys = quick().env("VERSUS_ADMIN_TOKEN", TOKEN).start().await;
        // The upstream refuses (a 400 is not retried): the matchup fails for good.
        sys.sim
            .fault(json!({"kind": "chat", "fault": {"type": "status", "status": 400}, "times": 1}))
            .await;
        let csv = File::new("csv", "Batman,Superman\n");
        let run = versus(&sys, Some(TOKEN), &["prewarm", csv.path()]).await;
        assert_eq!(run.code, Some(1));
        assert!(
            run.stdout
                .contains("1 matchup: 0 already cached, 0 generated, 1 failed"),
            "{}",
            run.stdout
        );
        assert!(
            run.stderr.contains("run the same command again"),
            "{}",
            run.stderr
        );

        // Running it again retries the failed one, which now succeeds.
        let again = versus(&sys, Some(TOKEN), &["prewarm", csv.path()]).await;
        assert_eq!(again.code, Some(0));
        assert!(
            again
                .stdout
                .contains("1 matchup: 0 already cached, 1 generated, 0 failed"),
            "{}",
            again.stdout
        );
    });
}

#[test]
fn purge_removes_the_answer_and_prewarm_popular_brings_it_back() {
    run(async {
        let sys = quick().env("VERSUS_ADMIN_TOKEN", TOKEN).start().await;
        let events = fight(&sys, "Batman", "Superman").await;
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        let url = format!("{}/v1/fights/{key}", sys.api_url());
        assert_eq!(http().get(&url).send().await.unwrap().status(), 200);

        let run = versus(&sys, Some(TOKEN), &["purge", &key]).await;
        assert_eq!(run.code, Some(0));
        assert!(
            run.stdout.contains(&format!("purged {key}")),
            "{}",
            run.stdout
        );
        assert_eq!(http().get(&url).send().await.unwrap().status(), 404);

        let again = versus(&sys, Some(TOKEN), &["purge", &key]).await;
        assert_eq!(again.code, Some(1));
        assert!(again.stderr.contains("no such answer"), "{}", again.stderr);

        let bad = versus(&sys, Some(TOKEN), &["purge", "not-a-key"]).await;
        assert_eq!(bad.code, Some(2));
        assert!(bad.stderr.contains("not an answer key"), "{}", bad.stderr);

        // The matchup was requested and has no answer now: `--popular` warms it again, once the
        // request has been counted (popularity is aggregated in the background).
        let pending = format!("{}/v1/admin/popular?limit=5&pending=true", sys.api_url());
        eventually(
            "the purged matchup is pending",
            Duration::from_secs(30),
            || async {
                let list = json_of(http().get(&pending).bearer_auth(TOKEN)).await;
                list["matchups"][0]["key"] == json!(key)
            },
        )
        .await;
        let warm = versus(&sys, Some(TOKEN), &["prewarm", "--popular", "5"]).await;
        assert_eq!(warm.code, Some(0));
        assert!(
            warm.stdout
                .contains("1 matchup: 0 already cached, 1 generated, 0 failed"),
            "{}",
            warm.stdout
        );
        assert_eq!(http().get(&url).send().await.unwrap().status(), 200);
        assert_eq!(sys.sim.chat_calls().await, 2);
    });
}

#[test]
fn reports_are_listed_and_a_hidden_answer_is_kept_with_settle() {
    run(async {
        // One report of `unsafe` is enough to hide an answer here.
        let sys = quick()
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .worker_env("VERSUS_REPORTS_TO_HIDE", "1")
            .start()
            .await;
        let none = versus(&sys, Some(TOKEN), &["reports", "list"]).await;
        assert_eq!(none.code, Some(0));
        assert!(
            none.stdout
                .contains("no answer or picture has been reported"),
            "{}",
            none.stdout
        );

        let events = fight(&sys, "Batman", "Superman").await;
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        let url = format!("{}/v1/fights/{key}", sys.api_url());
        let report = http()
            .post(format!("{url}/report"))
            .json(&json!({"reason": "unsafe"}))
            .send()
            .await
            .unwrap();
        assert_eq!(report.status(), 202);
        eventually("the answer is hidden", Duration::from_secs(10), || async {
            http().get(&url).send().await.unwrap().status() != 200
        })
        .await;

        let list = versus(&sys, Some(TOKEN), &["reports", "list"]).await;
        assert_eq!(list.code, Some(0));
        let line = list
            .stdout
            .lines()
            .find(|l| l.contains(&key))
            .unwrap_or_else(|| panic!("{key} is listed: {}", list.stdout));
        assert!(line.starts_with("hidden   text "), "{line}");
        assert!(line.ends_with("Batman vs Superman"), "{line}");
        let counts: Vec<&str> = line.split_whitespace().skip(3).take(4).collect();
        assert_eq!(counts, ["1", "0", "0", "0"], "{line}");

        let kept = versus(
            &sys,
            Some(TOKEN),
            &["reports", "settle", "text", &key, "keep"],
        )
        .await;
        assert_eq!(kept.code, Some(0));
        assert!(
            kept.stdout.contains(&format!("kept the answer {key}")),
            "{}",
            kept.stdout
        );
        eventually(
            "the kept answer is served again",
            Duration::from_secs(10),
            || async { http().get(&url).send().await.unwrap().status() == 200 },
        )
        .await;
        let list = versus(&sys, Some(TOKEN), &["reports", "list"]).await;
        assert!(
            list.stdout
                .lines()
                .any(|l| l.contains(&key) && l.starts_with("kept ")),
            "{}",
            list.stdout
        );
        assert_eq!(
            sys.sim.chat_calls().await,
            1,
            "keeping it generated nothing"
        );

        // An answer nobody reported has nothing to settle; a bad key or action is bad input.
        let unknown = versus(
            &sys,
            Some(TOKEN),
            &["reports", "settle", "image", &key, "refuse"],
        )
        .await;
        assert_eq!(unknown.code, Some(1));
        assert!(
            unknown.stderr.contains("no such report"),
            "{}",
            unknown.stderr
        );
        let bad = versus(
            &sys,
            Some(TOKEN),
            &["reports", "settle", "text", "nope", "keep"],
        )
        .await;
        assert_eq!(bad.code, Some(2));
        assert!(bad.stderr.contains("not an answer key"), "{}", bad.stderr);
        let bad = versus(
            &sys,
            Some(TOKEN),
            &["reports", "settle", "text", &key, "hide"],
        )
        .await;
        assert_eq!(bad.code, Some(2));
    });
}

#[test]
fn aliases_are_added_listed_imported_and_removed() {
    run(async {
        let sys = quick().env("VERSUS_ADMIN_TOKEN", TOKEN).start().await;
        let none = versus(&sys, Some(TOKEN), &["alias", "list"]).await;
        assert_eq!(none.code, Some(0));
        assert!(none.stdout.contains("no aliases"), "{}", none.stdout);

        let add = versus(&sys, Some(TOKEN), &["alias", "add", "Kakarot", "Goku"]).await;
        assert_eq!(add.code, Some(0));
        assert_eq!(add.stdout, "Kakarot → Goku\n");
        let list = versus(&sys, Some(TOKEN), &["alias", "list"]).await;
        assert_eq!(list.code, Some(0));
        assert_eq!(list.stdout, "Kakarot → Goku\n");
        // One the API refuses (a cycle) fails with its reason.
        let cycle = versus(&sys, Some(TOKEN), &["alias", "add", "Goku", "Kakarot"]).await;
        assert_eq!(cycle.code, Some(1));
        assert!(
            cycle.stderr.contains("Goku → Kakarot was refused: "),
            "{}",
            cycle.stderr
        );
        // A name of dots is still one path segment (URLs drop `..`).
        let dots = versus(&sys, Some(TOKEN), &["alias", "add", "..", "Ellipsis"]).await;
        assert_eq!(
            (dots.code, dots.stdout.as_str()),
            (Some(0), ".. → Ellipsis\n")
        );
        let dots = versus(&sys, Some(TOKEN), &["alias", "rm", ".."]).await;
        assert_eq!(dots.code, Some(0), "{}", dots.stderr);

        // Two lines: the first is added; the second would chain (Goku is Kakarot's canonical
        // name), so the API refuses it, and it is reported with its line.
        let csv = File::new("csv", "alias,canonical\nKal-El,Superman\nGoku,Son Goku\n");
        let import = versus(&sys, Some(TOKEN), &["alias", "import", csv.path()]).await;
        assert_eq!(import.code, Some(1));
        assert!(
            import.stdout.contains("1 alias added, 1 refused"),
            "{}",
            import.stdout
        );
        assert!(
            import
                .stderr
                .contains("line 3: Goku → Son Goku was refused: "),
            "{}",
            import.stderr
        );
        let list = versus(&sys, Some(TOKEN), &["alias", "list"]).await;
        let mut lines: Vec<&str> = list.stdout.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, ["Kakarot → Goku", "Kal-El → Superman"]);

        // A file with a bad name is refused whole, with its line, before anything is sent.
        let bad = File::new("csv", "Kid Goku,Goku\nVegeta,\n");
        for args in [
            &["alias", "import", "--check", bad.path()][..],
            &["alias", "import", bad.path()],
        ] {
            let run = versus(&sys, Some(TOKEN), args).await;
            assert_eq!(run.code, Some(2));
            assert!(
                run.stderr.contains("line 2: opponent `canonical` is empty"),
                "{}",
                run.stderr
            );
        }
        let check = versus(&sys, None, &["alias", "import", "--check", csv.path()]).await;
        assert_eq!(check.code, Some(0));
        assert!(
            check.stdout.contains("2 aliases, all valid"),
            "{}",
            check.stdout
        );

        let rm = versus(&sys, Some(TOKEN), &["alias", "rm", "Kakarot"]).await;
        assert_eq!(rm.code, Some(0));
        assert!(
            rm.stdout.contains("removed the alias Kakarot"),
            "{}",
            rm.stdout
        );
        // Removed already: unknown, as a purge of an unknown key is.
        let again = versus(&sys, Some(TOKEN), &["alias", "rm", "Kakarot"]).await;
        assert_eq!(again.code, Some(1));
        assert!(again.stderr.contains("no such alias"), "{}", again.stderr);
        let list = versus(&sys, Some(TOKEN), &["alias", "list"]).await;
        assert_eq!(list.stdout, "Kal-El → Superman\n");
    });
}
