//! The daily budget: what the upstream's calls cost, by model, and whether today's spend
//! (cluster-wide, the UTC day) leaves room for a new generation.
//!
//! Workers record every paid call in Postgres (the truth, `spend`) and put the day's total in
//! the KV bucket `versus_spend` (key `day.<days since 1970-01-01>`); every process watches that
//! bucket into a [`Budget`], so the check on a miss is a lock and a comparison, never a round
//! trip. Each process also counts what it spent itself, for `/metrics`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream::kv;
use futures::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{config::ModelSettings, key::MAX_NAME_BYTES, kind::Kind};

const DAY_SECS: u64 = 24 * 3600;

/// The budget's settings, read by every binary.
#[derive(clap::Args, Debug, Clone)]
pub struct BudgetSettings {
    /// Most the upstream may cost per UTC day, cluster-wide, in US dollars; once spent, no
    /// new answer starts until midnight UTC (hits and answers in progress go on). 0: no cap.
    #[arg(long, env = "VERSUS_DAILY_BUDGET_USD", default_value_t = 10.0)]
    pub daily_budget_usd: f64,
    /// Prices replacing or adding to the built-in table, as JSON:
    /// `{"model": {"input_per_mtok": x, "output_per_mtok": y, "per_image": z,
    /// "image_output_per_mtok": w}}` (US dollars per million tokens, per picture, and per
    /// million image output tokens: what a picture's partial images cost).
    #[arg(long, env = "VERSUS_PRICES", default_value = "")]
    pub prices: String,
    /// The most of the day's budget pictures may use (0 to 1); once it is spent, new pictures
    /// get `budget_exhausted` while text goes on until the rest is spent.
    #[arg(long, env = "VERSUS_PICTURE_BUDGET_SHARE", default_value_t = 0.3)]
    pub picture_budget_share: f64,
}

/// What one model costs. Missing fields cost nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    #[serde(default)]
    pub input_per_mtok: f64,
    #[serde(default)]
    pub output_per_mtok: f64,
    #[serde(default)]
    pub per_image: f64,
    /// Per million image output tokens: a streamed picture's partial images cost
    /// [`PARTIAL_IMAGE_TOKENS`] each.
    #[serde(default)]
    pub image_output_per_mtok: f64,
}

/// OpenAI's published list prices (US dollars per million tokens, standard tier, as of 2025;
/// `VERSUS_PRICES` corrects any that changed). Pictures are priced
/// at 1024×1024 in the quality the image API picks by default for each model (gpt-image-1's
/// `auto` can be `high`, so its top price is taken).
const BUILT_IN: &[(&str, Price)] = &[
    ("gpt-4o-mini", chat(0.15, 0.60)),
    ("gpt-4o", chat(2.50, 10.00)),
    ("gpt-4.1", chat(2.00, 8.00)),
    ("gpt-4.1-mini", chat(0.40, 1.60)),
    ("gpt-4.1-nano", chat(0.10, 0.40)),
    ("gpt-5", chat(1.25, 10.00)),
    ("gpt-5-mini", chat(0.25, 2.00)),
    ("gpt-5-nano", chat(0.05, 0.40)),
    ("o4-mini", chat(1.10, 4.40)),
    ("gpt-image-1", image(0.167, 40.00)),
    ("gpt-image-1-mini", image(0.036, 8.00)),
    ("dall-e-3", image(0.04, 0.0)),
    ("dall-e-2", image(0.02, 0.0)),
];

const fn chat(input_per_mtok: f64, output_per_mtok: f64) -> Price {
    Price {
        input_per_mtok,
        output_per_mtok,
        per_image: 0.0,
        image_output_per_mtok: 0.0,
    }
}

/// A picture model: its price per picture, and per million image output tokens (what its
/// partial images cost: [`PARTIAL_IMAGE_TOKENS`] each).
const fn image(per_image: f64, image_output_per_mtok: f64) -> Price {
    Price {
        input_per_mtok: 0.0,
        output_per_mtok: 0.0,
        per_image,
        image_output_per_mtok,
    }
}

/// Image output tokens one partial image of a streamed picture costs (OpenAI's figure).
pub const PARTIAL_IMAGE_TOKENS: u64 = 100;
/// The most partial images a picture is streamed with (`VERSUS_PARTIAL_IMAGES`, 0 to 3).
pub const MAX_PARTIAL_IMAGES: u32 = 3;

