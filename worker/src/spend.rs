//! What upstream calls cost: reserved before each paid call, recorded once it ends.
//!
//! Before a paid call, its worst case (its kind's, from `VERSUS_PRICES`) is reserved in
//! Postgres, cluster-wide and atomically (`reserve_spend`, migration `reservations`): at no
//! moment do the day's spend and its reservations exceed the budget, nor pictures their share.
//! When the call ends, what it cost replaces its [`Reservation`] (in Postgres, the truth, per
//! UTC day, kind and model; in the `versus_spend` KV bucket that every process watches; and in
//! this process's own counter); a call the upstream refused releases it; a call dropped while
//! under way (a speculative request whose claim was lost) costs its prompt, or its picture.
//! Calls are recorded before their answer is announced, so the next miss after a `done` is
//! judged against a budget that includes it.
//!
//! Every answer of a day adds to the same few rows, whose lock each statement holds until its
//! commit is durable: one statement per answer would make answers wait on each other's
//! commits. The [`Ledger`] gathers the records that arrive while a statement runs into the
//! next one ([`crate::batch`], as [`crate::claims::Claimer`] does with claims), and publishes
//! each day's new total once per statement.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::kv;
use sqlx::PgPool;
use versus_shared::{
    budget::{self, Budget, DaySpend},
    retry,
    tasks::Tasks,
    wire::Kind,
};

use crate::{
    batch::{Batcher, Stopped},
    claims::Usage,
};

/// One paid upstream call.
pub enum Call<'a> {
    /// A chat completion and the usage it reported.
    Chat { model: &'a str, usage: Usage },
    /// A chat completion that broke off without reporting usage: its tokens are estimated from
    /// the characters sent and received ([`CHARS_PER_TOKEN`]).
    ChatCut {
        model: &'a str,
        prompt_chars: usize,
        text_chars: usize,
    },
    /// A picture the image API returned, with the partial images it streamed first (each 100
    /// image output tokens).
    Image { model: &'a str, partials: u32 },
}

/// Characters per token in an estimate: about four, in English, for OpenAI's tokenizers.
const CHARS_PER_TOKEN: usize = 4;

/// What a call cost, and where it is added up: the row of its kind and model.
struct Cost<'a> {
    kind: &'static str,
    model: &'a str,
    sums: Sums,
}

impl Call<'_> {
    fn cost(&self, prices: &budget::Prices) -> Cost<'_> {
        let chat = |model, input: i64, output: i64, estimated: bool| Cost {
            kind: "chat",
            model,
            sums: Sums {
                usd: prices.of(model).tokens(input as u64, output as u64),
                calls: 1,
                input_tokens: input,
                output_tokens: output,
                images: 0,
                estimated: i64::from(estimated),
            },
        };
        match *self {
            Call::Chat { model, usage } => chat(
                model,
                i64::from(usage.prompt_tokens.max(0)),
                i64::from(usage.completion_tokens.max(0)),
                false,
            ),
            Call::ChatCut {
                model,
                prompt_chars,
                text_chars,
            } => chat(
                model,
                prompt_chars.div_ceil(CHARS_PER_TOKEN) as i64,
                text_chars.div_ceil(CHARS_PER_TOKEN) as i64,
                true,
            ),
            Call::Image { model, partials } => {
                let tokens = u64::from(partials) * budget::PARTIAL_IMAGE_TOKENS;
                Cost {
                    kind: "image",
                    model,
                    sums: Sums {
                        usd: prices.of(model).picture(partials),
                        calls: 1,
                        images: 1,
                        output_tokens: tokens as i64,
                        ..Sums::default()
                    },
                }
            }
        }
    }
}

/// Puts this process's spend on the models it generates with at zero in `/metrics`
/// (`versus_spend_usd_total`), so that a rule over it has a value before the first call.
pub fn zero_counters(budget: &budget::Budget, models: &versus_shared::config::ModelSettings) {
    budget.count("chat", &models.chat_model, 0.0);
    budget.count("image", &models.image_model, 0.0);
}

/// What calls add to one row of `spend`.
#[derive(Default, Clone, Copy)]
struct Sums {
    usd: f64,
    calls: i64,
    input_tokens: i64,
    output_tokens: i64,
    images: i64,
    estimated: i64,
}

impl std::ops::AddAssign for Sums {
    fn add_assign(&mut self, other: Sums) {
        self.usd += other.usd;
        self.calls += other.calls;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.images += other.images;
        self.estimated += other.estimated;
    }
}

/// Writes spend records to Postgres, those that arrive together in one statement, and counts
/// them against the daily budget; reserves before calls. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    records: Batcher<Record, ()>,
    reservations: Batcher<Ask, Result<Option<i64>, Arc<sqlx::Error>>>,
    budget: Arc<Budget>,
}

