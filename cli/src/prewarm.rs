//! `versus prewarm`: read and check every matchup, submit them in batches, follow the batches
//! until none is pending, and sum up.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::MissedTickBehavior;

use crate::Error;
use crate::admin::{Admin, Progress, Submitted};
use crate::args::PrewarmArgs;
use crate::input::{self, Pair};

/// How often the batches' progress is read.
const POLL: Duration = Duration::from_millis(500);
/// How long the API may stay unreachable while we follow batches before we stop following.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
/// How often a plain progress line is printed when the bar is hidden (output not a terminal).
const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub async fn run(api: &str, args: &PrewarmArgs) -> Result<(), Error> {
    let (admin, pairs) = match (&args.file, args.popular) {
        (Some(path), _) => {
            let pairs = input::read(path).map_err(|problems| input::refuse(path, &problems))?;
            if args.check {
                let count = matchups(pairs.len().try_into().unwrap_or(u64::MAX));
                println!("{}: {count}, all valid", path.display());
                return Ok(());
            }
            (Admin::from_env(api)?, pairs)
        }
        (None, Some(limit)) => {
            let admin = Admin::from_env(api)?;
            let popular = admin.popular(limit, true).await?;
            let pairs = popular.into_iter().map(|p| Pair { a: p.a, b: p.b });
            (admin, pairs.collect::<Vec<_>>())
        }
        (None, None) => return Err(Error::BadInput("give a FILE or --popular N".to_owned())),
    };
    if pairs.is_empty() {
        println!("nothing to warm: every requested matchup has its answer");
        return Ok(());
    }

    let started = Instant::now();
    let batches = submit(&admin, &pairs, args.images, args.batch_size).await?;
    let already: u64 = batches.iter().map(|b| b.already_cached).sum();
    let end = follow(&admin, &batches, already).await?;
    println!(
        "{}: {already} already cached, {} generated, {} failed, in {:.1} s",
        matchups(end.total),
        end.done.saturating_sub(already),
        end.failed,
        started.elapsed().as_secs_f64()
    );
    if end.failed > 0 {
        return Err(anyhow!(
            "{} of {} failed: run the same command again to retry",
            end.failed,
            matchups(end.total)
        )
        .into());
    }
    Ok(())
}

/// Submits the matchups in chunks of `batch_size`, one batch each.
async fn submit(
    admin: &Admin,
    pairs: &[Pair],
    images: bool,
    batch_size: u64,
) -> anyhow::Result<Vec<Submitted>> {
    let chunks: Vec<&[Pair]> = pairs
        .chunks(usize::try_from(batch_size).unwrap_or(usize::MAX).max(1))
        .collect();
    let mut batches: Vec<Submitted> = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let submitted = match admin.prewarm(chunk, images).await {
            Ok(submitted) => submitted,
            Err(e) if batches.is_empty() => return Err(e),
            Err(e) => {
                let ids: Vec<&str> = batches.iter().map(|b| b.batch.as_str()).collect();
                return Err(e.context(format!(
                    "batch {} of {} was not submitted (batches {} were, and go on)",
                    i + 1,
                    chunks.len(),
                    ids.join(", ")
                )));
            }
        };
        eprintln!(
            "batch {}: {}, {} already cached, {} queued",
            submitted.batch,
            matchups(submitted.total),
            submitted.already_cached,
            submitted.queued
        );
        batches.push(submitted);
    }
    Ok(batches)
}

/// Reads every unfinished batch's progress each [`POLL`] and shows it, until none is pending.
async fn follow(admin: &Admin, batches: &[Submitted], already: u64) -> anyhow::Result<Progress> {
    // Until the first read, what the submissions said: the cached ones are done.
    let mut progress: Vec<Progress> = batches
        .iter()
        .map(|b| Progress {
            total: b.total,
            done: b.already_cached,
            failed: 0,
            pending: b.total.saturating_sub(b.already_cached),
        })
        .collect();
    // The bar counts only the matchups to generate, so that its ETA is not skewed by the
    // cached ones, which are done from the start.
    let bar = bar(sum(&progress).pending);
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_read = Instant::now();
    let mut last_plain = Instant::now();
    let mut trouble: Option<String> = None;
    loop {
        let now = sum(&progress);
        let generated = now.done.saturating_sub(already);
        bar.set_position(generated + now.failed);
        bar.set_message(match &trouble {
            None => format!("{generated} done, {} failed", now.failed),
            Some(e) => format!("{generated} done, {} failed; retrying: {e}", now.failed),
        });
        if now.pending == 0 {
            bar.finish_and_clear();
            return Ok(now);
        }
        if bar.is_hidden() && last_plain.elapsed() >= PLAIN_EVERY {
            last_plain = Instant::now();
            eprintln!(
                "{generated} generated, {} failed, {} pending",
                now.failed, now.pending
            );
        }
        ticker.tick().await;
        for (batch, state) in batches.iter().zip(&mut progress) {
            if state.pending == 0 {
                continue;
            }
            match admin.progress(&batch.batch).await {
                Ok(read) => {
                    *state = read;
                    last_read = Instant::now();
                    trouble = None;
                }
                // A restarting API should not end a long pre-warm: keep trying for a while.
                Err(e) if last_read.elapsed() < GIVE_UP_AFTER => trouble = Some(format!("{e:#}")),
                Err(e) => {
                    bar.abandon();
                    return Err(e.context("the batches go on, but their progress cannot be read"));
                }
            }
        }
    }
}

fn matchups(n: u64) -> String {
    match n {
        1 => "1 matchup".to_owned(),
        n => format!("{n} matchups"),
    }
}

fn sum(progress: &[Progress]) -> Progress {
    progress
        .iter()
        .fold(Progress::default(), |acc, p| Progress {
            total: acc.total + p.total,
            done: acc.done + p.done,
            failed: acc.failed + p.failed,
            pending: acc.pending + p.pending,
        })
}

/// The progress bar, on stderr; indicatif hides it when stderr is not a terminal.
fn bar(len: u64) -> ProgressBar {
    let template = "{spinner} {elapsed_precise} [{wide_bar}] {pos}/{len} ({msg}), ETA {eta}";
    let style =
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::new(len).with_style(style.progress_chars("=> "));
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