/// The price table: the built-in prices with the operator's on top.
#[derive(Debug, Clone)]
pub struct Prices(HashMap<String, Price>);

impl Prices {
    /// The built-in table, with `overrides` (the JSON of `VERSUS_PRICES`, or empty) on top.
    pub fn new(overrides: &str) -> anyhow::Result<Prices> {
        let mut table: HashMap<String, Price> = BUILT_IN
            .iter()
            .map(|(model, price)| ((*model).to_owned(), *price))
            .collect();
        if !overrides.trim().is_empty() {
            let given: HashMap<String, Price> = serde_json::from_str(overrides).map_err(|e| {
                anyhow::anyhow!(
                    "VERSUS_PRICES must be {{\"model\": {{\"input_per_mtok\", \"output_per_mtok\", \"per_image\"}}}}: {e}"
                )
            })?;
            for (model, price) in &given {
                let fields = [price.input_per_mtok, price.output_per_mtok, price.per_image];
                if fields.iter().any(|v| !v.is_finite() || *v < 0.0) {
                    anyhow::bail!("VERSUS_PRICES: the prices of {model} must be numbers ≥ 0");
                }
            }
            table.extend(given);
        }
        Ok(Prices(table))
    }

    /// The price of `model`. A model the table lacks is priced as the dearest one it has, so
    /// that an unknown model can never spend past the budget.
    pub fn of(&self, model: &str) -> Price {
        self.0.get(model).copied().unwrap_or_else(|| {
            let dearest = |f: fn(&Price) -> f64| self.0.values().map(f).fold(0.0, f64::max);
            Price {
                input_per_mtok: dearest(|p| p.input_per_mtok),
                output_per_mtok: dearest(|p| p.output_per_mtok),
                per_image: dearest(|p| p.per_image),
                image_output_per_mtok: dearest(|p| p.image_output_per_mtok),
            }
        })
    }

    pub fn knows(&self, model: &str) -> bool {
        self.0.contains_key(model)
    }
}

impl Price {
    /// What a chat call with this usage costs.
    pub fn tokens(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.input_per_mtok + output as f64 * self.output_per_mtok) / 1e6
    }

    /// What a picture streamed with `partials` partial images costs.
    pub fn picture(&self, partials: u32) -> f64 {
        let tokens = u64::from(partials) * PARTIAL_IMAGE_TOKENS;
        self.per_image + tokens as f64 * self.image_output_per_mtok / 1e6
    }
}

/// The UTC day of `at`, in days since 1970-01-01.
pub fn day_of(at: SystemTime) -> u32 {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    (secs / DAY_SECS) as u32
}

pub fn today() -> u32 {
    day_of(SystemTime::now())
}

/// How long until the next UTC day begins (at least a second).
pub fn until_tomorrow() -> Duration {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Duration::from_secs((DAY_SECS - secs % DAY_SECS).max(1))
}

/// `day` (days since 1970-01-01) as a date, `YYYY-MM-DD` (the proleptic Gregorian calendar).
pub fn date_of(day: u32) -> String {
    // Shift to a calendar whose years begin in March, so leap days fall at the end of a year.
    let z = i64::from(day) + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let d = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let m = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let y = year_of_era + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The key of `day`'s total in the spend bucket.
pub fn kv_key(day: u32) -> String {
    format!("day.{day}")
}

/// The key of what pictures cost on `day`, in the spend bucket.
pub fn kv_image_key(day: u32) -> String {
    format!("day.{day}.image")
}

/// A bound on the tokens of one text prompt: each byte is at most a token, the names are at
/// most [`MAX_NAME_BYTES`] each and at most double once quoted, and the templates are short.
const PROMPT_TOKENS_MAX: u64 = 4 * MAX_NAME_BYTES as u64 + 1024;

/// A millionth of a cent: sums of prices that should reach a cap exactly still fit it.
const ROUNDING_SLACK: f64 = 1e-8;

/// What the cluster spent on one UTC day, in all and on pictures, as this process last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DaySpend {
    pub day: u32,
    pub usd: f64,
    pub image_usd: f64,
}

