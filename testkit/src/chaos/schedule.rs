//! The seeded plan of a fault run, pure: which fault when and for how long, and the random
//! streams every other choice is drawn from. The same seed gives the same plan on any machine.

use std::time::Duration;

use serde::Serialize;

/// Where an API replica runs: beside the hub, or at an edge (`edge1` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    Hub,
    Edge(usize),
}

impl Site {
    /// Index into the run's API endpoints: 0 for the hub's, 1.. for the edges'.
    pub fn index(self) -> usize {
        match self {
            Site::Hub => 0,
            Site::Edge(i) => i + 1,
        }
    }

    pub fn from_index(i: usize) -> Site {
        if i == 0 { Site::Hub } else { Site::Edge(i - 1) }
    }
}

/// What goes wrong upstream (the simulator's fault injection), for every chat call until healed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Upstream {
    /// 429 with `Retry-After: 1`.
    TooManyRequests,
    /// 500.
    ServerError,
    /// The stream is cut after this many tokens.
    Cut { after_tokens: u64 },
    /// The stream goes silent after this many tokens.
    Stall { after_tokens: u64 },
}

/// One fault, healed after its hold: a killed process is started again, a paused one resumed,
/// the upstream's faults cleared, a cut link restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "fault", rename_all = "snake_case")]
pub enum Fault {
    /// SIGKILL of worker `i`; a new one takes its place.
    KillWorker { worker: usize },
    /// SIGSTOP of worker `i`, then SIGCONT.
    PauseWorker { worker: usize },
    /// SIGKILL of an API replica; started again on the same address.
    KillApi { site: Site },
    /// SIGSTOP of an API replica, then SIGCONT.
    PauseApi { site: Site },
    /// SIGKILL of hub server `hub<node+1>`, started again on its ports and store.
    KillHubNode { node: usize },
    /// SIGSTOP of a hub server, then SIGCONT.
    PauseHubNode { node: usize },
    /// SIGKILL of an edge's nats-server, started again on its ports and store.
    KillEdgeNats { edge: usize },
    /// SIGSTOP of an edge's nats-server, then SIGCONT.
    PauseEdgeNats { edge: usize },
    /// SIGSTOP of the Postgres server (the postmaster and every backend), then SIGCONT.
    PausePostgres,
    /// Every chat call fails as said until healed.
    Upstream { upstream: Upstream },
    /// The edge's leaf link to the hub is cut at its proxy, then restored.
    CutLink { edge: usize },
}

/// How many of each part the system has: the faults name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub workers: usize,
    pub edges: usize,
    pub hub_nodes: usize,
}

/// One planned fault: injected `at` (from the start of the load), healed `hold` later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Step {
    pub at_ms: u64,
    pub hold_ms: u64,
    #[serde(flatten)]
    pub fault: Fault,
}

/// Time between the starts of two faults.
pub const GAP_MS: (u64, u64) = (5_000, 15_000);
/// How long a fault lasts before it is healed.
pub const HOLD_MS: (u64, u64) = (2_000, 6_000);
/// The first fault comes after the load has warmed up a little.
const FIRST_MS: (u64, u64) = (2_000, 5_000);

/// The independent random streams of a run: each part draws from its own, so that what one
/// part does (how many ops a client finished in time) never shifts another's choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Nemesis,
    Operator,
    Client(usize),
}

/// The random stream `stream` of the run with `seed`.
pub fn rng(seed: u64, stream: Stream) -> fastrand::Rng {
    let salt = match stream {
        Stream::Nemesis => 1,
        Stream::Operator => 2,
        Stream::Client(i) => 1_000 + i as u64,
    };
    fastrand::Rng::with_seed(mix(seed ^ mix(salt)))
}

/// SplitMix64's finaliser: nearby seeds give unrelated streams.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The faults of a run of `duration` with `seed`: one every 5–15 s, each held 2–6 s (less
/// than the gap to the next), the last healed before `duration` ends.
pub fn plan(seed: u64, duration: Duration, shape: Shape) -> Vec<Step> {
    let mut rng = rng(seed, Stream::Nemesis);
    let end = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    let mut steps = Vec::new();
    let mut at = rng.u64(FIRST_MS.0..=FIRST_MS.1);
    loop {
        let gap = rng.u64(GAP_MS.0..=GAP_MS.1);
        let hold = rng.u64(HOLD_MS.0..=HOLD_MS.1.min(gap - 1_000));
        let fault = pick(&mut rng, shape);
        if at + hold > end {
            return steps;
        }
        steps.push(Step {
            at_ms: at,
            hold_ms: hold,
            fault,
        });
        at += gap;
    }
}

