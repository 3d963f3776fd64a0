//! Every error code a client of Versus can see, in one place: the `code` of an error response
//! (`{"error":{"code","message"}}`) and of an SSE `error` event, with whether asking again may
//! help and the words people are shown. The API, the workers and the OpenAPI document all take
//! their codes from here; on the wire a code stays a string, so that a client or a process of
//! an older version reads a code it does not know as text.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One error code, as clients see it (`snake_case`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // A request refused before anything was done (an error response, 4xx).
    /// An opponent's name is missing.
    MissingName,
    /// An opponent's name is empty once trimmed.
    EmptyName,
    /// An opponent's name is too long.
    NameTooLong,
    /// A name holds a control character.
    ControlCharacter,
    /// A name holds a character that shows nothing.
    InvisibleCharacter,
    /// A name holds a character Unicode has not assigned.
    UnassignedCharacter,
    /// A name stacks too many combining marks.
    TooManyMarks,
    /// A name mixes scripts that spoof one another.
    MixedScripts,
    /// The request's body is not what the route takes.
    InvalidBody,
    /// The request's query is not what the route takes.
    InvalidQuery,
    /// No such answer or picture.
    NotFound,
    /// An operator's route without a valid token.
    Unauthorized,
    /// A browser asked for a new answer on behalf of another site.
    CrossSite,
    /// The client asked for too many new answers, or holds too many streams.
    RateLimited,
    /// The client's new answers used up its allowance for the UTC day.
    QuotaExhausted,

    // A generation that ended, or was never started, without an answer (an SSE `error`, or
    // 422/502/503 from the routes that wait for the whole answer).
    /// Moderation refused the matchup, for good.
    Refused,
    /// The queue of new answers is full.
    Busy,
    /// Today's budget for new answers is spent.
    BudgetExhausted,
    /// This server cannot reach what writes new answers, or stops.
    Unavailable,
    /// The answer took longer than a client waits.
    Timeout,
    /// An operator withdrew the answer while it was being written.
    Purged,
    /// The AI model is unavailable (an outage, a rate limit).
    UpstreamUnavailable,
    /// The AI model refused to answer this matchup.
    UpstreamRefused,
    /// The picture could not be stored.
    StorageUnavailable,
}

