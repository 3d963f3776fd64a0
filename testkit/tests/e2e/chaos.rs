//! A short seeded fault run (`versus_testkit::chaos`): the cluster topology under mixed load
//! while a seeded nemesis kills and pauses its parts, then healed and checked. The seed comes
//! from `VERSUS_CHAOS_SEED` (else [`SEED`]) and the length from `VERSUS_CHAOS_SECS` (else 60 s);
//! `scripts/chaos` runs this test with them. What it saw is kept under `target/chaos/<seed>/`.

use versus_testkit::chaos;

/// The seed of the run `scripts/test` makes.
const SEED: u64 = 76;

#[tokio::test]
async fn a_short_seeded_fault_run_keeps_every_invariant() {
    let report = chaos::run(chaos::Settings::from_env(SEED)).await;
    assert!(report.passed(), "{}", report.failure());
}
