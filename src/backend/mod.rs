//! The container backend: every VM is a Docker container (spec §5).
//!
//! Takes and returns domain types only; bollard types never leave this module. Docker errors
//! are classified once, in [`classify`], into what callers can act on.

mod container;
mod convert;
pub mod docker;
mod events;
pub mod host_ports;
pub mod labels;
mod listing;
pub mod network;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

pub use docker::DockerBackend;
pub use events::LIFECYCLE_ACTIONS;
pub use labels::VmLabels;
pub use listing::{Listed, Listing};
pub use network::VmNetwork;

/// Every container inspect metald has made, for /metrics: the engine work that events,
/// re-lists and operations cost (a VM must not be able to drive it up).
pub static INSPECTS: AtomicU64 = AtomicU64::new(0);

use crate::vm::{ExposedPort, NetworkView};

/// Everything needed to create one VM's container.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub env: Vec<String>,
    pub labels: VmLabels,
    pub ports: Vec<ExposedPort>,
    pub nano_cpus: i64,
    pub memory_bytes: i64,
}

/// A container as Docker reports it now.
#[derive(Debug, Clone)]
pub struct ContainerView {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    pub labels: HashMap<String, String>,
    pub image: String,
    /// Docker's status word: `created`, `running`, `paused`, `exited`, ….
    pub status: String,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub exit_code: Option<i64>,
    pub network: NetworkView,
}

/// A container event relevant to the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    pub container_id: String,
    /// The `unkey.vm.id` label of the container.
    pub vm_id: String,
    /// Its scope label (`default` when absent).
    pub scope: String,
    /// Docker's action word (`start`, `die`, `destroy`, …).
    pub action: String,
}

impl ContainerEvent {
    pub fn is_destroy(&self) -> bool {
        self.action == "destroy"
    }
}

/// What the engine is.
#[derive(Debug, Clone, Default)]
pub struct EngineInfo {
    pub version: String,
    pub api_version: String,
    pub ncpu: i64,
}

/// A failed Docker operation: which operation, on what, and what Docker meant.
#[derive(Debug, thiserror::Error)]
#[error("docker {op} {target}: {kind}")]
pub struct Error {
    pub op: &'static str,
    pub target: String,
    pub kind: ErrorKind,
}

/// Docker's answer, classified.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ErrorKind {
    /// 404: no such container or image, in Docker's words. (Docker also answers 404 when
    /// something a container needs is missing, its network say: callers that act on "gone"
    /// confirm with an inspect.)
    #[error("not found: {0}")]
    NotFound(String),
    /// 409: a name already in use, or a state conflict ("is already paused").
    #[error("conflict: {0}")]
    Conflict(String),
    /// 304: already in the asked-for state.
    #[error("already in that state")]
    NotModified,
    /// The engine cannot be reached (socket missing, connection refused, timeout).
    #[error("engine unreachable: {0}")]
    Unavailable(String),
    /// Docker's allocator has no free host port in the configured range.
    #[error("no host port left: {0}")]
    PortsExhausted(String),
    /// The host port Docker picked is held by a process outside Docker (an outgoing
    /// connection's ephemeral port, say), `tries` picks in a row.
    #[error("host port held outside docker ({tries} tries): {message}")]
    HostPortInUse { tries: u32, message: String },
    /// The image is not present and cannot be pulled.
    #[error("image unavailable: {0}")]
    ImageUnavailable(String),
    /// The engine refused the request (bad parameters, runtime failure).
    #[error("refused ({status}): {message}")]
    Rejected { status: u16, message: String },
}

/// Turns a bollard error into the kind callers can act on. The one place that reads Docker
/// status codes and messages.
pub fn classify(err: &bollard::errors::Error) -> ErrorKind {
    use bollard::errors::Error as B;
    match err {
        B::DockerResponseServerError {
            status_code,
            message,
        } => {
            let lower = message.to_ascii_lowercase();
            match *status_code {
                404 => ErrorKind::NotFound(message.clone()),
                409 => ErrorKind::Conflict(message.clone()),
                304 => ErrorKind::NotModified,
                // Docker's allocator does not know ports that other processes hold; its
                // proxy's bind then fails. Not exhaustion: another pick may well succeed.
                _ if lower.contains("address already in use") => ErrorKind::HostPortInUse {
                    tries: 1,
                    message: message.clone(),
                },
                _ if lower.contains("port is already allocated")
                    || lower.contains("all ports are allocated") =>
                {
                    ErrorKind::PortsExhausted(message.clone())
                }
                status => ErrorKind::Rejected {
                    status,
                    message: message.clone(),
                },
            }
        }
        B::RequestTimeoutError
        | B::IOError { .. }
        | B::HyperResponseError { .. }
        | B::HyperLegacyError { .. }
        | B::SocketNotFoundError(_)
        | B::HttpClientError { .. } => ErrorKind::Unavailable(err.to_string()),
        other => ErrorKind::Rejected {
            status: 0,
            message: other.to_string(),
        },
    }
}

