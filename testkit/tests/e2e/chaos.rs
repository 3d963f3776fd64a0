//! A short seeded fault run (`versus_testkit::chaos`): the cluster topology under mixed load
//! while a seeded nemesis kills and pauses its parts, then healed and checked. The seed comes
//! from `VERSUS_CHAOS_SEED` (else [`SEED`]) and the length from `VERSUS_CHAOS_SECS` (else 60 s);
//! `scripts/chaos` runs this test with them. What it saw is kept under `target/chaos/<seed>/`.

use std::time::Duration;

use versus_testkit::{chaos, run_within};

/// The seed of the run `scripts/test` makes.
const SEED: u64 = 76;

/// How long the run may take on top of its faults: healing every part and settling, the
/// clients' last operations (up to a minute each), the purges' tries (up to a minute) and the
/// audit, on a loaded machine. A run still going after that is stuck.
const BEYOND_THE_FAULTS: Duration = Duration::from_secs(600);

#[test]
fn a_short_seeded_fault_run_keeps_every_invariant() {
    let settings = chaos::Settings::from_env(SEED);
    run_within(settings.duration + BEYOND_THE_FAULTS, async move {
        let report = chaos::run(settings).await;
        assert!(report.passed(), "{}", report.failure());
    });
}
