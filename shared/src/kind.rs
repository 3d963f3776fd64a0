//! The two kinds of answer Versus makes: a fight's text and its picture. A leaf: the key hashes
//! the kind in, and the wire names subjects and buckets after it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What kind of answer a job asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Text,
    Image,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Image => "image",
        }
    }

    /// The kind `s` names (`text` or `image`), if any.
    pub fn parse(s: &str) -> Option<Kind> {
        [Kind::Text, Kind::Image]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
