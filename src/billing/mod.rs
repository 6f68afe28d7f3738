//! Billing (spec §8): samples every running or paused VM, keeps every sample in a durable
//! spool, and delivers the spool to billaged in order, exactly once per acknowledgement.
//!
//! Three tasks: the collector (samples on a timer, announces starts and stops), the sender
//! (drains the spool, with backoff while billaged is away), the heartbeat. They share
//! [`Billing`]; the spool sits behind one mutex that is never held across a network call.

pub mod client;
pub mod collector;
pub mod sample;
pub mod sender;
pub mod spool;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::backend::DockerBackend;
use crate::config::BillingConfig;
use crate::vm::index::VmIndex;
use crate::vm::{UsageBoard, VmId, VmSnapshot};
use client::BillagedClient;
use sample::Sample;
use spool::{Record, Spool};

/// The longest a stop waits for its final billing sample (one engine stats read, normally
/// well under a second; a loaded engine may take longer).
pub const FINAL_SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

/// How billing behaves (spec §8: disabled and mock make no calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enabled,
    /// Samples are taken and logged at debug level; nothing is sent or spooled.
    Mock,
    /// Samples are taken for GetVmInfo only.
    Disabled,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enabled => "enabled",
            Mode::Mock => "mock",
            Mode::Disabled => "disabled",
        }
    }
}

/// Counters for /metrics and /health.
#[derive(Debug, Default)]
pub struct Counters {
    pub batches_sent: AtomicU64,
    pub batch_send_micros: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    pub samples_collected: AtomicU64,
    pub collection_ticks: AtomicU64,
    pub collection_micros: AtomicU64,
}

/// A point-in-time view for /health and /metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub enabled: bool,
    pub mode: &'static str,
    pub reachable: bool,
    pub spool_depth: usize,
    pub spool_bytes: u64,
    pub oldest_age_seconds: f64,
    pub rejected_batches: u64,
    pub dropped_samples: u64,
}

/// Shared billing state.
pub struct Billing {
    mode: Mode,
    config: BillingConfig,
    backend: DockerBackend,
    index: Arc<VmIndex>,
    usage: Arc<UsageBoard>,
    /// True once the VM index is in step with Docker: before that, an empty index would read
    /// as "every metered VM stopped".
    index_ready: Arc<AtomicBool>,
    /// `Some` only when enabled.
    spool: Option<Mutex<Spool>>,
    client: BillagedClient,
    /// The last sample per VM, for CPU percentages.
    previous: Mutex<HashMap<VmId, Sample>>,
    /// Wakes the sender early (a VM stopped: its records go now).
    wake: Notify,
    reachable: AtomicBool,
    instance_id: String,
    pub counters: Counters,
}

