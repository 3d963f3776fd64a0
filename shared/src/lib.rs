//! What the Versus API and workers share, so that the contract between them is one crate:
//!
//! - [`kind`]: the two kinds of answer, text and picture;
//! - [`error_code`]: every error code clients see, with its retryability and its words;
//! - [`aliases`]: names an operator declared to be another, as every process follows them;
//! - [`key`]: validated opponent names and the canonical matchup key;
//! - [`wire`]: subjects, streams, job and event payloads, the edge-cache value (the contract);
//! - [`prompt`]: the prompt templates and their versions, which are part of every key;
//! - [`recipe`]: the model, size and prompt version an answer is made with, and the key and
//!   job they derive (the API makes jobs with it, workers check jobs against it);
//! - [`budget`]: prices, and the daily budget every process watches;
//! - [`bus`]: connecting to NATS and declaring streams and the KV bucket idempotently;
//! - [`history`]: reading a key's stored events (its last one, and all from a point on);
//! - [`db`]: the Postgres pool and the embedded migrations;
//! - [`objects`]: the object store that holds the pictures;
//! - [`config`]: settings both binaries read from the environment;
//! - [`retry`]: every retry and back-off policy, by name;
//! - [`telemetry`]: logs, Prometheus metrics, and the ops routes (`/healthz`, `/readyz`, `/metrics`);
//! - [`traces`]: spans exported over OTLP when asked, and W3C trace context across NATS and HTTP;
//! - [`shutdown`]: one signal handler that drives the shutdown token;
//! - [`tasks`]: every task a process spawns, tracked and waited for;
//! - [`tls`]: the TLS crypto provider for HTTPS clients.

pub mod aliases;
pub mod budget;
pub mod bus;
pub mod config;
pub mod db;
pub mod error_code;
pub mod history;
pub mod key;
pub mod kind;
pub mod objects;
pub mod prompt;
pub mod recipe;
pub mod retry;
pub mod shutdown;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod traces;
pub mod wire;
