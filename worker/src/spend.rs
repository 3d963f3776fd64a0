//! Recording what each upstream call cost: in Postgres (the truth, per UTC day, kind and
//! model), in the `versus_spend` KV bucket that every process watches for the daily budget, and
//! in this process's own counter. Calls are recorded before their answer is announced, so the
//! next miss after a `done` is judged against a budget that includes it.
//!
//! Every answer of a day adds to the same few rows, whose lock each statement holds until its
//! commit is durable: one statement per answer would make answers wait on each other's
//! commits. The [`Ledger`] gathers the records that arrive while a statement runs into the
//! next one ([`crate::batch`], as [`crate::claims::Claimer`] does with claims), and publishes
//! each day's new total once per statement.

use std::{collections::HashMap, sync::Arc};

use async_nats::jetstream::kv;
use sqlx::PgPool;
use versus_shared::{
    budget::{self, Budget},
    tasks::Tasks,
};

use crate::{batch::Batcher, claims::Usage};

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
    /// A picture the image API returned.
    Image { model: &'a str },
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
            Call::Image { model } => Cost {
                kind: "image",
                model,
                sums: Sums {
                    usd: prices.of(model).per_image,
                    calls: 1,
                    images: 1,
                    ..Sums::default()
                },
            },
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
/// them against the daily budget. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    records: Batcher<Record, ()>,
    budget: Arc<Budget>,
}

/// One call's cost, on the day it was recorded.
struct Record {
    day: u32,
    kind: &'static str,
    model: String,
    sums: Sums,
}

impl Ledger {
    /// Starts the task that writes the records, on `tasks`; it ends when every `Ledger` is
    /// dropped. Each statement's new daily totals go to `budget` and to the `spend` bucket.
    pub fn start(db: PgPool, spend: kv::Store, budget: Arc<Budget>, tasks: &Tasks) -> Ledger {
        let observer = budget.clone();
        let records = Batcher::start(tasks, move |records: Vec<Record>| {
            let (db, spend, budget) = (db.clone(), spend.clone(), observer.clone());
            async move {
                let answers = vec![(); records.len()];
                match write(&db, records).await {
                    Ok(totals) => {
                        for (day, total) in totals {
                            budget.observe(day, total);
                            let put = spend.put(budget::kv_key(day), total.to_string().into());
                            if let Err(e) = put.await {
                                tracing::warn!(error = %e, "publishing today's spend failed");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "recording spend failed"),
                }
                answers
            }
        });
        Ledger { records, budget }
    }

    /// Records `call`, and returns once it is in Postgres and today's total is published. Best
    /// effort past the local counter: the call is paid for already, and failing its answer
    /// would not get the money back. A record that could not be written is logged, and the
    /// budget then trails by that call.
    pub async fn record(&self, call: Call<'_>) {
        let cost = call.cost(&self.budget.prices);
        self.budget.count(cost.kind, cost.model, cost.sums.usd);
        let record = Record {
            day: budget::today(),
            kind: cost.kind,
            model: cost.model.to_owned(),
            sums: cost.sums,
        };
        if let Err(e) = self.records.call(record).await {
            tracing::warn!(error = %e, "recording spend failed");
        }
    }
}

/// Adds `records` to their rows in one statement; returns the new total of each day they
/// touched.
async fn write(db: &PgPool, records: Vec<Record>) -> sqlx::Result<Vec<(u32, f64)>> {
    // One row per (day, kind, model): a statement may not update a row twice.
    let mut rows: HashMap<(u32, &'static str, String), Sums> = HashMap::new();
    for r in records {
        *rows.entry((r.day, r.kind, r.model)).or_default() += r.sums;
    }
    let rows: Vec<_> = rows.into_iter().collect();
    let column = |f: fn(&Sums) -> i64| rows.iter().map(|(_, s)| f(s)).collect::<Vec<i64>>();
    let totals: Vec<(i32, f64)> = sqlx::query_as(
        "WITH up AS (
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
             RETURNING day, kind, model, usd)
         -- The rows written, as they are now, and the day's other rows, as they were.
         SELECT (d.day - DATE '1970-01-01')::int4,
                (SELECT sum(usd) FROM up WHERE up.day = d.day)
                + COALESCE((SELECT sum(s.usd) FROM spend s
                            WHERE s.day = d.day AND NOT EXISTS (
                                SELECT 1 FROM up
                                WHERE up.day = s.day AND up.kind = s.kind
                                  AND up.model = s.model)), 0)
         FROM (SELECT DISTINCT day FROM up) AS d",
    )
    .bind(rows.iter().map(|(k, _)| k.0 as i32).collect::<Vec<i32>>())
    .bind(rows.iter().map(|(k, _)| k.1).collect::<Vec<&str>>())
    .bind(
        rows.iter()
            .map(|(k, _)| k.2.as_str())
            .collect::<Vec<&str>>(),
    )
    .bind(rows.iter().map(|(_, s)| s.usd).collect::<Vec<f64>>())
    .bind(column(|s| s.calls))
    .bind(column(|s| s.input_tokens))
    .bind(column(|s| s.output_tokens))
    .bind(column(|s| s.images))
    .bind(column(|s| s.estimated))
    .fetch_all(db)
    .await?;
    Ok(totals
        .into_iter()
        .map(|(day, total)| (day as u32, total))
        .collect())
}
