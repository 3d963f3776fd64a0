//! The miss path: what a request for an answer that this replica's memory lacks goes through,
//! in order.
//!
//! - [`path`]: the lookup (the KV bucket, the refusals and the [`prefetch`], read at once)
//!   and the admission of a miss, which carries out what [`admit`] decided;
//! - [`admit`]: the admission as a pure decision over what is known of the miss (the gates
//!   and their order), unit-tested;
//! - [`flights`]: the registry: however many requests of this process wait on one answer,
//!   one flight follows its generation, and each request replays the flight's log from the
//!   first event, so a request that joins late gets everything;
//! - [`flight`]: one flight, its log and the signal that wakes its waiters;
//! - [`log`]: the pure log that takes each event of a generation once, in order;
//! - [`prefetch`]: a flight's first steps, taken while the caches are read;
//! - [`reader`]: the NATS side of a flight: the key's subscription, its stored history, the
//!   job.
//!
//! Across API replicas, the job's `Nats-Msg-Id` makes identical misses one job.

mod admit;
mod flight;
mod flights;
mod log;
mod path;
mod prefetch;
mod reader;

pub use flights::{Flights, Waiter, zero_counters};
pub use log::Logged;
pub(crate) use path::{Found, Path};
