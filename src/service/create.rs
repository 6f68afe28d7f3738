//! CreateVm: caps → validate → quota → image → one create per caller-named id → container →
//! index. Idempotent for the same id, customer and config.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use prost::Message as _;

use super::{validate, Caller, CreateVm, Error, VmService};
use crate::backend::{self, ContainerSpec, VmLabels};
use crate::vm::{VmId, VmSnapshot};

/// One lock per caller-named id whose create is in flight.
pub(super) type CreateLocks = std::sync::Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>;

/// A create's exclusive turn on its vm_id; the id's lock goes when nobody else waits on it.
pub(super) struct CreateTurn<'a> {
    creating: &'a CreateLocks,
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

impl VmService {
    /// Waits for `vm_id`'s turn to be created (see `VmService::creating`).
    pub(super) async fn create_turn(&self, vm_id: &VmId) -> CreateTurn<'_> {
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

    /// CreateVm: makes the container (not started). Idempotent for the same id, customer and
    /// config.
    pub async fn create(&self, caller: &Caller, req: CreateVm) -> Result<Arc<VmSnapshot>, Error> {
        if !req.customer_id.is_empty() && req.customer_id != caller.customer_id {
            return Err(Error::PermissionDenied(format!(
                "customer_id {:?} is not the caller's customer",
                req.customer_id
            )));
        }
        // The caps (spec §5.1) come before anything touches the engine; the size first, as it
        // bounds the work of every other rule.
        if let Some(config) = &req.config {
            validate::config_size(config.encoded_len(), &self.limits)?;
        }
        let spec = validate::vm_spec(req.config.as_ref(), self.backend.engine().ncpu)?;
        validate::port_count(&spec, &self.limits)?;
        let named = !req.vm_id.is_empty();
        let vm_id = if named {
            VmId::parse(&req.vm_id).map_err(|why| Error::InvalidArgument(format!("vm_id {why}")))?
        } else {
            VmId::generate()
        };
        let config = req.config.unwrap_or_default();
        let config_bytes = config.encode_to_vec();
        self.require_docker()?;

        // An idempotent retry is answered before the quota: it makes no new VM.
        if let Some(slot) = self.index.get(&vm_id) {
            return same_vm(slot.snapshot(), caller, &config_bytes);
        }
        // Held until this create ends, either way (before the pull: a pull in flight is a
        // create in flight, and concurrent creates must not overshoot the cap).
        let _counted =
            self.quota
                .reserve(&self.index, &caller.customer_id, &vm_id, &self.limits)?;
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
    use crate::service::tests::service;

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