/// The daily budget as this process sees it, and what this process spent itself.
pub struct Budget {
    /// US dollars per UTC day; 0 or less: no cap.
    limit: f64,
    /// The fraction of `limit` pictures may use.
    picture_share: f64,
    pub prices: Prices,
    /// The models answers are made with, which set what one call may cost.
    models: ModelSettings,
    /// The newest day seen in the spend bucket, and its totals.
    seen: Mutex<DaySpend>,
    /// What this process spent since it started, by (kind, model): the counter of `/metrics`.
    spent: Mutex<BTreeMap<(&'static str, String), f64>>,
}

impl Budget {
    pub fn new(settings: &BudgetSettings, models: &ModelSettings) -> anyhow::Result<Arc<Budget>> {
        if !settings.daily_budget_usd.is_finite() || settings.daily_budget_usd < 0.0 {
            anyhow::bail!("VERSUS_DAILY_BUDGET_USD must be a number ≥ 0");
        }
        if !(0.0..=1.0).contains(&settings.picture_budget_share) {
            anyhow::bail!("VERSUS_PICTURE_BUDGET_SHARE must be a number from 0 to 1");
        }
        Ok(Arc::new(Budget {
            limit: settings.daily_budget_usd,
            picture_share: settings.picture_budget_share,
            prices: Prices::new(&settings.prices)?,
            models: models.clone(),
            seen: Mutex::new(DaySpend::default()),
            spent: Mutex::new(BTreeMap::new()),
        }))
    }

    /// Whether the budget caps spend at all.
    pub fn capped(&self) -> bool {
        self.limit > 0.0
    }

    /// The day's budget, in all (with a hair of slack, so that sums of prices that should
    /// meet it exactly do despite rounding).
    pub fn total_cap(&self) -> f64 {
        self.limit + ROUNDING_SLACK
    }

    /// What pictures may cost in a day (`VERSUS_PICTURE_BUDGET_SHARE` of the budget).
    pub fn image_cap(&self) -> f64 {
        self.limit * self.picture_share + ROUNDING_SLACK
    }

    /// What the cluster spent today, as far as this process knows.
    pub fn spent_today(&self) -> DaySpend {
        let seen = *lock(&self.seen);
        if seen.day == today() {
            seen
        } else {
            DaySpend::default()
        }
    }

    /// Whether a new call for an answer of `kind`, at its worst case, fits in what `spent`
    /// leaves of the day's budget and, for a picture, of the pictures' share. The workers'
    /// reservations (`reserve_spend`) judge by the same rule, counting the calls under way too.
    pub fn fits(&self, kind: Kind, spent: DaySpend) -> bool {
        let worst = self.worst_case(kind);
        !self.capped()
            || (spent.usd + worst <= self.total_cap()
                && (kind == Kind::Text || spent.image_usd + worst <= self.image_cap()))
    }

    /// Whether no new generation of `kind` may start today, as far as this process knows: the
    /// budget (for a picture, or the pictures' share of it) has no room for one more call.
    pub fn exhausted_for(&self, kind: Kind) -> bool {
        !self.fits(kind, self.spent_today())
    }

    /// The most one call for an answer of `kind` may cost: what is reserved before it is made
    /// (a text answer's longest prompt and answer, a picture's price).
    pub fn worst_case(&self, kind: Kind) -> f64 {
        match kind {
            Kind::Text => self
                .prices
                .of(&self.models.chat_model)
                .tokens(PROMPT_TOKENS_MAX, u64::from(self.models.max_answer_tokens)),
            // With the most partial images it may be streamed with.
            Kind::Image => self
                .prices
                .of(&self.models.image_model)
                .picture(MAX_PARTIAL_IMAGES),
        }
    }

    /// Takes `spent` as its day's spend. Totals of one day only grow: older, smaller totals
    /// that arrive late are ignored.
    pub fn observe(&self, spent: DaySpend) {
        let mut seen = lock(&self.seen);
        if spent.day > seen.day {
            *seen = spent;
        } else if spent.day == seen.day {
            seen.usd = seen.usd.max(spent.usd);
            seen.image_usd = seen.image_usd.max(spent.image_usd);
        }
    }

    /// Counts `usd` spent by this process on a `kind` call to `model`.
    pub fn count(&self, kind: &'static str, model: &str, usd: f64) {
        *lock(&self.spent)
            .entry((kind, model.to_owned()))
            .or_default() += usd;
    }

