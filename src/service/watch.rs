//! Keeps the index true to Docker (spec §6): at (re)connect, make sure the VM network exists,
//! reap leftovers and re-list, then follow the event stream, re-listing every minute; reconnect
//! with backoff when the engine goes away, answering `unavailable` meanwhile.
//!
//! VMs are hostile (spec §5.1) and can make Docker emit events at will, so only lifecycle
//! events are followed and each VM's re-reads are coalesced (`refresh`): what an event costs
//! is bounded per VM, whatever the VM does.

mod reap;
mod refresh;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::VmService;
use crate::backend::{self, host_ports};

/// Counts event-stream reconnects, for /metrics.
pub static RECONNECTS: AtomicU64 = AtomicU64::new(0);

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How often a connected instance re-lists: repairs whatever a dropped event missed (the
/// event stream is not a guaranteed delivery), and re-reads the network's subnets. A re-list
/// costs one list call, one inspect per container of this scope (8 at a time) and a second,
/// under the VM's lock, only for those the index disagrees with; other scopes' containers
/// are not inspected.
pub const RELIST_EVERY: Duration = Duration::from_secs(60);

/// One instance's watch: what outlives a single connection.
struct Watch {
    service: Arc<VmService>,
    refreshes: Arc<refresh::Refreshes>,
    left_alone: reap::LeftAlone,
    /// The network warning is said once per process, not at every reconnect.
    network_warned: AtomicBool,
    /// Whether the last network check failed (its error is logged when that starts).
    network_failing: AtomicBool,
}

/// Runs until `cancel`: connect, reconcile, follow events, repeat.
pub async fn run(service: Arc<VmService>, cancel: CancellationToken) {
    warn_if_host_ports_overlap(&service);
    let watch = Watch {
        service,
        refreshes: Arc::default(),
        left_alone: reap::LeftAlone::default(),
        network_warned: AtomicBool::new(false),
        network_failing: AtomicBool::new(false),
    };
    let service = &watch.service;
    let mut backoff = BACKOFF_MIN;
    // One warning per outage (the first failed attempt at start counts as one), then quiet.
    let mut warned = false;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        match connect_and_follow(&watch, &cancel).await {
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

/// Only a local engine shares this host's ephemeral ports; for a remote one, this host's
/// settings say nothing.
fn warn_if_host_ports_overlap(service: &VmService) {
    let settings = service.backend().settings();
    if settings.host.starts_with("tcp://") || settings.host.starts_with("http://") {
        return;
    }
    if let Some(warning) = host_ports::check_this_host(settings.port_range) {
        tracing::warn!("{warning}");
    }
}

/// One connection's life. `Ok` only when cancelled.
async fn connect_and_follow(
    watch: &Watch,
    cancel: &CancellationToken,
) -> Result<(), backend::Error> {
    let service = &watch.service;
    let engine = service.backend().negotiate().await?;
    // Events since just before the re-list are replayed, so nothing between the two is missed.
    let since = crate::vm::unix_seconds(SystemTime::now()) - 1;
    relist(watch).await?;
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
    let mut relist_timer =
        tokio::time::interval_at(tokio::time::Instant::now() + RELIST_EVERY, RELIST_EVERY);
    relist_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = relist_timer.tick() => {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    result = relist(watch) => result?,
                }
            }
            next = events.next() => match next {
                Some(Ok(event)) => {
                    if event.scope == service.scope() {
                        watch.refreshes.request(service, &event.vm_id, Some(&event.container_id));
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

/// The network, the reaper and the index, brought in line with the engine.
async fn relist(watch: &Watch) -> Result<(), backend::Error> {
    ensure_network(watch).await?;
    reap::reap(&watch.service, &watch.left_alone).await?;
    resync(watch).await
}

/// Makes sure the VM network exists and hands its subnets to the listeners' guard. Checked at
/// every connect and re-list: without it every BootVm fails, and the operator should hear why
/// before the first caller does. `Err` only when the engine is gone.
async fn ensure_network(watch: &Watch) -> Result<(), backend::Error> {
    let service = &watch.service;
    let name = &service.backend().settings().network;
    let network = match service.backend().ensure_network().await {
        Ok(network) => network,
        Err(e) if e.is_unavailable() => return Err(e),
        Err(e) => {
            if !watch.network_failing.swap(true, Ordering::Relaxed) {
                tracing::error!(network = name, error = %e, "cannot create or read the VM network (UNKEY_METALD_DOCKER_NETWORK): creating VMs fails until it exists");
            }
            return Ok(());
        }
    };
    watch.network_failing.store(false, Ordering::Relaxed);
    if network.created {
        tracing::info!(
            network = name,
            network_id = network.id,
            "created the VM network (bridge, inter-container traffic off)"
        );
    }
    let as_metald_makes_it = network.ours && network.isolated;
    if !as_metald_makes_it && !watch.network_warned.swap(true, Ordering::Relaxed) {
        if network.isolated {
            tracing::warn!(
                network = name,
                "the VM network was not made by metald; using it as it is"
            );
        } else {
            tracing::warn!(
                network = name,
                "VMs can reach each other on the VM network: it is not a bridge with inter-container traffic off (com.docker.network.bridge.enable_icc=false); using it as it is"
            );
        }
    }
    service.peer_guard().set_vm_subnets(network.subnets);
    Ok(())
}

/// Lists every VM container of this scope and brings the index in line. One container that
/// cannot be inspected is logged and passed over: it must not keep the whole instance
/// answering `unavailable`.
async fn resync(watch: &Watch) -> Result<(), backend::Error> {
    let service = &watch.service;
    let mut seen = HashSet::new();
    let listing = service
        .backend()
        .list_vm_containers(service.scope())
        .await?;
    for view in listing.views {
        let id = view.id.clone();
        let known = service
            .snapshot_of(view.clone())
            .map(|s| (s.vm_id.clone(), s));
        match known {
            Ok((vm_id, snapshot)) => {
                match service.index().get(&vm_id) {
                    Some(slot) if refresh::unchanged(&slot.snapshot(), &view) => {}
                    // The listing's inspect may be older than an operation that finished
                    // since: re-read under the VM's lock rather than store it.
                    Some(_) => watch.refreshes.soon(service, &vm_id, Some(&view.id)).await,
                    None => {
                        service.index().insert_new(snapshot);
                    }
                }
                seen.insert(vm_id);
            }
            Err(why) => tracing::debug!(container_id = id, reason = why, "not a VM of this scope"),
        }
    }
    if !listing.unreadable.is_empty() {
        // A container of ours could not be inspected: do not conclude that any VM is gone.
        return Ok(());
    }
    // Gone while we were not looking; the re-read confirms under the lock before removing.
    for vm_id in service.index().ids() {
        if !seen.contains(&vm_id) {
            watch.refreshes.soon(service, &vm_id, None).await;
        }
    }
    Ok(())
}
