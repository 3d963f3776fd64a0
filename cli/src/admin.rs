//! The API's admin routes, as a typed client. The token goes in a header marked sensitive and
//! is never part of a message.

use std::time::Duration;

use anyhow::{Context, anyhow};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use versus_shared::key::Key;

use crate::Error;
use crate::input::Pair;

/// The variable that holds the admin token (the API reads the same one).
pub const TOKEN_VAR: &str = versus_shared::config::ADMIN_TOKEN_VAR;

/// `POST /v1/admin/prewarm`'s answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Submitted {
    pub batch: String,
    pub total: u64,
    pub already_cached: u64,
    pub queued: u64,
}

/// `GET /v1/admin/prewarm/{batch}`'s answer: `done + failed + pending == total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Progress {
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    pub pending: u64,
}

/// One entry of `GET /v1/admin/popular`.
#[derive(Debug, Clone, Deserialize)]
pub struct Popular {
    pub key: String,
    pub a: String,
    pub b: String,
    pub requests: u64,
    pub cached: bool,
}

#[derive(Deserialize)]
struct PopularList {
    matchups: Vec<Popular>,
}

/// One entry of `GET /v1/admin/reports`: an answer users reported, and what became of it.
#[derive(Debug, Clone, Deserialize)]
pub struct Report {
    /// `text` or `image`.
    pub kind: String,
    pub key: String,
    pub a: String,
    pub b: String,
    /// `open`, `hidden` (enough clients said unsafe), `kept` or `refused`.
    pub state: String,
    pub counts: Counts,
    /// When the last report came (RFC 3339).
    pub last_at: String,
}

/// How many clients reported an answer, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Counts {
    #[serde(default, rename = "unsafe")]
    pub unsafe_: u64,
    #[serde(default)]
    pub wrong: u64,
    #[serde(default)]
    pub poor: u64,
    #[serde(default)]
    pub other: u64,
}

#[derive(Deserialize)]
struct ReportList {
    reports: Vec<Report>,
}

/// An alias: a name the API takes for another (`Kakarot` for `Goku`), as
/// `PUT /v1/admin/aliases/{alias}` answers it and `GET /v1/admin/aliases` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Alias {
    pub alias: String,
    pub canonical: String,
}

#[derive(Deserialize)]
struct AliasList {
    aliases: Vec<Alias>,
}

/// Why the API refused a request (400): its code (`invalid_body`, `mixed_scripts`…) and
/// message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct Refusal {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Refusal,
}

impl Refusal {
    /// What the API said in `body`: its `{"error":{"code","message"}}`, or else the start of
    /// the text as the message.
    fn of(body: &str) -> Refusal {
        match serde_json::from_str::<ErrorBody>(body) {
            Ok(ErrorBody { error }) if !error.message.is_empty() => error,
            _ => Refusal {
                code: String::new(),
                message: body.trim().chars().take(200).collect(),
            },
        }
    }
}

pub struct Admin {
    http: reqwest::Client,
    base: Url,
    token: HeaderValue,
}

impl Admin {
    /// A client for the API at `api`, with the token from [`TOKEN_VAR`].
    pub fn from_env(api: &str) -> Result<Admin, Error> {
        let raw = std::env::var(TOKEN_VAR).unwrap_or_default();
        // Trimmed as the API trims its own.
        let token = versus_shared::config::trimmed_admin_token(&raw);
        if token.is_empty() {
            return Err(Error::BadInput(format!(
                "{TOKEN_VAR} is not set: export the API's admin token in it"
            )));
        }
        Admin::new(api, token)
    }

