//! Recording what each upstream call cost: in Postgres (the truth, per UTC day, kind and
//! model), in the `versus_spend` KV bucket that every process watches for the daily budget, and
//! in this process's own counter. Calls are recorded before their answer is announced, so the
//! next miss after a `done` is judged against a budget that includes it.

use versus_shared::budget;

use crate::{claims::Usage, ctx::Ctx};

/// One paid upstream call.
pub enum Call<'a> {
    /// A chat completion and the usage it reported.
    Chat { model: &'a str, usage: Usage },
    /// A chat completion that broke off without reporting usage: its tokens are estimated from
    /// the characters sent and received (about four to a token).
    ChatCut {
        model: &'a str,
        prompt_chars: usize,
        text_chars: usize,
    },
    /// A picture the image API returned.
    Image { model: &'a str },
}

struct Cost<'a> {
    kind: &'static str,
    model: &'a str,
    usd: f64,
    input_tokens: i64,
    output_tokens: i64,
    images: i64,
    estimated: bool,
}

impl Call<'_> {
    fn cost(&self, prices: &budget::Prices) -> Cost<'_> {
        let chat = |model, input: i64, output: i64, estimated| Cost {
            kind: "chat",
            model,
            usd: prices.of(model).tokens(input as u64, output as u64),
            input_tokens: input,
            output_tokens: output,
            images: 0,
            estimated,
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
                prompt_chars.div_ceil(4) as i64,
                text_chars.div_ceil(4) as i64,
                true,
            ),
            Call::Image { model } => Cost {
                kind: "image",
                model,
                usd: prices.of(model).per_image,
                input_tokens: 0,
                output_tokens: 0,
                images: 1,
                estimated: false,
            },
        }
    }
}

/// Records `call`. Best effort past the local counter: the call is paid for already, and
/// failing its answer would not get the money back. A record that could not be written is
/// logged, and the budget then trails by that call.
pub async fn record(ctx: &Ctx, call: Call<'_>) {
    let cost = call.cost(&ctx.budget.prices);
    ctx.budget.count(cost.kind, cost.model, cost.usd);
    let day = budget::today();
    let total = sqlx::query_scalar::<_, f64>(
        "WITH up AS (
             INSERT INTO spend AS s
                 (day, kind, model, usd, calls, input_tokens, output_tokens, images, estimated)
             VALUES (DATE '1970-01-01' + $1::int, $2, $3, $4, 1, $5, $6, $7, $8)
             ON CONFLICT (day, kind, model) DO UPDATE SET
                 usd = s.usd + excluded.usd,
                 calls = s.calls + 1,
                 input_tokens = s.input_tokens + excluded.input_tokens,
                 output_tokens = s.output_tokens + excluded.output_tokens,
                 images = s.images + excluded.images,
                 estimated = s.estimated + excluded.estimated
             RETURNING usd)
         SELECT (SELECT usd FROM up) + COALESCE((SELECT sum(usd) FROM spend
             WHERE day = DATE '1970-01-01' + $1::int AND NOT (kind = $2 AND model = $3)), 0)",
    )
    .bind(day as i32)
    .bind(cost.kind)
    .bind(cost.model)
    .bind(cost.usd)
    .bind(cost.input_tokens)
    .bind(cost.output_tokens)
    .bind(cost.images)
    .bind(i64::from(cost.estimated))
    .fetch_one(&ctx.db)
    .await;
    let total = match total {
        Ok(total) => total,
        Err(e) => {
            tracing::warn!(error = %e, usd = cost.usd, "recording spend failed");
            return;
        }
    };
    ctx.budget.observe(day, total);
    let put = ctx
        .bus
        .spend
        .put(budget::kv_key(day), total.to_string().into())
        .await;
    if let Err(e) = put {
        tracing::warn!(error = %e, "publishing today's spend failed");
    }
}
