//! Start-up arguments and the live knobs they seed (timing, answer length, image shape).

use clap::Parser;
use serde::{Deserialize, Serialize};

/// Command line of the `versus-sim` binary; every flag also reads an env var.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "versus-sim",
    about = "OpenAI-compatible upstream simulator for tests, benchmarks and offline dev"
)]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (the real one is printed).
    #[arg(long, env = "VERSUS_SIM_ADDR", default_value = "127.0.0.1:8787")]
    pub addr: String,

    /// Terms the moderation endpoint flags, as `term=category,…` (a whole word or phrase, in
    /// any case; a term without a category flags `hate`).
    #[arg(long, env = "VERSUS_SIM_MODERATION_FLAGS", default_value = "")]
    pub moderation_flags: String,

    #[command(flatten)]
    pub knobs: Knobs,
}

/// How `/v1/images/generations` hands images back, whatever the request asked for,
/// because the worker has to cope with both real-world behaviours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum ImageMode {
    #[serde(rename = "b64_json")]
    #[value(name = "b64_json")]
    B64Json,
    #[serde(rename = "url")]
    #[value(name = "url")]
    Url,
}

/// How `/v1/images/generations` treats `"stream": true`, because upstreams differ: GPT image
/// models stream partial images, others refuse the parameter or ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ImageStream {
    /// Server-sent events: `partial_images` partial images, then the completed one.
    On,
    /// A 400 `unknown_parameter` error naming `stream` (the same request without it works).
    Refuse,
    /// The plain JSON answer, as if `stream` had not been asked.
    Ignore,
}

/// The behaviour knobs; changed live through `POST /_sim/config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct Knobs {
    /// Delay before the first content token, in milliseconds.
    #[arg(long, env = "VERSUS_SIM_TTFT_MS", default_value_t = 400)]
    pub ttft_ms: u64,
    /// Token pace after the first one; 0 sends everything at once.
    #[arg(long, env = "VERSUS_SIM_TOKENS_PER_SEC", default_value_t = 60)]
    pub tokens_per_sec: u64,
    /// Tokens in a full answer (max_tokens in a request can only shorten it).
    #[arg(long, env = "VERSUS_SIM_ANSWER_TOKENS", default_value_t = 120)]
    pub answer_tokens: u64,
    /// Time an image generation takes, in milliseconds.
    #[arg(long, env = "VERSUS_SIM_IMAGE_LATENCY_MS", default_value_t = 1500)]
    pub image_latency_ms: u64,
    /// `b64_json` or `url`.
    #[arg(long, env = "VERSUS_SIM_IMAGE_MODE", value_enum, default_value_t = ImageMode::B64Json)]
    pub image_mode: ImageMode,
    /// Side of the square image when a request names no size, in pixels.
    #[arg(long, env = "VERSUS_SIM_IMAGE_SIZE", default_value_t = 256)]
    pub image_size: u32,
    /// What an image request asking `"stream": true` gets: `on`, `refuse` or `ignore`.
    #[arg(long, env = "VERSUS_SIM_IMAGE_STREAM", value_enum, default_value_t = ImageStream::On)]
    pub image_stream: ImageStream,
}

impl Default for Knobs {
    /// The same values as the command-line defaults, for embedding the simulator in tests.
    fn default() -> Self {
        Self {
            ttft_ms: 400,
            tokens_per_sec: 60,
            answer_tokens: 120,
            image_latency_ms: 1500,
            image_mode: ImageMode::B64Json,
            image_size: 256,
            image_stream: ImageStream::On,
        }
    }
}

/// A partial update of [`Knobs`]; unknown fields are refused so typos in tests show up.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnobsPatch {
    pub ttft_ms: Option<u64>,
    pub tokens_per_sec: Option<u64>,
    pub answer_tokens: Option<u64>,
    pub image_latency_ms: Option<u64>,
    pub image_mode: Option<ImageMode>,
    pub image_size: Option<u32>,
    pub image_stream: Option<ImageStream>,
}

impl Knobs {
    pub fn apply(&mut self, patch: &KnobsPatch) {
        if let Some(v) = patch.ttft_ms {
            self.ttft_ms = v;
        }
        if let Some(v) = patch.tokens_per_sec {
            self.tokens_per_sec = v;
        }
        if let Some(v) = patch.answer_tokens {
            self.answer_tokens = v;
        }
        if let Some(v) = patch.image_latency_ms {
            self.image_latency_ms = v;
        }
        if let Some(v) = patch.image_mode {
            self.image_mode = v;
        }
        if let Some(v) = patch.image_size {
            self.image_size = v;
        }
        if let Some(v) = patch.image_stream {
            self.image_stream = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_command_line_defaults() {
        let args = Args::parse_from(["versus-sim"]);
        assert_eq!(args.knobs, Knobs::default());
        assert_eq!(args.addr, "127.0.0.1:8787");
    }

    #[test]
    fn image_mode_reads_the_openai_spelling() {
        let args = Args::parse_from(["versus-sim", "--image-mode", "url"]);
        assert_eq!(args.knobs.image_mode, ImageMode::Url);
        let patch: KnobsPatch =
            serde_json::from_str(r#"{"image_mode":"b64_json"}"#).expect("a valid patch");
        assert_eq!(patch.image_mode, Some(ImageMode::B64Json));
    }

    #[test]
    fn image_stream_reads_on_refuse_and_ignore() {
        assert_eq!(Knobs::default().image_stream, ImageStream::On);
        let args = Args::parse_from(["versus-sim", "--image-stream", "refuse"]);
        assert_eq!(args.knobs.image_stream, ImageStream::Refuse);
        let patch: KnobsPatch =
            serde_json::from_str(r#"{"image_stream":"ignore"}"#).expect("a valid patch");
        assert_eq!(patch.image_stream, Some(ImageStream::Ignore));
        assert!(serde_json::from_str::<KnobsPatch>(r#"{"image_stream":"yes"}"#).is_err());
    }
}
