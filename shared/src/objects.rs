//! Object storage for the pictures, chosen by `VERSUS_OBJECT_STORE` through `object_store`:
//! `file:///path` (the default, `.data/objects`), `s3://bucket` (with the usual `AWS_*`
//! variables, `AWS_ENDPOINT_URL` for S3-compatible servers), `gs://bucket`, `az://container`,
//! or `memory://` (for tests).
//!
//! Architecture Invariant: every picture lives under [`IMAGES_PREFIX`], at a path derived from
//! its key and its content ([`picture_path`]), so a URL can name nothing else in the store,
//! and a picture once served is never overwritten by another attempt's.

use std::sync::Arc;

use anyhow::{Context, bail};
use object_store::{
    ObjectStore, aws::AmazonS3Builder, azure::MicrosoftAzureBuilder,
    gcp::GoogleCloudStorageBuilder, local::LocalFileSystem, memory::InMemory, path::Path,
};

use crate::key::Key;

pub const IMAGES_PREFIX: &str = "images";

/// Hex digits of a picture's SHA-256 in its name: enough to tell apart the pictures of one key.
const DIGEST_CHARS: usize = 16;

/// Where the picture of `key` whose SHA-256 is `sha256` (hex) lives in the store, given its
/// file extension: `images/<key>-<first 16 hex digits of the SHA-256>.<ext>`. Named by its
/// content, a picture is never overwritten: an attempt that draws the key again stores its
/// picture beside the one already served.
pub fn picture_path(key: &Key, sha256: &str, extension: &str) -> Path {
    let digest = sha256.get(..DIGEST_CHARS).unwrap_or(sha256);
    Path::from(format!("{IMAGES_PREFIX}/{key}-{digest}.{extension}"))
}

/// Where the pictures stored before names carried their content live: `images/<key>.<ext>`.
pub fn image_path(key: &Key, extension: &str) -> Path {
    Path::from(format!("{IMAGES_PREFIX}/{key}.{extension}"))
}

/// The key and the store path that a picture URL's file name names: `<key>-<digest>.<ext>`
/// ([`picture_path`]) or `<key>.<ext>` ([`image_path`]); None for any other name.
pub fn picture_file(file: &str) -> Option<(Key, Path)> {
    let (name, extension) = file.split_once('.')?;
    let (key, digest) = match name.split_once('-') {
        Some((key, digest)) => (key, Some(digest)),
        None => (name, None),
    };
    let key = Key::parse(key)?;
    let path = match digest {
        None => image_path(&key, extension),
        Some(digest)
            if digest.len() == DIGEST_CHARS
                && digest
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            picture_path(&key, digest, extension)
        }
        Some(_) => return None,
    };
    Some((key, path))
}

/// Where a picture's partial images live: never under `images/`, so that none is ever taken
/// for a finished picture, and removed once the picture is done (or left to the store's
/// lifecycle rule for this prefix: `docs/deploy.md`).
pub const PARTIALS_PREFIX: &str = "partials";

/// Where partial image `index` of attempt `attempt` of the picture `key` is stored:
/// `partials/<key>/<attempt>/<index>.<ext>`.
pub fn partial_path(key: &Key, attempt: i32, index: u32, extension: &str) -> Path {
    Path::from(format!(
        "{PARTIALS_PREFIX}/{key}/{attempt}/{index}.{extension}"
    ))
}

/// The `Cache-Control` of a partial image: short, since it is removed once its picture is
/// stored, and never the answer.
pub const PARTIAL_CACHE_CONTROL: &str = "public, max-age=60";

/// Every partial image of the picture `key`, of any attempt (to remove them).
pub fn partials_of_picture(key: &Key) -> Path {
    Path::from(format!("{PARTIALS_PREFIX}/{key}"))
}

/// The partials of one attempt of the picture `key` (to remove them).
pub fn partials_of(key: &Key, attempt: i32) -> Path {
    Path::from(format!("{PARTIALS_PREFIX}/{key}/{attempt}"))
}

