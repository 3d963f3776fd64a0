//! Settings both binaries read from the environment (each binary adds its own with clap's
//! `flatten`, so `--help` lists every variable with its default).

use std::{fmt, str::FromStr, time::Duration};

/// A value that must never reach a log or an error message.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// The variable that holds the admin token: the API checks it, the operator CLI sends it.
pub const ADMIN_TOKEN_VAR: &str = "VERSUS_ADMIN_TOKEN";

/// The fewest characters an admin token may hold once trimmed: a token that short is guessed
/// by trying, one that long (`openssl rand -hex 32` gives 64) is not.
pub const ADMIN_TOKEN_MIN_CHARS: usize = 32;

/// An admin token as the API and the CLI both read it, so that they always agree: without the
/// white space around it (the newline a file or `echo` leaves, say).
pub fn trimmed_admin_token(raw: &str) -> &str {
    raw.trim()
}

/// Where NATS is, who this process is on it, and how long generation events stay replayable.
#[derive(clap::Args, Debug, Clone)]
pub struct NatsSettings {
    /// NATS server URL: `nats://user:password@host:4222` logs in as that user (`tls://…`
    /// requires TLS); several servers are separated by commas. Kept secret: it never reaches
    /// a log, an error message or `--help`.
    #[arg(
        long = "nats-url",
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub url: Secret,
    /// A NATS credentials file (a user JWT and its NKey seed, as `nsc` or the NATS account
    /// server issues them), instead of a user and password in `NATS_URL`.
    #[arg(long = "nats-creds", env = "NATS_CREDS")]
    pub creds: Option<std::path::PathBuf>,
    /// The CA certificate (PEM) that signed the NATS server's certificate, for a private CA:
    /// setting it requires TLS. (`tls://` URLs are checked against the system's CAs.)
    #[arg(long = "nats-tls-ca", env = "NATS_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Replicas of the jobs and events streams and the KV buckets (3 on a JetStream cluster).
    /// Unset: new ones get 1 and existing ones keep theirs; set: existing ones are scaled to
    /// it at start-up.
    #[arg(long, env = "VERSUS_NATS_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: Option<u8>,
    /// How long a generation's events stay on the events stream, in seconds.
    #[arg(long, env = "VERSUS_EVENTS_MAX_AGE_SECS", default_value_t = 600)]
    pub events_max_age_secs: u64,
    /// The most memory the events stream takes on each nats-server, in MiB: past it the oldest
    /// events (finished answers') make room, so a flood of new answers never makes a publish
    /// fail. Keep it under the servers' `max_memory_store` (256 MB in `nats.conf` and
    /// `nats-hub.conf`); 0: no cap (the store's size is then the limit, and a full one refuses
    /// every event).
    #[arg(long, env = "VERSUS_EVENTS_MAX_MIB", default_value_t = 192)]
    pub events_max_mib: u64,
    /// The most jobs the jobs stream holds (queued and in progress, both lanes); a new job
    /// beyond it is refused and its clients told `busy`.
    #[arg(long, env = "VERSUS_MAX_QUEUED_JOBS", default_value_t = 10_000)]
    pub max_queued_jobs: i64,
}

impl NatsSettings {
    pub fn events_max_age(&self) -> Duration {
        Duration::from_secs(self.events_max_age_secs.max(60))
    }

    /// The events stream's byte cap (`max_bytes`): -1 for none.
    pub fn events_max_bytes(&self) -> i64 {
        match self.events_max_mib {
            0 => -1,
            mib => i64::try_from(mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX),
        }
    }
}

/// The models whose answers the system serves; part of every key.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelSettings {
    /// Chat model for the fight text.
    #[arg(long, env = "VERSUS_CHAT_MODEL", default_value = "gpt-4o-mini")]
    pub chat_model: String,
    /// Image model for the fight picture.
    #[arg(long, env = "VERSUS_IMAGE_MODEL", default_value = "gpt-image-1")]
    pub image_model: String,
    /// Size of the picture, as the image API takes it.
    #[arg(long, env = "VERSUS_IMAGE_SIZE", default_value = "1024x1024")]
    pub image_size: String,
    /// The most tokens one answer may have (`max_completion_tokens` of every chat request);
    /// with the longest prompt, what a text answer reserves of the day's budget before its call.
    #[arg(long, env = "VERSUS_MAX_ANSWER_TOKENS", default_value_t = 600)]
    pub max_answer_tokens: u32,
}

impl ModelSettings {
    /// What an image key is made with: the model and the size both change the picture.
    pub fn image_variant(&self) -> String {
        format!("{}@{}", self.image_model, self.image_size)
    }
}
