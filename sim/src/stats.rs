//! The record of upstream calls that `/_sim/stats` reports.

use std::collections::VecDeque;

use serde::Serialize;

/// Keeps memory bounded in long benchmarks; the counters stay exact past this.
const MAX_KEPT_CALLS: usize = 100_000;

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
    /// Status answered; 0 when no response was given (a non-streaming cut, or a stall).
    pub status: u16,
    pub fault: Option<&'static str>,
    pub prompt_sha256: String,
    pub image_sha256: Option<String>,
    /// The usage the answer reports (chat answers that run to their end, when asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
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
            status: 0,
            fault: None,
            prompt_sha256: String::new(),
            image_sha256: None,
            usage: None,
        }
    }
}

/// Counters plus the most recent calls, oldest first.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    pub chat_calls: u64,
    pub image_calls: u64,
    pub moderation_calls: u64,
    /// Every chat answer's reported usage, added up.
    pub usage: Usage,
    pub calls: VecDeque<Call>,
}

impl Stats {
    pub fn record(&mut self, call: Call) {
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