impl ErrorCode {
    /// Every code, in the order the contract lists them.
    pub const ALL: [ErrorCode; 24] = [
        ErrorCode::MissingName,
        ErrorCode::EmptyName,
        ErrorCode::NameTooLong,
        ErrorCode::ControlCharacter,
        ErrorCode::InvisibleCharacter,
        ErrorCode::UnassignedCharacter,
        ErrorCode::TooManyMarks,
        ErrorCode::MixedScripts,
        ErrorCode::InvalidBody,
        ErrorCode::InvalidQuery,
        ErrorCode::NotFound,
        ErrorCode::Unauthorized,
        ErrorCode::CrossSite,
        ErrorCode::RateLimited,
        ErrorCode::QuotaExhausted,
        ErrorCode::Refused,
        ErrorCode::Busy,
        ErrorCode::BudgetExhausted,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::Purged,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::UpstreamRefused,
        ErrorCode::StorageUnavailable,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MissingName => "missing_name",
            ErrorCode::EmptyName => "empty_name",
            ErrorCode::NameTooLong => "name_too_long",
            ErrorCode::ControlCharacter => "control_character",
            ErrorCode::InvisibleCharacter => "invisible_character",
            ErrorCode::UnassignedCharacter => "unassigned_character",
            ErrorCode::TooManyMarks => "too_many_marks",
            ErrorCode::MixedScripts => "mixed_scripts",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::CrossSite => "cross_site",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::QuotaExhausted => "quota_exhausted",
            ErrorCode::Refused => "refused",
            ErrorCode::Busy => "busy",
            ErrorCode::BudgetExhausted => "budget_exhausted",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Purged => "purged",
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::UpstreamRefused => "upstream_refused",
            ErrorCode::StorageUnavailable => "storage_unavailable",
        }
    }

    /// The code `s` names, if any.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether asking again (the same request, later) may succeed.
    pub const fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::QuotaExhausted
                | ErrorCode::Busy
                | ErrorCode::BudgetExhausted
                | ErrorCode::Unavailable
                | ErrorCode::Timeout
                | ErrorCode::Purged
                | ErrorCode::UpstreamUnavailable
                | ErrorCode::StorageUnavailable
        )
    }

    /// Whether a generation can end with this code (an SSE `error` event), rather than only a
    /// request be refused with it.
    pub const fn ends_generations(self) -> bool {
        match self {
            ErrorCode::Refused | ErrorCode::UpstreamRefused => true,
            // The retryable codes of a request refused before anything was done.
            ErrorCode::RateLimited | ErrorCode::QuotaExhausted => false,
            other => other.retryable(),
        }
    }

    /// What people are told, unless the moment has more precise words (a name error says
    /// which name and why; `unavailable` says what cannot be reached).
    pub const fn message(self) -> &'static str {
        match self {
            ErrorCode::MissingName
            | ErrorCode::EmptyName
            | ErrorCode::NameTooLong
            | ErrorCode::ControlCharacter
            | ErrorCode::InvisibleCharacter
            | ErrorCode::UnassignedCharacter
            | ErrorCode::TooManyMarks
            | ErrorCode::MixedScripts => "a name is not valid",
            ErrorCode::InvalidBody => "the request's body is not valid",
            ErrorCode::InvalidQuery => "the request's query is not valid",
            ErrorCode::NotFound => "no such answer",
            ErrorCode::Unauthorized => "a valid admin bearer token is required",
            ErrorCode::CrossSite => {
                "a new answer cannot be started from another site; open Versus itself to ask"
            }
            ErrorCode::RateLimited => "you have asked for many new matchups; try again later",
            ErrorCode::QuotaExhausted => {
                "You have used today's allowance of new answers; try again after midnight UTC. \
                 Answers already written still work."
            }
            ErrorCode::Refused => "Versus does not answer this matchup.",
            ErrorCode::Busy => "Versus is busy right now. Please try again in a few seconds.",
            ErrorCode::BudgetExhausted => {
                "Versus has spent today's budget for new answers. Answers already written still \
                 work; new ones start again after midnight UTC."
            }
            ErrorCode::Unavailable => "The service is unavailable right now. Please try again.",
            ErrorCode::Timeout => "The answer took too long. Please try again.",
            ErrorCode::Purged => {
                "This answer was withdrawn while it was being generated. Please ask again."
            }
            ErrorCode::UpstreamUnavailable => {
                "The AI model is unavailable right now. Please try again."
            }
            ErrorCode::UpstreamRefused => "The AI model refused to answer this matchup.",
            ErrorCode::StorageUnavailable => {
                "The picture could not be stored right now. Please try again."
            }
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<ErrorCode> for str {
    fn eq(&self, code: &ErrorCode) -> bool {
        self == code.as_str()
    }
}

impl PartialEq<ErrorCode> for String {
    fn eq(&self, code: &ErrorCode) -> bool {
        self.as_str() == code.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_once_and_reads_back_as_itself() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(*code));
            assert_eq!(
                serde_json::to_string(code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
            assert!(
                !ErrorCode::ALL[..i].contains(code),
                "{code} is listed twice"
            );
        }
        assert_eq!(ErrorCode::parse("no_such_code"), None);
    }

    #[test]
    fn only_a_moderation_or_model_refusal_ends_a_generation_for_good() {
        let ends: Vec<_> = ErrorCode::ALL
            .into_iter()
            .filter(|c| c.ends_generations() && !c.retryable())
            .collect();
        assert_eq!(ends, [ErrorCode::Refused, ErrorCode::UpstreamRefused]);
    }

    #[test]
    fn the_readme_lists_every_code_once_with_its_retryability() {
        let readme = include_str!("../../README.md");
        let rows: Vec<&str> = readme
            .lines()
            .filter(|l| l.starts_with("| `") && l.matches(" | ").count() >= 3)
            .collect();
        for code in ErrorCode::ALL {
            let quoted = format!("`{code}`");
            let found: Vec<&&str> = rows
                .iter()
                .filter(|row| row.split(" | ").next().unwrap().contains(&quoted))
                .collect();
            assert_eq!(
                found.len(),
                1,
                "README.md's table of codes lists {code} once"
            );
            let retryable = found[0].split(" | ").nth(2).unwrap().trim();
            let expected = if code.retryable() { "yes" } else { "no" };
            assert_eq!(retryable, expected, "README.md: is {code} retryable?");
        }
    }
}