impl Error {
    pub fn new(op: &'static str, target: impl Into<String>, err: &bollard::errors::Error) -> Self {
        Self {
            op,
            target: target.into(),
            kind: classify(err),
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self.kind, ErrorKind::NotFound(_))
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable(_))
    }

    pub fn is_host_port_in_use(&self) -> bool {
        matches!(self.kind, ErrorKind::HostPortInUse { .. })
    }
}

impl ErrorKind {
    /// The `address:port` a failed bind names (`listen tcp4 127.0.0.1:33164: bind: …`).
    pub fn held_address(&self) -> Option<&str> {
        let ErrorKind::HostPortInUse { message, .. } = self else {
            return None;
        };
        let after = &message[message.find("listen ")? + "listen ".len()..];
        // Past the protocol word (`tcp4`, `udp6`, …), up to the `: bind` that follows.
        let (_, rest) = after.split_once(' ')?;
        let end = rest.find(": bind")?;
        Some(&rest[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::errors::Error as B;

    fn server(status_code: u16, message: &str) -> B {
        B::DockerResponseServerError {
            status_code,
            message: message.into(),
        }
    }

    #[test]
    fn classifies_status_codes() {
        assert_eq!(
            classify(&server(404, "No such container: x")),
            ErrorKind::NotFound("No such container: x".into())
        );
        assert_eq!(classify(&server(304, "")), ErrorKind::NotModified);
        assert!(matches!(
            classify(&server(409, "already in use")),
            ErrorKind::Conflict(_)
        ));
        assert!(matches!(
            classify(&server(
                500,
                "driver failed: Bind for 0.0.0.0:30001 failed: port is already allocated"
            )),
            ErrorKind::PortsExhausted(_)
        ));
        assert!(matches!(
            classify(&server(
                500,
                "driver failed programming external connectivity: all ports are allocated"
            )),
            ErrorKind::PortsExhausted(_)
        ));
        assert!(matches!(
            classify(&server(400, "invalid reference format")),
            ErrorKind::Rejected { status: 400, .. }
        ));
    }

    #[test]
    fn a_port_held_outside_docker_is_not_exhaustion() {
        let kind = classify(&server(
            500,
            "driver failed programming external connectivity on endpoint unkey-vm-x (abc): \
             Error starting userland proxy: listen tcp4 127.0.0.1:33164: bind: address already in use",
        ));
        assert!(matches!(kind, ErrorKind::HostPortInUse { tries: 1, .. }));
        assert_eq!(kind.held_address(), Some("127.0.0.1:33164"));
        assert_eq!(ErrorKind::NotModified.held_address(), None);
    }

    #[test]
    fn classifies_transport_failures_as_unavailable() {
        assert!(matches!(
            classify(&B::RequestTimeoutError),
            ErrorKind::Unavailable(_)
        ));
        assert!(matches!(
            classify(&B::SocketNotFoundError("/nope".into())),
            ErrorKind::Unavailable(_)
        ));
    }
}

/// One reading of a container's cgroup counters, as Docker reports them (raw; the billing
/// module turns it into a usage sample).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerStats {
    /// Cumulative CPU time, ns.
    pub cpu_total_ns: u64,
    /// cgroup memory usage including page cache.
    pub memory_usage: u64,
    /// cgroup memory.stat entries (`inactive_file`, `total_inactive_file`, …).
    pub memory_stat: HashMap<String, u64>,
    /// Bytes per block-I/O entry: (op, value), op in whatever case the cgroup version uses.
    pub blkio_bytes: Vec<(String, u64)>,
    /// Operations per block-I/O entry.
    pub blkio_ops: Vec<(String, u64)>,
    /// Per interface: (rx bytes, tx bytes, rx packets, tx packets).
    pub networks: Vec<(u64, u64, u64, u64)>,
    /// False when the container was not running (Docker answers with empty counters).
    pub running: bool,
}
