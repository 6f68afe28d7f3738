//! VmService use-cases: authorize → validate → plan (vm::state) → backend → index.
//!
//! Knows tenancy, validation and the lifecycle; knows neither HTTP nor bollard. The service
//! and its reads (info, list, observation) live here; CreateVm in `create`, the lifecycle
//! operations in `lifecycle`, the per-customer count in `quota`.

mod create;
pub mod error;
mod lifecycle;
pub mod limits;
mod quota;
pub mod validate;
pub mod watch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message as _;

pub use error::Error;
pub use limits::Limits;

use crate::backend::{self, ContainerView, DockerBackend};
use crate::billing::Billing;
use crate::peer_guard::PeerGuard;
use crate::proto::vmprovisioner::VmConfig;
use crate::vm::index::VmIndex;
use crate::vm::{Usage, UsageBoard, VmId, VmSnapshot, VmState};

/// Who is calling, as established by the wire layer from the bearer token and X-Tenant-ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub customer_id: String,
    pub tenant_id: String,
}

/// A CreateVm request, wire types already stripped.
#[derive(Debug, Clone, Default)]
pub struct CreateVm {
    pub vm_id: String,
    pub customer_id: String,
    pub config: Option<VmConfig>,
}

/// One page of ListVms.
#[derive(Debug)]
pub struct VmList {
    pub vms: Vec<Arc<VmSnapshot>>,
    pub next_page_token: String,
    pub total_count: usize,
}

/// The VM service: one per process, shared by all requests.
pub struct VmService {
    backend: DockerBackend,
    index: Arc<VmIndex>,
    scope: String,
    /// True while the index is known to match Docker (event stream up, last re-list done).
    docker_up: Arc<AtomicBool>,
    /// Latest usage per VM, from the billing collector.
    usage: Arc<UsageBoard>,
    /// Takes the last sample before a VM stops.
    billing: Option<Arc<Billing>>,
    /// Creates of caller-named VMs take their id's turn, so a retry waits for the attempt
    /// still in flight instead of adopting a container that attempt may remove. One lock
    /// per id in flight: different ids never wait on each other.
    creating: create::CreateLocks,
    /// What one request may ask for (spec §5.1).
    limits: Limits,
    /// Each customer's creates in flight, counted with its live VMs against the cap.
    quota: quota::Quota,
    /// The listeners' view of the VM subnets; kept current by `watch`.
    peer_guard: Arc<PeerGuard>,
}

/// What the service is built from; the index, usage board and readiness flag are shared
/// with billing.
pub struct Parts {
    pub backend: DockerBackend,
    pub scope: String,
    pub index: Arc<VmIndex>,
    pub usage: Arc<UsageBoard>,
    pub docker_up: Arc<AtomicBool>,
    pub billing: Option<Arc<Billing>>,
    pub limits: Limits,
    pub peer_guard: Arc<PeerGuard>,
}

impl VmService {
    pub fn new(parts: Parts) -> Self {
        Self {
            backend: parts.backend,
            index: parts.index,
            scope: parts.scope,
            docker_up: parts.docker_up,
            usage: parts.usage,
            billing: parts.billing,
            creating: std::sync::Mutex::default(),
            limits: parts.limits,
            quota: quota::Quota::default(),
            peer_guard: parts.peer_guard,
        }
    }

    /// A service with its own index and no billing (tests, tools).
    pub fn standalone(backend: DockerBackend, scope: impl Into<String>) -> Self {
        Self::new(Parts {
            backend,
            scope: scope.into(),
            index: Arc::default(),
            usage: Arc::default(),
            docker_up: Arc::default(),
            billing: None,
            limits: Limits::default(),
            peer_guard: Arc::default(),
        })
    }

    /// The latest measured usage of a VM, if it has been sampled.
    pub fn usage(&self, id: &VmId) -> Option<Usage> {
        self.usage.get(id)
    }

    pub fn index(&self) -> &VmIndex {
        &self.index
    }

