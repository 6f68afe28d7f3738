//! Keeps the index true to Docker (spec §6): at (re)connect, re-list and reconcile (removing
//! leftovers of interrupted creates), then follow the event stream; reconnect with backoff
//! when the engine goes away, answering `unavailable` meanwhile.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::VmService;
use crate::backend::{self, labels};
use crate::vm::index::VmSlot;
use crate::vm::VmId;

/// Counts event-stream reconnects, for /metrics.
pub static RECONNECTS: AtomicU64 = AtomicU64::new(0);

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs until `cancel`: connect, reconcile, follow events, repeat.
pub async fn run(service: Arc<VmService>, cancel: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    // One warning per outage (the first failed attempt at start counts as one), then quiet.
    let mut warned = false;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        match connect_and_follow(&service, &cancel).await {
            Ok(()) => return,
            Err(e) => {
                if service.docker_up() {
                    tracing::warn!(error = %e, "lost the docker engine; answering unavailable until it is back");
                    RECONNECTS.fetch_add(1, Ordering::Relaxed);
                    backoff = BACKOFF_MIN;
                    warned = true;
                } else if !warned {
                    tracing::warn!(error = %e, "cannot reach the docker engine; answering unavailable and retrying");
                    warned = true;
                } else {
                    tracing::debug!(error = %e, "docker engine still unreachable");
                }
                service.set_docker_up(false);
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection's life. `Ok` only when cancelled.
async fn connect_and_follow(
    service: &Arc<VmService>,
    cancel: &CancellationToken,
) -> Result<(), backend::Error> {
    let engine = service.backend().negotiate().await?;
    // Events since just before the re-list are replayed, so nothing between the two is missed.
    let since = crate::vm::unix_seconds(SystemTime::now()) - 1;
    resync(service).await?;
    warn_if_network_missing(service).await;
    if !service.docker_up() {
        tracing::info!(
            version = engine.version,
            api = engine.api_version,
            cpus = engine.ncpu,
            vms = service.index().len(),
            "docker engine connected, index rebuilt"
        );
    }
    service.set_docker_up(true);
    let mut events = Box::pin(service.backend().events(since));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            next = events.next() => match next {
                Some(Ok(event)) => {
                    if event.scope == service.scope() {
                        spawn_refresh(service, &event.vm_id, Some(&event.container_id));
                    }
                }
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(backend::Error {
                        op: "follow events",
                        target: String::new(),
                        kind: backend::ErrorKind::Unavailable("event stream ended".into()),
                    })
                }
            }
        }
    }
}

/// The configured network is checked at every connect: without it every BootVm fails, and
/// the operator should hear why before the first caller does.
async fn warn_if_network_missing(service: &Arc<VmService>) {
    let network = &service.backend().settings().network;
    match service.backend().network_exists(network).await {
        Ok(true) => {}
        Ok(false) => tracing::error!(
            network,
            "UNKEY_METALD_DOCKER_NETWORK names a network the engine does not have: BootVm fails until it exists"
        ),
        Err(e) => tracing::warn!(network, error = %e, "could not check the docker network"),
    }
}

/// Lists every VM container of this scope and brings the index in line; removes containers
/// named like VMs of this scope that carry no valid labels (leftovers of interrupted creates).
/// One container that cannot be removed or inspected is logged and passed over: it must not
/// keep the whole instance answering `unavailable`.
async fn resync(service: &Arc<VmService>) -> Result<(), backend::Error> {
    let backend = service.backend();
    for zombie in backend
        .list_named(&labels::name_prefix(service.scope()))
        .await?
    {
        let Err(why) = backend::docker::vm_labels(&zombie) else {
            continue;
        };
        // The default scope's names are a prefix of every scope's: a container that says it
        // belongs to another scope is that scope's to reap.
        if zombie
            .labels
            .get(labels::SCOPE)
            .is_some_and(|scope| scope != service.scope())
        {
            continue;
        }
        tracing::warn!(
            container = zombie.name,
            container_id = zombie.id,
            reason = why,
            "removing leftover container of an interrupted create"
        );
        if let Err(e) = backend.remove(&zombie.id, true).await {
            if e.is_unavailable() && backend.ping().await.is_err() {
                return Err(e);
            }
            if !e.is_not_found() {
                tracing::warn!(container = zombie.name, error = %e, "could not remove leftover container; passing over it");
            }
        }
    }
    let mut seen = HashSet::new();
    let listing = backend.list_vm_containers().await?;
    for view in listing.views {
        let id = view.id.clone();
        match service.snapshot_of(view) {
            Ok(snapshot) => {
                let vm_id = snapshot.vm_id.clone();
                match service.index().get(&vm_id) {
                    Some(_) => refresh_soon(service, &vm_id, Some(&id)).await,
                    None => {
                        service.index().insert_new(snapshot);
                    }
                }
                seen.insert(vm_id);
            }
            Err(why) => tracing::debug!(container_id = id, reason = why, "not a VM of this scope"),
        }
    }
    if listing
        .unreadable
        .iter()
        .any(|l| labels::scope_of(l) == service.scope())
    {
        // A container of ours could not be inspected: do not conclude that any VM is gone.
        return Ok(());
    }
    // Gone while we were not looking; refresh confirms under the lock before removing.
    for vm_id in service.index().ids() {
        if !seen.contains(&vm_id) {
            refresh_soon(service, &vm_id, None).await;
        }
    }
    Ok(())
}

/// Refreshes a known VM now when no operation holds it; otherwise after that operation (which
/// may hold it for a whole grace period), in the background.
async fn refresh_soon(service: &Arc<VmService>, vm_id: &VmId, container: Option<&str>) {
    let Some(slot) = service.index().get(vm_id) else {
        return;
    };
    let guard = slot.op_lock.try_lock();
    match guard {
        Ok(_serialised) => reread(service, vm_id, &slot).await,
        Err(_) => spawn_refresh(service, vm_id.as_str(), container),
    };
}

fn spawn_refresh(service: &Arc<VmService>, vm_id: &str, container: Option<&str>) {
    let service = service.clone();
    let vm_id = vm_id.to_owned();
    let container = container.map(str::to_owned);
    tokio::spawn(async move { refresh(&service, &vm_id, container.as_deref()).await });
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
#[tracing::instrument(name = "vm.refresh", level = "info", skip_all, fields(vm_id))]
pub(crate) async fn refresh(service: &VmService, vm_id: &str, container_hint: Option<&str>) {
    let Ok(id) = VmId::parse(vm_id) else { return };
    let index = service.index();
    match index.get(&id) {
        Some(slot) => {
            let _serialised = slot.op_lock.lock().await;
            if slot.is_removed() {
                return;
            }
            let container_id = slot.snapshot().container_id.clone();
            match service.backend().inspect(&container_id).await {
                Ok(view) => match service.snapshot_of(view) {
                    Ok(snapshot) => {
                        index.upsert(snapshot);
                    }
                    Err(why) => {
                        tracing::warn!(vm_id, reason = why, "container no longer a valid VM")
                    }
                },
                Err(e) if e.is_not_found() => {
                    if index.remove(&id, Some(&container_id)) {
                        tracing::info!(vm_id, container_id, "vm container removed outside metald");
                    }
                }
                Err(e) => tracing::warn!(vm_id, error = %e, "could not refresh vm"),
            }
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
