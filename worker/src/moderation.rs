//! Moderation: what may be generated and cached for good. Before a generation the names (and a
//! picture's prompt) go to the upstream's moderation endpoint in one call, in the canonical
//! form the key is made of as well as as written (see [`names_stage`]); after a text
//! generation, the answer does, before it is stored. A result refuses when one of its flagged
//! categories is blocked (`VERSUS_MODERATION_BLOCK`): plain violence, the point of a fight, is
//! not blocked by default.

use versus_shared::{key::Matchup, wire::Job};

use crate::{
    openai::UpstreamError,
    providers::{self, Outcome, Providers, Use},
};

/// What the `names` stage reads for `job`: the canonical names and the match keys its key is
/// made of, then `screened` (the names as written, and a picture's prompt), each once. The
/// answer is cached under the key and served to whoever asks in any spelling of it, so the
/// forms the key folds to are what must pass: a name in mathematical bold letters
/// (`𝐛𝐚𝐝𝐰𝐨𝐫𝐝`) or with dots between its letters (`b.a.d.w.o.r.d`) may read as nothing to the
/// classifier, but its key is the plain word's. The spelling as written is read too,
/// since it is what the prompt and the page show. A job's names were checked when it arrived
/// (`versus_shared::recipe::check`), so they parse; were they not, the written forms are
/// still read.
pub fn names_stage(job: &Job, screened: &[&str]) -> Vec<String> {
    let canonical = Matchup::parse(Some(&job.a), Some(&job.b))
        .map(|m| {
            [&m.a, &m.b]
                .into_iter()
                .flat_map(|n| [n.canonical().to_owned(), n.matched().to_owned()])
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let mut inputs: Vec<String> = Vec::with_capacity(canonical.len() + screened.len());
    for input in canonical
        .into_iter()
        .chain(screened.iter().map(|s| (*s).to_owned()))
    {
        if !inputs.contains(&input) {
            inputs.push(input);
        }
    }
    inputs
}

/// Whether and how generations are moderated.
#[derive(clap::Args, Debug, Clone)]
pub struct ModerationSettings {
    /// `on` checks names, pictures' prompts and answers with the upstream's moderation
    /// endpoint; `off` checks nothing (for upstreams without the endpoint).
    #[arg(long, env = "VERSUS_MODERATION", default_value = "on", value_parser = ["on", "off"])]
    pub moderation: String,
    /// The moderation model.
    #[arg(
        long,
        env = "VERSUS_MODERATION_MODEL",
        default_value = "omni-moderation-latest"
    )]
    pub moderation_model: String,
    /// Categories that refuse (comma-separated; `hate` also blocks `hate/threatening`).
    #[arg(
        long,
        env = "VERSUS_MODERATION_BLOCK",
        default_value = "hate,harassment,sexual,self-harm"
    )]
    pub moderation_block: String,
    /// What a check does when no moderation provider answers (the primary and every
    /// `moderation` fallback failed): `closed` generates nothing (the generation fails,
    /// retryable), `open` lets it through unchecked (logged at start, and each time in
    /// `versus_moderation_skipped_total`).
    #[arg(
        long,
        env = "VERSUS_MODERATION_ON_ERROR",
        default_value = "closed",
        value_parser = ["closed", "open"]
    )]
    pub moderation_on_error: String,
}

/// What a moderation check refused, for operators (clients get a neutral message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What was read: `names` (and a picture's prompt) or `answer`.
    pub stage: &'static str,
    /// The blocked categories the endpoint flagged.
    pub categories: Vec<String>,
}

impl Refusal {
    /// Counts a refusal that is stored (`versus_refusals_total{stage,category}`): not a flag
    /// that a second look overrules, nor a check dropped with a claim another worker won.
    pub fn count(&self) {
        for category in &self.categories {
            metrics::counter!("versus_refusals_total", "stage" => self.stage, "category" => category.clone())
                .increment(1);
        }
    }

    pub fn reason(&self) -> String {
        format!(
            "moderation ({}): {}",
            self.stage,
            self.categories.join(", ")
        )
    }
}

pub struct Moderator {
    enabled: bool,
    /// Lets a check through when no provider answers (`VERSUS_MODERATION_ON_ERROR=open`).
    open_on_error: bool,
    block: Vec<String>,
    /// Names that passed, so that a name seen before costs no call: most new matchups pair a
    /// name people ask about often with another. Only passing names are kept (a refusal is
    /// stored per matchup), and only for this process's life, so a changed block list applies
    /// after a restart.
    passed: quick_cache::sync::Cache<String, ()>,
}

/// How many passing names a worker remembers.
const PASSED_NAMES: usize = 100_000;

impl Moderator {
    pub fn new(settings: &ModerationSettings) -> Moderator {
        let open_on_error = settings.moderation_on_error == "open";
        if open_on_error && settings.moderation == "on" {
            tracing::warn!(
                "VERSUS_MODERATION_ON_ERROR=open: when no moderation provider answers, names, prompts and answers go through unchecked"
            );
        }
        Moderator {
            enabled: settings.moderation == "on",
            open_on_error,
            block: settings
                .moderation_block
                .split(',')
                .map(|c| c.trim().to_lowercase())
                .filter(|c| !c.is_empty())
                .collect(),
            passed: quick_cache::sync::Cache::new(PASSED_NAMES),
        }
    }