    pub fn backend(&self) -> &DockerBackend {
        &self.backend
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn peer_guard(&self) -> &Arc<PeerGuard> {
        &self.peer_guard
    }

    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Whether the index is in step with a reachable engine.
    pub fn docker_up(&self) -> bool {
        self.docker_up.load(Ordering::Acquire)
    }

    pub(crate) fn set_docker_up(&self, up: bool) {
        self.docker_up.store(up, Ordering::Release);
    }

    fn require_docker(&self) -> Result<(), Error> {
        if self.docker_up() {
            Ok(())
        } else {
            Err(Error::Unavailable(
                "docker engine unreachable; metald reconnects by itself, retry shortly".into(),
            ))
        }
    }

    /// GetVmInfo: from the index, never a Docker call.
    pub fn info(&self, caller: &Caller, vm_id: &str) -> Result<Arc<VmSnapshot>, Error> {
        let id = validate::existing_vm_id(vm_id)?;
        self.require_docker()?;
        let slot = self
            .index
            .get(&id)
            .ok_or_else(|| Error::vm_not_found(vm_id))?;
        let snapshot = slot.snapshot();
        authorize(caller, &snapshot)?;
        Ok(snapshot)
    }

    /// ListVms: the caller's VMs, newest first, from the index.
    pub fn list(
        &self,
        caller: &Caller,
        states: &[VmState],
        page_size: i32,
        page_token: &str,
    ) -> Result<VmList, Error> {
        let size = validate::page_size(page_size)?;
        let after = validate::page_token(page_token)?;
        self.require_docker()?;
        let page = self
            .index
            .list(&caller.customer_id, states, after.as_ref(), size);
        Ok(VmList {
            vms: page.vms,
            next_page_token: page
                .next
                .as_ref()
                .map(validate::encode_page_token)
                .unwrap_or_default(),
            total_count: page.total,
        })
    }

    /// Inspects the container of `vm_id` (errors name the VM, not the container).
    async fn observe(&self, vm_id: &str, container: &str) -> Result<VmSnapshot, Error> {
        let view = self
            .backend
            .inspect(container)
            .await
            .map_err(|e| Error::from_backend(vm_id, e))?;
        self.snapshot_of(view).map_err(Error::Internal)
    }

    /// A container → the VM it holds, if it is a valid VM of this scope.
    pub(crate) fn snapshot_of(&self, view: ContainerView) -> Result<VmSnapshot, String> {
        let labels = backend::docker::vm_labels(&view)?;
        if labels.scope != self.scope {
            return Err(format!("belongs to scope {:?}", labels.scope));
        }
        let vm_id = VmId::parse(&labels.vm_id).map_err(|why| format!("label vm id {why}"))?;
        let config = VmConfig::decode(labels.config.as_slice())
            .map_err(|e| format!("config label does not decode: {e}"))?;
        let created_at =
            SystemTime::UNIX_EPOCH + Duration::from_nanos(labels.created_at_nanos.max(0) as u64);
        let state = VmState::from_docker_status(&view.status);
        let modified_at = [Some(created_at), view.started_at, view.finished_at]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(created_at);
        Ok(VmSnapshot {
            vm_id,
            customer_id: labels.customer_id,
            config: Arc::new(config),
            config_bytes: Arc::new(labels.config),
            created_at,
            container_id: view.id,
            container_name: view.name,
            image: view.image,
            state,
            docker_status: view.status,
            started_at: view.started_at,
            finished_at: view.finished_at,
            exit_code: view.exit_code,
            network: view.network,
            modified_at,
        })
    }
}

/// The one tenancy rule: a VM is visible only to its customer.
fn authorize(caller: &Caller, vm: &VmSnapshot) -> Result<(), Error> {
    if vm.customer_id == caller.customer_id {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!(
            "vm {} belongs to another customer",
            vm.vm_id
        )))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::docker::DockerSettings;

    /// A service whose engine is never there: what it answers, it answered without Docker.
    pub(crate) fn service() -> VmService {
        let backend = DockerBackend::new(DockerSettings {
            host: "unix:///nonexistent/docker.sock".into(),
            network: "bridge".into(),
            port_host_ip: "127.0.0.1".into(),
            port_range: (30000, 40000),
            pull_timeout: Duration::from_secs(1),
            hardening: Default::default(),
        })
        .expect("backend");
        VmService::standalone(backend, "unit")
    }

    pub(crate) fn caller() -> Caller {
        Caller {
            customer_id: "alice".into(),
            tenant_id: "t".into(),
        }
    }
}
