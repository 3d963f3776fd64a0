//! The record of upstream calls that `/_sim/stats` reports.

use std::collections::VecDeque;

use serde::Serialize;

/// Keeps memory bounded in long benchmarks; the counters stay exact past this.
const MAX_KEPT_CALLS: usize = 100_000;
/// How many recent chat requests keep their messages: enough for a test to read what the
/// upstream was sent, little enough for a benchmark of 100k calls.
const MAX_KEPT_CHAT_REQUESTS: usize = 32;
/// The same for image requests.
const MAX_KEPT_IMAGE_REQUESTS: usize = 32;
/// The most of one message's text kept, in bytes (cut at a character boundary).
const MAX_KEPT_MESSAGE_BYTES: usize = 4096;

/// Which upstream endpoint a call reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallKind {
    Chat,
    Image,
    Moderation,
}

/// One upstream request as seen by the simulator.
#[derive(Debug, Clone, Serialize)]
pub struct Call {
    pub kind: CallKind,
    /// Unix milliseconds when the request arrived.
    pub at_ms: u64,
    /// The same in microseconds, for timings finer than a millisecond.
    pub at_us: u64,
    /// Status answered; 0 when no response was given (a non-streaming cut, or a stall).
    pub status: u16,
    pub fault: Option<&'static str>,
    pub prompt_sha256: String,
    pub image_sha256: Option<String>,
    /// The usage the answer reports (chat answers that run to their end, when asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// What a chat request asked: moved to [`Stats::chat_requests`] when the call is recorded,
    /// so that the long list of calls keeps only the hash.
    #[serde(skip)]
    pub request: Option<ChatRequest>,
    /// What an image request asked: moved to [`Stats::image_requests`] likewise.
    #[serde(skip)]
    pub image_request: Option<ImageRequest>,
}

/// A chat request as the simulator received it: its model and messages.
#[derive(Debug, Clone, Serialize)]
pub struct ChatRequest {
    /// Unix milliseconds when the request arrived.
    pub at_ms: u64,
    pub model: String,
    pub messages: Vec<ChatMessage>,
}

/// An image request as the simulator received it: its fields as sent (`None` when absent),
/// the prompt cut to at most [`MAX_KEPT_MESSAGE_BYTES`].
#[derive(Debug, Clone, Serialize)]
pub struct ImageRequest {
    /// Unix milliseconds when the request arrived.
    pub at_ms: u64,
    pub model: Option<String>,
    pub prompt: String,
    pub n: Option<u32>,
    pub size: Option<String>,
    pub quality: Option<String>,
    pub background: Option<String>,
    pub output_format: Option<String>,
    /// Whether `"stream": true` was asked.
    pub stream: bool,
    pub partial_images: Option<u32>,
}

/// One message of a chat request; `content` is its text (the text parts of a content array,
/// joined), at most [`MAX_KEPT_MESSAGE_BYTES`] of it.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.to_owned(),
            content: kept(content).to_owned(),
        }
    }
}

/// At most [`MAX_KEPT_MESSAGE_BYTES`] of `text`, cut at a character boundary.
pub fn kept(text: &str) -> &str {
    let mut end = text.len().min(MAX_KEPT_MESSAGE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Tokens as a chat answer's `usage` reports them.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Call {
    pub fn arrived(kind: CallKind) -> Self {
        Self {
            kind,
            at_ms: crate::openai::unix_ms(),
            at_us: crate::openai::unix_us(),
            status: 0,
            fault: None,
            prompt_sha256: String::new(),
            image_sha256: None,
            usage: None,
            request: None,
            image_request: None,
        }
    }
}

/// Counters plus the most recent calls, oldest first.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    pub chat_calls: u64,
    pub image_calls: u64,
    pub moderation_calls: u64,
    /// Chat streams their client dropped while tokens still flowed.
    pub chat_abandoned: u64,
    /// Image requests that asked `"stream": true`, whatever they were answered.
    pub image_stream_requests: u64,
    /// `image_generation.partial_image` events sent, over all image streams.
    pub partials_sent: u64,
    /// Every chat answer's reported usage, added up.
    pub usage: Usage,
    pub calls: VecDeque<Call>,
    /// The most recent chat requests with their messages (at most
    /// [`MAX_KEPT_CHAT_REQUESTS`]), oldest first.
    pub chat_requests: VecDeque<ChatRequest>,
    /// The most recent image requests (at most [`MAX_KEPT_IMAGE_REQUESTS`]), oldest first.
    pub image_requests: VecDeque<ImageRequest>,
}

impl Stats {
    pub fn record(&mut self, mut call: Call) {
        if let Some(request) = call.request.take() {
            if self.chat_requests.len() == MAX_KEPT_CHAT_REQUESTS {
                self.chat_requests.pop_front();
            }
            self.chat_requests.push_back(request);
        }
        if let Some(request) = call.image_request.take() {
            if request.stream {
                self.image_stream_requests += 1;
            }
            if self.image_requests.len() == MAX_KEPT_IMAGE_REQUESTS {
                self.image_requests.pop_front();
            }
            self.image_requests.push_back(request);
        }
        match call.kind {
            CallKind::Chat => self.chat_calls += 1,
            CallKind::Image => self.image_calls += 1,
            CallKind::Moderation => self.moderation_calls += 1,
        }
        if let Some(usage) = call.usage {
            self.usage.prompt_tokens += usage.prompt_tokens;
            self.usage.completion_tokens += usage.completion_tokens;
        }
        if self.calls.len() == MAX_KEPT_CALLS {
            self.calls.pop_front();
        }
        self.calls.push_back(call);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_latest_chat_requests_keep_their_messages() {
        let mut stats = Stats::default();
        for n in 0..(MAX_KEPT_CHAT_REQUESTS + 8) {
            let mut call = Call::arrived(CallKind::Chat);
            call.request = Some(ChatRequest {
                at_ms: 0,
                model: format!("m{n}"),
                messages: vec![ChatMessage::new(
                    "user",
                    &"é".repeat(MAX_KEPT_MESSAGE_BYTES),
                )],
            });
            stats.record(call);
        }
        assert_eq!(stats.chat_calls as usize, MAX_KEPT_CHAT_REQUESTS + 8);
        assert_eq!(stats.chat_requests.len(), MAX_KEPT_CHAT_REQUESTS);
        assert_eq!(stats.chat_requests[0].model, "m8");
        let kept = &stats.chat_requests[0].messages[0].content;
        assert_eq!(
            kept.len(),
            MAX_KEPT_MESSAGE_BYTES,
            "cut at a character boundary"
        );
        assert!(stats.calls.iter().all(|c| c.request.is_none()));
    }
}