/// One fault, every kind about as likely (the upstream's four count as one kind each).
fn pick(rng: &mut fastrand::Rng, shape: Shape) -> Fault {
    let site = |rng: &mut fastrand::Rng| Site::from_index(rng.usize(0..=shape.edges));
    match rng.u8(0..14) {
        0 => Fault::KillWorker {
            worker: rng.usize(0..shape.workers),
        },
        1 => Fault::PauseWorker {
            worker: rng.usize(0..shape.workers),
        },
        2 => Fault::KillApi { site: site(rng) },
        3 => Fault::PauseApi { site: site(rng) },
        4 => Fault::KillHubNode {
            node: rng.usize(0..shape.hub_nodes),
        },
        5 => Fault::PauseHubNode {
            node: rng.usize(0..shape.hub_nodes),
        },
        6 if shape.edges > 0 => Fault::KillEdgeNats {
            edge: rng.usize(0..shape.edges),
        },
        7 if shape.edges > 0 => Fault::PauseEdgeNats {
            edge: rng.usize(0..shape.edges),
        },
        8 if shape.edges > 0 => Fault::CutLink {
            edge: rng.usize(0..shape.edges),
        },
        9 => Fault::Upstream {
            upstream: Upstream::TooManyRequests,
        },
        10 => Fault::Upstream {
            upstream: Upstream::ServerError,
        },
        11 => Fault::Upstream {
            upstream: Upstream::Cut {
                after_tokens: rng.u64(1..20),
            },
        },
        12 => Fault::Upstream {
            upstream: Upstream::Stall {
                after_tokens: rng.u64(0..20),
            },
        },
        _ => Fault::PausePostgres,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        workers: 2,
        edges: 2,
        hub_nodes: 3,
    };

    #[test]
    fn a_seed_always_gives_the_same_plan_and_another_seed_another() {
        let minute = Duration::from_secs(60);
        assert_eq!(plan(7, minute, SHAPE), plan(7, minute, SHAPE));
        assert_ne!(plan(7, minute, SHAPE), plan(8, minute, SHAPE));
        // A longer run begins with the shorter run's faults.
        let long = plan(7, Duration::from_secs(600), SHAPE);
        let short = plan(7, minute, SHAPE);
        assert_eq!(&long[..short.len()], &short[..]);
    }

    #[test]
    fn faults_come_every_five_to_fifteen_seconds_and_are_healed_before_the_next_and_the_end() {
        for seed in 0..50 {
            let steps = plan(seed, Duration::from_secs(300), SHAPE);
            assert!(steps.len() >= 300 / 15 - 1, "seed {seed}: {}", steps.len());
            for pair in steps.windows(2) {
                let gap = pair[1].at_ms - pair[0].at_ms;
                assert!((GAP_MS.0..=GAP_MS.1).contains(&gap), "seed {seed}: {gap}");
                assert!(pair[0].at_ms + pair[0].hold_ms < pair[1].at_ms);
            }
            for step in &steps {
                assert!((HOLD_MS.0..=HOLD_MS.1).contains(&step.hold_ms));
                assert!(step.at_ms + step.hold_ms <= 300_000);
            }
        }
    }

    #[test]
    fn a_long_run_injects_every_kind_of_fault_on_parts_that_exist() {
        let steps = plan(1, Duration::from_secs(3_600), SHAPE);
        let mut kinds = std::collections::BTreeSet::new();
        for step in &steps {
            let name = serde_json::to_value(step.fault).unwrap()["fault"].clone();
            kinds.insert(name.as_str().unwrap().to_owned());
            match step.fault {
                Fault::KillWorker { worker } | Fault::PauseWorker { worker } => {
                    assert!(worker < SHAPE.workers)
                }
                Fault::KillHubNode { node } | Fault::PauseHubNode { node } => {
                    assert!(node < SHAPE.hub_nodes)
                }
                Fault::KillEdgeNats { edge }
                | Fault::PauseEdgeNats { edge }
                | Fault::CutLink { edge } => assert!(edge < SHAPE.edges),
                Fault::KillApi { site } | Fault::PauseApi { site } => {
                    assert!(site.index() <= SHAPE.edges)
                }
                Fault::PausePostgres | Fault::Upstream { .. } => {}
            }
        }
        assert_eq!(kinds.len(), 11, "{kinds:?}");
    }

    #[test]
    fn without_edges_no_fault_names_one() {
        let shape = Shape { edges: 0, ..SHAPE };
        for step in plan(3, Duration::from_secs(3_600), shape) {
            assert!(!matches!(
                step.fault,
                Fault::KillEdgeNats { .. }
                    | Fault::PauseEdgeNats { .. }
                    | Fault::CutLink { .. }
                    | Fault::KillApi {
                        site: Site::Edge(_)
                    }
                    | Fault::PauseApi {
                        site: Site::Edge(_)
                    }
            ));
        }
    }

    #[test]
    fn the_random_streams_of_one_seed_differ() {
        let mut a = rng(5, Stream::Client(0));
        let mut b = rng(5, Stream::Client(1));
        let mut c = rng(5, Stream::Client(0));
        let (x, y, z) = (a.u64(..), b.u64(..), c.u64(..));
        assert_ne!(x, y);
        assert_eq!(x, z);
    }
}
