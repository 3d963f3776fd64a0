//! Pictures: generate once, check that the bytes are an image, upload them to our object store
//! under a path derived from the key and the picture's content, then record path, size, hash
//! and type in Postgres (fenced). Nothing is marked done before the bytes are stored, and
//! provider URLs are never kept. A picture is paid for: an upload that fails is tried again
//! from the bytes in hand, never drawn again. The skeleton around it (claim, lease, KV, `done`,
//! failures) is [`crate::generation`].

use std::{
    sync::atomic::{AtomicI32, AtomicUsize, Ordering},
    time::Instant,
};

use anyhow::Context;
use bytes::Bytes;
use object_store::{Attribute, Attributes, ObjectStoreExt, PutOptions, PutPayload, path::Path};
use sha2::{Digest, Sha256};
use versus_shared::{
    objects::{self, IMAGE_CACHE_CONTROL},
    prompt, retry,
    wire::{ErrorCode, ImageAnswer, Job},
};

use crate::{
    claims::{self, Picture, Stored},
    ctx::Ctx,
    events::Publisher,
    generation::{Ended, Failure, Generation},
    openai::{ImageFailure, UpstreamError},
    providers::{self, Outcome, Use},
    spend::{Call, Paid, Reservation},
};

/// The picture of one matchup.
pub struct Image {
    /// The job's display names.
    a: String,
    b: String,
    prompt: String,
    /// The image provider calls go to (`providers`), as a text's.
    at: AtomicUsize,
    /// An upgrade of a degraded answer (`upgrade.rs`): the primary only.
    upgrade: bool,
}

impl Image {
    /// The providers calls may go to: the primary only for an upgrade.
    fn upto(&self) -> usize {
        if self.upgrade { 1 } else { usize::MAX }
    }

    /// One picture call, of the configured size, within `reservation`, to the first image
    /// provider from the current one whose circuit lets it through: what the upstream billed
    /// is recorded, a picture it answered with or one it may have drawn before the call timed
    /// out; a call it refused (or that no circuit let through) releases the reservation. The
    /// picture's bytes and the model that drew them.
    async fn draw(
        &self,
        ctx: &Ctx,
        mut reservation: Reservation,
    ) -> Result<(Bytes, String), UpstreamError> {
        let Some(at) = ctx
            .providers
            .pick(Use::Image, self.at.load(Ordering::SeqCst), self.upto())
        else {
            reservation.released().await;
            return Err(providers::all_open(Use::Image));
        };
        self.at.store(at, Ordering::SeqCst);
        let provider = &ctx.providers.of(Use::Image)[at];
        let model = &provider.model;
        reservation.calling();
        let size = &ctx.models.image_size;
        let drawn = provider.client.image(model, &self.prompt, size).await;
        provider.record(match &drawn {
            Ok(_) => Outcome::Answered,
            Err(failure) => Outcome::of(&failure.error),
        });
        match &drawn {
            Ok(_) | Err(ImageFailure { billed: true, .. }) => {
                reservation.spent(Call::Image { model }).await;
            }
            Err(_) => reservation.released().await,
        }
        drawn
            .map(|bytes| (bytes, model.clone()))
            .map_err(|failure| failure.error)
    }
}

impl Generation for Image {
    const SPECULATE: bool = false;

    fn new(job: &Job, upgrade: bool) -> Image {
        let prompt = prompt::image_prompt(&job.a, &job.b);
        Image {
            a: job.a.clone(),
            b: job.b.clone(),
            prompt,
            at: AtomicUsize::new(0),
            upgrade,
        }
    }

    /// The bytes of the first try, and the model that drew them.
    type Opened = Result<(Bytes, String), UpstreamError>;
    /// The stored picture and the model that drew it.
    type Made = (Picture, String);
    type Answer = ImageAnswer;

