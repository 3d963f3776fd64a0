//! The JSON bodies of finished answers, one type per shape, so that the public contract's
//! `{"key","a","b","text","model","cached"}` and `{"key","url","cached"}` are written once, with
//! the public URL of a stored picture.

use serde::Serialize;
use versus_shared::{
    key::Key,
    wire::{Answer, ImageAnswer},
};

/// A text answer: `POST /v1/fights`, `GET /v1/fights/{key}`.
#[derive(Debug, Serialize)]
pub struct TextBody<'a> {
    pub key: &'a Key,
    pub a: &'a str,
    pub b: &'a str,
    pub text: &'a str,
    pub model: &'a str,
    pub cached: bool,
}

impl<'a> TextBody<'a> {
    pub fn of(answer: &'a Answer, cached: bool) -> TextBody<'a> {
        TextBody {
            key: &answer.key,
            a: &answer.a,
            b: &answer.b,
            text: &answer.text,
            model: &answer.model,
            cached,
        }
    }
}

/// A stored picture: `POST /v1/images`.
#[derive(Debug, Serialize)]
pub struct ImageBody<'a> {
    pub key: &'a Key,
    pub url: &'a str,
    pub cached: bool,
}

impl<'a> ImageBody<'a> {
    pub fn of(answer: &'a ImageAnswer, url: &'a str, cached: bool) -> ImageBody<'a> {
        ImageBody {
            key: &answer.key,
            url,
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
