//! Traces across the bus: `tracing` spans exported with OpenTelemetry's OTLP exporter, and
//! W3C trace context (`traceparent`, `tracestate`) carried from the API's request through the
//! job's NATS headers to the worker, and back on the generation's events.
//!
//! Export is on when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the exporter and the batch processor read
//! the other standard variables themselves (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*`,
//! `OTEL_TRACES_SAMPLER`). When it is not set there is no OpenTelemetry layer at all: every
//! span of ours is disabled at its call site, nothing is injected into any header, and every
//! helper here returns at once.
//!
//! Architecture Invariant: the OpenTelemetry crates are used here only; the API and the
//! workers make spans with `tracing` and cross the bus through these helpers.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanContext, TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    runtime,
    trace::{SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{Layer, filter::Targets, registry::LookupSpan};

/// The variables that turn export on (the first is the traces-only one).
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The crates whose spans and events are exported: ours.
const OUR_CRATES: [&str; 3] = ["versus_api", "versus_worker", "versus_shared"];

/// What each binary's `--help` says about traces (they are no flags of ours).
pub const HELP: &str = "Traces: set OTEL_EXPORTER_OTLP_ENDPOINT to an OTLP/HTTP collector \
(Jaeger, Tempo, the OpenTelemetry Collector: http://127.0.0.1:4318) to export spans; the \
other standard OTEL_* variables apply (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, \
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_TIMEOUT, \
OTEL_BSP_SCHEDULE_DELAY, OTEL_TRACES_SAMPLER). Unset, nothing is exported.";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint was set at start-up).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether `target` (a span's or an event's) is one of our crates.
pub fn is_ours(target: &str) -> bool {
    OUR_CRATES.iter().any(|c| {
        target
            .strip_prefix(c)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// The tracer provider, to flush and shut down at exit; does nothing when export is off.
#[must_use = "shut it down at exit, or the last spans are lost"]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

/// How long [`Traces::shutdown`] waits for the last spans to go out.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

impl Traces {
    /// Exports the spans still buffered and stops the exporter, waiting up to 5 s (a
    /// collector that is down does not hold the exit up longer).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK blocks the calling thread until its batch task, on this runtime, has
        // exported: not on one of the runtime's workers.
        let done = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "flushing the last spans failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing the last spans failed"),
            Err(_) => tracing::warn!(?SHUTDOWN_TIMEOUT, "flushing the last spans timed out"),
        }
    }
}

/// The OpenTelemetry layer for `service` (its default `service.name`, unless
/// `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` names one) when an OTLP endpoint is
/// set, or None; and the provider to shut down at exit. Must run on the tokio runtime, where
/// the batch processor's task lives.
pub fn layer<S>(service: &'static str) -> anyhow::Result<(Option<impl Layer<S>>, Traces)>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let configured = ENDPOINT_VARS
        .iter()
        .any(|var| std::env::var(var).is_ok_and(|v| !v.trim().is_empty()));
    if !configured {
        return Ok((None, Traces { provider: None }));
    }
    // The exporter's reqwest client needs the process's TLS provider, even for plain HTTP.
    crate::tls::install();
    let exporter = SpanExporter::builder()
        .with_http()
        .build()
        .context("setting up the OTLP exporter (OTEL_EXPORTER_OTLP_*)")?;
    let processor = BatchSpanProcessor::builder(exporter, runtime::Tokio).build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource(service))
        .build();
    let ours = OUR_CRATES.iter().fold(Targets::new(), |t, c| {
        t.with_target(*c, tracing::Level::INFO)
    });
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("versus"))
        // No clock reads on every poll of an instrumented future, no thread or target noise.
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_target(false)
        .with_filter(ours);
    ENABLED.store(true, Ordering::Relaxed);
    Ok((
        Some(layer),
        Traces {
            provider: Some(provider),
        },
    ))
}

