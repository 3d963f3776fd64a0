//! The API's OpenAPI 3.1 document, derived from the handlers' annotations and the body types
//! they read and write: served at `/openapi.json` and kept in `docs/openapi.json` (a test fails
//! when the two differ). It only gathers: every type it names lives beside the code that reads
//! or builds it, and no module but the router imports this one.
//!
//! Event streams are described as OpenAPI 3.1 can: the `text/event-stream` schema is one event
//! (`event`, `data`, `id`, as an SSE parser yields it), its `data` a JSON string whose
//! `contentSchema` is that event's data.

use std::sync::OnceLock;

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use utoipa::{
    Modify, OpenApi,
    openapi::{
        self, ContentBuilder, HttpMethod, PathItem, RefOr, ResponseBuilder, Schema,
        path::OperationBuilder,
        schema::{ObjectBuilder, OneOfBuilder, Type},
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

use crate::{admin, fights, images, preview, ready, reports, sse::data, suggest};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Versus",
        description = "Who would win in a fight between A and B? An answer written by an AI model, \
            streamed as it is written, and a picture, each paid for once per unique matchup.",
        license(name = "MIT", identifier = "MIT"),
    ),
    paths(
        fights::stream_fight,
        fights::create_fight,
        fights::get_fight,
        images::stream_image,
        images::create_image,
        images::serve_image,
        images::serve_partial,
        reports::report_fight,
        reports::report_image,
        suggest::suggest,
        admin::prewarm::prewarm,
        admin::prewarm::batch_status,
        admin::popular::popular,
        admin::spend::spend,
        admin::purge::purge,
        admin::reports::list,
        admin::reports::settle,
        admin::aliases::list,
        admin::aliases::put,
        admin::aliases::delete,
        preview::index,
        ready::readyz,
    ),
    components(schemas(
        data::MetaData,
        data::ChunkData,
        data::PartialData,
        data::ResetData,
        data::DoneData,
        data::ImageDoneData,
        data::ErrorData,
    )),
    modifiers(&Additions),
    tags(
        (name = "fights", description = "Text answers: streamed, whole, or by key."),
        (name = "images", description = "Pictures of a matchup."),
        (name = "names", description = "Known names, suggested as visitors type."),
        (name = "admin", description = "Operators: pre-warm batches, popularity, spend, purges, reports, aliases. \
            Every route needs `Authorization: Bearer $VERSUS_ADMIN_TOKEN`. With `VERSUS_OPS_ADDR` \
            set, these routes and `/metrics` are served on that address only."),
        (name = "operations", description = "Probes, metrics, this document and the page."),
    ),
)]
struct ApiDoc;

/// What the derive cannot say: the admin security scheme, the event schemas, and the routes
/// served by closures (the probes, the metrics, this document).
struct Additions;

impl Modify for Additions {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`VERSUS_ADMIN_TOKEN` (at least 32 characters); unset, every admin \
                         route answers 401.",
                    ))
                    .build(),
            ),
        );
        for (path, schema) in [
            ("/v1/fights/stream", "FightEvent"),
            ("/v1/images/stream", "ImageEvent"),
        ] {
            let stream = doc
                .paths
                .paths
                .get_mut(path)
                .and_then(|item| item.get.as_mut())
                .and_then(|op| op.responses.responses.get_mut("200"))
                .and_then(|r| match r {
                    RefOr::T(response) => response.content.get_mut("text/event-stream"),
                    RefOr::Ref(_) => None,
                });
            if let Some(RefOr::T(content)) = stream {
                content.schema = Some(openapi::Ref::from_schema_name(schema).into());
            }
        }
        let components = doc.components.get_or_insert_with(Default::default);
        components.schemas.insert(
            "FightEvent".to_owned(),
            events(&[
                ("meta", "MetaData", None),
                ("chunk", "ChunkData", Some(CHUNK_ID)),
                ("reset", "ResetData", None),
                ("done", "DoneData", None),
                ("error", "ErrorData", None),
            ]),
        );
        components.schemas.insert(
            "ImageEvent".to_owned(),
            events(&[
                ("meta", "MetaData", None),
                ("partial", "PartialData", Some(PARTIAL_ID)),
                ("reset", "ResetData", None),
                ("done", "ImageDoneData", None),
                ("error", "ErrorData", None),
            ]),
        );
        for (path, summary, content_type, description) in [
            (
                "/healthz",
                "Liveness",
                "text/plain; charset=utf-8",
                "The process is alive.",
            ),
            (
                "/metrics",
                "Prometheus metrics",
                "text/plain; charset=utf-8",
                "The process's metrics, Prometheus text format.",
            ),
        ] {
            doc.paths.paths.insert(
                path.to_owned(),
                plain(summary, content_type, description, &[]),
            );
        }
        doc.paths.paths.insert(
            "/openapi.json".to_owned(),
            plain(
                "This document",
                "application/json",
                "The API's OpenAPI 3.1 document (also `docs/openapi.json`).",
                &[],
            ),
        );
    }
}

