//! Logs and metrics: the tracing subscriber (JSON when not on a terminal) and the Prometheus
//! text of §11, with the metric names existing dashboards query kept in one place.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::Duration;

use crate::billing::Billing;
use crate::vm::index::VmIndex;
use crate::vm::VmState;

/// Installs the global subscriber. `filter` is validated by the config loader.
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        let _ = builder.try_init();
    } else {
        let _ = builder.json().flatten_event(true).try_init();
    }
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
        out
    }
}