/// The standard resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), with `service`
/// as the name when they give none, and this build's version.
fn resource(service: &'static str) -> Resource {
    let version = KeyValue::new("service.version", env!("CARGO_PKG_VERSION"));
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::new("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let builder = Resource::builder().with_attribute(version);
    if named {
        builder.build()
    } else {
        builder.with_service_name(service).build()
    }
}

/// Where a span is in its trace, kept to link to it later (a coalesced join links to the
/// flight it joined). Empty when export is off.
#[derive(Debug, Clone, Default)]
pub struct Link(Option<SpanContext>);

impl Link {
    /// Where `span` is (nothing when export is off, or the span is disabled).
    pub fn of(span: &Span) -> Link {
        if !enabled() {
            return Link(None);
        }
        let cx = span.context();
        let span_cx = cx.span().span_context().clone();
        Link(span_cx.is_valid().then_some(span_cx))
    }
}

/// Links `span` to `to` (a request that joined a generation already in flight, to the flight's
/// span), and marks it `versus.coalesced`.
pub fn link(span: &Span, to: &Link) {
    let Link(Some(to)) = to else {
        return;
    };
    span.add_link(to.clone());
    span.set_attribute("versus.coalesced", true);
}

/// Links `span` to the trace whose context `headers` carry (a generation's events, read by
/// an API that did not start it), unless that is `span`'s own trace.
pub fn link_foreign(span: &Span, headers: &async_nats::HeaderMap) {
    if !enabled() {
        return;
    }
    let theirs = TraceContextPropagator::new().extract(&NatsHeaders(headers));
    let theirs = theirs.span().span_context().clone();
    if !theirs.is_valid() {
        return;
    }
    let ours = span.context();
    if ours.span().span_context().trace_id() != theirs.trace_id() {
        span.add_link(theirs);
    }
}

/// Headers that carry `span`'s trace context across NATS (`traceparent`, `tracestate`), or
/// None when export is off or the span is not sampled.
pub fn headers(span: &Span) -> Option<async_nats::HeaderMap> {
    if !enabled() {
        return None;
    }
    let mut headers = async_nats::HeaderMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut NatsInjector(&mut headers));
    (!headers.is_empty()).then_some(headers)
}

/// Makes `span` continue the trace whose context a NATS message carries, if any. Call it
/// before the span is first entered.
pub fn continue_from(span: &Span, headers: Option<&async_nats::HeaderMap>) {
    if !enabled() {
        return;
    }
    let Some(headers) = headers else {
        return;
    };
    set_parent(
        span,
        TraceContextPropagator::new().extract(&NatsHeaders(headers)),
    );
}

/// Makes `span` continue the trace of an HTTP request's `traceparent` (and `tracestate`) when
/// `trusted` (the request came from a proxy the operator trusts); from anyone else, they are
/// ignored and the span starts a trace of its own, so that no client can put its spans in
/// another's trace, or pick the ids and sampling of ours. Call it before the span is first
/// entered.
pub fn continue_http(span: &Span, headers: &axum::http::HeaderMap, trusted: bool) {
    if !enabled() || !trusted || !headers.contains_key("traceparent") {
        return;
    }
    set_parent(
        span,
        TraceContextPropagator::new().extract(&HttpHeaders(headers)),
    );
}

fn set_parent(span: &Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        // Only fails for a disabled span or one already started, and then it keeps its own.
        let _ = span.set_parent(parent);
    }
}

/// Records a moment in `span` (an upstream's first token): an event of the exported span,
/// not a log line.
pub fn event(span: &Span, name: &'static str) {
    if enabled() {
        span.add_event(name, Vec::new());
    }
}

struct NatsInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct NatsHeaders<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

struct HttpHeaders<'a>(&'a axum::http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_crates_are_told_from_others() {
        assert!(is_ours("versus_api"));
        assert!(is_ours("versus_worker::openai"));
        assert!(is_ours("versus_shared::traces"));
        assert!(!is_ours("versus_sim"));
        assert!(!is_ours("versus_apix"));
        assert!(!is_ours("hyper::proto"));
    }

    #[test]
    fn trace_context_crosses_nats_headers_and_back() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut http = axum::http::HeaderMap::new();
        http.insert("traceparent", parent.parse().unwrap());
        let cx = TraceContextPropagator::new().extract(&HttpHeaders(&http));
        let mut nats = async_nats::HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut NatsInjector(&mut nats));
        assert_eq!(nats.get("traceparent").map(|v| v.as_str()), Some(parent));
        let back = TraceContextPropagator::new().extract(&NatsHeaders(&nats));
        assert_eq!(
            back.span().span_context().trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
    }

    #[test]
    fn nothing_is_carried_when_export_is_off() {
        assert!(!enabled());
        assert!(headers(&Span::current()).is_none());
        assert!(Link::of(&Span::current()).0.is_none());
    }
}