    /// The moderation endpoint's flagged categories for each of `inputs`, from the first
    /// moderation provider that answers: each is tried within the upstream's retry budget
    /// (while its circuit lets calls through), then the next. The span (`moderation`) covers
    /// every try.
    #[tracing::instrument(
        name = "moderation",
        skip_all,
        fields(
            otel.kind = "client",
            versus.stage = stage,
            versus.inputs = inputs.len(),
            otel.status_code = tracing::field::Empty,
        )
    )]
    async fn ask(
        &self,
        providers: &Providers,
        stage: &'static str,
        inputs: &[&str],
    ) -> Result<Vec<Vec<String>>, UpstreamError> {
        let list = providers.of(Use::Moderation);
        let mut from = 0;
        let mut last = providers::all_open(Use::Moderation);
        while let Some(at) = providers.pick(Use::Moderation, from, usize::MAX) {
            let provider = &list[at];
            let mut backoff = provider.client.backoff();
            loop {
                let asked = provider.client.moderate(&provider.model, inputs).await;
                provider.record(match &asked {
                    Ok(_) => Outcome::Answered,
                    Err(error) => Outcome::of(error),
                });
                let error = match asked {
                    Ok(flagged) => return Ok(flagged),
                    Err(error) => error,
                };
                metrics::counter!("versus_upstream_errors_total", "kind" => "moderation")
                    .increment(1);
                let delay = provider.client.next_delay(&mut backoff, &error);
                let retryable = matches!(error, UpstreamError::Retryable { .. });
                last = error;
                match delay {
                    Some(delay) => tokio::time::sleep(delay).await,
                    _ if retryable => break,
                    _ => {
                        tracing::Span::current().record("otel.status_code", "ERROR");
                        return Err(last);
                    }
                }
            }
            tracing::warn!(stage, provider = provider.name, error = %last, "moderation failed; trying the next provider");
            from = at + 1;
        }
        tracing::Span::current().record("otel.status_code", "ERROR");
        Err(last)
    }

    /// Whether `category` (`hate/threatening`, say) is blocked.
    fn blocks(&self, category: &str) -> bool {
        self.block.iter().any(|b| {
            category == b
                || category
                    .strip_prefix(b.as_str())
                    .is_some_and(|r| r.starts_with('/'))
        })
    }

    /// Checks `inputs` in one call to a moderation provider's endpoint (retried within the
    /// upstream's retry budget), and says whether anything in them is refused. At the `names`
    /// stage, names that passed before are not sent again (and no call is made when all did).
    pub async fn check(
        &self,
        providers: &Providers,
        stage: &'static str,
        inputs: &[&str],
    ) -> Result<Option<Refusal>, UpstreamError> {
        let remembered = stage == "names";
        let inputs: Vec<&str> = inputs
            .iter()
            .copied()
            .filter(|input| !(remembered && self.passed.get(*input).is_some()))
            .collect();
        if !self.enabled || inputs.is_empty() {
            return Ok(None);
        }
        let flagged = match self.ask(providers, stage, &inputs).await {
            Ok(flagged) => flagged,
            Err(error) if self.open_on_error => {
                metrics::counter!("versus_moderation_skipped_total", "stage" => stage).increment(1);
                tracing::warn!(stage, %error, "no moderation provider answered; let through unchecked (VERSUS_MODERATION_ON_ERROR=open)");
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        let mut categories = Vec::new();
        for (input, flagged) in inputs.iter().zip(flagged) {
            let blocked: Vec<String> = flagged.into_iter().filter(|c| self.blocks(c)).collect();
            if blocked.is_empty() && remembered {
                self.passed.insert((*input).to_owned(), ());
            }
            categories.extend(blocked);
        }
        categories.sort();
        categories.dedup();
        if categories.is_empty() {
            return Ok(None);
        }
        Ok(Some(Refusal { stage, categories }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(a: &str, b: &str) -> Job {
        Job {
            kind: versus_shared::wire::Kind::Text,
            key: versus_shared::key::Key::parse(&"0".repeat(32)).unwrap(),
            a: a.to_owned(),
            b: b.to_owned(),
            model: "m".to_owned(),
            prompt_version: 2,
            size: None,
        }
    }

    #[test]
    fn the_names_stage_reads_the_canonical_names_and_the_written_ones_once_each() {
        let bold = "\u{1D41B}\u{1D41A}\u{1D41D}\u{1D430}\u{1D428}\u{1D42B}\u{1D41D}";
        let fancy = job(bold, "Mary  Jane");
        assert_eq!(
            names_stage(&fancy, &[bold, "Mary Jane"]),
            ["badword", "mary jane", "maryjane", bold, "Mary Jane"]
        );
        // Names already in canonical form are sent once; a picture's prompt comes last.
        let plain = job("batman", "joker");
        assert_eq!(
            names_stage(&plain, &["batman", "joker", "a prompt"]),
            ["batman", "joker", "a prompt"]
        );
    }

    #[test]
    fn blocking_a_category_blocks_its_subcategories_and_violence_passes_by_default() {
        let m = Moderator::new(&ModerationSettings {
            moderation: "on".into(),
            moderation_model: "m".into(),
            moderation_block: "hate,harassment,sexual,self-harm".into(),
            moderation_on_error: "closed".into(),
        });
        assert!(m.blocks("hate"));
        assert!(m.blocks("hate/threatening"));
        assert!(m.blocks("self-harm/intent"));
        assert!(m.blocks("sexual/minors"));
        assert!(!m.blocks("violence"));
        assert!(!m.blocks("violence/graphic"));
        assert!(!m.blocks("hateful"));
    }
}
