//! What a request asks for: the two names it gives, and the job they derive, key included.
//! Every route (text, pictures, pre-warm, purge) derives keys here, so one request always
//! names the same answer whichever route it takes.

use axum::{
    Json,
    extract::{FromRequest, FromRequestParts, Query, Request},
    http::request::Parts,
};
use serde::Deserialize;
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
#[derive(Debug, Deserialize)]
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

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<QueryFight, ApiError> {
        let Query(request) = Query::<FightRequest>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
        Ok(QueryFight(request))
    }
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
        let key = self.recipe(kind).key(&matchup);
        Ok(Ask { kind, key, matchup })
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
