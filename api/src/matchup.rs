//! What a request asks for: the two names it gives, and the job they derive, key included.
//! Every route (text, pictures, pre-warm, purge) derives keys here, so one request always
//! names the same answer whichever route it takes.

use axum::{
    Json,
    extract::{FromRequest, FromRequestParts, Request},
    http::request::Parts,
};
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use versus_shared::{
    key::{Key, Matchup, NameError},
    recipe::Recipe,
    wire::{Job, Kind},
};

use crate::{app::App, error::ApiError};

/// The largest JSON body the public routes read: two names of at most 100 characters fit
/// many times over; anything larger is refused before it is read whole.
pub(crate) const BODY_LIMIT: usize = 4 * 1024;

/// The names of a matchup, in a JSON body (`POST /v1/fights`, `POST /v1/images`, a pre-warm
/// batch's entries) as in a query string.
// As given: a name missing or null is `missing_name` when the names are validated (`App::ask`),
// not a malformed body. The schema says what a valid request holds.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct Names {
    #[schema(value_type = Name, example = "Batman")]
    a: Option<Name>,
    #[schema(value_type = Name, example = "Superman")]
    b: Option<Name>,
}

/// An opponent's name: 1 to 100 characters after trimming (1,024 bytes at most), without
/// control, invisible, unassigned or private-use characters, at most 4 combining marks in a
/// row, and not mixing scripts the way look-alikes do. "A vs B" and "B vs A" are the same
/// matchup, and so are names that differ only in case, white space or Unicode form.
///
/// JSON Schema can say only some of it (the pattern: something besides white space, no
/// control characters); the API checks the rest and answers 400 with the rule's code.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(
    min_length = 1,
    max_length = 1024,
    pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$",
    example = "Batman"
)]
pub(crate) struct Name(String);

impl Name {
    fn as_str(&self) -> &str {
        &self.0
    }
}

impl Names {
    pub(crate) fn new(a: String, b: String) -> Names {
        Names {
            a: Some(Name(a)),
            b: Some(Name(b)),
        }
    }

    /// Reads `{"a","b"}` from a JSON object (other members are ignored): anything but a string
    /// or null in a name's place is refused, naming the member.
    pub(crate) fn from_object(body: Map<String, Value>) -> Result<Names, ApiError> {
        // From an object only: serde would read a derived struct from an array `["A","B"]` too.
        // Only a name's value can be wrong, so the error's path is that name.
        serde_path_to_error::deserialize(body)
            .map_err(|e| ApiError::InvalidBody(format!("`{}` must be a string", e.path())))
    }

    /// The names, validated (each with the code of the rule it breaks, `a` first).
    pub(crate) fn matchup(&self) -> Result<Matchup, NameError> {
        Matchup::parse(
            self.a.as_ref().map(Name::as_str),
            self.b.as_ref().map(Name::as_str),
        )
    }

    /// Reads `a` and `b` from a query string (other parameters are ignored).
    pub(crate) fn from_query(query: &str) -> Result<Names, ApiError> {
        let mut names = Names { a: None, b: None };
        for (name, value) in query_pairs(query)? {
            let field = match name.as_str() {
                "a" => &mut names.a,
                "b" => &mut names.b,
                _ => continue,
            };
            if field.replace(Name(value)).is_some() {
                return Err(ApiError::InvalidQuery(format!("`{name}` is given twice")));
            }
        }
        Ok(names)
    }
}

/// The names of a JSON body `{"a","b"}`; anything else is bad input (400), like a bad name.
pub(crate) struct JsonFight(pub Names);

impl<S: Send + Sync> FromRequest<S> for JsonFight {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<JsonFight, ApiError> {
        let Json(body) = Json::<Map<String, Value>>::from_request(request, state)
            .await
            .map_err(|e| ApiError::InvalidBody(e.body_text()))?;
        Ok(JsonFight(Names::from_object(body)?))
    }
}

/// The names of a query string `?a=A&b=B`; a malformed one is bad input (400).
pub(crate) struct QueryFight(pub Names);

impl<S: Send + Sync> FromRequestParts<S> for QueryFight {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<QueryFight, ApiError> {
        Names::from_query(parts.uri.query().unwrap_or_default()).map(QueryFight)
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
    /// The names, each alias replaced by its canonical name.
    pub matchup: Matchup,
    /// Whether a name was an alias.
    pub aliased: bool,
}

impl Ask {
    /// Counts a hit whose spelling differs from the one its answer was made for (`Spider Man`
    /// served `Spider-Man`'s answer, `Kakarot` an alias's `Goku`): an answer the match keys
    /// and the aliases saved (`versus_spellings_merged_total{kind}`). `a` and `b` are the stored
    /// answer's names. The names are parsed again only when they are not the request's own, in
    /// either order.
    pub(crate) fn count_merged(&self, a: &str, b: &str) {
        let merged = self.aliased || {
            let (ra, rb) = (self.matchup.a.display(), self.matchup.b.display());
            (ra, rb) != (a, b)
                && (ra, rb) != (b, a)
                && Matchup::parse(Some(a), Some(b))
                    .is_ok_and(|stored| stored.canonical_pair() != self.matchup.canonical_pair())
        };
        if merged {
            metrics::counter!("versus_spellings_merged_total", "kind" => self.kind.as_str())
                .increment(1);
        }
    }
}

impl App {
    /// Validates the names, puts each alias's canonical name in its place, and derives the key
    /// of the answer of `kind`: the match keys, the prompt version and the model (with the
    /// picture size, for pictures), as [`Recipe`] makes it (workers check every job against
    /// the same recipe).
    pub(crate) fn ask(&self, names: &Names, kind: Kind) -> Result<Ask, ApiError> {
        let mut matchup = names.matchup()?;
        let aliased = self.inner.aliases.apply(&mut matchup);
        let key = self.key_of(kind, &matchup);
        Ok(Ask {
            kind,
            key,
            matchup,
            aliased,
        })
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
    use serde_json::{Value, json};

    use super::{Names, query_pairs};

    #[test]
    fn a_body_names_the_member_that_is_not_a_string() {
        let read = |body: Value| {
            let Value::Object(body) = body else {
                panic!("not an object")
            };
            Names::from_object(body).map_err(|e| e.to_string())
        };
        let names = read(json!({"a": "Batman", "b": null, "c": 1})).unwrap();
        assert_eq!(names.a.unwrap().0, "Batman");
        assert!(names.b.is_none());
        assert!(read(json!({})).is_ok());
        assert_eq!(read(json!({"a": 1})).unwrap_err(), "`a` must be a string");
        assert_eq!(
            read(json!({"a": "x", "b": []})).unwrap_err(),
            "`b` must be a string"
        );
        assert_eq!(
            read(json!({"b": {}, "a": true})).unwrap_err(),
            "`a` must be a string"
        );
    }

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
