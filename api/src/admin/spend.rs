//! `GET /v1/admin/spend`: today's spend (UTC) by kind of call and model, from Postgres (the
//! `spend` table the workers add to), against the daily budget.

use axum::{
    Json,
    extract::State,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;
use versus_shared::{budget::DaySpend, wire::Kind};

use super::backends::database;
use crate::{
    app::App,
    error::{ApiError, ErrorBody},
};

/// The kind of paid upstream call: `chat` (chat completions, which write the text answers) or
/// `image` (pictures), as workers record it in the `spend` table, which allows these alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SpendKind {
    /// Chat completions: the text answers.
    Chat,
    /// Pictures.
    Image,
}

impl TryFrom<String> for SpendKind {
    type Error = String;

    fn try_from(kind: String) -> Result<SpendKind, String> {
        match kind.as_str() {
            "chat" => Ok(SpendKind::Chat),
            "image" => Ok(SpendKind::Image),
            _ => Err(format!("unknown spend kind {kind:?}")),
        }
    }
}

/// What one model cost today, as `GET /v1/admin/spend` lists it.
#[derive(sqlx::FromRow, Serialize, ToSchema)]
pub(crate) struct ModelSpend {
    /// What kind of call the model was paid for.
    #[sqlx(try_from = "String")]
    kind: SpendKind,
    model: String,
    usd: f64,
    calls: i64,
    input_tokens: i64,
    output_tokens: i64,
    images: i64,
    /// Calls whose tokens were estimated (cut off before reporting usage).
    estimated_calls: i64,
}

/// Today's spend against the daily budget.
#[derive(Serialize, ToSchema)]
pub(crate) struct Spend {
    /// Today (UTC), `YYYY-MM-DD`.
    #[schema(example = "2026-11-30")]
    day: String,
    /// The daily budget in US dollars (0: no cap).
    budget_usd: f64,
    /// Spent today, in US dollars, cluster-wide.
    spent_usd: f64,
    /// Left today; null when there is no cap.
    remaining_usd: Option<f64>,
    /// Held for calls under way (each call reserves its worst case before it is made).
    reserved_usd: f64,
    /// What pictures may cost today (`VERSUS_PICTURE_BUDGET_SHARE` of the budget; 0: no cap).
    picture_budget_usd: f64,
    /// What pictures cost today.
    picture_spent_usd: f64,
    /// Whether new text answers are refused (`budget_exhausted`) until tomorrow: what is left
    /// cannot hold one more answer's worst case.
    exhausted: bool,
    /// Whether new pictures are refused so (the budget, or the pictures' share of it).
    pictures_exhausted: bool,
    /// Seconds until the day ends (UTC) and the budget resets.
    resets_in_secs: u64,
    by_model: Vec<ModelSpend>,
}

/// Today's spend (UTC) by kind and model, from Postgres, against the daily budget.
#[utoipa::path(
    get,
    path = "/v1/admin/spend",
    tag = "admin",
    security(("admin" = [])),
    responses(
        (status = 200, description = "Today's spend by kind and model.", body = Spend),
        (status = 401, description = "No valid admin bearer token.", body = ErrorBody),
        (status = 503, description = "Postgres is unavailable (or `DATABASE_URL` is unset).", body = ErrorBody),
    ),
)]
pub(crate) async fn spend(State(app): State<App>) -> Result<Response, ApiError> {
    let day = versus_shared::budget::today();
    let models: Vec<ModelSpend> = sqlx::query_as(
        "SELECT kind, model, usd, calls, input_tokens, output_tokens, images,
                estimated AS estimated_calls
         FROM spend WHERE day = DATE '1970-01-01' + $1::int ORDER BY usd DESC, kind, model",
    )
    .bind(day as i32)
    .fetch_all(app.db()?)
    .await
    .map_err(database)?;
    let reserved_usd: f64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(usd), 0) FROM spend_reservations
         WHERE day = DATE '1970-01-01' + $1::int AND expires_at > now()",
    )
    .bind(day as i32)
    .fetch_one(app.db()?)
    .await
    .map_err(database)?;
    let spent: f64 = models.iter().map(|m| m.usd).sum();
    let picture_spent_usd: f64 = models
        .iter()
        .filter(|m| m.kind == SpendKind::Image)
        .map(|m| m.usd)
        .sum();
    let today = DaySpend {
        day,
        usd: spent,
        image_usd: picture_spent_usd,
    };
    let settings = &app.inner.settings.budget;
    let budget = settings.daily_budget_usd;
    Ok(Json(Spend {
        day: versus_shared::budget::date_of(day),
        budget_usd: budget,
        spent_usd: spent,
        remaining_usd: (budget > 0.0).then(|| (budget - spent).max(0.0)),
        reserved_usd,
        picture_budget_usd: budget * settings.picture_budget_share,
        picture_spent_usd,
        exhausted: !app.inner.budget.fits(Kind::Text, today),
        pictures_exhausted: !app.inner.budget.fits(Kind::Image, today),
        resets_in_secs: versus_shared::budget::until_tomorrow().as_secs(),
        by_model: models,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::SpendKind;

    #[test]
    fn a_kind_reads_and_writes_as_the_spend_table_has_it() {
        for (text, kind) in [("chat", SpendKind::Chat), ("image", SpendKind::Image)] {
            assert_eq!(SpendKind::try_from(text.to_owned()), Ok(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), text);
        }
        assert!(SpendKind::try_from("text".to_owned()).is_err());
    }
}
