//! Keeps the index true to Docker (spec §6): at (re)connect, re-list and reconcile (removing
//! leftovers of interrupted creates), then follow the event stream; reconnect with backoff
//! when the engine goes away, answering `unavailable` meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::VmService;
use crate::backend::{self, labels};
use crate::vm::VmId;

/// Counts event-stream reconnects, for /metrics.
pub static RECONNECTS: AtomicU64 = AtomicU64::new(0);

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs until `cancel`: connect, reconcile, follow events, repeat.
pub async fn run(service: Arc<VmService>, cancel: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
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
                        let service = service.clone();
                        tokio::spawn(async move { refresh(&service, &event.vm_id, Some(&event.container_id)).await });
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

/// Lists every VM container of this scope and brings the index in line; removes containers
/// named like VMs of this scope that carry no valid labels (leftovers of interrupted creates).
async fn resync(service: &Arc<VmService>) -> Result<(), backend::Error> {
    let backend = service.backend();
    for zombie in backend
        .list_named(&labels::name_prefix(service.scope()))
        .await?
    {
        if let Err(why) = backend::docker::vm_labels(&zombie) {
            tracing::warn!(
                container = zombie.name,
                container_id = zombie.id,
                reason = why,
                "removing leftover container of an interrupted create"
            );
            if let Err(e) = backend.remove(&zombie.id, true).await {
                if !e.is_not_found() {
                    return Err(e);
                }
            }
        }
    }
    let mut seen = Vec::new();
    for view in backend.list_vm_containers().await? {
        let id = view.id.clone();
        match service.snapshot_of(view) {
            Ok(snapshot) => {
                let vm_id = snapshot.vm_id.clone();
                match service.index().get(&vm_id) {
                    // Known: refresh under its lock, so a concurrent operation's view wins.
                    Some(_) => refresh(service, vm_id.as_str(), Some(&id)).await,
                    None => {
                        service.index().upsert(snapshot);
                    }
                }
                seen.push(vm_id);
            }
            Err(why) => tracing::debug!(container_id = id, reason = why, "not a VM of this scope"),
        }
    }
    for vm_id in service.index().ids() {
        if !seen.contains(&vm_id) {
            refresh(service, vm_id.as_str(), None).await;
        }
    }
    Ok(())
}

/// Re-reads one VM from Docker and records it (or its absence).
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
                        if index.get(&id).is_none() {
                            index.upsert(snapshot);
                        }
                    }
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => tracing::warn!(vm_id, error = %e, "could not read new vm"),
            }
        }
    }
}
