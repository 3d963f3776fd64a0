//! What a request asks for: the two names it gives, and the job they derive, key included.
//! Every route (text, pictures, pre-warm, purge) derives keys here, so one request always
//! names the same answer whichever route it takes.

use axum::{
    Json,
    extract::{FromRequest, FromRequestParts, Request},
    http::request::Parts,
};
use serde_json::Value;
use versus_shared::{
    key::{Key, Matchup},
    recipe::Recipe,
    wire::{Job, Kind},
};

use crate::{app::App, error::ApiError};

/// The largest JSON body the public routes read: two names of at most 100 characters fit
/// many times over; anything larger is refused before it is read whole.
pub(crate) const BODY_LIMIT: usize = 4 * 1024;

/// The names of a request, as given (a query string or a JSON body).
#[derive(Debug)]
pub(crate) struct FightRequest {
    a: Option<String>,
    b: Option<String>,
}

impl FightRequest {
    pub(crate) fn new(a: String, b: String) -> FightRequest {
        FightRequest {
            a: Some(a),
            b: Some(b),
        }
    }

    /// Reads `{"a","b"}` from a JSON object; anything else in a name's place is refused.
    pub(crate) fn from_json(
        body: &serde_json::Map<String, Value>,
    ) -> Result<FightRequest, ApiError> {
        let field = |name: &str| match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::InvalidBody(format!("`{name}` must be a string"))),
        };
        Ok(FightRequest {
            a: field("a")?,
            b: field("b")?,
        })
    }
}

/// The names of a JSON body `{"a","b"}`; anything else is bad input (400), like a bad name.
pub(crate) struct JsonFight(pub FightRequest);

impl<S: Send + Sync> FromRequest<S> for JsonFight {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<JsonFight, ApiError> {
        let Json(body) = Json::<serde_json::Map<String, Value>>::from_request(request, state)
            .await
            .map_err(|e| ApiError::InvalidBody(e.body_text()))?;
        Ok(JsonFight(FightRequest::from_json(&body)?))
    }
}

/// The names of a query string `?a=A&b=B`; a malformed one is bad input (400).
pub(crate) struct QueryFight(pub FightRequest);

impl<S: Send + Sync> FromRequestParts<S> for QueryFight {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<QueryFight, ApiError> {
        FightRequest::from_query(parts.uri.query().unwrap_or_default()).map(QueryFight)
    }
}

impl FightRequest {
    /// Reads `a` and `b` from a query string (other parameters are ignored).
    pub(crate) fn from_query(query: &str) -> Result<FightRequest, ApiError> {
        let mut request = FightRequest { a: None, b: None };
        for (name, value) in query_pairs(query)? {
            let field = match name.as_str() {
                "a" => &mut request.a,
                "b" => &mut request.b,
                _ => continue,
            };
            if field.replace(value).is_some() {
                return Err(ApiError::InvalidQuery(format!("`{name}` is given twice")));
            }
        }
        Ok(request)
    }
}

/// The `name=value` pairs of a query string, decoded (`+` is a space, `%XX` a byte). Decoded
/// bytes that are not UTF-8 are bad input (400): they are not names, and turning them into
/// replacement characters would make a matchup of them, and pay for it.
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    let decode = |part: &str| {
        let spaced = part.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8()
            .map(|text| text.into_owned())
            .map_err(|_| ApiError::InvalidQuery("the query string is not valid UTF-8".to_owned()))
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

/// What a request asks for: the validated names and the key of the answer of `kind`. Cheap
/// enough for a cache hit; the job is made from it on a miss only.
pub(crate) struct Ask {
    pub kind: Kind,
    pub key: Key,
    pub matchup: Matchup,
}

impl App {
    /// Validates the names and derives the key of the answer of `kind`: the canonical pair,
    /// the prompt version and the model (with the picture size, for pictures), as
    /// [`Recipe`] makes it (workers check every job against the same recipe).
    pub(crate) fn ask(&self, request: &FightRequest, kind: Kind) -> Result<Ask, ApiError> {
        let matchup = Matchup::parse(request.a.as_deref(), request.b.as_deref())?;
        let key = self.key_of(kind, &matchup);
        Ok(Ask { kind, key, matchup })
    }

    /// The key of the answer of `kind` to a matchup already validated.
    pub(crate) fn key_of(&self, kind: Kind, matchup: &Matchup) -> Key {
        self.recipe(kind).key(matchup)
    }

    /// The job that generates what `ask` asks for, with the same prompt version and model
    /// settings its key was made from, and the display names for the prompt.
    pub(crate) fn job(&self, ask: Ask) -> Job {
        self.recipe(ask.kind).job(&ask.matchup, ask.key)
    }

    fn recipe(&self, kind: Kind) -> Recipe<'_> {
        Recipe::of(kind, &self.inner.settings.models)
    }
}

#[cfg(test)]
mod tests {
    use super::query_pairs;

    #[test]
    fn a_query_is_decoded_strictly() {
        let pairs = query_pairs("a=Bat+man&b=Super%20man&b2=%C3%A9&&flag").unwrap();
        let pairs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("a", "Bat man"),
                ("b", "Super man"),
                ("b2", "é"),
                ("flag", "")
            ]
        );
        assert_eq!(query_pairs("a=%2B").unwrap()[0].1, "+");
        assert!(query_pairs("a=%ff%fe&b=y").is_err());
        assert!(query_pairs("a%ff=x").is_err());
    }
}
