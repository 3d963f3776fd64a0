//! A seeded randomized fault run ("chaos") over the cluster topology: a 3-node hub, two edges
//! with an API each, the hub's API, two workers, Postgres and the simulator, under mixed load
//! from many clients, while a nemesis kills and pauses processes, cuts leaf links and makes the
//! upstream fail; then it heals, settles, and checks invariants over everything the clients
//! saw and everything the system holds.
//!
//! - [`schedule`]: the seeded plan (which fault when, for how long) and the random streams
//!   every choice is drawn from: a seed replays the same faults and the same clients' choices.
//! - `load`: the clients and the purging operator; `client`: one operation over SSE, retried
//!   and resumed as a browser would.
//! - `nemesis`: injects and heals the faults.
//! - `audit`: Postgres read while the load runs, and the healed system's state.
//! - [`invariants`]: the checks, pure, over [`history`]'s records.
//! - `run`: all of it, and what it saw written to `target/chaos/<seed>/`.
//!
//! `scripts/chaos --seed N --duration SECS` runs it (the e2e test
//! `chaos::a_short_seeded_fault_run_keeps_every_invariant`, with `VERSUS_CHAOS_SEED` and
//! `VERSUS_CHAOS_SECS`).

mod audit;
mod client;
pub mod history;
pub mod invariants;
mod load;
mod nemesis;
mod run;
pub mod schedule;

pub use run::{ANSWER_TOKENS, Report, Settings, run};
