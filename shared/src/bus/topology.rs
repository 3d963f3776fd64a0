//! Declaring the streams and buckets (a worker's part), looking them up (the API's), the edge's
//! mirror of the answers bucket, and keeping them declared: a worker's watchdog declares again
//! any that goes missing, and only the settings Versus owns are reconciled on one that exists.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, kv, stream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{config::NatsSettings, wire};

/// The edge's mirror of the hub's answers bucket, in the edge's own domain, created when
/// missing. It has the origin's name, so it is read like the bucket.
pub(super) async fn declare_mirror(
    local: &jetstream::Context,
    hub: &str,
) -> anyhow::Result<kv::Store> {
    let name = format!("KV_{}", wire::ANSWERS_BUCKET);
    if existing_config(local, &name).await?.is_none() {
        local
            .create_key_value(kv::Config {
                bucket: wire::ANSWERS_BUCKET.to_owned(),
                description: format!(
                    "A read-only mirror of the answers bucket of the hub (domain {hub})"
                ),
                history: 1,
                storage: stream::StorageType::File,
                // The hub's domain, as its API prefix: async-nats would turn `domain` into
                // this too, but also send `domain` itself, which nats-server refuses.
                mirror: Some(stream::Source {
                    name: wire::ANSWERS_BUCKET.to_owned(),
                    external: Some(stream::External {
                        api_prefix: format!("$JS.{hub}.API"),
                        delivery_prefix: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .context("creating the edge's mirror of the answers bucket")?;
    }
    local
        .get_key_value(wire::ANSWERS_BUCKET)
        .await
        .context("opening the edge's mirror of the answers bucket")
}

/// The streams and buckets: jobs, events, answers, spend, quota.
pub(super) type Handles = (
    stream::Stream,
    stream::Stream,
    kv::Store,
    kv::Store,
    kv::Store,
);

/// What a worker declares: the streams and buckets as its settings make them, and their
/// replicas. The watchdog declares a missing one again from the same.
#[derive(Debug, Clone)]
pub(super) struct Topology {
    jobs: stream::Config,
    events: stream::Config,
    answers: kv::Config,
    spend: kv::Config,
    quota: kv::Config,
    replicas: Option<usize>,
}

impl Topology {
    pub(super) fn of(settings: &NatsSettings) -> Topology {
        Topology {
            jobs: jobs_stream(settings.max_queued_jobs),
            events: events_stream(settings.events_max_age(), settings.events_max_bytes()),
            answers: answers_bucket(),
            spend: spend_bucket(),
            quota: quota_bucket(),
            replicas: settings.replicas.map(usize::from),
        }
    }

    /// Each stream, a bucket's included, in the order they are declared.
    fn parts(&self) -> [Part<'_>; 5] {
        [
            Part::Stream(&self.jobs),
            Part::Stream(&self.events),
            Part::Bucket(&self.answers),
            Part::Bucket(&self.spend),
            Part::Bucket(&self.quota),
        ]
    }
}

/// One stream of the [`Topology`]: a stream, or the stream behind a KV bucket.
#[derive(Debug, Clone, Copy)]
enum Part<'a> {
    Stream(&'a stream::Config),
    Bucket(&'a kv::Config),
}

impl Part<'_> {
    /// The stream's name (`KV_<bucket>` for a bucket).
    fn stream_name(self) -> String {
        match self {
            Part::Stream(config) => config.name.clone(),
            Part::Bucket(config) => format!("KV_{}", config.bucket),
        }
    }

    fn in_memory(self) -> bool {
        let storage = match self {
            Part::Stream(config) => config.storage,
            Part::Bucket(config) => config.storage,
        };
        storage == stream::StorageType::Memory
    }

    async fn declare(self, js: &jetstream::Context, replicas: Option<usize>) -> anyhow::Result<()> {
        match self {
            Part::Stream(config) => declare_stream(js, config.clone(), replicas).await.map(drop),
            Part::Bucket(config) => declare_bucket(js, config.clone(), replicas).await.map(drop),
        }
    }
}

/// Declares the streams and buckets (a worker's part): idempotent, so every worker does it.
pub(super) async fn declare(
    js: &jetstream::Context,
    topology: &Topology,
) -> anyhow::Result<Handles> {
    let replicas = topology.replicas;
    let jobs = declare_stream(js, topology.jobs.clone(), replicas).await?;
    let events = declare_stream(js, topology.events.clone(), replicas).await?;
    let answers = declare_bucket(js, topology.answers.clone(), replicas).await?;
    let spend = declare_bucket(js, topology.spend.clone(), replicas).await?;
    let quota = declare_bucket(js, topology.quota.clone(), replicas).await?;
    Ok((jobs, events, answers, spend, quota))
}

/// How often a process tries again to declare or look up the streams and buckets.
const LOOK_UP_EVERY: Duration = Duration::from_millis(500);
/// How often it says it is still trying.
const LOOK_UP_LOG_EVERY: u32 = 20;

/// `attempt`, tried again every [`LOOK_UP_EVERY`] until it succeeds or `shutdown` fires;
/// `waiting` is logged with its error every ten seconds. The API waits so for a worker to
/// declare the streams and buckets, and a worker for JetStream to take them (a cluster whose
/// streams have not elected their leaders yet answers nothing).
pub(super) async fn until_done<T, F, Fut>(
    waiting: &str,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut tries = 0u32;
    loop {
        match attempt().await {
            Ok(done) => {
                if tries > 0 {
                    tracing::info!("the streams and buckets are there");
                }
                return Ok(done);
            }
            Err(e) => {
                if tries.is_multiple_of(LOOK_UP_LOG_EVERY) {
                    tracing::info!(error = format!("{e:#}"), "{waiting}");
                }
                tries += 1;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                anyhow::bail!("stopped while {waiting}")
            }
            () = tokio::time::sleep(LOOK_UP_EVERY) => {}
        }
    }
}

/// Looks the streams and buckets up (the API's part: it may not declare them).
pub(super) async fn look_up(js: &jetstream::Context) -> anyhow::Result<Handles> {
    let stream = |name: &'static str| async move {
        js.get_stream(name)
            .await
            .with_context(|| format!("looking up stream {name}"))
    };
    let bucket = |name: &'static str| async move {
        js.get_key_value(name)
            .await
            .with_context(|| format!("looking up KV bucket {name}"))
    };
    Ok((
        stream(wire::JOBS_STREAM).await?,
        stream(wire::EVENTS_STREAM).await?,
        bucket(wire::ANSWERS_BUCKET).await?,
        bucket(wire::SPEND_BUCKET).await?,
        bucket(wire::QUOTA_BUCKET).await?,
    ))
}

fn answers_bucket() -> kv::Config {
    kv::Config {
        bucket: wire::ANSWERS_BUCKET.to_owned(),
        description: "Finished answers: the edge cache in front of Postgres".to_owned(),
        history: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

fn spend_bucket() -> kv::Config {
    kv::Config {
        bucket: wire::SPEND_BUCKET.to_owned(),
        description: "Each UTC day's upstream spend, cluster-wide".to_owned(),
        history: 1,
        max_age: Duration::from_secs(3 * 24 * 3600),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// What each client's new generations were charged per UTC day (the API's quota). A day's keys
/// are written on that day only, so two days of age let yesterday's go without ever cutting
/// today's short.
fn quota_bucket() -> kv::Config {
    kv::Config {
        bucket: wire::QUOTA_BUCKET.to_owned(),
        description: "What each client's new answers were charged per UTC day, cluster-wide"
            .to_owned(),
        history: 1,
        max_age: Duration::from_secs(2 * 24 * 3600),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

fn jobs_stream(max_queued: i64) -> stream::Config {
    stream::Config {
        name: wire::JOBS_STREAM.to_owned(),
        description: Some("Generation jobs, one per unique answer; workers pull them".to_owned()),
        subjects: vec![
            wire::JOBS_SUBJECTS.to_owned(),
            wire::PREWARM_SUBJECTS.to_owned(),
        ],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        // Identical misses published by any API replica within this window become one job.
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::from_secs(24 * 3600),
        // A bounded queue: a flood is refused at once (and costs nothing) rather than queued
        // for hours and paid for after its clients left.
        max_messages: max_queued.max(1),
        discard: stream::DiscardPolicy::New,
        // The API publishes each client's job with a TTL (`Nats-TTL`, its stream timeout): a job
        // nobody waits for any more leaves the queue, delivered or not, rather than fill it.
        // Pre-warm jobs carry none. nats-server 2.11+; turned on in place on an existing stream.
        allow_message_ttl: true,
        ..Default::default()
    }
}

/// The most events one answer's subject keeps: more than any answer has (`started`, a chunk per
/// token at most, `VERSUS_MAX_ANSWER_TOKENS` being 600 by default, and its end), so the cap
/// only ever trims a subject that something fills without end.
pub const EVENTS_PER_SUBJECT: i64 = 20_000;

fn events_stream(max_age: Duration, max_bytes: i64) -> stream::Config {
    stream::Config {
        name: wire::EVENTS_STREAM.to_owned(),
        description: Some("Generation events per answer, replayable for late joiners".to_owned()),
        subjects: vec![wire::EVENTS_SUBJECTS.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        // Events are worth minutes: memory is faster, and a lost stream is repaired by the
        // job's redelivery, which starts a new attempt.
        storage: stream::StorageType::Memory,
        max_age,
        // Bounded in bytes: past the cap the oldest events (finished answers', which the
        // answers bucket holds) are dropped, never a new one refused, and no subject holds more
        // than an answer's worth.
        max_bytes,
        discard: stream::DiscardPolicy::Old,
        max_messages_per_subject: EVENTS_PER_SUBJECT,
        duplicate_window: Duration::from_secs(30),
        // Readers catch up with direct gets (any replica answers), never with a consumer.
        allow_direct: true,
        // nats-server caps a stream that sets no consumer limit at 1,000 consumers; tools and
        // operators may attach some, and a stream cannot lower this limit once declared.
        max_consumers: 1_000_000,
        ..Default::default()
    }
}

/// How often a worker's watchdog looks for each stream.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// Streams (a bucket's included) this worker found missing and declared again, by `stream`.
const REDECLARED: &str = "versus_bus_redeclared_total";

/// The counter of streams declared again, at zero for each stream: an alert sees the first
/// increase.
pub(super) fn zero_counters(topology: &Topology) {
    for part in topology.parts() {
        metrics::counter!(REDECLARED, "stream" => part.stream_name()).increment(0);
    }
}

/// A worker's watchdog: every [`WATCH_EVERY`], and at once after a reconnect, looks each stream
/// of `topology` up (one `STREAM.INFO` each, all at once), and declares any that is missing
/// again, as at start-up. Nothing else repairs a stream an operator (or anyone with the rights)
/// deleted while the workers run: misses would fail until a worker restarts. A missing stream
/// is logged as an error and counted in [`REDECLARED`], except one kept in memory that is
/// missing right after a reconnect: a restarted nats-server comes back without it (the events
/// stream, unless replicated).
pub(super) async fn keep_declared(
    js: jetstream::Context,
    topology: Topology,
    mut reconnects: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let parts = topology.parts();
    let mut watched = [Watched::default(); 5];
    let mut seen = *reconnects.borrow_and_update();
    let watch = async {
        loop {
            let connection = *reconnects.borrow_and_update();
            let reconnected = connection != seen;
            seen = connection;
            let looks = parts.iter().zip(&mut watched).map(|(part, watched)| {
                watched.reconnected |= reconnected;
                look_after(&js, *part, topology.replicas, watched)
            });
            futures::future::join_all(looks).await;
            // A closed channel (the client is gone) leaves the timer.
            tokio::select! {
                () = tokio::time::sleep(WATCH_EVERY) => {}
                Ok(()) = reconnects.changed() => {}
            }
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = watch => {}
    }
}

/// What the watchdog remembers of one stream: whether looking it up, or declaring it again,
/// failed last time (each is logged once per run of failures), and whether the connection
/// came back since it last got an answer.
#[derive(Debug, Default, Clone, Copy)]
struct Watched {
    look_failed: bool,
    declare_failed: bool,
    reconnected: bool,
}

/// One look at `part`, and its declaration again if it is missing.
async fn look_after(
    js: &jetstream::Context,
    part: Part<'_>,
    replicas: Option<usize>,
    watched: &mut Watched,
) {
    let name = part.stream_name();
    match existing_config(js, &name).await {
        Ok(Some(_)) => *watched = Watched::default(),
        Err(e) => {
            if !watched.look_failed {
                tracing::info!(stream = %name, error = format!("{e:#}"), "looking the stream up failed; trying again");
            }
            watched.look_failed = true;
        }
        Ok(None) => {
            watched.look_failed = false;
            // Told once per absence, however many tries declaring it takes.
            if !watched.declare_failed {
                if std::mem::take(&mut watched.reconnected) && part.in_memory() {
                    tracing::info!(stream = %name, "the server came back without the stream, which it keeps in memory: declaring it again");
                } else {
                    tracing::error!(stream = %name, "the stream is missing (deleted while the workers run?): declaring it again");
                    metrics::counter!(REDECLARED, "stream" => name.clone()).increment(1);
                }
            }
            match part.declare(js, replicas).await {
                Ok(()) => {
                    tracing::info!(stream = %name, "declared the stream again");
                    watched.declare_failed = false;
                }
                Err(e) => {
                    if !watched.declare_failed {
                        tracing::warn!(stream = %name, error = format!("{e:#}"), "declaring the stream again failed; trying again");
                    }
                    watched.declare_failed = true;
                }
            }
        }
    }
}

/// Creates the stream `wanted` describes when it is missing (with `replicas`, else 1). When it
/// exists, only the settings Versus owns are brought back to `wanted` (see [`reconcile`]);
/// whatever else an operator changed stays, and a setting that cannot change in place is
/// logged as a conflict.
async fn declare_stream(
    js: &jetstream::Context,
    mut wanted: stream::Config,
    replicas: Option<usize>,
) -> anyhow::Result<stream::Stream> {
    let name = wanted.name.clone();
    match existing_config(js, &name).await? {
        Some(existing) => update_owned(js, &existing, &wanted, replicas).await?,
        None => {
            wanted.num_replicas = replicas.unwrap_or(1);
            js.create_stream(wanted)
                .await
                .with_context(|| format!("creating stream {name}"))?;
        }
    }
    js.get_stream(&name)
        .await
        .with_context(|| format!("opening stream {name}"))
}

/// Creates the bucket when it is missing; when it exists, reconciles its stream
/// (`KV_<bucket>`) like [`declare_stream`]: its history and age are Versus's.
async fn declare_bucket(
    js: &jetstream::Context,
    mut wanted: kv::Config,
    replicas: Option<usize>,
) -> anyhow::Result<kv::Store> {
    let bucket = wanted.bucket.clone();
    match existing_config(js, &format!("KV_{bucket}")).await? {
        Some(existing) => {
            let mut owned = existing.clone();
            owned.max_messages_per_subject = wanted.history;
            owned.max_age = wanted.max_age;
            update_owned(js, &existing, &owned, replicas).await?;
        }
        None => {
            wanted.num_replicas = replicas.unwrap_or(1);
            js.create_key_value(wanted)
                .await
                .with_context(|| format!("creating KV bucket {bucket}"))?;
        }
    }
    js.get_key_value(&bucket)
        .await
        .with_context(|| format!("opening KV bucket {bucket}"))
}

/// The configuration of stream `name`, or None when there is no such stream.
async fn existing_config(
    js: &jetstream::Context,
    name: &str,
) -> anyhow::Result<Option<stream::Config>> {
    use jetstream::context::GetStreamErrorKind;
    // The lookup answers with the stream's info: one request.
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream.cached_info().config.clone())),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(error)
                if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(e).with_context(|| format!("looking up stream {name}")),
        },
    }
}

/// Brings the settings Versus owns in `existing` back to `wanted`'s, if any differ.
async fn update_owned(
    js: &jetstream::Context,
    existing: &stream::Config,
    wanted: &stream::Config,
    replicas: Option<usize>,
) -> anyhow::Result<()> {
    let name = &existing.name;
    let Reconciled {
        config,
        changed,
        conflicts,
    } = reconcile(existing, wanted, replicas);
    for conflict in &conflicts {
        tracing::error!(stream = %name, %conflict, "the stream differs from what Versus needs, and this cannot change in place: an operator must recreate it");
    }
    if !changed.is_empty() {
        tracing::info!(stream = %name, changed = ?changed, "bringing the settings Versus owns back to what it needs; the rest stays as it is");
        js.update_stream(config)
            .await
            .with_context(|| format!("updating stream {name}"))?;
    }
    Ok(())
}

/// What [`reconcile`] found.
#[derive(Debug)]
struct Reconciled {
    /// The existing configuration with Versus's settings put back.
    config: stream::Config,
    /// The settings that were put back.
    changed: Vec<&'static str>,
    /// Settings that differ but cannot change in place.
    conflicts: Vec<String>,
}

/// The existing configuration with the settings Versus owns taken from `wanted`: its subjects,
/// limits on messages and age, the events stream's byte cap, discard policy, duplicate window,
/// direct gets, and the replica count when `replicas` is set. Everything else (description,
/// other streams' byte limits, placement,
/// compression, metadata, consumer limits, …) is the operator's and stays.
fn reconcile(
    existing: &stream::Config,
    wanted: &stream::Config,
    replicas: Option<usize>,
) -> Reconciled {
    let mut config = existing.clone();
    let mut changed = Vec::new();
    macro_rules! own {
        ($($field:ident),*) => {$(
            if config.$field != wanted.$field {
                config.$field = wanted.$field.clone();
                changed.push(stringify!($field));
            }
        )*};
    }
    own!(subjects, max_age, discard, duplicate_window, allow_direct);
    // Per-message TTLs can be turned on in place, never off: only ever turned on.
    if wanted.allow_message_ttl && !config.allow_message_ttl {
        config.allow_message_ttl = true;
        changed.push("allow_message_ttl");
    }
    // The server stores "no limit" as -1 whatever a request said (0 or -1).
    let limit = |n: i64| if n <= 0 { -1 } else { n };
    if limit(config.max_messages) != limit(wanted.max_messages) {
        config.max_messages = wanted.max_messages;
        changed.push("max_messages");
    }
    if limit(config.max_messages_per_subject) != limit(wanted.max_messages_per_subject) {
        config.max_messages_per_subject = wanted.max_messages_per_subject;
        changed.push("max_messages_per_subject");
    }
    // A byte cap is Versus's only on a stream it sets one for (the events'; `-1` when turned
    // off); elsewhere it is the operator's.
    if wanted.max_bytes != 0 && limit(config.max_bytes) != limit(wanted.max_bytes) {
        config.max_bytes = wanted.max_bytes;
        changed.push("max_bytes");
    }
    if let Some(replicas) = replicas.filter(|r| *r != config.num_replicas) {
        config.num_replicas = replicas;
        changed.push("num_replicas");
    }
    let mut conflicts = Vec::new();
    if existing.storage != wanted.storage {
        conflicts.push(format!(
            "storage is {:?}, Versus needs {:?}",
            existing.storage, wanted.storage
        ));
    }
    if existing.retention != wanted.retention {
        conflicts.push(format!(
            "retention is {:?}, Versus needs {:?}",
            existing.retention, wanted.retention
        ));
    }
    Reconciled {
        config,
        changed,
        conflicts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn only_the_settings_versus_owns_are_put_back() {
        let wanted = jobs_stream(10_000);
        let mut existing = wanted.clone();
        // An operator's changes, and a limit another setting changed.
        existing.description = Some("ours now".into());
        existing.max_bytes = 1 << 30;
        existing.num_replicas = 3;
        existing.max_messages = 500;
        let r = reconcile(&existing, &wanted, None);
        assert_eq!(r.changed, ["max_messages"]);
        assert_eq!(r.config.max_messages, 10_000);
        assert_eq!(r.config.description.as_deref(), Some("ours now"));
        assert_eq!(r.config.max_bytes, 1 << 30);
        assert_eq!(
            r.config.num_replicas, 3,
            "replicas stay unless VERSUS_NATS_REPLICAS says"
        );
        assert!(r.conflicts.is_empty());

        let r = reconcile(&existing, &wanted, Some(1));
        assert!(r.changed.contains(&"num_replicas"));
        assert_eq!(r.config.num_replicas, 1);

        // The server writes "no limit" as -1.
        let events = events_stream(Duration::from_secs(600), 192 << 20);
        let mut stored = events.clone();
        stored.max_messages = -1;
        let r = reconcile(&stored, &events, None);
        assert!(r.changed.is_empty(), "{:?}", r.changed);

        // An events stream declared before its caps gets them in place.
        let mut unbounded = events.clone();
        unbounded.max_bytes = -1;
        unbounded.max_messages_per_subject = -1;
        let r = reconcile(&unbounded, &events, None);
        assert_eq!(r.changed, ["max_messages_per_subject", "max_bytes"]);
        assert_eq!(r.config.max_bytes, 192 << 20);
        assert_eq!(r.config.max_messages_per_subject, EVENTS_PER_SUBJECT);
        assert_eq!(r.config.discard, stream::DiscardPolicy::Old);
        // A cap turned off (0 MiB: -1) is taken off again.
        let off = events_stream(Duration::from_secs(600), -1);
        let r = reconcile(&events, &off, None);
        assert_eq!(r.changed, ["max_bytes"]);
        assert_eq!(r.config.max_bytes, -1);

        let mut memory = wanted.clone();
        memory.storage = stream::StorageType::Memory;
        assert_eq!(reconcile(&memory, &wanted, None).conflicts.len(), 1);
    }

    #[test]
    fn the_watchdog_looks_after_the_five_streams_and_only_the_events_live_in_memory() {
        let topology = Topology::of(&NatsSettings {
            url: Secret::new("nats://127.0.0.1:4222"),
            creds: None,
            tls_ca: None,
            replicas: None,
            events_max_age_secs: 600,
            events_max_mib: 192,
            max_queued_jobs: 10_000,
        });
        let parts = topology.parts();
        let names = parts.map(Part::stream_name);
        assert_eq!(
            names,
            [
                wire::JOBS_STREAM.to_owned(),
                wire::EVENTS_STREAM.to_owned(),
                format!("KV_{}", wire::ANSWERS_BUCKET),
                format!("KV_{}", wire::SPEND_BUCKET),
                format!("KV_{}", wire::QUOTA_BUCKET),
            ]
        );
        // Only a stream a restarted server loses is expected to be missing after a reconnect.
        assert_eq!(
            parts.map(Part::in_memory),
            [false, true, false, false, false]
        );
    }

    #[test]
    fn a_jobs_stream_declared_before_ttls_gets_them_in_place_and_others_do_not() {
        let wanted = jobs_stream(10_000);
        assert!(wanted.allow_message_ttl);
        let mut older = wanted.clone();
        older.allow_message_ttl = false;
        let r = reconcile(&older, &wanted, None);
        assert_eq!(r.changed, ["allow_message_ttl"]);
        assert!(r.config.allow_message_ttl);
        // Never turned off (the server refuses that), and not asked of other streams.
        let events = events_stream(Duration::from_secs(600), 1 << 20);
        assert!(!events.allow_message_ttl);
        let mut with_ttls = events.clone();
        with_ttls.allow_message_ttl = true;
        let kept = reconcile(&with_ttls, &events, None);
        assert!(!kept.changed.contains(&"allow_message_ttl"));
    }
}