    /// The budget's lines of the Prometheus exposition: this process's spend (a counter with
    /// fractions, which the `metrics` crate cannot express), the cap and what is left today.
    pub fn render_metrics(&self, out: &mut String) {
        let spent = lock(&self.spent);
        out.push_str(
            "# HELP versus_spend_usd_total US dollars this process spent on upstream calls.\n\
             # TYPE versus_spend_usd_total counter\n",
        );
        for ((kind, model), usd) in spent.iter() {
            let model = model.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                out,
                "versus_spend_usd_total{{kind=\"{kind}\",model=\"{model}\"}} {usd}"
            );
        }
        let today = self.spent_today().usd;
        let _ = write!(
            out,
            "# HELP versus_budget_spent_today_usd US dollars spent today (UTC), cluster-wide.\n\
             # TYPE versus_budget_spent_today_usd gauge\n\
             versus_budget_spent_today_usd {today}\n\
             # HELP versus_budget_daily_usd The daily budget (0: no cap).\n\
             # TYPE versus_budget_daily_usd gauge\n\
             versus_budget_daily_usd {}\n",
            self.limit.max(0.0)
        );
        if self.capped() {
            let seen = self.spent_today();
            let _ = write!(
                out,
                "# HELP versus_budget_remaining_usd US dollars left in today's budget.\n\
                 # TYPE versus_budget_remaining_usd gauge\n\
                 versus_budget_remaining_usd {}\n\
                 # HELP versus_budget_picture_spent_today_usd US dollars pictures cost today (UTC).\n\
                 # TYPE versus_budget_picture_spent_today_usd gauge\n\
                 versus_budget_picture_spent_today_usd {}\n\
                 # HELP versus_budget_exhausted 1 while no new answer of this kind fits in what \
                 is left of today's budget (for pictures, of their share).\n\
                 # TYPE versus_budget_exhausted gauge\n",
                (self.limit - today).max(0.0),
                seen.image_usd,
            );
            for kind in [Kind::Text, Kind::Image] {
                let exhausted = u8::from(!self.fits(kind, seen));
                let _ = writeln!(
                    out,
                    "versus_budget_exhausted{{kind=\"{kind}\"}} {exhausted}"
                );
            }
        }
    }

