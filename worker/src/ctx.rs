//! What every job handler needs: the bus, Postgres and the claimer, the upstream client, the
//! object store, the lease, and the daily budget.

use std::{sync::Arc, time::Duration};

use versus_shared::{budget::Budget, bus::Bus};

use crate::{claims, moderation, openai};

/// What every job handler needs.
pub struct Ctx {
    pub bus: Bus,
    pub db: sqlx::PgPool,
    pub openai: openai::Client,
    pub objects: Arc<dyn object_store::ObjectStore>,
    pub lease: Duration,
    /// An interactive job that waited longer than this in the queue is dropped, not started.
    pub job_max_wait: Duration,
    /// Identifies this process in claims, for operators.
    pub worker_id: String,
    pub claimer: claims::Claimer,
    /// What may be generated and stored.
    pub moderator: moderation::Moderator,
    /// When a matchup that keeps failing cools down.
    pub cooldown: claims::Cooldown,
    /// The daily budget: no generation starts once today's spend reached it.
    pub budget: Arc<Budget>,
}
