//! Re-reading one VM from Docker, under its op lock, coalesced: however many events arrive for
//! a VM, at most one re-read is in flight and one more waits, so a VM that makes Docker emit
//! events in a loop costs a bounded number of inspects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::backend::ContainerView;
use crate::service::VmService;
use crate::vm::index::VmSlot;
use crate::vm::{VmId, VmSnapshot};

/// The VMs with a re-read in flight, by vm id.
#[derive(Default)]
pub(super) struct Refreshes {
    /// Present while a task re-reads that VM; whether another re-read was asked for meanwhile,
    /// and the newest container id an event named.
    queued: Mutex<HashMap<String, Again>>,
}

#[derive(Default)]
struct Again {
    wanted: bool,
    container: Option<String>,
}

impl Refreshes {
    /// Re-reads the VM soon: now when no re-read runs for it, else once after the running one.
    pub(super) fn request(
        self: &Arc<Self>,
        service: &Arc<VmService>,
        vm_id: &str,
        container: Option<&str>,
    ) {
        {
            let mut queued = lock(&self.queued);
            if let Some(again) = queued.get_mut(vm_id) {
                again.wanted = true;
                if let Some(c) = container {
                    again.container = Some(c.to_owned());
                }
                return;
            }
            queued.insert(vm_id.to_owned(), Again::default());
        }
        let this = self.clone();
        let service = service.clone();
        let vm_id = vm_id.to_owned();
        let mut container = container.map(str::to_owned);
        tokio::spawn(async move {
            loop {
                refresh(&service, &vm_id, container.as_deref()).await;
                let mut queued = lock(&this.queued);
                match queued.get_mut(&vm_id) {
                    Some(again) if again.wanted => {
                        again.wanted = false;
                        if let Some(c) = again.container.take() {
                            container = Some(c);
                        }
                    }
                    _ => {
                        queued.remove(&vm_id);
                        return;
                    }
                }
            }
        });
    }

    /// Re-reads a known VM now when no operation holds it (so a re-list's findings are in the
    /// index when it returns); otherwise after that operation, which may hold it for a whole
    /// grace period, in the background.
    pub(super) async fn soon(
        self: &Arc<Self>,
        service: &Arc<VmService>,
        vm_id: &VmId,
        container: Option<&str>,
    ) {
        let Some(slot) = service.index().get(vm_id) else {
            return;
        };
        let guard = slot.op_lock.try_lock();
        match guard {
            Ok(_serialised) => reread(service, vm_id, &slot).await,
            Err(_) => self.request(service, vm_id.as_str(), container),
        };
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Whether a listed container says what the index already holds: then a re-list has nothing
/// to re-read (and costs no second inspect).
pub(super) fn unchanged(snapshot: &VmSnapshot, view: &ContainerView) -> bool {
    snapshot.container_id == view.id
        && snapshot.container_name == view.name
        && snapshot.docker_status == view.status
        && snapshot.started_at == view.started_at
        && snapshot.finished_at == view.finished_at
        && snapshot.exit_code == view.exit_code
        && snapshot.network == view.network
}

/// Inspects a known VM and records what Docker says. The caller holds the VM's op lock.
#[tracing::instrument(name = "vm.refresh", level = "info", skip_all, fields(vm_id = %id))]
async fn reread(service: &VmService, id: &VmId, slot: &VmSlot) {
    if slot.is_removed() {
        return;
    }
    let index = service.index();
    let container_id = slot.snapshot().container_id.clone();
    match service.backend().inspect(&container_id).await {
        Ok(view) => match service.snapshot_of(view) {
            Ok(snapshot) => {
                index.upsert(snapshot);
            }
            Err(why) => tracing::warn!(vm_id = %id, reason = why, "container no longer a valid VM"),
        },
        Err(e) if e.is_not_found() => {
            if index.remove(id, Some(&container_id)) {
                tracing::info!(vm_id = %id, container_id, "vm container removed outside metald");
            }
        }
        Err(e) => tracing::warn!(vm_id = %id, error = %e, "could not refresh vm"),
    }
}

/// Re-reads one VM from Docker and records it (or its absence).
async fn refresh(service: &VmService, vm_id: &str, container_hint: Option<&str>) {
    let Ok(id) = VmId::parse(vm_id) else { return };
    let index = service.index();
    match index.get(&id) {
        Some(slot) => {
            let _serialised = slot.op_lock.lock().await;
            reread(service, &id, &slot).await;
        }
        // A VM the index does not know yet: made by a create in flight or another instance
        // of this scope.
        None => {
            let Some(container) = container_hint else {
                return;
            };
            match service.backend().inspect(container).await {
                Ok(view) => {
                    if let Ok(snapshot) = service.snapshot_of(view) {
                        index.insert_new(snapshot);
                    }
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => tracing::warn!(vm_id, error = %e, "could not read new vm"),
            }
        }
    }
}
