//! The sender: drains the spool to billaged in order; backs off with jitter while billaged is
//! away, then replays and owes each interrupted VM a NotifyPossibleGap. Also the heartbeat.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::client::CallError;
use super::spool::Head;
use super::Billing;
use crate::vm::unix_nanos;

/// Most samples in one SendMetricsBatch.
const MAX_BATCH: usize = 500;
const RETRY_BASE: Duration = Duration::from_millis(500);

/// billaged did not answer; try again later.
struct Outage;

pub async fn run(billing: Arc<Billing>, cancel: CancellationToken) {
    let mut attempt: u32 = 0;
    loop {
        let wait = if attempt == 0 {
            billing.config.flush_interval
        } else {
            super::backoff(attempt - 1, RETRY_BASE, billing.config.retry_max)
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = billing.wake.notified() => {}
        }
        match billing.deliver().await {
            Ok(answered) => {
                if attempt > 0 {
                    tracing::info!("billaged reachable again; spool replayed");
                }
                attempt = 0;
                // An empty spool proves nothing about billaged: only an answer does.
                if answered {
                    billing.reachable.store(true, Ordering::Relaxed);
                }
            }
            Err(Outage) => {
                if attempt == 0 {
                    tracing::warn!("billaged unreachable; keeping usage in the spool");
                }
                attempt = attempt.saturating_add(1);
                billing.reachable.store(false, Ordering::Relaxed);
            }
        }
    }
}

pub async fn heartbeat(billing: Arc<Billing>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(billing.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let active: Vec<String> = match billing.spool() {
            Some(spool) => spool.metered().keys().cloned().collect(),
            None => continue,
        };
        match billing
            .client
            .heartbeat(&billing.config.tenant_id, &billing.instance_id, active)
            .await
        {
            Ok(()) => {
                billing
                    .counters
                    .heartbeats_sent
                    .fetch_add(1, Ordering::Relaxed);
                billing.reachable.store(true, Ordering::Relaxed);
            }
            Err(CallError::Retry(e)) => {
                tracing::debug!(error = %e, "heartbeat failed");
                billing.reachable.store(false, Ordering::Relaxed);
            }
            Err(CallError::Reject(e)) => {
                // billaged answered: it is there, it just refused the heartbeat.
                tracing::warn!(error = %e, "heartbeat rejected");
                billing.reachable.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl Billing {
    /// Sends everything queued, VM by VM, oldest first; then the gap notices now due.
    /// `Ok(true)` when billaged answered at least once.
    async fn deliver(&self) -> Result<bool, Outage> {
        let vms = match self.spool() {
            Some(spool) => spool.pending_vms(),
            None => return Ok(false),
        };
        let mut answered = !vms.is_empty();
        for vm in vms {
            self.deliver_vm(&vm).await?;
        }
        let due = self.spool().map(|s| s.due_gaps()).unwrap_or_default();
        for (vm, gap) in due {
            let resume = unix_nanos(SystemTime::now());
            match self
                .client
                .possible_gap(&vm, &gap.customer_id, gap.last_sent_nanos, resume)
                .await
            {
                Ok(()) | Err(CallError::Reject(_)) => {
                    if let Some(mut spool) = self.spool() {
                        if let Err(e) = spool.clear_gap(&vm) {
                            tracing::error!(vm_id = vm, error = %e, "billing spool write failed");
                        }
                    }
                }
                Err(CallError::Retry(e)) => return Err(self.outage(&e)),
            }
            answered = true;
        }
        Ok(answered)
    }

    async fn deliver_vm(&self, vm: &str) -> Result<(), Outage> {
        loop {
            let Some((customer, head)) = self.spool().and_then(|s| s.head(vm, MAX_BATCH)) else {
                return Ok(());
            };
            let started = Instant::now();
            let result = match &head {
                Head::Started(t) => self.client.vm_started(vm, &customer, *t).await,
                Head::Stopped(t) => self.client.vm_stopped(vm, &customer, *t).await,
                Head::Samples(samples) => self.client.send_batch(vm, &customer, samples).await,
            };
            let Some(mut spool) = self.spool() else {
                return Ok(());
            };
            let written = match result {
                Ok(()) => {
                    if matches!(head, Head::Samples(_)) {
                        self.counters.batches_sent.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .batch_send_micros
                            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                    spool.ack(vm, head.len())
                }
                Err(CallError::Reject(reason)) => {
                    tracing::error!(vm_id = vm, reason, "billaged rejected records; set aside");
                    spool.reject(vm, head.len(), &reason)
                }
                Err(CallError::Retry(reason)) => {
                    drop(spool);
                    return Err(self.outage(&reason));
                }
            };
            if let Err(e) = written {
                tracing::error!(vm_id = vm, error = %e, "billing spool write failed");
                return Err(Outage);
            }
        }
    }

    /// Every VM with records waiting is owed a gap notice once they are through.
    fn outage(&self, reason: &str) -> Outage {
        tracing::debug!(reason, "billaged call failed");
        if let Some(mut spool) = self.spool() {
            for vm in spool.pending_vms() {
                if let Err(e) = spool.mark_gap(&vm) {
                    tracing::error!(vm_id = vm, error = %e, "billing spool write failed");
                }
            }
        }
        Outage
    }
}