impl Billing {
    /// Opens the spool (when enabled) and the instance id under `data_dir`.
    pub fn open(
        config: &BillingConfig,
        data_dir: &Path,
        backend: DockerBackend,
        index: Arc<VmIndex>,
        usage: Arc<UsageBoard>,
        index_ready: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let mode = if !config.enabled {
            Mode::Disabled
        } else if config.mock_mode {
            Mode::Mock
        } else {
            Mode::Enabled
        };
        let (spool, instance_id) = if mode == Mode::Enabled {
            let spool = Spool::open(&data_dir.join("billing"), config.spool_max_bytes)?;
            (Some(Mutex::new(spool)), instance_id(data_dir)?)
        } else {
            (None, String::new())
        };
        Ok(Self {
            mode,
            config: config.clone(),
            backend,
            index,
            usage,
            index_ready,
            spool,
            client: BillagedClient::new(&config.endpoint),
            previous: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            reachable: AtomicBool::new(true),
            instance_id,
            counters: Counters::default(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn spool(&self) -> Option<MutexGuard<'_, Spool>> {
        self.spool.as_ref().map(|m| match m.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        })
    }

    pub fn status(&self) -> Status {
        let now = crate::vm::unix_nanos(SystemTime::now());
        let (depth, bytes, oldest, rejected, dropped) = match self.spool() {
            Some(s) => (
                s.depth(),
                s.bytes(),
                s.oldest_nanos(),
                s.rejected_batches,
                s.dropped_samples,
            ),
            None => (0, 0, None, 0, 0),
        };
        Status {
            enabled: self.mode == Mode::Enabled,
            mode: self.mode.name(),
            reachable: self.mode != Mode::Enabled || self.reachable.load(Ordering::Relaxed),
            spool_depth: depth,
            spool_bytes: bytes,
            oldest_age_seconds: oldest.map(|t| (now - t).max(0) as f64 / 1e9).unwrap_or(0.0),
            rejected_batches: rejected,
            dropped_samples: dropped,
        }
    }

    /// Takes one more sample of a metered VM right before it stops, so usage up to the stop
    /// is billed (its counters are gone once the container is down). Bounded by
    /// [`FINAL_SAMPLE_TIMEOUT`]: a stop, and above all a force kill, waits no longer for it;
    /// the last periodic sample then stands as the run's last.
    pub async fn final_sample(&self, vm: &VmSnapshot) {
        if self.mode == Mode::Disabled {
            return;
        }
        let reading =
            tokio::time::timeout(FINAL_SAMPLE_TIMEOUT, self.backend.stats(&vm.container_id)).await;
        match reading {
            Ok(Ok(stats)) if stats.running => {
                let sample = self.record_sample(vm, &stats);
                self.spool_samples(vec![(vm.vm_id.to_string(), vm.customer_id.clone(), sample)]);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(vm_id = %vm.vm_id, error = %e, "final billing sample failed")
            }
            Err(_) => tracing::warn!(
                vm_id = %vm.vm_id,
                timeout = ?FINAL_SAMPLE_TIMEOUT,
                "final billing sample took too long; stopping without it"
            ),
        }
    }

    /// Turns a reading into a sample and the VM's latest usage.
    fn record_sample(&self, vm: &VmSnapshot, stats: &crate::backend::ContainerStats) -> Sample {
        let mut previous = match self.previous.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let (sample, usage) = sample::sample_of(stats, SystemTime::now(), previous.get(&vm.vm_id));
        previous.insert(vm.vm_id.clone(), sample);
        self.usage.set(vm.vm_id.clone(), usage);
        self.counters
            .samples_collected
            .fetch_add(1, Ordering::Relaxed);
        sample
    }

    /// Puts samples of metered VMs into the spool (or the debug log in mock mode).
    fn spool_samples(&self, samples: Vec<(String, String, Sample)>) {
        match self.mode {
            Mode::Disabled => {}
            Mode::Mock => {
                for (vm, customer, s) in samples {
                    tracing::debug!(vm_id = vm, customer, sample = ?s, "billing sample (mock mode)");
                }
            }
            Mode::Enabled => {
                let Some(mut spool) = self.spool() else {
                    return;
                };
                for (vm, customer, s) in samples {
                    // Samples only follow a NotifyVmStarted in the same queue.
                    if !spool.metered().contains_key(&vm) {
                        continue;
                    }
                    if let Err(e) = spool.append(&vm, &customer, &[Record::Sample { sample: s }]) {
                        tracing::error!(vm_id = vm, error = %e, "billing spool write failed: sample not recorded");
                    }
                }
            }
        }
    }
}

/// The stable id of this host's metald: made once, kept in the data dir.
fn instance_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("instance_id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let id = format!(
        "metald-{}-{}",
        if host.is_empty() { "host" } else { &host },
        ulid::Ulid::new().to_string().to_ascii_lowercase()
    );
    std::fs::create_dir_all(data_dir)?;
    std::fs::write(&path, &id)?;
    Ok(id)
}

/// Exponential backoff with full jitter between `base` and `max`.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(max);
    let jitter: f64 = rand::random::<f64>() * 0.5 + 0.5;
    exp.mul_f64(jitter)
}