    pub fn new(api: &str, token: &str) -> Result<Admin, Error> {
        let mut base = Url::parse(api)
            .map_err(|e| Error::BadInput(format!("--api {api:?} is not a URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::BadInput(format!(
                "--api {api:?} is not an http(s) URL"
            )));
        }
        // Routes are joined onto the base, so an API behind a path prefix works too.
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let mut token = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            Error::BadInput(format!("{TOKEN_VAR} holds characters a header cannot"))
        })?;
        token.set_sensitive(true);
        versus_shared::tls::install();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        Ok(Admin { http, base, token })
    }

    pub async fn prewarm(&self, matchups: &[Pair], images: bool) -> anyhow::Result<Submitted> {
        let body = json!({ "matchups": matchups, "images": images });
        let request = self.request(Method::POST, &["prewarm"])?.json(&body);
        json_of(self.send(request, "submitting the matchups").await?).await
    }

    pub async fn progress(&self, batch: &str) -> anyhow::Result<Progress> {
        let request = self.request(Method::GET, &["prewarm", batch])?;
        json_of(self.send(request, "reading the batch's progress").await?).await
    }

    pub async fn popular(&self, limit: u32, pending: bool) -> anyhow::Result<Vec<Popular>> {
        let mut url = self.url(&["popular"])?;
        url.query_pairs_mut()
            .append_pair("limit", &limit.to_string())
            .append_pair("pending", &pending.to_string());
        let request = self.authorized(Method::GET, url);
        let list: PopularList =
            json_of(self.send(request, "listing the popular matchups").await?).await?;
        Ok(list.matchups)
    }

    /// Purges `key`: true when it was there, false when the API does not know it.
    pub async fn purge(&self, key: &Key) -> anyhow::Result<bool> {
        let request = self.request(Method::DELETE, &["fights", key.as_str()])?;
        self.done_unless_unknown(request, "purging the answer")
            .await
    }

    /// The answers users reported: hidden ones first, then the most reported unsafe.
    pub async fn reports(&self) -> anyhow::Result<Vec<Report>> {
        let request = self.request(Method::GET, &["reports"])?;
        let list: ReportList =
            json_of(self.send(request, "listing the reported answers").await?).await?;
        Ok(list.reports)
    }

    /// Settles the reports of the `kind` answer `key` with `action` (`keep`, `purge` or
    /// `refuse`): true when done, false when the API holds no report of that answer.
    pub async fn settle(&self, kind: &str, key: &Key, action: &str) -> anyhow::Result<bool> {
        let request = self
            .request(Method::POST, &["reports", kind, key.as_str()])?
            .json(&json!({ "action": action }));
        self.done_unless_unknown(request, "settling the reports")
            .await
    }

    /// Makes `alias` stand for `canonical`: the alias as the API holds it, or why it refused
    /// (a name it does not take, or a chain or cycle of aliases).
    pub async fn set_alias(
        &self,
        alias: &str,
        canonical: &str,
    ) -> anyhow::Result<Result<Alias, Refusal>> {
        let request = self
            .request(Method::PUT, &["aliases", &segment(alias)])?
            .json(&json!({ "canonical": canonical }));
        match self
            .done_unless_refused(request, "adding the alias")
            .await?
        {
            Ok(response) => Ok(Ok(json_of(response).await?)),
            Err(refusal) => Ok(Err(refusal)),
        }
    }

    /// Removes the alias `alias`: true when it was there, false when the API does not know it.
    pub async fn remove_alias(&self, alias: &str) -> anyhow::Result<bool> {
        let request = self.request(Method::DELETE, &["aliases", &segment(alias)])?;
        self.done_unless_unknown(request, "removing the alias")
            .await
    }

    /// Every alias, as the API lists them.
    pub async fn aliases(&self) -> anyhow::Result<Vec<Alias>> {
        let request = self.request(Method::GET, &["aliases"])?;
        let list: AliasList = json_of(self.send(request, "listing the aliases").await?).await?;
        Ok(list.aliases)
    }

    /// Sends `request` (`what` it does): true when done, false when the API answered 404.
    async fn done_unless_unknown(
        &self,
        request: RequestBuilder,
        what: &str,
    ) -> anyhow::Result<bool> {
        let response = self.sent(request, what).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        check(response, what).await?;
        Ok(true)
    }

    /// Sends `request` (`what` it does): the response when done, what the API said when it
    /// answered 400.
    async fn done_unless_refused(
        &self,
        request: RequestBuilder,
        what: &str,
    ) -> anyhow::Result<Result<Response, Refusal>> {
        let response = self.sent(request, what).await?;
        if response.status() == StatusCode::BAD_REQUEST {
            let body = response.text().await.unwrap_or_default();
            return Ok(Err(Refusal::of(&body)));
        }
        Ok(Ok(check(response, what).await?))
    }

    /// A request to `/v1/admin/<segments…>`.
    fn request(&self, method: Method, segments: &[&str]) -> anyhow::Result<RequestBuilder> {
        Ok(self.authorized(method, self.url(segments)?))
    }

    /// The URL of `/v1/admin/<segments…>`, each segment escaped.
    fn url(&self, segments: &[&str]) -> anyhow::Result<Url> {
        let mut url = self.base.join("v1/admin")?;
        url.path_segments_mut()
            .map_err(|()| anyhow!("the API URL cannot take a path"))?
            .extend(segments);
        Ok(url)
    }

    fn authorized(&self, method: Method, url: Url) -> RequestBuilder {
        self.http
            .request(method, url)
            .header(AUTHORIZATION, self.token.clone())
    }

    /// Sends `request` (`what` it does): the response if it succeeded, else an error.
    async fn send(&self, request: RequestBuilder, what: &str) -> anyhow::Result<Response> {
        check(self.sent(request, what).await?, what).await
    }

    /// Sends `request` (`what` it does): the response, whatever its status.
    async fn sent(&self, request: RequestBuilder, what: &str) -> anyhow::Result<Response> {
        request.send().await.map_err(|e| self.unreachable(what, e))
    }

    fn unreachable(&self, what: &str, e: reqwest::Error) -> anyhow::Error {
        // Without the URL: the base is named once, and reqwest's own text stays short.
        let e = error_chain(&e.without_url());
        anyhow!("{what}: cannot reach the API at {}: {e}", self.base)
    }
}