/// One call's cost, on the day its reservation was made, and the reservation it settles.
struct Record {
    day: u32,
    kind: &'static str,
    model: String,
    sums: Sums,
    reservation: Option<i64>,
}

/// A reservation asked for: its kind and what it holds.
struct Ask {
    kind: &'static str,
    usd: f64,
}

/// How long a reservation counts if nothing settles it (its worker died mid-call): longer than
/// any call may take (`VERSUS_UPSTREAM_CALL_TIMEOUT_SECS`, `VERSUS_UPSTREAM_IMAGE_TIMEOUT_SECS`).
const RESERVATION_TTL: Duration = Duration::from_secs(15 * 60);

/// What a paid call will be, known before it is made.
#[derive(Clone, Copy)]
pub enum Paid<'a> {
    /// A chat completion with a prompt of `prompt_chars` characters.
    Chat {
        model: &'a str,
        prompt_chars: usize,
    },
    Image {
        model: &'a str,
    },
}

impl<'a> Paid<'a> {
    fn kind(self) -> Kind {
        match self {
            Paid::Chat { .. } => Kind::Text,
            Paid::Image { .. } => Kind::Image,
        }
    }

    fn model(self) -> &'a str {
        match self {
            Paid::Chat { model, .. } | Paid::Image { model } => model,
        }
    }

    /// What the call costs if it is dropped while under way: a chat request its prompt (the
    /// upstream bills what it read), a picture its price (it may have been drawn).
    fn if_dropped(self) -> Call<'a> {
        match self {
            Paid::Chat {
                model,
                prompt_chars,
            } => Call::ChatCut {
                model,
                prompt_chars,
                text_chars: 0,
            },
            Paid::Image { model } => Call::Image {
                model,
                partials: budget::MAX_PARTIAL_IMAGES,
            },
        }
    }
}

/// Part of the day's budget held for one paid call until it is settled: with what the call
/// cost ([`Reservation::spent`]), or with nothing when the upstream refused it
/// ([`Reservation::released`]). Dropped unsettled once its call began ([`Reservation::calling`]),
/// it records what the call costs if dropped (see [`Paid`]); dropped before, it is released.
pub struct Reservation {
    ledger: Ledger,
    /// None when the budget is not capped: nothing was reserved.
    id: Option<i64>,
    day: u32,
    model: String,
    /// What the call costs if it is dropped unsettled (its kind and sums).
    if_dropped: (&'static str, Sums),
    /// The call began: from here on the upstream may bill it.
    called: bool,
}

impl Ledger {
    /// Starts the tasks that reserve and write the records, on `tasks`; they end when every
    /// `Ledger` is dropped. Each write's new daily totals go to `budget` and to the `spend`
    /// bucket.
    pub fn start(db: PgPool, spend: kv::Store, budget: Arc<Budget>, tasks: &Tasks) -> Ledger {
        let observer = budget.clone();
        let writer = db.clone();
        let records = Batcher::start(tasks, move |records: Vec<Record>| {
            let (db, spend, budget) = (writer.clone(), spend.clone(), observer.clone());
            async move {
                let answers = vec![(); records.len()];
                let written = retry::spend_write()
                    .retry(|| write(&db, &records))
                    .notify(|e, delay| {
                        tracing::warn!(error = %e, ?delay, "recording spend failed; trying again");
                    })
                    .await;
                match written {
                    Ok(totals) => {
                        for spent in totals {
                            budget.observe(spent);
                            publish(&spend, spent).await;
                        }
                    }
                    Err(e) => tracing::error!(
                        error = %e,
                        calls = records.len(),
                        "recording spend failed for good: these calls are missing from the spend"
                    ),
                }
                answers
            }
        });
        let caps = budget.clone();
        let releases = records.clone();
        let reservations = Batcher::start_with(
            tasks,
            move |asks: Vec<Ask>| {
                let (db, budget) = (db.clone(), caps.clone());
                async move {
                    match reserve(&db, &budget, &asks).await {
                        Ok(ids) => ids.into_iter().map(Ok).collect(),
                        Err(e) => {
                            let e = Arc::new(e);
                            asks.iter().map(|_| Err(e.clone())).collect()
                        }
                    }
                }
            },
            // A reservation granted to a caller that stopped waiting (a speculative call
            // dropped meanwhile) is given back at once rather than held until it expires.
            move |granted| {
                if let Ok(Some(id)) = granted {
                    let release = Record {
                        day: budget::today(),
                        kind: "chat",
                        model: String::new(),
                        sums: Sums::default(),
                        reservation: Some(id),
                    };
                    if releases.send(release).is_err() {
                        tracing::warn!("giving back an unclaimed reservation failed; it expires");
                    }
                }
            },
        );
        Ledger {
            records,
            reservations,
            budget,
        }
    }

