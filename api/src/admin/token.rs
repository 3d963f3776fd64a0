//! The admin token (`VERSUS_ADMIN_TOKEN`), as the API keeps it and checks a request's.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use versus_shared::config::{ADMIN_TOKEN_MIN_CHARS, ADMIN_TOKEN_VAR, Secret, trimmed_admin_token};

/// The admin token, kept as its SHA-256 digest: a request's token is compared digest to
/// digest, in constant time, so that neither the time taken nor the length compared says
/// anything about the token.
pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    /// The token `VERSUS_ADMIN_TOKEN` holds, trimmed as the CLI trims it: None when unset or
    /// empty (the admin routes refuse everything); an error, which never quotes it, when it
    /// is shorter than [`ADMIN_TOKEN_MIN_CHARS`].
    pub fn parse(raw: Option<&Secret>) -> anyhow::Result<Option<AdminToken>> {
        let Some(token) = raw
            .map(|t| trimmed_admin_token(t.expose()))
            .filter(|t| !t.is_empty())
        else {
            return Ok(None);
        };
        let chars = token.chars().count();
        anyhow::ensure!(
            chars >= ADMIN_TOKEN_MIN_CHARS,
            "{ADMIN_TOKEN_VAR} is too short ({chars} characters): it must hold at least \
             {ADMIN_TOKEN_MIN_CHARS} once trimmed, such as the 64 that `openssl rand -hex 32` \
             prints; or leave it unset to turn the admin routes off"
        );
        Ok(Some(AdminToken {
            digest: Sha256::digest(token.as_bytes()).into(),
        }))
    }

    /// Whether `given` (trimmed likewise) is the token.
    pub(super) fn accepts(&self, given: &str) -> bool {
        let given = Sha256::digest(trimmed_admin_token(given).as_bytes());
        bool::from(given.as_slice().ct_eq(&self.digest))
    }
}

#[cfg(test)]
mod tests {
    use super::{AdminToken, Secret};

    #[test]
    fn a_short_token_is_refused_with_its_variable_named_and_never_quoted() {
        let short = "  0123456789abcdef0123456789abcde \n";
        let error = AdminToken::parse(Some(&Secret::new(short))).err().unwrap();
        let text = format!("{error:#}");
        assert!(text.contains("VERSUS_ADMIN_TOKEN"), "{text}");
        assert!(!text.contains("0123456789abcdef"), "{text}");
        for off in [None, Some(Secret::new("")), Some(Secret::new(" \n"))] {
            assert!(AdminToken::parse(off.as_ref()).unwrap().is_none());
        }
    }

    #[test]
    fn the_token_is_trimmed_and_only_the_whole_of_it_is_accepted() {
        let token = "0123456789abcdef0123456789abcdef";
        let parsed = AdminToken::parse(Some(&Secret::new(format!(" {token}\n"))))
            .unwrap()
            .unwrap();
        assert!(parsed.accepts(token));
        assert!(parsed.accepts(&format!("{token} ")));
        for wrong in [
            "",
            &token[..31],
            &format!("{token}0"),
            &"f".repeat(32),
            &"f".repeat(500),
        ] {
            assert!(!parsed.accepts(wrong), "{wrong}");
        }
    }
}