/// A name as a path segment. URLs drop a segment `.` or `..` (even escaped): with a blank
/// before it, which the API trims as it trims every name, it stays the name.
fn segment(name: &str) -> std::borrow::Cow<'_, str> {
    match name {
        "." | ".." => format!(" {name}").into(),
        _ => name.into(),
    }
}

/// The response if it succeeded; else an error naming the status and the API's message.
async fn check(response: Response, what: &str) -> anyhow::Result<Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    let message = Refusal::of(&body).message;
    let hint = if status == StatusCode::UNAUTHORIZED {
        format!(" ({TOKEN_VAR} must match the API's)")
    } else {
        String::new()
    };
    let message = if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    };
    Err(anyhow!("{what}: the API answered {status}{message}{hint}"))
}

async fn json_of<T: DeserializeOwned>(response: Response) -> anyhow::Result<T> {
    let url = response.url().path().to_owned();
    response
        .json()
        .await
        .with_context(|| format!("the API's answer to {url} is not what this CLI expects"))
}

/// reqwest's error and its sources in one line ("error sending request: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_joined_onto_the_base_and_escaped() {
        let admin = Admin::new("https://ops.example/versus", "t").unwrap();
        let url = admin.url(&["prewarm", "a b/c"]).unwrap();
        assert_eq!(
            url.as_str(),
            "https://ops.example/versus/v1/admin/prewarm/a%20b%2Fc"
        );
        let admin = Admin::new("http://127.0.0.1:8080", "t").unwrap();
        assert_eq!(
            admin.url(&["popular"]).unwrap().as_str(),
            "http://127.0.0.1:8080/v1/admin/popular"
        );
    }

    #[test]
    fn an_alias_is_one_escaped_segment() {
        let admin = Admin::new("http://127.0.0.1:8080", "t").unwrap();
        assert_eq!(
            admin.url(&["aliases", "Son Gokū/孫悟空?"]).unwrap().path(),
            "/v1/admin/aliases/Son%20Gok%C5%AB%2F%E5%AD%AB%E6%82%9F%E7%A9%BA%3F"
        );
    }

    #[test]
    fn an_alias_of_dots_is_still_a_segment() {
        let admin = Admin::new("http://127.0.0.1:8080", "t").unwrap();
        for (name, path) in [
            (".", "/v1/admin/aliases/%20."),
            ("..", "/v1/admin/aliases/%20.."),
            ("...", "/v1/admin/aliases/..."),
            ("%2E", "/v1/admin/aliases/%252E"),
        ] {
            let url = admin.url(&["aliases", &segment(name)]).unwrap();
            assert_eq!(url.path(), path, "{name:?}");
        }
    }

    #[test]
    fn a_refusal_is_the_apis_code_and_message_or_else_its_text() {
        let body =
            r#"{"error":{"code":"invalid_body","message":"Goku is itself an alias of Son Goku"}}"#;
        assert_eq!(
            Refusal::of(body),
            Refusal {
                code: "invalid_body".to_owned(),
                message: "Goku is itself an alias of Son Goku".to_owned(),
            }
        );
        assert_eq!(Refusal::of("  bad request\n").message, "bad request");
        assert_eq!(Refusal::of("").message, "");
    }

    #[test]
    fn an_api_url_that_is_not_http_is_bad_input() {
        for api in ["127.0.0.1:8080", "ftp://x", "not a url"] {
            assert!(
                matches!(Admin::new(api, "t"), Err(Error::BadInput(_))),
                "{api}"
            );
        }
    }
}