    /// Asks for a picture of the configured size: the one the job names, since
    /// `versus_shared::recipe::check` dropped any job that names another.
    fn paid<'a>(&self, job: &'a Job) -> Paid<'a> {
        Paid::Image { model: &job.model }
    }

    async fn open(&self, ctx: &Ctx, _job: &Job, reservation: Reservation) -> Self::Opened {
        self.draw(ctx, reservation).await
    }

    /// Calls the image API again within the retry budget until the bytes are a picture (the
    /// next provider once a provider's retries ran out), then uploads them.
    async fn work(
        &self,
        ctx: &Ctx,
        job: &Job,
        mut result: Self::Opened,
        _attempt: &AtomicI32,
        _publisher: &mut Publisher<'_>,
    ) -> anyhow::Result<Ended<Self::Made>> {
        let images = ctx.providers.of(Use::Image);
        let mut backoff = images[self.at.load(Ordering::SeqCst)].client.backoff();
        let (bytes, format, model) = loop {
            // Bytes that are not a picture say something about the matchup (they count
            // towards its cool-down); an upstream that fails does not.
            let (error, not_a_picture) = match result {
                Ok((bytes, model)) => match sniff(&bytes) {
                    Ok(format) => break (bytes, format, model),
                    Err(error) => (error, true),
                },
                Err(error) => (error, false),
            };
            metrics::counter!("versus_upstream_errors_total", "kind" => "image").increment(1);
            let at = self.at.load(Ordering::SeqCst);
            let delay = images[at].client.next_delay(&mut backoff, &error);
            if !not_a_picture
                && !self.upgrade
                && ctx.providers.move_on(Use::Image, at, &error, delay)
            {
                // The next provider, with retries of its own.
                tracing::warn!(key = %job.key, %error, from = images[at].name, to = images[at + 1].name, "image upstream failed; falling back");
                self.at.store(at + 1, Ordering::SeqCst);
                backoff = images[at + 1].client.backoff();
            } else {
                let Some(delay) = delay else {
                    let failure = Failure::from(error);
                    return Ok(Ended::GaveUp(Failure {
                        counts: failure.counts || not_a_picture,
                        ..failure
                    }));
                };
                tracing::info!(key = %job.key, %error, ?delay, "image upstream failed; retrying");
                tokio::time::sleep(delay).await;
            }
            let Some(next) = ctx.ledger.reserve(self.paid(job)).await? else {
                return Ok(Ended::OverBudget);
            };
            result = self.draw(ctx, next).await;
        };
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let path = objects::picture_path(&job.key, &sha256, format.extension);
        // The picture is paid for: it is kept, and its upload tried again from these bytes for
        // up to VERSUS_STORE_RETRY_SECS, for as long as the skeleton's keep-alive holds the
        // lease. Named by its content, it cannot overwrite a picture another attempt stored.
        let began = Instant::now();
        let upload = || upload(ctx, &path, bytes.clone(), format.mime);
        let stored = retry::picture_upload()
            .retry(upload)
            .when(|_| began.elapsed() < ctx.store_retry)
            .notify(|error, delay| {
                metrics::counter!("versus_store_retries_total", "what" => "picture").increment(1);
                tracing::warn!(key = %job.key, %error, ?delay, "uploading the picture failed; trying again with the same bytes");
            })
            .await;
        if let Err(e) = stored {
            return Ok(Ended::GaveUp(Failure {
                code: ErrorCode::StorageUnavailable,
                detail: format!("uploading to the object store failed: {e}"),
                counts: false,
            }));
        }
        let picture = Picture {
            path: path.to_string(),
            size: bytes.len() as i64,
            sha256,
            content_type: format.mime.to_owned(),
        };
        Ok(Ended::Finished((picture, model)))
    }

    async fn complete(
        &self,
        ctx: &Ctx,
        job: &Job,
        attempt: i32,
        (picture, model): &Self::Made,
    ) -> anyhow::Result<Option<ImageAnswer>> {
        let picture = picture.clone();
        let by = ctx.made_by(job, model);
        if !claims::complete_image(&ctx.db, job, attempt, &picture, &by).await? {
            return Ok(None);
        }
        Ok(Some(ImageAnswer {
            key: job.key.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            path: picture.path,
            size: picture.size as u64,
            sha256: picture.sha256,
            content_type: picture.content_type,
            model: by.model,
            attempt,
            degraded_until_ms: by.degraded_until_ms,
        }))
    }

    fn stored_answer(job: &Job, row: Stored) -> anyhow::Result<ImageAnswer> {
        Ok(ImageAnswer {
            key: job.key.clone(),
            a: row.a,
            b: row.b,
            path: row.image_path.context("a done image row without a path")?,
            size: row.image_size.unwrap_or_default() as u64,
            sha256: row.image_sha256.unwrap_or_default(),
            content_type: row.content_type.unwrap_or_else(|| "image/png".to_owned()),
            model: row.model,
            attempt: row.attempt,
            degraded_until_ms: row.degraded_until_ms.map(|ms| ms as u64),
        })
    }

    fn replayed_text(_answer: &ImageAnswer) -> Option<&str> {
        None
    }

    fn upgrade(&self) -> bool {
        self.upgrade
    }

    fn screened(&self) -> Vec<&str> {
        vec![&self.a, &self.b, &self.prompt]
    }
}

async fn upload(
    ctx: &Ctx,
    path: &Path,
    bytes: Bytes,
    mime: &'static str,
) -> object_store::Result<()> {
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::ContentType, mime.into());
    attributes.insert(Attribute::CacheControl, IMAGE_CACHE_CONTROL.into());
    let options = PutOptions {
        attributes,
        ..Default::default()
    };
    let payload = PutPayload::from_bytes(bytes.clone());
    match ctx.objects.put_opts(path, payload, options).await {
        // A local folder keeps no attributes; the API sets the headers itself anyway.
        Err(object_store::Error::NotImplemented { .. }) => {
            ctx.objects.put(path, bytes.into()).await.map(drop)
        }
        other => other.map(drop),
    }
}

/// An image format we accept, by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub mime: &'static str,
    pub extension: &'static str,
}

/// What the bytes are, or an error if they are not a picture we serve.
pub fn sniff(bytes: &[u8]) -> Result<Format, UpstreamError> {
    let format = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Format {
            mime: "image/png",
            extension: "png",
        }
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Format {
            mime: "image/jpeg",
            extension: "jpg",
        }
    } else if bytes.len() > 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Format {
            mime: "image/webp",
            extension: "webp",
        }
    } else {
        return Err(UpstreamError::Retryable {
            message: "the upstream sent something that is not an image".to_owned(),
            retry_after: None,
        });
    };
    Ok(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pictures_pass_the_sniff() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n....").unwrap().mime, "image/png");
        assert_eq!(sniff(&[0xff, 0xd8, 0xff, 0xe0]).unwrap().extension, "jpg");
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 ").unwrap().extension, "webp");
        assert!(sniff(b"<html>expired</html>").is_err());
        assert!(sniff(b"").is_err());
    }
}
