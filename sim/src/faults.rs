//! Injected faults: what they are, and the FIFO list that upstream requests draw from.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::stats::CallKind;

/// Which upstream requests a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Chat,
    Image,
    Any,
}

impl Target {
    fn matches(self, kind: CallKind) -> bool {
        matches!(
            (self, kind),
            (Target::Any, _) | (Target::Chat, CallKind::Chat) | (Target::Image, CallKind::Image)
        )
    }
}

/// What goes wrong with one request.
///
/// On an image request: `status` and `hang` act as on chat; `cut` answers a 200 whose body
/// breaks once the picture would be ready, and `stall` never answers; `finish` and `say` draw
/// as usual. On a streamed image request (`"stream": true`), `cut` and `stall` count partial
/// images instead of tokens (`after_partials` is accepted as another name for `after_tokens`):
/// the stream sends that many `image_generation.partial_image` events (at most the
/// `partial_images` asked), then `cut` drops the connection when the next event was due and
/// `stall` goes silent; neither sends `image_generation.completed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Fault {
    /// Answer this status with an OpenAI error body (and `Retry-After` when given).
    Status {
        status: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_secs: Option<u64>,
    },
    /// Send this many tokens (partial images on an image stream), then drop the connection.
    Cut {
        #[serde(default, alias = "after_partials")]
        after_tokens: u64,
    },
    /// Send this many tokens (partial images on an image stream), then go silent until the
    /// client gives up.
    Stall {
        #[serde(default, alias = "after_partials")]
        after_tokens: u64,
    },
    /// Take the request and never answer, not even with response headers.
    Hang,
    /// Send this many tokens, then end the answer normally (usage and `[DONE]`) but with this
    /// `finish_reason`: `length` by default (an answer cut at its token cap), or any other
    /// (`content_filter`; `stop` with no tokens is an empty answer).
    Finish {
        #[serde(default = "length")]
        reason: String,
        #[serde(default)]
        after_tokens: u64,
    },
    /// Answer as usual, with `text` added at the end of the answer (as more words): what a
    /// model steered by the names might write, such as a link, or a term moderation flags.
    Say { text: String },
}

fn length() -> String {
    "length".to_owned()
}

impl Fault {
    /// The name recorded in `/_sim/stats`.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Status { .. } => "status",
            Fault::Cut { .. } => "cut",
            Fault::Stall { .. } => "stall",
            Fault::Hang => "hang",
            Fault::Finish { .. } => "finish",
            Fault::Say { .. } => "say",
        }
    }
}

/// One entry of the list: a fault, whom it hits, and how many more times (`None` = forever).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    pub kind: Target,
    pub fault: Fault,
    #[serde(default)]
    pub times: Option<u64>,
}

/// Faults in the order they were added; a request takes the first one that matches it.
#[derive(Debug, Default)]
pub struct FaultQueue {
    rules: VecDeque<FaultRule>,
}

impl FaultQueue {
    pub fn push(&mut self, rule: FaultRule) {
        // A rule that may fire zero times would never be seen; keep the list honest.
        if rule.times != Some(0) {
            self.rules.push_back(rule);
        }
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    pub fn list(&self) -> Vec<FaultRule> {
        self.rules.iter().cloned().collect()
    }

    /// Draws the fault for one request of `kind`, spending one of its uses.
    pub fn take(&mut self, kind: CallKind) -> Option<Fault> {
        let index = self.rules.iter().position(|r| r.kind.matches(kind))?;
        let rule = &mut self.rules[index];
        let fault = rule.fault.clone();
        if let Some(times) = rule.times.as_mut() {
            *times = times.saturating_sub(1);
            if *times == 0 {
                self.rules.remove(index);
            }
        }
        Some(fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> FaultRule {
        serde_json::from_str(json).expect("a valid fault rule")
    }

    #[test]
    fn a_counted_fault_is_used_up_and_then_removed() {
        let mut q = FaultQueue::default();
        q.push(rule(
            r#"{"kind":"chat","fault":{"type":"status","status":429,"retry_after_secs":2},"times":2}"#,
        ));
        assert!(q.take(CallKind::Chat).is_some());
        assert!(q.take(CallKind::Image).is_none());
        assert!(q.take(CallKind::Chat).is_some());
        assert!(q.take(CallKind::Chat).is_none());
    }

    #[test]
    fn the_first_matching_fault_wins_and_a_forever_fault_stays() {
        let mut q = FaultQueue::default();
        q.push(rule(
            r#"{"kind":"image","fault":{"type":"stall"},"times":null}"#,
        ));
        q.push(rule(
            r#"{"kind":"any","fault":{"type":"cut","after_tokens":5},"times":1}"#,
        ));
        assert_eq!(q.take(CallKind::Chat), Some(Fault::Cut { after_tokens: 5 }));
        for _ in 0..3 {
            assert_eq!(
                q.take(CallKind::Image),
                Some(Fault::Stall { after_tokens: 0 })
            );
        }
        assert_eq!(q.list().len(), 1);
    }

    #[test]
    fn after_partials_is_another_name_for_after_tokens() {
        assert_eq!(
            rule(r#"{"kind":"image","fault":{"type":"cut","after_partials":1}}"#).fault,
            Fault::Cut { after_tokens: 1 }
        );
        assert_eq!(
            rule(r#"{"kind":"image","fault":{"type":"stall","after_partials":2}}"#).fault,
            Fault::Stall { after_tokens: 2 }
        );
    }

    #[test]
    fn a_finish_fault_ends_with_length_unless_told_otherwise() {
        assert_eq!(
            rule(r#"{"kind":"chat","fault":{"type":"finish"}}"#).fault,
            Fault::Finish {
                reason: "length".to_owned(),
                after_tokens: 0
            }
        );
        assert_eq!(
            rule(r#"{"kind":"chat","fault":{"type":"finish","reason":"content_filter","after_tokens":3}}"#)
                .fault
                .name(),
            "finish"
        );
        assert_eq!(
            rule(r#"{"kind":"chat","fault":{"type":"say","text":"visit evil.example"}}"#).fault,
            Fault::Say {
                text: "visit evil.example".to_owned()
            }
        );
    }
}
