//! How an answer of one kind is made, in one place: the model, the picture size and the
//! prompt version a process is configured with, and the key and job they derive from two
//! names. The API makes keys and jobs with it; a worker makes it again from a job's names and
//! its own settings, and drops a job it would not have produced (see [`check`]): what
//! arrives on the bus is not trusted, and the two sides cannot drift apart.

use crate::{
    config::ModelSettings,
    key::{Key, Matchup},
    prompt::{IMAGE_PROMPT_VERSION, TEXT_PROMPT_VERSION},
    wire::{Job, Kind},
};

/// What an answer of `kind` is made with. Borrowed from the settings: a cache hit derives a
/// key from it without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipe<'a> {
    pub kind: Kind,
    pub model: &'a str,
    pub prompt_version: u32,
    /// The picture size (pictures only).
    pub size: Option<&'a str>,
}

impl<'a> Recipe<'a> {
    /// The recipe of `kind` under `models`: the chat model for text; the image model and size
    /// for pictures.
    pub fn of(kind: Kind, models: &'a ModelSettings) -> Recipe<'a> {
        match kind {
            Kind::Text => Recipe {
                kind,
                model: &models.chat_model,
                prompt_version: TEXT_PROMPT_VERSION,
                size: None,
            },
            Kind::Image => Recipe {
                kind,
                model: &models.image_model,
                prompt_version: IMAGE_PROMPT_VERSION,
                size: Some(&models.image_size),
            },
        }
    }

    /// The key of `matchup`'s answer: a picture's key is made with `model@size`
    /// ([`ModelSettings::image_variant`]), since both change the picture.
    pub fn key(&self, matchup: &Matchup) -> Key {
        match self.size {
            None => matchup.key(self.kind, self.prompt_version, self.model),
            Some(size) => {
                matchup.key_of_parts(self.kind, self.prompt_version, &[self.model, "@", size])
            }
        }
    }

    /// The job that generates `matchup`'s answer (under `key`, which [`Recipe::key`] made),
    /// with the display names for the prompt.
    pub fn job(&self, matchup: &Matchup, key: Key) -> Job {
        Job {
            kind: self.kind,
            key,
            a: matchup.a.display().to_owned(),
            b: matchup.b.display().to_owned(),
            model: self.model.to_owned(),
            prompt_version: self.prompt_version,
            size: self.size.map(str::to_owned),
        }
    }
}

/// Whether `job` is one a process with `models` would have produced: its names are valid
/// names, and its model, size, prompt version and key are what the recipe of its kind makes of
/// them here.
pub fn check(models: &ModelSettings, job: &Job) -> Result<(), Forged> {
    let recipe = Recipe::of(job.kind, models);
    let matchup = Matchup::parse(Some(&job.a), Some(&job.b)).map_err(|_| Forged::Names)?;
    if job.model != recipe.model {
        return Err(Forged::Model);
    }
    if job.size.as_deref() != recipe.size {
        return Err(Forged::Size);
    }
    if job.prompt_version != recipe.prompt_version {
        return Err(Forged::PromptVersion);
    }
    if job.key != recipe.key(&matchup) {
        return Err(Forged::Key);
    }
    Ok(())
}

/// Why a job is not one this process would have produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Forged {
    #[error("its names are not valid names")]
    Names,
    #[error("it names another model")]
    Model,
    #[error("it names another picture size")]
    Size,
    #[error("it names another prompt version")]
    PromptVersion,
    #[error("its key is not the key of its names")]
    Key,
}

impl Forged {
    /// The `reason` label of `versus_jobs_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Forged::Names => "names",
            Forged::Model => "model",
            Forged::Size => "size",
            Forged::PromptVersion => "prompt_version",
            Forged::Key => "key",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> ModelSettings {
        ModelSettings {
            chat_model: "gpt-4o-mini".to_owned(),
            image_model: "gpt-image-1".to_owned(),
            image_size: "1024x1024".to_owned(),
            max_answer_tokens: 600,
        }
    }

    fn job(kind: Kind, models: &ModelSettings, a: &str, b: &str) -> Job {
        let matchup = Matchup::parse(Some(a), Some(b)).unwrap();
        let recipe = Recipe::of(kind, models);
        recipe.job(&matchup, recipe.key(&matchup))
    }

    #[test]
    fn keys_are_the_ones_the_api_always_made() {
        let models = models();
        let m = Matchup::parse(Some("Batman"), Some("Superman")).unwrap();
        assert_eq!(
            Recipe::of(Kind::Text, &models).key(&m),
            m.key(Kind::Text, TEXT_PROMPT_VERSION, "gpt-4o-mini")
        );
        assert_eq!(
            Recipe::of(Kind::Image, &models).key(&m),
            m.key(Kind::Image, IMAGE_PROMPT_VERSION, &models.image_variant())
        );
    }

    #[test]
    fn a_job_passes_the_check_of_the_settings_that_made_it() {
        let models = models();
        for kind in [Kind::Text, Kind::Image] {
            for (a, b) in [
                ("Batman", "Superman"),
                ("  Mary   Jane ", "STRASSE"),
                ("Son Goku 孫悟空", "\u{3000}Бэтмен "),
                ("👩‍🚀 Astronaut", "Pe\u{301}le\u{301}"),
            ] {
                let job = job(kind, &models, a, b);
                assert_eq!(check(&models, &job), Ok(()), "{job:?}");
            }
        }
    }

    #[test]
    fn a_job_another_process_would_not_have_made_is_forged() {
        let models = models();
        let good = job(Kind::Text, &models, "Batman", "Superman");

        let mut other_names = good.clone();
        other_names.b = "Joker".to_owned();
        assert_eq!(check(&models, &other_names), Err(Forged::Key));

        // Made elsewhere with another model: its key matches its names there, not here.
        let mut dearer = models.clone();
        dearer.chat_model = "gpt-4o".to_owned();
        let elsewhere = job(Kind::Text, &dearer, "Batman", "Superman");
        assert_eq!(check(&models, &elsewhere), Err(Forged::Model));

        let mut sized = good.clone();
        sized.size = Some("1024x1024".to_owned());
        assert_eq!(check(&models, &sized), Err(Forged::Size));

        let mut old = good.clone();
        old.prompt_version = 1;
        assert_eq!(check(&models, &old), Err(Forged::PromptVersion));

        let mut bidi = good.clone();
        bidi.a = "Bat\u{202E}man".to_owned();
        assert_eq!(check(&models, &bidi), Err(Forged::Names));

        let mut bigger = job(Kind::Image, &models, "Batman", "Superman");
        bigger.size = Some("4096x4096".to_owned());
        assert_eq!(check(&models, &bigger), Err(Forged::Size));
    }
}
