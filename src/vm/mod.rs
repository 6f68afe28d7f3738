//! Domain types of a VM: identity, lifecycle state and the snapshot the index serves.
//!
//! Nothing here knows the wire (Connect, proto framing) or Docker; `api/` and `backend/` translate.

pub mod id;
pub mod index;
pub mod state;

use std::sync::Arc;
use std::time::SystemTime;

pub use id::VmId;
pub use state::{Action, Op, Rejection, VmState};

use crate::proto::vmprovisioner::VmConfig;

/// A port published to the host: where a caller reaches a VM's service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortMapping {
    pub container_port: u16,
    pub host_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// The network view of a VM as Docker reports it now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkView {
    pub network: String,
    pub ip_address: String,
    pub mac_address: String,
    pub gateway: String,
    pub ports: Vec<PortMapping>,
}

/// Everything the index knows about one VM: what it was created as (immutable) plus the live
/// container state as last observed from Docker. Replaced whole on every observation, so readers
/// never see a half-updated view.
#[derive(Debug, Clone)]
pub struct VmSnapshot {
    pub vm_id: VmId,
    pub customer_id: String,
    /// The config exactly as given at create time (the domain's config document).
    pub config: Arc<VmConfig>,
    /// Its canonical encoding: two creates are "the same config" when these bytes match.
    pub config_bytes: Arc<Vec<u8>>,
    pub created_at: SystemTime,
    pub container_id: String,
    pub container_name: String,
    pub image: String,
    pub state: VmState,
    /// Docker's own status word (`running`, `exited`, …), for backend_info.
    pub docker_status: String,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub exit_code: Option<i64>,
    pub network: NetworkView,
    /// The last time the state was seen to change.
    pub modified_at: SystemTime,
}

impl VmSnapshot {
    /// Seconds since the VM was last started, while it runs.
    pub fn uptime_seconds(&self, now: SystemTime) -> i64 {
        match (self.state, self.started_at) {
            (VmState::Running | VmState::Paused, Some(started)) => now
                .duration_since(started)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            _ => 0,
        }
    }
}

/// Seconds since the Unix epoch, clamped at zero.
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Nanoseconds since the Unix epoch, clamped at zero.
pub fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// Transport protocol of an exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A container port to expose and publish on a host port chosen by Docker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExposedPort {
    pub port: u16,
    pub protocol: Protocol,
}

/// What a VM used, from the latest sample of its container's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Percent of one CPU since the previous sample (200 = two CPUs busy).
    pub cpu_percent: f64,
    pub memory_bytes: i64,
    pub net_rx_bytes: i64,
    pub net_tx_bytes: i64,
    pub net_rx_packets: i64,
    pub net_tx_packets: i64,
    pub disk_read_bytes: i64,
    pub disk_write_bytes: i64,
    pub disk_read_ops: i64,
    pub disk_write_ops: i64,
}

/// The latest usage of every sampled VM: written by the billing collector, read by GetVmInfo
/// (which must never make a slow stats call itself).
#[derive(Debug, Default)]
pub struct UsageBoard {
    latest: std::sync::RwLock<std::collections::HashMap<VmId, Usage>>,
}

impl UsageBoard {
    pub fn get(&self, id: &VmId) -> Option<Usage> {
        match self.latest.read() {
            Ok(g) => g.get(id).copied(),
            Err(p) => p.into_inner().get(id).copied(),
        }
    }

    pub fn set(&self, id: VmId, usage: Usage) {
        match self.latest.write() {
            Ok(mut g) => g.insert(id, usage),
            Err(p) => p.into_inner().insert(id, usage),
        };
    }

    /// Keeps only the given VMs (the others stopped or are gone).
    pub fn retain(&self, keep: &std::collections::HashSet<VmId>) {
        match self.latest.write() {
            Ok(mut g) => g.retain(|k, _| keep.contains(k)),
            Err(p) => p.into_inner().retain(|k, _| keep.contains(k)),
        }
    }
}
