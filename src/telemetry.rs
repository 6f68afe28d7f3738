//! Logs, traces and metrics: the tracing subscriber (JSON when not on a terminal), OTLP trace
//! export with W3C trace-context propagation when enabled, and the Prometheus text of §11,
//! with the metric names existing dashboards query kept in one place.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt as _};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use crate::billing::Billing;
use crate::config::OtelConfig;
use crate::vm::index::VmIndex;
use crate::vm::VmState;

/// Longest one OTLP export may take.
const OTLP_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether spans are exported; when not, trace headers are neither read nor written.
static TRACING: AtomicBool = AtomicBool::new(false);

/// What `init` set up that outlives the runtime: the span pipeline, flushed at shutdown.
#[must_use = "call shutdown() to flush the spans still queued"]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is queued and stops the exporter. Call outside the async runtime: the
    /// exporter's blocking HTTP client must not be dropped on a runtime thread.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "OTLP: flushing spans at shutdown failed");
            }
        }
    }
}

/// Installs the global subscriber: logs under `log_filter` (validated by the config
/// loader), and, with OTel enabled, every span of this crate exported by OTLP/HTTP
/// whatever the log level. Call before the runtime starts.
pub fn init(log_filter: &str, otel: &OtelConfig) -> Telemetry {
    let filter = EnvFilter::try_new(log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // Spans exist for traces; log lines stay one flat object each.
    let logs = if std::io::stderr().is_terminal() {
        logs.boxed()
    } else {
        logs.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed()
    };
    let (tracer_provider, setup_error) = if otel.enabled {
        match tracer_provider(otel) {
            Ok(provider) => (Some(provider), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let traces = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("metald"))
            .with_filter(filter_fn(|meta| {
                meta.is_span()
                    && meta.target().starts_with("metald")
                    && *meta.level() <= tracing::Level::INFO
            }))
    });
    // Log lines are events; keeping spans away from the log layer means that with OTel off
    // no layer wants a span and none is ever built (GetVmInfo stays as cheap as before).
    let logs = logs.with_filter(filter.and(filter_fn(|meta| !meta.is_span())));
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
    match (&tracer_provider, setup_error) {
        (Some(_), _) => {
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
            TRACING.store(true, Ordering::Relaxed);
            tracing::info!(
                endpoint = otlp_traces_url(&otel.endpoint),
                service_name = otel.service_name,
                sampling_rate = otel.sampling_rate,
                "OTLP trace export"
            );
        }
        (None, Some(e)) => {
            tracing::error!(
                error = e,
                "OTLP trace export could not be set up; no traces are sent"
            );
        }
        (None, None) => {}
    }
    Telemetry { tracer_provider }
}

/// The span pipeline: OTLP/HTTP binary protobuf, batched on the SDK's own thread, sampled
/// by ratio unless the caller's trace decides.
fn tracer_provider(otel: &OtelConfig) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(otlp_traces_url(&otel.endpoint))
        .with_timeout(OTLP_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(otel.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            otel.sampling_rate,
        ))))
        .with_resource(resource)
        .build())
}

/// `UNKEY_METALD_OTEL_ENDPOINT` is compat `host:port` (OTLP/HTTP); a full URL is taken too.
/// Either way the traces path is added when the URL has none.
pub fn otlp_traces_url(endpoint: &str) -> String {
    let endpoint = endpoint.trim().trim_end_matches('/');
    let url = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let has_path = url
        .split_once("://")
        .is_some_and(|(_, rest)| rest.contains('/'));
    if has_path {
        url
    } else {
        format!("{url}/v1/traces")
    }
}

/// Makes `span` continue the caller's trace from its W3C `traceparent`/`tracestate`
/// headers; a request without them starts a trace of its own.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if !TRACING.load(Ordering::Relaxed) {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&opentelemetry_http::HeaderExtractor(headers))
    });
    let _ = span.set_parent(parent);
}

/// Adds the current span's `traceparent` to an outgoing request's headers.
pub fn inject_trace(headers: &mut http::HeaderMap) {
    if !TRACING.load(Ordering::Relaxed) {
        return;
    }
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut opentelemetry_http::HeaderInjector(headers))
    });
}

/// Histogram bucket bounds, seconds.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.counts[i] += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }

    fn render(&self, name: &str, out: &mut String) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            out.push_str(&format!("{name}_bucket{{le=\"{bound}\"}} {c}\n"));
        }
        out.push_str(&format!(
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n",
            self.count, self.sum, self.count
        ));
    }
}

#[derive(Debug, Default)]
struct Inner {
    rpc: BTreeMap<(String, String), u64>,
    /// op → (requests, success, failures, duration)
    vm_ops: BTreeMap<&'static str, (u64, u64, u64, Histogram)>,
}

