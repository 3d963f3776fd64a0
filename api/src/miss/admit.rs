//! The admission of a miss, as a pure decision: from what is known of it ([`Facts`]) to what
//! happens ([`Admission`]). No I/O, no clock: [`super::path`] gathers the facts and carries
//! the decision out.
//!
//! The gates, in order (the first that applies decides):
//!
//! 1. **origin**: a browser acting for another site is refused (403 `cross_site`), even a join;
//! 2. **join**: a flight this process follows already is joined, free of every later gate but
//!    the client's joins limit (`VERSUS_CLIENT_JOINS_PER_MINUTE`, looser; 429 `rate_limited`);
//! 3. **refused**: a matchup moderation refused ends with `refused`, at no cost;
//! 4. **bus**: with no NATS connection, `unavailable` (retryable);
//! 5. **hub**: at an edge whose link to the hub is down, `unavailable` (retryable);
//! 6. **under way**: a generation under way anywhere (another replica's, a pre-warm) is
//!    followed free of the three gates below, charged to the client's joins limit as a join
//!    is; it is looked up only when one of these four applies;
//! 7. **budget**: once today's budget is spent (for a picture, or the pictures' share of it),
//!    `budget_exhausted` until midnight UTC;
//! 8. **client limit**: otherwise the flight starts, charged to the client's per-minute limit
//!    (this replica's own: 429 `rate_limited`),
//! 9. **daily quota**: and then to the client's daily quota, cluster-wide (`crate::quota`: 429
//!    `quota_exhausted` until midnight UTC), each when it is set. Both charges are made by
//!    [`super::path`] when it carries out [`Admission::Start`] `{ charged: true }`, in this
//!    order, so that a client over its per-minute limit costs the quota bucket nothing.

use versus_shared::wire::{self, ErrorCode, Event};

use crate::error::ApiError;

/// What is known of a miss when a request asks to wait on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Facts {
    /// A browser sent the request on behalf of another site (`origin::Origins::check`).
    pub other_site: bool,
    /// This process follows the key's generation already.
    pub followed: bool,
    /// Moderation refused the matchup.
    pub refused: bool,
    /// How far this replica reaches the workers.
    pub reach: Reach,
    /// Today's budget is spent: new answers start again at this time (Unix milliseconds).
    pub budget_spent_until: Option<u64>,
    /// The client's per-minute limit applies to this kind of answer.
    pub limited: bool,
    /// The client's daily quota applies (`VERSUS_CLIENT_DAILY_USD` is set).
    pub quota: bool,
    /// The client's joins limit applies (`VERSUS_CLIENT_JOINS_PER_MINUTE` is set).
    pub joins_limited: bool,
    /// Whether the events stream shows a generation under way; None until read.
    pub under_way: Option<bool>,
}

/// How far a replica reaches the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reach {
    /// No NATS connection.
    NoBus,
    /// At an edge, its link to the hub is down.
    NoHub,
    Workers,
}

/// What happens to a miss.
#[derive(Debug, PartialEq)]
pub(crate) enum Admission {
    /// Refused with an error response, before any stream begins.
    Refuse(ApiError),
    /// Wait on the flight this process follows; `charged`: counted against the client's
    /// joins limit first, which may refuse it (429 `rate_limited`).
    Join { charged: bool },
    /// The stream ends at once with this, and no job is published.
    End(Ending),
    /// Read whether a generation is under way ([`Facts::under_way`]), then decide again.
    ReadUnderWay,
    /// Follow the key's generation with a flight of this process, publishing its job (which
    /// starts a generation unless one is under way). `charged`: counted against the client's
    /// per-minute limit, then its daily quota, first, either of which may refuse it (429
    /// `rate_limited`, 429 `quota_exhausted`).
    Start { charged: bool },
    /// Follow a generation under way (elsewhere, or here after this process's flight ended)
    /// with a flight of this process, which publishes a job only if the generation looks dead.
    /// `charged`: counted against the client's joins limit first (429 `rate_limited`).
    Follow { charged: bool },
}

/// Why a miss ends at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Refused,
    NoBus,
    NoHub,
    BudgetSpent { until_ms: u64 },
}

