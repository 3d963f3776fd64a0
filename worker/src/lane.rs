//! The two lanes jobs arrive on: interactive (clients wait for the answer) and pre-warm (an
//! operator's batch, which nobody waits for). Each lane has its own durable consumer and
//! concurrency ([`crate::consumer`]). A job's lane also decides whether it may expire in the
//! queue ([`crate::consumer`]), whether its first upstream call may start before its claim
//! commits ([`crate::job`]), and what it does once the day's budget is spent
//! ([`crate::generation`]).

use versus_shared::wire;

/// A lane of jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Interactive,
    Prewarm,
}

impl Lane {
    /// The lane of a job delivered on `subject`.
    pub fn of(subject: &str) -> Lane {
        if wire::is_prewarm_subject(subject) {
            Lane::Prewarm
        } else {
            Lane::Interactive
        }
    }

    /// The `lane` label of the lane's metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Lane::Interactive => "interactive",
            Lane::Prewarm => "prewarm",
        }
    }
}

#[cfg(test)]
mod tests {
    use versus_shared::wire::{self, Kind};

    use super::Lane;

    #[test]
    fn a_job_is_in_the_lane_of_its_subject() {
        assert_eq!(Lane::of(&wire::prewarm_subject(Kind::Image)), Lane::Prewarm);
        assert_eq!(Lane::of(&wire::job_subject(Kind::Text)), Lane::Interactive);
    }
}