    /// Follows the spend bucket into this view until `shutdown`, watching again whenever the
    /// watch breaks (a reconnect, a restarted server).
    pub async fn follow(self: Arc<Self>, spend: kv::Store, shutdown: CancellationToken) {
        let follow = async {
            loop {
                match spend.watch_with_history(">").await {
                    Ok(mut watch) => {
                        while let Some(Ok(entry)) = watch.next().await {
                            self.take(&entry);
                        }
                    }
                    Err(e) => tracing::info!(error = %e, "watching the spend bucket failed"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = follow => {}
        }
    }

    fn take(&self, entry: &kv::Entry) {
        let (day, image) = match entry.key.strip_prefix("day.") {
            Some(rest) => match rest.strip_suffix(".image") {
                Some(day) => (day, true),
                None => (rest, false),
            },
            None => return,
        };
        let day = day.parse::<u32>().ok();
        let usd = std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite());
        if let (Some(day), Some(usd)) = (day, usd) {
            self.observe(if image {
                DaySpend {
                    day,
                    usd: 0.0,
                    image_usd: usd,
                }
            } else {
                DaySpend {
                    day,
                    usd,
                    image_usd: 0.0,
                }
            });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A text answer's worst case costs $1 (output only, 100 tokens), a picture $2.
    const PRICES: &str = r#"{"chat": {"output_per_mtok": 10000}, "draw": {"per_image": 2}}"#;

    fn budget(limit: f64, prices: &str) -> Arc<Budget> {
        budget_shared(limit, prices, 1.0)
    }

    fn budget_shared(limit: f64, prices: &str, share: f64) -> Arc<Budget> {
        Budget::new(
            &BudgetSettings {
                daily_budget_usd: limit,
                prices: prices.to_owned(),
                picture_budget_share: share,
            },
            &ModelSettings {
                chat_model: "chat".to_owned(),
                image_model: "draw".to_owned(),
                image_size: "1024x1024".to_owned(),
                max_answer_tokens: 100,
            },
        )
        .unwrap()
    }

    fn spent(day: u32, usd: f64, image_usd: f64) -> DaySpend {
        DaySpend {
            day,
            usd,
            image_usd,
        }
    }

    #[test]
    fn overrides_replace_built_in_prices_and_unknown_models_cost_the_most() {
        let prices = Prices::new(r#"{"gpt-4o-mini": {"output_per_mtok": 2}}"#).unwrap();
        assert_eq!(prices.of("gpt-4o-mini").tokens(1_000_000, 1_000_000), 2.0);
        assert_eq!(Prices::new("").unwrap().of("gpt-4o").per_image, 0.0);
        let unknown = prices.of("tomorrows-model");
        assert_eq!(unknown.output_per_mtok, 10.0);
        assert_eq!(unknown.per_image, 0.167);
        assert!(Prices::new(r#"{"m": {"per_image": -1}}"#).is_err());
        assert!(Prices::new(r#"{"m": {"per_img": 1}}"#).is_err());
        assert!(Prices::new("[1]").is_err());
    }

    #[test]
    fn a_call_starts_only_while_its_worst_case_fits_and_yesterday_does_not_count() {
        let b = budget(3.0, PRICES);
        assert_eq!(b.worst_case(Kind::Text), 1.0);
        assert_eq!(b.worst_case(Kind::Image), 2.0);
        assert!(!b.exhausted_for(Kind::Text));
        b.observe(spent(today() - 1, 100.0, 0.0));
        assert!(
            !b.exhausted_for(Kind::Text),
            "yesterday's spend does not count today"
        );
        b.observe(spent(today(), 1.5, 0.0));
        assert!(!b.exhausted_for(Kind::Text));
        assert!(
            b.exhausted_for(Kind::Image),
            "1.5 + a $2 picture would pass $3"
        );
        b.observe(spent(today(), 2.0, 0.0));
        assert!(
            !b.exhausted_for(Kind::Text),
            "2 + 1 meets $3 exactly: it fits"
        );
        b.observe(spent(today(), 2.5, 0.0));
        assert!(b.exhausted_for(Kind::Text));
        b.observe(spent(today(), 1.0, 0.0));
        assert!(
            b.exhausted_for(Kind::Text),
            "a late, smaller total is ignored"
        );
        let free = budget(0.0, PRICES);
        free.observe(spent(today(), 1e9, 1e9));
        assert!(!free.exhausted_for(Kind::Image), "0 means no cap");
    }

    #[test]
    fn pictures_stop_at_their_share_and_text_goes_on_until_the_rest_is_spent() {
        // $10 a day, pictures at most 30% of it: one $2 picture fits, a second would not.
        let b = budget_shared(10.0, PRICES, 0.3);
        assert!(b.fits(Kind::Image, spent(today(), 0.0, 0.0)));
        assert!(!b.fits(Kind::Image, spent(today(), 2.0, 2.0)));
        assert!(b.fits(Kind::Text, spent(today(), 9.0, 2.0)));
        assert!(!b.fits(Kind::Text, spent(today(), 9.5, 2.0)));
        assert!(
            Budget::new(
                &BudgetSettings {
                    daily_budget_usd: 1.0,
                    prices: String::new(),
                    picture_budget_share: 1.5,
                },
                &b.models,
            )
            .is_err()
        );
    }

    #[test]
    fn metrics_render_this_process_spend_and_what_is_left() {
        let b = budget(10.0, "");
        b.count("chat", "gpt-4o-mini", 0.25);
        b.count("chat", "gpt-4o-mini", 0.5);
        b.observe(spent(today(), 4.0, 0.0));
        let mut out = String::new();
        b.render_metrics(&mut out);
        assert!(out.contains("versus_spend_usd_total{kind=\"chat\",model=\"gpt-4o-mini\"} 0.75"));
        assert!(out.contains("versus_budget_remaining_usd 6\n"));
        assert!(out.contains("# TYPE versus_spend_usd_total counter"));
    }

    #[test]
    fn a_day_is_a_utc_day() {
        assert_eq!(day_of(UNIX_EPOCH + Duration::from_secs(DAY_SECS - 1)), 0);
        assert_eq!(day_of(UNIX_EPOCH + Duration::from_secs(DAY_SECS)), 1);
        assert!(until_tomorrow() <= Duration::from_secs(DAY_SECS));
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(11_016), "2000-02-29");
        assert_eq!(date_of(20_786), "2026-11-29");
        assert_eq!(date_of(20_820), "2027-01-02");
    }
}