/// What a chunk's `id` is.
const CHUNK_ID: &str =
    "`<attempt>:<end offset>`: send it back as `Last-Event-ID` to resume after this chunk.";
/// What a partial image's `id` is.
const PARTIAL_ID: &str = "`<attempt>:<index + 1>` (the partial images then held): send it back \
    as `Last-Event-ID` to resume after this partial image.";

/// One event of a stream whose events are `(name, data schema, what its id is if it has one)`.
fn events(kinds: &[(&str, &str, Option<&str>)]) -> RefOr<Schema> {
    let one_of = kinds
        .iter()
        .fold(OneOfBuilder::new(), |one_of, (name, data, id)| {
            let mut event = ObjectBuilder::new()
                .property(
                    "event",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some([*name])),
                )
                .required("event")
                .property(
                    "data",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .content_media_type("application/json")
                        .content_schema(Some(openapi::Ref::from_schema_name(*data))),
                )
                .required("data");
            if let Some(id) = id {
                event = event
                    .property(
                        "id",
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .pattern(Some("^[0-9]+:[0-9]+$"))
                            .description(Some(*id)),
                    )
                    .required("id");
            }
            one_of.item(event)
        });
    RefOr::T(Schema::OneOf(one_of.build()))
}

/// A GET route that answers 200 with `content_type` (a JSON object, or else text) and the
/// `other` statuses.
fn plain(summary: &str, content_type: &str, description: &str, other: &[(u16, &str)]) -> PathItem {
    let body = if content_type == "application/json" {
        Type::Object
    } else {
        Type::String
    };
    let ok = ResponseBuilder::new().description(description).content(
        content_type,
        ContentBuilder::new()
            .schema(Some(ObjectBuilder::new().schema_type(body)))
            .build(),
    );
    let operation = other.iter().fold(
        OperationBuilder::new()
            .tag("operations")
            .summary(Some(summary))
            .response("200", ok),
        |operation, (status, description)| {
            operation.response(
                status.to_string(),
                ResponseBuilder::new().description(*description),
            )
        },
    );
    PathItem::new(HttpMethod::Get, operation)
}

/// The document, as pretty JSON with a final newline (the form of `docs/openapi.json`).
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut json = ApiDoc::openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        json.push('\n');
        json
    })
}

/// `GET /openapi.json`.
pub(crate) async fn serve() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    /// `docs/openapi.json` is the document the code derives. After a change to the API, write it
    /// again with `VERSUS_WRITE_OPENAPI=1 cargo test -p versus-api openapi`.
    #[test]
    fn docs_openapi_json_is_the_derived_document() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let derived = super::document();
        if std::env::var_os("VERSUS_WRITE_OPENAPI").is_some() {
            std::fs::write(path, derived).expect("docs/openapi.json is writable");
        }
        let kept = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            kept == derived,
            "docs/openapi.json differs from the document the code derives: \
             run `VERSUS_WRITE_OPENAPI=1 cargo test -p versus-api openapi` and review the diff"
        );
    }
}