/// The store path a partial's URL file name names: `<key>-<attempt>-<index>.<ext>` with an
/// extension of a picture we serve, numbers written as [`partial_file_name`] writes them (no
/// leading zero: one partial, one name); None for any other name.
pub fn partial_file(file: &str) -> Option<(Key, Path)> {
    let (name, extension) = file.split_once('.')?;
    if !matches!(extension, "png" | "jpg" | "webp") {
        return None;
    }
    let mut parts = name.split('-');
    let (key, attempt, index) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let key = Key::parse(key)?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(attempt) || !digits(index) {
        return None;
    }
    let path = partial_path(&key, attempt.parse().ok()?, index.parse().ok()?, extension);
    (partial_file_name(path.as_ref()).as_deref() == Some(file)).then_some((key, path))
}

/// The URL file name of the partial stored at `path` (`partial_path`'s), for `partial_file`.
pub fn partial_file_name(path: &str) -> Option<String> {
    let rest = path.strip_prefix(PARTIALS_PREFIX)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let (key, attempt, file) = (parts.next()?, parts.next()?, parts.next()?);
    Some(format!("{key}-{attempt}-{file}"))
}

/// Opens the store named by `url`.
pub fn open(url: &str) -> anyhow::Result<Arc<dyn ObjectStore>> {
    crate::tls::install();
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    let store: Arc<dyn ObjectStore> = match scheme {
        "file" => {
            let dir = &url["file://".len()..];
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the object folder {dir}"))?;
            Arc::new(LocalFileSystem::new_with_prefix(dir)?)
        }
        "memory" => Arc::new(InMemory::new()),
        "s3" | "s3a" => Arc::new(AmazonS3Builder::from_env().with_url(url).build()?),
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_url(url)
                .build()?,
        ),
        "az" | "azure" | "abfs" | "abfss" => {
            Arc::new(MicrosoftAzureBuilder::from_env().with_url(url).build()?)
        }
        _ => bail!(
            "VERSUS_OBJECT_STORE must be file:///path, s3://bucket, gs://bucket, az://container \
             or memory://, not {url:?}"
        ),
    };
    Ok(store)
}

/// The settings that choose the store, shared by the API (which serves pictures) and the
/// workers (which upload them).
#[derive(clap::Args, Debug, Clone)]
pub struct ObjectStoreSettings {
    /// Object store URL for pictures.
    #[arg(
        long,
        env = "VERSUS_OBJECT_STORE",
        default_value = "file://.data/objects"
    )]
    pub object_store: String,
}

impl ObjectStoreSettings {
    pub fn open(&self) -> anyhow::Result<Arc<dyn ObjectStore>> {
        let url = match self.object_store.strip_prefix("file://") {
            // A relative folder is relative to the working directory.
            Some(rel) if !rel.starts_with('/') => {
                let abs = std::env::current_dir()?.join(rel);
                format!("file://{}", abs.display())
            }
            _ => self.object_store.clone(),
        };
        open(&url).with_context(|| format!("opening the object store {}", self.object_store))
    }
}

/// Pictures never change under a URL: a CDN and browsers may keep them for a year.
pub const IMAGE_CACHE_CONTROL: &str = "public, max-age=31536000, immutable";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picture_file_names_a_path_under_images_or_nothing() {
        let key = "0123456789abcdef0123456789abcdef";
        let sha = "fedcba9876543210".repeat(4);
        let (parsed, path) = picture_file(&format!("{key}-fedcba9876543210.png")).unwrap();
        assert_eq!(parsed.as_str(), key);
        assert_eq!(path, picture_path(&parsed, &sha, "png"));
        assert_eq!(path.as_ref(), format!("images/{key}-fedcba9876543210.png"));
        // A picture stored before names carried their content.
        let (_, old) = picture_file(&format!("{key}.png")).unwrap();
        assert_eq!(old.as_ref(), format!("images/{key}.png"));
        for bad in [
            format!("{key}-FEDCBA9876543210.png"),
            format!("{key}-fedcba987654321.png"),
            format!("{key}-../../etc.png"),
            "../etc/passwd".to_owned(),
            key.to_owned(),
            "0123.png".to_owned(),
        ] {
            assert!(picture_file(&bad).is_none(), "{bad}");
        }
    }
}
