//! Pictures: generate once, check that the bytes are an image, upload them to our object store
//! under a path derived from the key and the picture's content, then record path, size, hash
//! and type in Postgres (fenced). Nothing is marked done before the bytes are stored, and
//! provider URLs are never kept. A picture is paid for: an upload that fails is tried again
//! from the bytes in hand, never drawn again. The skeleton around it (claim, lease, KV, `done`,
//! failures) is [`crate::generation`].

use std::{
    sync::atomic::{AtomicI32, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
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
    openai::{Drawing, ImageFailure, ImagePiece, UpstreamError},
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
    /// provider from the current one whose circuit lets it through, streamed with partial
    /// images unless that provider refused streaming before: the reservation (settled once
    /// the drawing is read), the provider (None when no circuit let a call through) and what
    /// it answered.
    async fn draw(&self, ctx: &Ctx, mut reservation: Reservation) -> <Image as Generation>::Opened {
        let Some(at) = ctx
            .providers
            .pick(Use::Image, self.at.load(Ordering::SeqCst), self.upto())
        else {
            let failure = ImageFailure {
                error: providers::all_open(Use::Image),
                billed: false,
                stream_refused: false,
            };
            return (reservation, None, Err(failure));
        };
        self.at.store(at, Ordering::SeqCst);
        let provider = &ctx.providers.of(Use::Image)[at];
        reservation.calling();
        let partials = if provider.streams_images.load(Ordering::Relaxed) {
            provider.client.partial_images()
        } else {
            0
        };
        let size = &ctx.models.image_size;
        let drawn = provider
            .client
            .draw(&provider.model, &self.prompt, size, partials)
            .await;
        (reservation, Some(at), drawn)
    }

    /// Reads `drawing` to its picture, publishing each partial image as the attempt's next
    /// (`published` of them so far) once stored: the picture's bytes, and the partials the
    /// upstream billed.
    async fn read(
        &self,
        ctx: &Ctx,
        job: &Job,
        drawing: Drawing,
        attempt: &AtomicI32,
        published: &mut u32,
        publisher: &mut Publisher<'_>,
    ) -> anyhow::Result<(Result<Bytes, ImageFailure>, u32)> {
        let mut stream = match drawing {
            Drawing::Whole(bytes) => return Ok((Ok(bytes), 0)),
            Drawing::Streamed(stream) => stream,
        };
        loop {
            match stream.next().await {
                Ok(ImagePiece::Partial(bytes)) => {
                    let attempt = attempt.load(Ordering::SeqCst);
                    if let Some(path) = store_partial(ctx, job, attempt, *published, bytes).await {
                        publisher.partial(attempt, *published, path).await?;
                        *published += 1;
                    }
                }
                Ok(ImagePiece::Done(bytes)) => return Ok((Ok(bytes), stream.partials())),
                Err(failure) => return Ok((Err(failure), stream.partials())),
            }
        }
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

    /// The first try's reservation, its provider (None: no circuit let a call through), and
    /// what it answered.
    type Opened = (Reservation, Option<usize>, Result<Drawing, ImageFailure>);
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
    /// next provider once a provider's retries ran out), then uploads them. Partial images are
    /// published as they come; a try that fails after publishing some moves to a new attempt
    /// (readers get `reset`), whose partials start afresh. An upstream that refuses streaming
    /// is asked again at once without it, and never streamed to again.
    async fn work(
        &self,
        ctx: &Ctx,
        job: &Job,
        (mut reservation, mut called, mut opened): Self::Opened,
        attempt: &AtomicI32,
        publisher: &mut Publisher<'_>,
    ) -> anyhow::Result<Ended<Self::Made>> {
        let images = ctx.providers.of(Use::Image);
        let mut backoff = images[self.at.load(Ordering::SeqCst)].client.backoff();
        // Partial images of the current attempt published so far.
        let mut published = 0;
        let (bytes, format, model) = loop {
            let provider = called.map(|at| &images[at]);
            let model = provider.map_or(job.model.as_str(), |p| p.model.as_str());
            let (result, partials) = match opened {
                Ok(drawing) => {
                    self.read(ctx, job, drawing, attempt, &mut published, publisher)
                        .await?
                }
                Err(failure) => (Err(failure), 0),
            };
            if let Some(provider) = provider {
                provider.record(match &result {
                    Ok(_) => Outcome::Answered,
                    Err(failure) => Outcome::of(&failure.error),
                });
            }
            match &result {
                Ok(_) | Err(ImageFailure { billed: true, .. }) => {
                    reservation.spent(Call::Image { model, partials }).await;
                }
                Err(_) => reservation.released().await,
            }
            if let (
                Err(ImageFailure {
                    stream_refused: true,
                    ..
                }),
                Some(provider),
            ) = (&result, provider)
            {
                // Not a try: the same call without streaming, at once.
                tracing::info!(
                    provider = provider.name,
                    "the image upstream does not stream; drawing without partials from now on"
                );
                provider.streams_images.store(false, Ordering::Relaxed);
                let Some(next) = ctx.ledger.reserve(self.paid(job)).await? else {
                    return Ok(Ended::OverBudget);
                };
                (reservation, called, opened) = self.draw(ctx, next).await;
                continue;
            }
            // Bytes that are not a picture say something about the matchup (they count
            // towards its cool-down); an upstream that fails does not.
            let (error, not_a_picture) = match result {
                Ok(bytes) => match sniff(&bytes) {
                    Ok(format) => break (bytes, format, model.to_owned()),
                    Err(error) => (error, true),
                },
                Err(failure) => (failure.error, false),
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
            if published > 0 {
                // Viewers saw this attempt's partials: the next try is a new attempt, so
                // they get `reset` and its partials from the first.
                let current = attempt.load(Ordering::SeqCst);
                let Some(next) = claims::next_attempt(&ctx.db, job, current).await? else {
                    return Ok(Ended::Lost);
                };
                attempt.store(next, Ordering::SeqCst);
                publisher.start(next).await?;
                remove_partials_later(ctx, objects::partials_of(&job.key, current));
                published = 0;
            }
            let Some(next) = ctx.ledger.reserve(self.paid(job)).await? else {
                return Ok(Ended::OverBudget);
            };
            (reservation, called, opened) = self.draw(ctx, next).await;
        };
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let path = objects::picture_path(&job.key, &sha256, format.extension);
        // The picture is paid for: it is kept, and its upload tried again from these bytes for
        // up to VERSUS_STORE_RETRY_SECS, for as long as the skeleton's keep-alive holds the
        // lease. Named by its content, it cannot overwrite a picture another attempt stored.
        let began = Instant::now();
        let upload = || upload(ctx, &path, bytes.clone(), format.mime, IMAGE_CACHE_CONTROL);
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
        // The picture is stored: its partials (this attempt's, and any an earlier one left)
        // are no longer shown to anyone.
        remove_partials_later(ctx, objects::partials_of_picture(&job.key));
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

/// How long partial images stay after their picture is stored or their attempt abandoned: a
/// viewer loading one then still gets it.
const PARTIALS_KEPT: Duration = Duration::from_secs(30);
/// How long a partial image's upload may take: a store that is slow or down (whose client
/// retries for minutes) must not hold up the picture, which matters more; the partial is
/// skipped.
const PARTIAL_UPLOAD_TIMEOUT: Duration = Duration::from_secs(2);

/// Stores partial image `index` of `attempt` under `partials/` with a short cache lifetime:
/// its path, or None when the bytes are not a picture or the store failed or took over
/// [`PARTIAL_UPLOAD_TIMEOUT`] (the partial is then skipped: viewers wait for the next, or the
/// picture).
async fn store_partial(
    ctx: &Ctx,
    job: &Job,
    attempt: i32,
    index: u32,
    bytes: Bytes,
) -> Option<String> {
    let format = sniff(&bytes).ok()?;
    let path = objects::partial_path(&job.key, attempt, index, format.extension);
    let stored = tokio::time::timeout(
        PARTIAL_UPLOAD_TIMEOUT,
        upload(
            ctx,
            &path,
            bytes,
            format.mime,
            objects::PARTIAL_CACHE_CONTROL,
        ),
    )
    .await;
    match stored {
        Ok(Ok(())) => Some(path.to_string()),
        Ok(Err(e)) => {
            tracing::warn!(key = %job.key, error = %e, "storing a partial image failed; skipped");
            None
        }
        Err(_) => {
            tracing::warn!(key = %job.key, "storing a partial image took too long; skipped");
            None
        }
    }
}

/// Removes what is stored under `prefix` (partial images) after [`PARTIALS_KEPT`] (at once
/// when the process stops), in the background. Best effort: what a worker that dies leaves
/// behind, the store's lifecycle rule for `partials/` removes (`docs/deploy.md`).
fn remove_partials_later(ctx: &Ctx, prefix: Path) {
    let objects = ctx.objects.clone();
    let stopping = ctx.tasks.shutdown().clone();
    ctx.tasks.spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(PARTIALS_KEPT) => {}
            () = stopping.cancelled() => {}
        }
        let listed: Vec<_> = objects.list(Some(&prefix)).collect().await;
        for meta in listed.into_iter().flatten() {
            if let Err(e) = objects.delete(&meta.location).await {
                tracing::debug!(error = %e, "removing a partial image failed");
            }
        }
    });
}

async fn upload(
    ctx: &Ctx,
    path: &Path,
    bytes: Bytes,
    mime: &'static str,
    cache_control: &'static str,
) -> object_store::Result<()> {
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::ContentType, mime.into());
    attributes.insert(Attribute::CacheControl, cache_control.into());
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
