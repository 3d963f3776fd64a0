//! The JSON bodies of finished answers, one type per shape, so that the public contract's
//! `{"key","a","b","text","model","degraded","cached"}` and
//! `{"key","url","model","degraded","cached"}` are written once, with the public URL of a
//! stored picture.

use serde::Serialize;
use utoipa::ToSchema;
use versus_shared::{
    key::Key,
    objects,
    wire::{Answer, Degraded, ImageAnswer},
};

/// Which answer a body is about: its key and the opponents' names as shown. Text bodies and
/// the streams' `meta` event share it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Fight<'a> {
    /// The answer's key (the canonical matchup, prompt version and model).
    #[schema(value_type = String, example = "3f9c2b7e41d0a8c5e6f1b2a3c4d5e6f7")]
    pub key: &'a Key,
    /// The first opponent's display name (the first request's spelling).
    #[schema(example = "Batman")]
    pub a: &'a str,
    /// The second opponent's display name.
    #[schema(example = "Superman")]
    pub b: &'a str,
}

/// A text answer: `POST /v1/fights`, `GET /v1/fights/{key}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TextBody<'a> {
    #[serde(flatten)]
    pub fight: Fight<'a>,
    /// The whole answer.
    pub text: &'a str,
    /// The chat model that wrote it: a fallback provider's when `degraded`.
    #[schema(example = "gpt-4o-mini")]
    pub model: &'a str,
    /// Whether a fallback provider wrote it, while the primary could not: it is served until
    /// the primary's answer replaces it.
    pub degraded: bool,
    /// Whether it was already stored when asked.
    pub cached: bool,
}

impl<'a> TextBody<'a> {
    pub fn of(answer: &'a Answer, cached: bool) -> TextBody<'a> {
        TextBody {
            fight: Fight {
                key: &answer.key,
                a: &answer.a,
                b: &answer.b,
            },
            text: &answer.text,
            model: &answer.model,
            degraded: answer.degraded(),
            cached,
        }
    }
}

/// A stored picture: `POST /v1/images`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageBody<'a> {
    /// The picture's key (the canonical matchup, prompt version, model and size).
    #[schema(value_type = String, example = "9a8b7c6d5e4f30211a2b3c4d5e6f7081")]
    pub key: &'a Key,
    /// Where the picture is served: this API's `/v1/images/{file}`, or under
    /// `VERSUS_PUBLIC_IMAGE_BASE_URL` when set.
    pub url: &'a str,
    /// The image model that drew it: a fallback provider's when `degraded`.
    #[schema(example = "gpt-image-1")]
    pub model: &'a str,
    /// Whether a fallback provider drew it, while the primary could not: it is served until
    /// the primary's picture replaces it.
    pub degraded: bool,
    /// Whether it was already stored when asked.
    pub cached: bool,
}

impl<'a> ImageBody<'a> {
    pub fn of(answer: &'a ImageAnswer, url: &'a str, cached: bool) -> ImageBody<'a> {
        ImageBody {
            key: &answer.key,
            url,
            model: &answer.model,
            degraded: answer.degraded(),
            cached,
        }
    }
}

/// Where clients fetch a stored picture: the public base (a CDN or the bucket) when set,
/// else this API's own route.
pub fn image_url(public_base: Option<&str>, answer: &ImageAnswer) -> String {
    match public_base {
        Some(base) => format!("{}/{}", base.trim_end_matches('/'), answer.path),
        None => {
            let file = answer.path.rsplit('/').next().unwrap_or_default();
            format!("/v1/images/{file}")
        }
    }
}

/// Where clients fetch the partial image stored at `path` (`objects::partial_path`) while its
/// picture is drawn: under the public base when set, as pictures are, else this API's
/// `/v1/images/partials/{file}`. None for a path that route would not serve.
pub fn partial_url(public_base: Option<&str>, path: &str) -> Option<String> {
    let file = objects::partial_file_name(path)?;
    let (_, stored) = objects::partial_file(&file)?;
    if stored.as_ref() != path {
        return None;
    }
    Some(match public_base {
        Some(base) => format!("{}/{path}", base.trim_end_matches('/')),
        None => format!("/v1/images/partials/{file}"),
    })
}
