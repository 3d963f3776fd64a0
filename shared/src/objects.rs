//! Object storage for the pictures, chosen by `VERSUS_OBJECT_STORE` through `object_store`:
//! `file:///path` (the default, `.data/objects`), `s3://bucket` (with the usual `AWS_*`
//! variables, `AWS_ENDPOINT_URL` for S3-compatible servers), `gs://bucket`, `az://container`,
//! or `memory://` (for tests).
//!
//! Architecture Invariant: every picture lives under [`IMAGES_PREFIX`], at a path derived from
//! its key alone, so a URL can name nothing else in the store.

use std::sync::Arc;

use anyhow::{Context, bail};
use object_store::{
    ObjectStore, aws::AmazonS3Builder, azure::MicrosoftAzureBuilder,
    gcp::GoogleCloudStorageBuilder, local::LocalFileSystem, memory::InMemory, path::Path,
};

use crate::key::Key;

pub const IMAGES_PREFIX: &str = "images";

/// Where the picture of `key` lives in the store, given its file extension.
pub fn image_path(key: &Key, extension: &str) -> Path {
    Path::from(format!("{IMAGES_PREFIX}/{key}.{extension}"))
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