    /// Reserves the worst case of `paid` (see [`Budget::worst_case`]) before it is made; None
    /// when the day's budget, or the pictures' share of it, has no room for it.
    pub async fn reserve(&self, paid: Paid<'_>) -> anyhow::Result<Option<Reservation>> {
        let kind = paid.kind();
        let id = if self.budget.capped() {
            let ask = Ask {
                kind: cost_kind(kind),
                usd: self.budget.worst_case(kind),
            };
            match self.reservations.call(ask).await? {
                Ok(Some(id)) => Some(id),
                Ok(None) => {
                    metrics::counter!("versus_budget_reservations_refused_total", "kind" => kind.as_str())
                        .increment(1);
                    return Ok(None);
                }
                Err(e) => return Err(anyhow::anyhow!("reserving spend failed: {e}")),
            }
        } else {
            None
        };
        let dropped = paid.if_dropped();
        let dropped = dropped.cost(&self.budget.prices);
        Ok(Some(Reservation {
            ledger: self.clone(),
            id,
            day: budget::today(),
            model: paid.model().to_owned(),
            if_dropped: (dropped.kind, dropped.sums),
            called: false,
        }))
    }

    /// Records what a call cost, settling `reservation` (if any), and returns once it is in
    /// Postgres and the day's total is published. Best effort past the local counter and the
    /// write's retries: the call is paid for already, and failing its answer would not get the
    /// money back.
    async fn record(&self, day: u32, cost: Cost<'_>, reservation: Option<i64>) {
        let record = self.counted(day, cost, reservation);
        if let Err(e) = self.records.call(record).await {
            tracing::warn!(error = %e, "recording spend failed");
        }
    }

    /// `cost` as a record, counted in this process's spend.
    fn counted(&self, day: u32, cost: Cost<'_>, reservation: Option<i64>) -> Record {
        if cost.sums.calls > 0 {
            self.budget.count(cost.kind, cost.model, cost.sums.usd);
        }
        Record {
            day,
            kind: cost.kind,
            model: cost.model.to_owned(),
            sums: cost.sums,
            reservation,
        }
    }
}

impl Reservation {
    /// Marks the call as begun: dropped from now on, it is billed as [`Paid`] says.
    pub fn calling(&mut self) {
        self.called = true;
    }

    /// Records what the call cost in place of the reservation.
    pub async fn spent(mut self, call: Call<'_>) {
        let cost = call.cost(&self.ledger.budget.prices);
        self.settle(cost).await;
    }

    /// The call cost nothing (the upstream refused it before doing any work): its reservation
    /// is given back.
    pub async fn released(mut self) {
        let nothing = self.nothing();
        self.settle(nothing).await;
    }

    async fn settle(&mut self, cost: Cost<'_>) {
        self.called = false;
        let id = self.id.take();
        if id.is_some() || cost.sums.calls > 0 {
            self.ledger.record(self.day, cost, id).await;
        }
    }

    fn nothing(&self) -> Cost<'static> {
        Cost {
            kind: self.if_dropped.0,
            model: "",
            sums: Sums::default(),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Dropped while its call was under way (a speculative request whose claim was lost):
        // recorded at what the call may have cost, or released if it never began, without
        // waiting (a drop cannot), in the next batch.
        let cost = if self.called {
            let (kind, sums) = self.if_dropped;
            Cost {
                kind,
                model: &self.model,
                sums,
            }
        } else if self.id.is_some() {
            self.nothing()
        } else {
            return;
        };
        let record = self.ledger.counted(self.day, cost, self.id.take());
        if self.ledger.records.send(record).is_err() {
            tracing::warn!(error = %Stopped, "recording a dropped call's spend failed");
        }
    }
}

fn cost_kind(kind: Kind) -> &'static str {
    match kind {
        Kind::Text => "chat",
        Kind::Image => "image",
    }
}

/// Asks Postgres for the reservations `asks`, in order, for today; an id for each one granted.
async fn reserve(db: &PgPool, budget: &Budget, asks: &[Ask]) -> sqlx::Result<Vec<Option<i64>>> {
    sqlx::query_scalar(
        "SELECT reserve_spend(DATE '1970-01-01' + $1::int4, $2::text[], $3::float8[], $4, $5,
                              make_interval(secs => $6))",
    )
    .bind(budget::today() as i32)
    .bind(asks.iter().map(|a| a.kind).collect::<Vec<_>>())
    .bind(asks.iter().map(|a| a.usd).collect::<Vec<_>>())
    .bind(budget.total_cap())
    .bind(budget.image_cap())
    .bind(RESERVATION_TTL.as_secs_f64())
    .fetch_one(db)
    .await
}

