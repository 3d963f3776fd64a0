//! What every job handler needs: the bus, Postgres and the claimer, the upstream providers, the
//! object store, the lease, the models, and the daily budget.

use std::{sync::Arc, time::Duration};

use versus_shared::{
    aliases::Aliases, budget::Budget, bus::Bus, config::ModelSettings, tasks::Tasks, wire::Job,
};

use crate::{
    claims::{self, MadeBy},
    moderation,
    providers::Providers,
    spend,
};

/// What every job handler needs.
pub struct Ctx {
    pub bus: Bus,
    pub db: sqlx::PgPool,
    /// The upstream providers of text, pictures and moderation, the primary first.
    pub providers: Providers,
    pub objects: Arc<dyn object_store::ObjectStore>,
    pub lease: Duration,
    /// An interactive job that waited longer than this in the queue is dropped, not started.
    pub job_max_wait: Duration,
    /// The models and picture size answers are made with: a job that names others, or whose
    /// key is not what they make of its names, is dropped (`versus_shared::recipe::check`).
    pub models: ModelSettings,
    pub claimer: claims::Claimer,
    /// What may be generated and stored.
    pub moderator: moderation::Moderator,
    /// How long what was paid for (a picture's bytes, a finished answer) is kept and its
    /// storage tried again, while the lease is kept, before the generation gives up.
    pub store_retry: Duration,
    /// When a matchup that keeps failing cools down.
    pub cooldown: claims::Cooldown,
    /// The daily budget: no generation starts once today's spend reached it.
    pub budget: Arc<Budget>,
    /// This process's tasks (waited for at shutdown).
    pub tasks: Tasks,
    /// The aliases: a job naming one is ended before anything is paid for.
    pub aliases: Arc<Aliases>,
    /// Where what each upstream call cost is written.
    pub ledger: spend::Ledger,
}

impl Ctx {
    /// Which model made an answer of `job` (`model`), and, when it is not the job's own (a
    /// fallback's), until when it is served as degraded.
    pub fn made_by(&self, job: &Job, model: &str) -> MadeBy {
        let degraded_until_ms = (model != job.model).then(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (now + self.providers.degraded_ttl).as_millis() as u64
        });
        MadeBy {
            model: model.to_owned(),
            degraded_until_ms,
        }
    }
}
