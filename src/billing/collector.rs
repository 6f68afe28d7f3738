//! The collector: on every interval, one reading per running or paused VM, taken
//! concurrently with a bound; announces starts and stops as the index changes.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::spool::{Metered, Record};
use super::{Billing, Mode};
use crate::vm::{unix_nanos, VmSnapshot, VmState};

/// Stats calls in flight at once. The engine answers a one-shot stats request from its
/// once-a-second collection cycle, so each call waits up to a second however idle the engine
/// is, while costing it little CPU (measured: about 2 ms per container). The latency, not the
/// work, decides a tick's length: 256 at once lets a tick for 200 VMs finish in about one
/// cycle while still bounding the connections metald holds open to the engine.
pub const STATS_CONCURRENCY: usize = 256;

pub async fn run(billing: Arc<Billing>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(billing.config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                billing.reconcile();
                billing.collect().await;
            }
            _ = billing.index.changed() => {
                // A VM that just started is sampled now, not a whole interval later.
                let started = billing.reconcile();
                if !started.is_empty() {
                    billing.collect_some(started, false).await;
                }
            }
        }
    }
}

fn metered_state(state: VmState) -> bool {
    matches!(state, VmState::Running | VmState::Paused)
}

impl Billing {
    /// Announces VMs that started being metered and those that stopped, each exactly once
    /// (the metered set is durable, so a restart announces nothing again). Returns the VMs
    /// that started being metered (without billing: those not sampled yet).
    pub fn reconcile(&self) -> Vec<Arc<VmSnapshot>> {
        if !self.index_ready.load(Ordering::Acquire) {
            return Vec::new();
        }
        let vms: Vec<Arc<VmSnapshot>> = self.index.snapshots();
        if self.mode != Mode::Enabled {
            return vms
                .into_iter()
                .filter(|v| metered_state(v.state) && self.usage.get(&v.vm_id).is_none())
                .collect();
        }
        let Some(mut spool) = self.spool() else {
            return Vec::new();
        };
        let mut started = Vec::new();
        for vm in vms.iter().filter(|v| metered_state(v.state)) {
            let id = vm.vm_id.to_string();
            if spool.metered().contains_key(&id) {
                continue;
            }
            let start_nanos = vm
                .started_at
                .map(unix_nanos)
                .unwrap_or_else(|| unix_nanos(SystemTime::now()));
            let entry = Metered {
                customer_id: vm.customer_id.clone(),
                start_nanos,
            };
            let result = spool
                .append(&id, &vm.customer_id, &[Record::Started { start_nanos }])
                .and_then(|_| spool.set_metered(&id, Some(entry)));
            match result {
                Ok(()) => {
                    tracing::info!(vm_id = id, "metering started");
                    started.push(vm.clone());
                }
                Err(e) => {
                    tracing::error!(vm_id = id, error = %e, "billing spool write failed: start not recorded")
                }
            }
        }
        let running: HashSet<&str> = vms
            .iter()
            .filter(|v| metered_state(v.state))
            .map(|v| v.vm_id.as_str())
            .collect();
        let gone: Vec<(String, String)> = spool
            .metered()
            .iter()
            .filter(|(id, _)| !running.contains(id.as_str()))
            .map(|(id, m)| (id.clone(), m.customer_id.clone()))
            .collect();
        let mut stopped_any = false;
        for (id, customer) in gone {
            let stop_nanos = vms
                .iter()
                .find(|v| v.vm_id.as_str() == id)
                .and_then(|v| v.finished_at)
                .map(unix_nanos)
                .unwrap_or_else(|| unix_nanos(SystemTime::now()));
            let result = spool
                .append(&id, &customer, &[Record::Stopped { stop_nanos }])
                .and_then(|_| spool.set_metered(&id, None));
            match result {
                Ok(()) => {
                    tracing::info!(vm_id = id, "metering stopped");
                    stopped_any = true;
                }
                Err(e) => {
                    tracing::error!(vm_id = id, error = %e, "billing spool write failed: stop not recorded")
                }
            }
        }
        drop(spool);
        if stopped_any {
            // Stopped VMs' records go now, not at the next flush.
            self.wake.notify_one();
        }
        started
    }

    /// One collection tick: every running or paused VM.
    pub async fn collect(&self) {
        let vms: Vec<Arc<VmSnapshot>> = self
            .index
            .snapshots()
            .into_iter()
            .filter(|v| metered_state(v.state))
            .collect();
        self.collect_some(vms, true).await;
    }

    /// Samples the given VMs; `full` = these are all running VMs (forget the others' usage).
    async fn collect_some(&self, vms: Vec<Arc<VmSnapshot>>, full: bool) {
        let started = Instant::now();
        // A tick with nothing to meter calls nothing: no trace for it either.
        let span = if vms.is_empty() {
            tracing::Span::none()
        } else {
            tracing::info_span!("billing.collect", vms = vms.len())
        };
        let readings: Vec<_> = futures::stream::iter(vms)
            .map(|vm| async move {
                let stats = self.backend.stats(&vm.container_id).await;
                (vm, stats)
            })
            .buffer_unordered(STATS_CONCURRENCY)
            .collect()
            .instrument(span.clone())
            .await;
        let _in_span = span.enter();
        let mut samples = Vec::with_capacity(readings.len());
        let mut sampled = HashSet::new();
        for (vm, stats) in readings {
            match stats {
                Ok(stats) if stats.running => {
                    let sample = self.record_sample(&vm, &stats);
                    sampled.insert(vm.vm_id.clone());
                    samples.push((vm.vm_id.to_string(), vm.customer_id.clone(), sample));
                }
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => tracing::warn!(vm_id = %vm.vm_id, error = %e, "stats read failed"),
            }
        }
        self.spool_samples(samples);
        if full {
            self.usage.retain(&sampled);
            self.counters
                .collection_ticks
                .fetch_add(1, Ordering::Relaxed);
            self.counters
                .collection_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
    }
}