impl Ending {
    /// The event the stream ends with.
    pub fn event(self) -> Event {
        match self {
            Ending::Refused => wire::refused(0),
            Ending::NoBus => Event::failed_with(
                ErrorCode::Unavailable,
                "This server cannot reach its message bus right now. Answers already written \
                 still work; please try again shortly.",
                None,
            ),
            Ending::NoHub => Event::failed_with(
                ErrorCode::Unavailable,
                "This server cannot reach the one that writes new answers right now. Answers \
                 already written still work; please try again shortly.",
                None,
            ),
            Ending::BudgetSpent { until_ms } => {
                Event::failed(ErrorCode::BudgetExhausted, Some(until_ms))
            }
        }
    }

    /// The counter of misses that end this way.
    pub fn counter(self) -> &'static str {
        match self {
            Ending::Refused => "versus_refused_total",
            Ending::NoBus => "versus_nats_refusals_total",
            Ending::NoHub => "versus_edge_refusals_total",
            Ending::BudgetSpent { .. } => "versus_budget_refusals_total",
        }
    }
}

/// The decision for a miss: the first gate that applies, in the order of the module's doc.
pub(crate) fn admit(facts: &Facts) -> Admission {
    if facts.other_site {
        return Admission::Refuse(ApiError::CrossSite);
    }
    if facts.followed {
        return Admission::Join {
            charged: facts.joins_limited,
        };
    }
    if facts.refused {
        return Admission::End(Ending::Refused);
    }
    match facts.reach {
        Reach::NoBus => return Admission::End(Ending::NoBus),
        Reach::NoHub => return Admission::End(Ending::NoHub),
        Reach::Workers => {}
    }
    if facts.budget_spent_until.is_none() && !facts.limited && !facts.quota && !facts.joins_limited
    {
        return Admission::Start { charged: false };
    }
    match facts.under_way {
        None => Admission::ReadUnderWay,
        Some(true) => Admission::Follow {
            charged: facts.joins_limited,
        },
        Some(false) => match facts.budget_spent_until {
            Some(until_ms) => Admission::End(Ending::BudgetSpent { until_ms }),
            None => Admission::Start {
                charged: facts.limited || facts.quota,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A miss that passes every gate: a new generation, from this site, nothing in the way.
    const OPEN: Facts = Facts {
        other_site: false,
        followed: false,
        refused: false,
        reach: Reach::Workers,
        budget_spent_until: None,
        limited: false,
        quota: false,
        joins_limited: false,
        under_way: Some(false),
    };

    /// Every gate shut at once: what decides is the first in order.
    const SHUT: Facts = Facts {
        other_site: true,
        followed: true,
        refused: true,
        reach: Reach::NoBus,
        budget_spent_until: Some(7),
        limited: true,
        quota: true,
        joins_limited: true,
        under_way: Some(false),
    };

    #[test]
    fn gate_1_origin_refuses_another_sites_request_before_anything_even_a_join() {
        assert_eq!(admit(&SHUT), Admission::Refuse(ApiError::CrossSite));
        let join = Facts {
            other_site: true,
            followed: true,
            ..OPEN
        };
        assert_eq!(admit(&join), Admission::Refuse(ApiError::CrossSite));
    }

    #[test]
    fn gate_2_a_flight_of_this_process_is_joined_whatever_the_later_gates_say() {
        let facts = Facts {
            other_site: false,
            ..SHUT
        };
        assert_eq!(admit(&facts), Admission::Join { charged: true });
        let unlimited = Facts {
            joins_limited: false,
            ..facts
        };
        assert_eq!(
            admit(&unlimited),
            Admission::Join { charged: false },
            "charged to the joins limit only when it is set"
        );
    }

    #[test]
    fn gate_3_a_refused_matchup_ends_refused_before_the_bus_is_needed() {
        let facts = Facts {
            other_site: false,
            followed: false,
            ..SHUT
        };
        assert_eq!(admit(&facts), Admission::End(Ending::Refused));
        assert_eq!(
            Ending::Refused.event(),
            wire::refused(0),
            "the same neutral refusal a worker gives"
        );
    }

    #[test]
    fn gate_4_and_5_no_bus_then_no_hub_end_unavailable_and_retryable() {
        let no_bus = Facts {
            other_site: false,
            followed: false,
            refused: false,
            ..SHUT
        };
        assert_eq!(admit(&no_bus), Admission::End(Ending::NoBus));
        let no_hub = Facts {
            reach: Reach::NoHub,
            ..no_bus
        };
        assert_eq!(admit(&no_hub), Admission::End(Ending::NoHub));
        for ending in [Ending::NoBus, Ending::NoHub] {
            let Event::Error {
                code, retryable, ..
            } = ending.event()
            else {
                panic!("{ending:?} ends with an error");
            };
            assert_eq!(code, ErrorCode::Unavailable);
            assert!(retryable);
        }
    }

    #[test]
    fn gate_6_whether_a_generation_is_under_way_is_read_only_when_budget_limit_or_quota_apply() {
        let unread = Facts {
            under_way: None,
            ..OPEN
        };
        assert_eq!(admit(&unread), Admission::Start { charged: false });
        for gated in [
            Facts {
                limited: true,
                ..unread
            },
            Facts {
                budget_spent_until: Some(7),
                ..unread
            },
            Facts {
                quota: true,
                ..unread
            },
        ] {
            assert_eq!(admit(&gated), Admission::ReadUnderWay);
            let under_way = Facts {
                under_way: Some(true),
                ..gated
            };
            assert_eq!(
                admit(&under_way),
                Admission::Follow { charged: false },
                "following a generation under way is free, budget or not"
            );
        }
        let refused_first = Facts {
            refused: true,
            ..unread
        };
        assert_eq!(admit(&refused_first), Admission::End(Ending::Refused));
    }

    #[test]
    fn gate_7_a_spent_budget_ends_a_new_generation_until_the_time_it_names() {
        let facts = Facts {
            budget_spent_until: Some(86_400_000),
            limited: true,
            quota: true,
            ..OPEN
        };
        assert_eq!(
            admit(&facts),
            Admission::End(Ending::BudgetSpent {
                until_ms: 86_400_000
            }),
            "before the client's limit or quota is charged"
        );
        let Event::Error {
            code,
            retryable,
            retry_at_ms,
            ..
        } = Ending::BudgetSpent {
            until_ms: 86_400_000,
        }
        .event()
        else {
            panic!("a budget ending is an error");
        };
        assert_eq!(code, ErrorCode::BudgetExhausted);
        assert!(retryable);
        assert_eq!(retry_at_ms, Some(86_400_000));
    }

    #[test]
    fn gate_8_a_new_generation_is_charged_to_the_client_only_when_limits_apply() {
        assert_eq!(admit(&OPEN), Admission::Start { charged: false });
        let limited = Facts {
            limited: true,
            ..OPEN
        };
        assert_eq!(admit(&limited), Admission::Start { charged: true });
    }

    #[test]
    fn gate_9_a_new_generation_is_charged_to_the_daily_quota_when_set_with_or_without_a_limit() {
        for limited in [false, true] {
            let facts = Facts {
                limited,
                quota: true,
                ..OPEN
            };
            assert_eq!(admit(&facts), Admission::Start { charged: true });
            let under_way = Facts {
                under_way: Some(true),
                ..facts
            };
            assert_eq!(
                admit(&under_way),
                Admission::Follow { charged: false },
                "following a generation under way costs no quota"
            );
            let joined = Facts {
                followed: true,
                ..facts
            };
            assert_eq!(
                admit(&joined),
                Admission::Join { charged: false },
                "a join costs no quota"
            );
        }
    }

    #[test]
    fn gate_2_and_6_joins_are_charged_to_the_joins_limit_and_new_generations_are_not() {
        let joins = Facts {
            joins_limited: true,
            under_way: None,
            ..OPEN
        };
        // With only the joins limit set, whether a generation is under way decides the charge.
        assert_eq!(admit(&joins), Admission::ReadUnderWay);
        let under_way = Facts {
            under_way: Some(true),
            ..joins
        };
        assert_eq!(admit(&under_way), Admission::Follow { charged: true });
        let new = Facts {
            under_way: Some(false),
            ..joins
        };
        assert_eq!(
            admit(&new),
            Admission::Start { charged: false },
            "a new generation is not a join"
        );
        let limited = Facts {
            limited: true,
            ..new
        };
        assert_eq!(admit(&limited), Admission::Start { charged: true });
        let budget_spent = Facts {
            under_way: Some(true),
            budget_spent_until: Some(7),
            ..joins
        };
        assert_eq!(
            admit(&budget_spent),
            Admission::Follow { charged: true },
            "a spent budget does not stop a join, and does not make it free"
        );
        let local = Facts {
            followed: true,
            ..joins
        };
        assert_eq!(admit(&local), Admission::Join { charged: true });
        let refused = Facts {
            refused: true,
            ..under_way
        };
        assert_eq!(
            admit(&refused),
            Admission::End(Ending::Refused),
            "a refusal costs nothing"
        );
    }
}