/// Puts `spent` in the spend bucket, where every process watches it.
async fn publish(spend: &kv::Store, spent: DaySpend) {
    for (key, usd) in [
        (budget::kv_key(spent.day), spent.usd),
        (budget::kv_image_key(spent.day), spent.image_usd),
    ] {
        if let Err(e) = spend.put(key, usd.to_string().into()).await {
            tracing::warn!(error = %e, "publishing today's spend failed");
        }
    }
}

/// Adds `records` to their rows, settles their reservations and adds to the days' totals, in
/// one statement; returns the new totals of each day they touched.
async fn write(db: &PgPool, records: &[Record]) -> sqlx::Result<Vec<DaySpend>> {
    // One row per (day, kind, model) and per day: a statement may not update a row twice.
    let mut rows: HashMap<(u32, &'static str, &str), Sums> = HashMap::new();
    let mut days: HashMap<u32, (f64, f64)> = HashMap::new();
    for r in records {
        let day = days.entry(r.day).or_default();
        day.0 += r.sums.usd;
        if r.kind == "image" {
            day.1 += r.sums.usd;
        }
        // A released reservation adds nothing.
        if r.sums.calls > 0 {
            *rows.entry((r.day, r.kind, &r.model)).or_default() += r.sums;
        }
    }
    let rows: Vec<_> = rows.into_iter().collect();
    let days: Vec<_> = days.into_iter().collect();
    let column = |f: fn(&Sums) -> i64| rows.iter().map(|(_, s)| f(s)).collect::<Vec<i64>>();
    let totals: Vec<(i32, f64, f64)> = sqlx::query_as(
        "WITH settled AS (
             DELETE FROM spend_reservations WHERE id = ANY($10::int8[])
         ), added AS (
             INSERT INTO spend AS s
                 (day, kind, model, usd, calls, input_tokens, output_tokens, images, estimated)
             SELECT DATE '1970-01-01' + r.day, r.kind, r.model, r.usd, r.calls,
                    r.input_tokens, r.output_tokens, r.images, r.estimated
             FROM UNNEST($1::int4[], $2::text[], $3::text[], $4::float8[], $5::int8[],
                         $6::int8[], $7::int8[], $8::int8[], $9::int8[])
                  AS r(day, kind, model, usd, calls, input_tokens, output_tokens, images,
                       estimated)
             ON CONFLICT (day, kind, model) DO UPDATE SET
                 usd = s.usd + excluded.usd,
                 calls = s.calls + excluded.calls,
                 input_tokens = s.input_tokens + excluded.input_tokens,
                 output_tokens = s.output_tokens + excluded.output_tokens,
                 images = s.images + excluded.images,
                 estimated = s.estimated + excluded.estimated
         )
         INSERT INTO budget_days AS b (day, usd, image_usd)
         SELECT DATE '1970-01-01' + d.day, d.usd, d.image_usd
         FROM UNNEST($11::int4[], $12::float8[], $13::float8[]) AS d(day, usd, image_usd)
         ON CONFLICT (day) DO UPDATE SET
             usd = b.usd + excluded.usd,
             image_usd = b.image_usd + excluded.image_usd
         RETURNING (day - DATE '1970-01-01')::int4, usd, image_usd",
    )
    .bind(rows.iter().map(|(k, _)| k.0 as i32).collect::<Vec<i32>>())
    .bind(rows.iter().map(|(k, _)| k.1).collect::<Vec<&str>>())
    .bind(rows.iter().map(|(k, _)| k.2).collect::<Vec<&str>>())
    .bind(rows.iter().map(|(_, s)| s.usd).collect::<Vec<f64>>())
    .bind(column(|s| s.calls))
    .bind(column(|s| s.input_tokens))
    .bind(column(|s| s.output_tokens))
    .bind(column(|s| s.images))
    .bind(column(|s| s.estimated))
    .bind(
        records
            .iter()
            .filter_map(|r| r.reservation)
            .collect::<Vec<i64>>(),
    )
    .bind(days.iter().map(|(d, _)| *d as i32).collect::<Vec<i32>>())
    .bind(days.iter().map(|(_, t)| t.0).collect::<Vec<f64>>())
    .bind(days.iter().map(|(_, t)| t.1).collect::<Vec<f64>>())
    .fetch_all(db)
    .await?;
    Ok(totals
        .into_iter()
        .map(|(day, usd, image_usd)| DaySpend {
            day: day as u32,
            usd,
            image_usd,
        })
        .collect())
}