/// Process-wide counters. One mutex: updates are a few additions per RPC, far cheaper than
/// the RPC itself.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    /// Records one finished RPC.
    pub fn record_rpc(&self, method: &str, code: &str, elapsed: Duration) {
        let op = match method {
            "CreateVm" => Some("create"),
            "BootVm" => Some("boot"),
            "ShutdownVm" => Some("shutdown"),
            "DeleteVm" => Some("delete"),
            _ => None,
        };
        let mut inner = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *inner
            .rpc
            .entry((method.to_owned(), code.to_owned()))
            .or_insert(0) += 1;
        if let Some(op) = op {
            let entry = inner.vm_ops.entry(op).or_default();
            entry.0 += 1;
            if code == "ok" {
                entry.1 += 1;
            } else {
                entry.2 += 1;
            }
            entry.3.observe(elapsed.as_secs_f64());
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, index: &VmIndex, billing: &Billing) -> String {
        let mut out = String::new();
        let inner = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        out.push_str("# TYPE rpc_server_requests_total counter\n");
        for ((method, code), n) in &inner.rpc {
            out.push_str(&format!(
                "rpc_server_requests_total{{rpc_method=\"{method}\",rpc_status=\"{code}\"}} {n}\n"
            ));
        }
        for op in ["create", "boot", "shutdown", "delete"] {
            let (req, ok, fail, hist) = inner.vm_ops.get(op).cloned().unwrap_or_default();
            for (suffix, n) in [("requests", req), ("success", ok), ("failures", fail)] {
                out.push_str(&format!("# TYPE unkey_metald_vm_{op}_{suffix}_total counter\nunkey_metald_vm_{op}_{suffix}_total {n}\n"));
            }
            out.push_str(&format!(
                "# TYPE unkey_metald_vm_{op}_duration_seconds histogram\n"
            ));
            hist.render(&format!("unkey_metald_vm_{op}_duration_seconds"), &mut out);
        }
        let by_state = index.count_by_state();
        out.push_str("# TYPE metald_vms gauge\n");
        for s in [
            VmState::Created,
            VmState::Running,
            VmState::Paused,
            VmState::Shutdown,
        ] {
            out.push_str(&format!(
                "metald_vms{{state=\"{}\"}} {}\n",
                s.name(),
                by_state.get(&s).copied().unwrap_or(0)
            ));
        }
        let c = &billing.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let status = billing.status();
        let batches = load(&c.batches_sent);
        let ticks = load(&c.collection_ticks);
        for (name, kind, value) in [
            (
                "metald_billing_batches_sent_total",
                "counter",
                batches as f64,
            ),
            (
                "metald_heartbeat_sent_total",
                "counter",
                load(&c.heartbeats_sent) as f64,
            ),
            (
                "metald_metrics_collected_total",
                "counter",
                load(&c.samples_collected) as f64,
            ),
            (
                "metald_billing_spool_depth",
                "gauge",
                status.spool_depth as f64,
            ),
            (
                "metald_billing_spool_bytes",
                "gauge",
                status.spool_bytes as f64,
            ),
            (
                "metald_billing_spool_oldest_age_seconds",
                "gauge",
                status.oldest_age_seconds,
            ),
            (
                "metald_billing_rejected_batches_total",
                "counter",
                status.rejected_batches as f64,
            ),
            (
                "metald_billing_dropped_samples_total",
                "counter",
                status.dropped_samples as f64,
            ),
            (
                "metald_billing_reachable",
                "gauge",
                if status.reachable { 1.0 } else { 0.0 },
            ),
        ] {
            out.push_str(&format!("# TYPE {name} {kind}\n{name} {value}\n"));
        }
        // Summaries: total seconds and count (enough for rate-of-average queries).
        for (name, micros, count) in [
            (
                "metald_billing_batch_send_duration_seconds",
                load(&c.batch_send_micros),
                batches,
            ),
            (
                "metald_metrics_collection_duration_seconds",
                load(&c.collection_micros),
                ticks,
            ),
        ] {
            out.push_str(&format!(
                "# TYPE {name} summary\n{name}_sum {}\n{name}_count {count}\n",
                micros as f64 / 1e6
            ));
        }
        out.push_str(&format!(
            "# TYPE metald_docker_event_stream_reconnects_total counter\nmetald_docker_event_stream_reconnects_total {}\n",
            crate::service::watch::RECONNECTS.load(std::sync::atomic::Ordering::Relaxed)
        ));
        out.push_str(&format!(
            "# TYPE metald_docker_inspects_total counter\nmetald_docker_inspects_total {}\n",
            crate::backend::INSPECTS.load(std::sync::atomic::Ordering::Relaxed)
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::otlp_traces_url;

    #[test]
    fn otlp_endpoint_forms() {
        assert_eq!(
            otlp_traces_url("localhost:4318"),
            "http://localhost:4318/v1/traces"
        );
        assert_eq!(
            otlp_traces_url("https://otel.example:4318/"),
            "https://otel.example:4318/v1/traces"
        );
        assert_eq!(
            otlp_traces_url("http://collector:4318/custom/traces"),
            "http://collector:4318/custom/traces"
        );
    }
}
