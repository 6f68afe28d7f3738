//! VmService use-cases: authorize → validate → plan (vm::state) → backend → index.
//!
//! Knows tenancy, validation and the lifecycle; knows neither HTTP nor bollard.

pub mod error;
pub mod limits;
pub mod validate;
pub mod watch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message as _;

pub use error::Error;
pub use limits::Limits;

use crate::backend::{self, ContainerSpec, ContainerView, DockerBackend, VmLabels};
use crate::billing::Billing;
use crate::peer_guard::PeerGuard;
use crate::proto::vmprovisioner::VmConfig;
use crate::vm::index::VmIndex;
use crate::vm::state::{self, Action, Op};
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
    creating: std::sync::Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
    /// What one request may ask for (spec §5.1).
    limits: Limits,
    /// The listeners' view of the VM subnets; kept current by `watch`.
    peer_guard: Arc<PeerGuard>,
}

/// A create's exclusive turn on its vm_id; the id's lock goes when nobody else waits on it.
struct CreateTurn<'a> {
    creating: &'a std::sync::Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
    id: VmId,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for CreateTurn<'_> {
    fn drop(&mut self) {
        let mut map = match self.creating.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        // The map's reference and the one in our guard: no one else is waiting.
        if map
            .get(&self.id)
            .is_some_and(|lock| Arc::strong_count(lock) <= 2)
        {
            map.remove(&self.id);
        }
    }
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
            peer_guard: parts.peer_guard,
        }
    }

    /// Waits for `vm_id`'s turn to be created (see `creating`).
    async fn create_turn(&self, vm_id: &VmId) -> CreateTurn<'_> {
        let lock = {
            let mut map = match self.creating.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            map.entry(vm_id.clone()).or_default().clone()
        };
        CreateTurn {
            creating: &self.creating,
            id: vm_id.clone(),
            _turn: lock.lock_owned().await,
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

    /// CreateVm: makes the container (not started). Idempotent for the same id, customer and
    /// config.
    pub async fn create(&self, caller: &Caller, req: CreateVm) -> Result<Arc<VmSnapshot>, Error> {
        if !req.customer_id.is_empty() && req.customer_id != caller.customer_id {
            return Err(Error::PermissionDenied(format!(
                "customer_id {:?} is not the caller's customer",
                req.customer_id
            )));
        }
        let spec = validate::vm_spec(req.config.as_ref(), self.backend.engine().ncpu)?;
        let named = !req.vm_id.is_empty();
        let vm_id = if named {
            VmId::parse(&req.vm_id).map_err(|why| Error::InvalidArgument(format!("vm_id {why}")))?
        } else {
            VmId::generate()
        };
        let config = req.config.unwrap_or_default();
        let config_bytes = config.encode_to_vec();
        self.require_docker()?;

        if let Some(slot) = self.index.get(&vm_id) {
            return same_vm(slot.snapshot(), caller, &config_bytes);
        }
        self.backend
            .ensure_image(&spec.image)
            .await
            .map_err(|e| image_error(&spec.image, e))?;
        // A made-up id is unique; a caller's id may be retried while its first try runs.
        // Held from here (not over the pull, which may take minutes and concerns no name).
        let _one_create_per_id = if named {
            Some(self.create_turn(&vm_id).await)
        } else {
            None
        };
        if let Some(slot) = self.index.get(&vm_id) {
            return same_vm(slot.snapshot(), caller, &config_bytes);
        }

        let now = SystemTime::now();
        let labels = VmLabels {
            vm_id: vm_id.to_string(),
            scope: self.scope.clone(),
            customer_id: caller.customer_id.clone(),
            config: config_bytes.clone(),
            created_at_nanos: crate::vm::unix_nanos(now),
        };
        let container = ContainerSpec {
            name: backend::labels::container_name(&self.scope, vm_id.as_str()),
            image: spec.image.clone(),
            env: spec.env.clone(),
            labels,
            ports: spec.ports.clone(),
            nano_cpus: spec.vcpus * 1_000_000_000,
            memory_bytes: spec.memory_bytes,
        };
        let container_id = match self.backend.create(&container).await {
            Ok(id) => id,
            // The name is taken: a retry of this create, or a different VM under that id.
            Err(e) if matches!(e.kind, backend::ErrorKind::Conflict(_)) => {
                let existing = self
                    .backend
                    .inspect(&container.name)
                    .await
                    .map_err(|e| Error::from_backend(vm_id.as_str(), e))?;
                let snapshot = self.snapshot_of(existing).map_err(|why| {
                    Error::AlreadyExists(format!(
                        "vm {vm_id}: a container of that name exists ({why})"
                    ))
                })?;
                let snapshot = self.index.upsert(snapshot).snapshot();
                return same_vm(snapshot, caller, &config_bytes);
            }
            Err(e) => {
                // A timeout or a dropped connection says nothing of whether the engine made
                // the container: remove it, so a failed create leaves no VM behind.
                if e.is_unavailable() {
                    self.remove_if_made_by(&vm_id, &container).await;
                }
                return Err(Error::from_backend(vm_id.as_str(), e));
            }
        };
        match self.observe(vm_id.as_str(), &container_id).await {
            Ok(snapshot) => {
                tracing::info!(vm_id = %vm_id, container_id, image = spec.image, "vm created");
                Ok(self.index.upsert(snapshot).snapshot())
            }
            Err(e) => {
                // Never leave a VM the caller was told failed.
                self.remove_failed_create(&vm_id, &container_id).await;
                Err(e)
            }
        }
    }

    /// Removes the container named for `attempt` if this very attempt made it (its creation
    /// time label says so): a retry of the same create may have found and returned it.
    async fn remove_if_made_by(&self, id: &VmId, attempt: &ContainerSpec) {
        let vm_id = id.as_str();
        let ours = match self.backend.inspect(&attempt.name).await {
            Ok(view) => backend::docker::vm_labels(&view)
                .is_ok_and(|l| l.created_at_nanos == attempt.labels.created_at_nanos)
                .then_some(view.id),
            Err(e) if e.is_not_found() => None,
            Err(e) => {
                tracing::warn!(vm_id, error = %e, "could not check for the container of a failed create; the next re-list finds it");
                None
            }
        };
        let Some(container_id) = ours else { return };
        self.remove_failed_create(id, &container_id).await;
    }

    /// Removes a container whose create failed, and its index entry (its create event may
    /// have put it there already).
    async fn remove_failed_create(&self, id: &VmId, container_id: &str) {
        match self.backend.remove(container_id, true).await {
            Err(e) if !e.is_not_found() => {
                tracing::warn!(vm_id = %id, error = %e, "could not remove the container of a failed create; the next re-list finds it")
            }
            removed => {
                self.index.remove(id, Some(container_id));
                if removed.is_ok() {
                    tracing::info!(vm_id = %id, "removed the container of a create that failed midway");
                }
            }
        }
    }

    /// Boot, Shutdown, Pause, Resume, Reboot, Delete: one lifecycle operation, serialised with
    /// every other operation on the same VM. Returns the state after it (`None` once deleted).
    pub async fn apply(
        &self,
        caller: &Caller,
        vm_id: &str,
        op: Op,
    ) -> Result<Option<VmState>, Error> {
        let id = validate::existing_vm_id(vm_id)?;
        self.require_docker()?;
        let slot = self
            .index
            .get(&id)
            .ok_or_else(|| Error::vm_not_found(vm_id))?;
        authorize(caller, &slot.snapshot())?;

        let _serialised = slot.op_lock.lock().await;
        if slot.is_removed() {
            return Err(Error::vm_not_found(vm_id));
        }
        let container_id = slot.snapshot().container_id.clone();
        // Plan on a fresh observation, not on what the index last heard.
        let current = self.refresh_locked(&id, &container_id).await?;
        let action = state::plan(current.state, op)
            .map_err(|r| Error::FailedPrecondition(format!("vm {vm_id}: {r}")))?;
        let expected = state::state_after(current.state, action);
        if action == Action::NoOp {
            return Ok(Some(current.state));
        }
        // Usage up to this moment is billed before the counters go away with the process.
        let ends_process = matches!(
            action,
            Action::Stop { .. }
                | Action::Kill
                | Action::Restart { .. }
                | Action::Remove { force: true }
        );
        if let (Some(billing), true) = (&self.billing, ends_process) {
            billing.final_sample(&current).await;
        }
        let result = self.execute(&container_id, action).await;
        match result {
            Ok(()) => {}
            Err(e) if e.kind == backend::ErrorKind::NotModified => {}
            // A 404 may be about the container or about something it needs (its network,
            // removed or never there): only a container that is really gone is a VM gone.
            Err(e) if e.is_not_found() => {
                self.refresh_locked(&id, &container_id).await?;
                return Err(Error::FailedPrecondition(format!("vm {vm_id}: {e}")));
            }
            // Docker disagrees about the state (it changed behind our back): look again; if it
            // is already where we were going, the operation is done.
            Err(e) if matches!(e.kind, backend::ErrorKind::Conflict(_)) => {
                let now = self.refresh_locked(&id, &container_id).await?;
                if Some(now.state) != expected {
                    return Err(Error::from_backend(vm_id, e));
                }
            }
            Err(e) => return Err(Error::from_backend(vm_id, e)),
        }
        if expected.is_none() {
            self.index.remove(&id, Some(&container_id));
            tracing::info!(vm_id, container_id, "vm deleted");
            return Ok(None);
        }
        let after = self.refresh_locked(&id, &container_id).await?;
        tracing::info!(vm_id, op = op.name(), state = %after.state, "vm operation done");
        Ok(Some(after.state))
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

    async fn execute(&self, container: &str, action: Action) -> Result<(), backend::Error> {
        match action {
            Action::Start => self.backend.start(container).await,
            Action::Stop { grace } => self.backend.stop(container, grace).await,
            Action::Kill => self.backend.kill(container).await,
            Action::Pause => self.backend.pause(container).await,
            Action::Unpause => self.backend.unpause(container).await,
            Action::Restart { grace } => self.backend.restart(container, grace).await,
            Action::Remove { force } => self.backend.remove(container, force).await,
            Action::NoOp => Ok(()),
        }
    }

    /// Inspects a VM's container and records what it is now. Caller holds the VM's op lock.
    async fn refresh_locked(
        &self,
        id: &VmId,
        container_id: &str,
    ) -> Result<Arc<VmSnapshot>, Error> {
        match self.observe(id.as_str(), container_id).await {
            Ok(snapshot) => Ok(self.index.upsert(snapshot).snapshot()),
            Err(Error::NotFound(_)) => {
                self.index.remove(id, Some(container_id));
                Err(Error::vm_not_found(id.as_str()))
            }
            Err(e) => Err(e),
        }
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

/// Idempotent create: the existing VM is the answer when customer and config match.
fn same_vm(
    existing: Arc<VmSnapshot>,
    caller: &Caller,
    config_bytes: &[u8],
) -> Result<Arc<VmSnapshot>, Error> {
    if existing.customer_id != caller.customer_id {
        return Err(Error::AlreadyExists(format!(
            "vm {} already exists",
            existing.vm_id
        )));
    }
    if existing.config_bytes.as_slice() != config_bytes {
        return Err(Error::AlreadyExists(format!(
            "vm {} already exists with a different config",
            existing.vm_id
        )));
    }
    Ok(existing)
}

fn image_error(image: &str, e: backend::Error) -> Error {
    match e.kind {
        backend::ErrorKind::Unavailable(reason) => Error::Unavailable(format!(
            "docker engine unreachable during {}: {reason}",
            e.op
        )),
        backend::ErrorKind::Rejected {
            status: 400,
            message,
        } => Error::InvalidArgument(format!(
            "image {image:?} is not a valid reference: {message}"
        )),
        backend::ErrorKind::ImageUnavailable(reason) => {
            Error::FailedPrecondition(format!("image {image} cannot be had: {reason}"))
        }
        other => Error::FailedPrecondition(format!("image {image} cannot be had: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::docker::DockerSettings;

    fn service() -> VmService {
        // No engine is contacted: the socket need not exist.
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

    #[tokio::test]
    async fn create_turns_serialise_one_id_only_and_leave_nothing_behind() {
        let svc = service();
        let a = VmId::parse("a").unwrap();
        let b = VmId::parse("b").unwrap();
        let first = svc.create_turn(&a).await;
        // Another id goes at once.
        let other = tokio::time::timeout(Duration::from_millis(100), svc.create_turn(&b)).await;
        assert!(other.is_ok(), "a different id waited");
        drop(other);
        // The same id waits for the first turn.
        let waiting = tokio::time::timeout(Duration::from_millis(100), svc.create_turn(&a)).await;
        assert!(waiting.is_err(), "the same id did not wait");
        drop(first);
        let again = tokio::time::timeout(Duration::from_millis(100), svc.create_turn(&a)).await;
        assert!(again.is_ok());
        drop(again);
        assert!(svc.creating.lock().unwrap().is_empty());
    }
}
