//! Re-reading one VM from Docker, under its op lock, coalesced: however many events arrive for
//! a VM, at most one re-read is in flight and one more waits, so a VM that makes Docker emit
//! events in a loop costs a bounded number of inspects.

use std::collections::HashMap;
use std::future::Future;
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
        let service = service.clone();
        self.coalesce(vm_id, container, move |vm_id, container| {
            let service = service.clone();
            async move { refresh(&service, &vm_id, container.as_deref()).await }
        });
    }

    /// Runs `run(key, hint)` now when none runs for `key`; otherwise marks it wanted once more
    /// after the running one (with the newest hint). Any number of calls meanwhile add one run.
    fn coalesce<F, Fut>(self: &Arc<Self>, key: &str, hint: Option<&str>, run: F)
    where
        F: Fn(String, Option<String>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        {
            let mut queued = lock(&self.queued);
            if let Some(again) = queued.get_mut(key) {
                again.wanted = true;
                if let Some(h) = hint {
                    again.container = Some(h.to_owned());
                }
                return;
            }
            queued.insert(key.to_owned(), Again::default());
        }
        let this = self.clone();
        let key = key.to_owned();
        let mut hint = hint.map(str::to_owned);
        tokio::spawn(async move {
            loop {
                run(key.clone(), hint.clone()).await;
                let mut queued = lock(&this.queued);
                match queued.get_mut(&key) {
                    Some(again) if again.wanted => {
                        again.wanted = false;
                        if let Some(h) = again.container.take() {
                            hint = Some(h);
                        }
                    }
                    _ => {
                        queued.remove(&key);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_burst_costs_at_most_two_runs_per_key() {
        let refreshes = Arc::new(Refreshes::default());
        let runs = Arc::new(Mutex::new(Vec::<(String, Option<String>)>::new()));
        let counted = {
            let runs = runs.clone();
            move |key: String, hint: Option<String>| {
                let runs = runs.clone();
                async move {
                    lock(&runs).push((key, hint));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        for i in 0..100 {
            refreshes.coalesce("vm-a", Some(&format!("c{i}")), counted.clone());
        }
        refreshes.coalesce("vm-b", None, counted.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let runs = lock(&runs).clone();
        let a: Vec<_> = runs.iter().filter(|(k, _)| k == "vm-a").collect();
        assert_eq!(a.len(), 2, "{runs:?}");
        // The first with its own hint, the one after with the newest.
        assert_eq!(a[0].1.as_deref(), Some("c0"));
        assert_eq!(a[1].1.as_deref(), Some("c99"));
        assert_eq!(runs.iter().filter(|(k, _)| k == "vm-b").count(), 1);
        assert!(lock(&refreshes.queued).is_empty(), "nothing left queued");
    }

    #[tokio::test]
    async fn a_request_after_the_run_ends_runs_again() {
        let refreshes = Arc::new(Refreshes::default());
        let count = Arc::new(AtomicUsize::new(0));
        let counted = {
            let count = count.clone();
            move |_: String, _: Option<String>| {
                let count = count.clone();
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        };
        refreshes.coalesce("vm-a", None, counted.clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
        refreshes.coalesce("vm-a", None, counted.clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
