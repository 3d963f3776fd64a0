//! Opponent names as validated at the boundary, and the canonical key that names an answer.
//!
//! Two requests ask for the same answer when their names match after trimming, Unicode NFKC
//! normalisation, case folding and collapsing inner white space, in either order. The key is a
//! hash over that pair, the kind of answer, the prompt template version and the model, so a new
//! prompt or model is a new key and old answers stay addressable.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

use crate::wire::Kind;

/// The longest name we accept, in characters, after trimming.
pub const MAX_NAME_CHARS: usize = 100;

/// Why a name was refused. The API turns these into 400 answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("opponent `{0}` is missing")]
    Missing(&'static str),
    #[error("opponent `{0}` is empty")]
    Empty(&'static str),
    #[error("opponent `{0}` is longer than {MAX_NAME_CHARS} characters")]
    TooLong(&'static str),
    #[error("opponent `{0}` contains control characters")]
    ControlCharacter(&'static str),
}

impl NameError {
    /// A stable, machine-readable code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            NameError::Missing(_) => "missing_name",
            NameError::Empty(_) => "empty_name",
            NameError::TooLong(_) => "name_too_long",
            NameError::ControlCharacter(_) => "control_character",
        }
    }
}

/// One opponent: the name as shown (trimmed, inner white space collapsed) and its canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name {
    display: String,
    canonical: String,
}

impl Name {
    /// Validates a raw name; `field` names the input in error messages (`a` or `b`).
    pub fn parse(field: &'static str, raw: Option<&str>) -> Result<Name, NameError> {
        let raw = raw.ok_or(NameError::Missing(field))?;
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(NameError::Empty(field));
        }
        if trimmed.chars().any(char::is_control) {
            return Err(NameError::ControlCharacter(field));
        }
        if trimmed.chars().count() > MAX_NAME_CHARS {
            return Err(NameError::TooLong(field));
        }
        let display = collapse_whitespace(trimmed);
        let canonical = if trimmed.is_ascii() {
            // What `fold` gives for ASCII, without its passes: NFKC leaves ASCII alone, and
            // folding it is lowercasing. Most names are ASCII, and every hit pays this.
            collapse_whitespace(&trimmed.to_ascii_lowercase())
        } else {
            fold(trimmed)
        };
        Ok(Name { display, canonical })
    }

    pub fn display(&self) -> &str {
        &self.display
    }

    pub fn canonical(&self) -> &str {
        &self.canonical
    }
}

/// NFKC, then case folding, then NFKC again (folding can produce sequences that are not in
/// normal form: this is the NFKC_Casefold recipe), with white space collapsed.
fn fold(name: &str) -> String {
    let folded = caseless::default_case_fold_str(&name.nfkc().collect::<String>());
    collapse_whitespace(&folded.nfkc().collect::<String>())
}

fn collapse_whitespace(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A validated pair of opponents in the order the client gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matchup {
    pub a: Name,
    pub b: Name,
}

impl Matchup {
    pub fn parse(a: Option<&str>, b: Option<&str>) -> Result<Matchup, NameError> {
        Ok(Matchup {
            a: Name::parse("a", a)?,
            b: Name::parse("b", b)?,
        })
    }

    /// The key of this matchup's answer of `kind`, made with prompt `version` and `model`.
    pub fn key(&self, kind: Kind, version: u32, model: &str) -> Key {
        let (lo, hi) = if self.a.canonical <= self.b.canonical {
            (&self.a.canonical, &self.b.canonical)
        } else {
            (&self.b.canonical, &self.a.canonical)
        };
        // Names contain no control characters, so the unit separator cannot be forged.
        let mut hash = Sha256::new();
        for part in [kind.as_str(), &version.to_string(), model, lo, hi] {
            hash.update(part.as_bytes());
            hash.update([0x1f]);
        }
        let digest = hash.finalize();
        Key(hex::encode(&digest[..16]))
    }
}

/// The name of one answer: 32 lowercase hex digits, safe in NATS subjects, KV keys and URLs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Key(String);

impl Key {
    pub const LEN: usize = 32;

    /// Accepts only what [`Matchup::key`] produces, so a key from a URL is safe to use anywhere.
    pub fn parse(s: &str) -> Option<Key> {
        let ok = s.len() == Key::LEN && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| Key(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Key {
    type Error = String;
    fn try_from(s: String) -> Result<Key, String> {
        Key::parse(&s).ok_or_else(|| format!("not a matchup key: {s:?}"))
    }
}

impl From<Key> for String {
    fn from(k: Key) -> String {
        k.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(a: &str, b: &str) -> Key {
        Matchup::parse(Some(a), Some(b))
            .unwrap()
            .key(Kind::Text, 1, "m")
    }

    #[test]
    fn order_case_and_white_space_variants_share_a_key() {
        let k = key("Batman", "Superman");
        assert_eq!(k, key("superman", "  BATMAN "));
        assert_eq!(key("\u{3000}SUPERMAN\t", "batman"), k);
        assert_eq!(key("Mary  Jane", "X"), key("mary jane", "x"));
        assert_eq!(key("Straße", "X"), key("STRASSE", "x"));
        // Full-width letters are NFKC-equivalent to ASCII.
        assert_eq!(key("Ｂａｔｍａｎ", "Superman"), k);
    }

    #[test]
    fn the_ascii_shortcut_folds_as_the_full_recipe_does() {
        let printable: String = (' '..='~').collect();
        for name in [
            printable.as_str(),
            "Batman",
            "MARY  jane",
            "R2-D2 & C-3PO",
            " x   y ",
        ] {
            let parsed = Name::parse("a", Some(name)).unwrap();
            assert_eq!(parsed.canonical(), fold(name.trim()), "{name:?}");
        }
    }

    #[test]
    fn different_pairs_models_and_versions_have_different_keys() {
        let m = Matchup::parse(Some("Batman"), Some("Superman")).unwrap();
        assert_ne!(m.key(Kind::Text, 1, "m"), m.key(Kind::Text, 2, "m"));
        assert_ne!(m.key(Kind::Text, 1, "m"), m.key(Kind::Text, 1, "n"));
        assert_ne!(m.key(Kind::Text, 1, "m"), m.key(Kind::Image, 1, "m"));
        assert_ne!(key("Batman", "Superman"), key("Batman", "Joker"));
    }

    #[test]
    fn display_names_are_trimmed_and_collapsed_but_keep_their_case() {
        let m = Matchup::parse(Some("  Mary   Jane "), Some("X")).unwrap();
        assert_eq!(m.a.display(), "Mary Jane");
    }

    #[test]
    fn bad_names_are_refused_with_a_reason() {
        let long = "x".repeat(101);
        assert_eq!(Name::parse("a", None), Err(NameError::Missing("a")));
        assert_eq!(Name::parse("a", Some("  ")), Err(NameError::Empty("a")));
        assert_eq!(Name::parse("b", Some(&long)), Err(NameError::TooLong("b")));
        assert_eq!(
            Name::parse("a", Some("Bat\u{7}man")),
            Err(NameError::ControlCharacter("a"))
        );
        let hundred = format!("  {}  ", "é".repeat(100));
        assert!(Name::parse("a", Some(&hundred)).is_ok());
    }

    #[test]
    fn keys_from_urls_are_checked() {
        let k = key("a", "b");
        assert_eq!(Key::parse(k.as_str()), Some(k));
        assert_eq!(Key::parse("../etc/passwd"), None);
        assert_eq!(Key::parse(&"A".repeat(32)), None);
    }
}
