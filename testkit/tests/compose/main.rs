//! `compose.yaml` and the `Dockerfile`, checked without a Docker engine: the file is valid
//! against the Compose Specification's schema and whole in every profile; it sets only
//! variables the programs read, gives workers longer to stop than they drain, and picks the
//! upstream from `OPENAI_API_KEY` alone; the owner migrates and the programs log in to Postgres
//! as their roles; its healthchecks work against a real server; every image is pinned.
//!
//! The programs' side comes from the built binaries (`--help`, as `scripts/test` builds them)
//! and the scripts they run under (`/bin/sh`, `bash`), never from a copy kept here.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod file;
mod images;
mod postgres;
mod programs;
mod spec;
mod topology;
mod upstream;
