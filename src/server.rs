//! Wires state and background tasks together, serves the listeners, and shuts down in a
//! written-down order.

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState, RpcSlots};
use crate::backend::DockerBackend;
use crate::billing::{collector, sender, Billing, Mode};
use crate::config::{Config, TlsMode};
use crate::peer_guard::PeerGuard;
use crate::service::{watch, Parts, VmService};
use crate::telemetry::Metrics;
use crate::vm::index::VmIndex;
use crate::vm::UsageBoard;
use crate::{listener, tls};

/// How long in-flight RPCs may take to finish after a shutdown signal (spec §2).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves metald on `listener` until `shutdown` resolves. Shutdown order: stop accepting,
/// drain in-flight RPCs (at most [`DRAIN_TIMEOUT`]), cancel background tasks and wait for
/// them. VMs keep running.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let backend = DockerBackend::new(config.docker.clone())?;
    let peer_guard = Arc::new(PeerGuard::default());
    let index = Arc::new(VmIndex::default());
    let usage = Arc::new(UsageBoard::default());
    let docker_up = Arc::new(AtomicBool::new(false));
    let billing = Billing::open(
        &config.billing,
        config.data_dir(),
        backend.clone(),
        index.clone(),
        usage.clone(),
        docker_up.clone(),
    )
    .map_err(|e| anyhow::anyhow!("billing spool under {}: {e}", config.data_dir().display()))?;
    let billing = Arc::new(billing);
    let service = Arc::new(VmService::new(Parts {
        backend,
        scope: config.scope.clone(),
        index,
        usage,
        docker_up,
        billing: Some(billing.clone()),
        limits: config.limits.clone(),
        peer_guard: peer_guard.clone(),
    }));
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(watch::run(service.clone(), cancel.clone()));
    tasks.spawn(collector::run(billing.clone(), cancel.clone()));
    tasks.spawn(trim_memory(cancel.clone()));
    if billing.mode() == Mode::Enabled {
        tasks.spawn(sender::run(billing.clone(), cancel.clone()));
        tasks.spawn(sender::heartbeat(billing.clone(), cancel.clone()));
    }
    tracing::info!(
        mode = billing.mode().name(),
        endpoint = config.billing.endpoint,
        "billing"
    );

    if config.otel.enabled {
        tracing::info!(
            "UNKEY_METALD_OTEL_ENABLED: traces go by OTLP; metrics are served as Prometheus text, not pushed by OTLP"
        );
    }
    let state = AppState {
        service,
        billing,
        metrics: Arc::new(Metrics::default()),
        started: Instant::now(),
        rpc_tasks: TaskTracker::new(),
        rpc_slots: Arc::new(RpcSlots::new(config.max_inflight_rpcs)),
        engine_ping: Arc::default(),
    };
    let metrics_listener_on = config.otel.enabled && config.otel.prometheus_enabled;
    let bounds = connection_bounds(config.max_connections, metrics_listener_on);
    if metrics_listener_on {
        let addr = (
            config.otel.prometheus_interface,
            config.otel.prometheus_port,
        );
        let metrics_listener = TcpListener::bind(addr).await?;
        tracing::info!(address = %metrics_listener.local_addr()?, "prometheus listener");
        let router = api::metrics_router(state.clone());
        let options = listener::Options {
            name: "prometheus",
            tls: None,
            peer_guard: peer_guard.clone(),
            max_connections: bounds.metrics,
        };
        tasks.spawn(listener::serve(
            metrics_listener,
            router,
            options,
            cancel.clone(),
        ));
    }

    let tls = match &config.tls.mode {
        TlsMode::Disabled => None,
        TlsMode::File { cert, key, ca } => Some(tls::server_config(cert, key, ca.as_deref())?),
    };
    tracing::info!(
        address = %listener.local_addr()?,
        scope = config.scope,
        tls = tls.is_some(),
        max_inflight_rpcs = config.max_inflight_rpcs,
        "metald listening"
    );
    let options = listener::Options {
        name: "api",
        tls,
        peer_guard,
        max_connections: bounds.api,
    };
    let draining = CancellationToken::new();
    let signal = {
        let draining = draining.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight requests");
            draining.cancel();
        }
    };
    let rpc_tasks = state.rpc_tasks.clone();
    let router = api::router(state);
    tokio::spawn(signal);
    let drain = async {
        listener::serve(listener, router, options, draining.clone()).await;
        // Connections are done; service calls whose caller left or whose deadline passed
        // may still run, and finish before we exit.
        rpc_tasks.close();
        rpc_tasks.wait().await;
    };
    tokio::select! {
        () = drain => {}
        _ = async { draining.cancelled().await; tokio::time::sleep(DRAIN_TIMEOUT).await } => {
            tracing::warn!("drain timeout passed; exiting with requests still in flight");
        }
    }
    cancel.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop in time");
    }
    tracing::info!("metald stopped");
    Ok(())
}

/// How often freed heap memory is handed back to the kernel.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// After a burst (thousands of refused RPCs, many connections closed) glibc keeps the
/// freed memory in its arenas, so RSS stays at the burst's peak: measured, two bursts of
/// 5,000 refused RPCs over 250 connections left +13 MiB, also once the connections had
/// closed. `malloc_trim` hands whole free pages back (that case: -5 MiB from before the
/// bursts). It runs on a timer rather than on some sign of a burst, since freed memory
/// gives none (RSS does not move when memory is freed). It holds each arena's lock while
/// it walks it: measured 0.2-8 ms wall time here (once 0.5 s, with the cores busy
/// elsewhere), on a blocking thread.
async fn trim_memory(cancel: CancellationToken) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            // SAFETY: malloc_trim has no preconditions; it only releases free memory.
            let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    cancel.cancelled().await;
}

/// Each listener's bound on open connections: as configured, or derived from the open-file
/// limit (which `main` has raised to the hard limit), and logged either way.
fn connection_bounds(configured: usize, metrics_listener: bool) -> listener::fd_limit::Bounds {
    let soft = match listener::fd_limit::current() {
        Ok(limit) => limit.soft,
        Err(e) => {
            // Linux always answers; were it not to, assume the common default.
            tracing::warn!(error = %e, "cannot read the open-file limit; assuming 1024");
            1024
        }
    };
    let bounds = listener::fd_limit::bounds(configured, soft, metrics_listener);
    let per_listener = if metrics_listener { 2 } else { 1 };
    if configured > 0 && (configured as u64).saturating_mul(per_listener) >= soft {
        tracing::warn!(
            max_connections = configured,
            open_file_limit = soft,
            "UNKEY_METALD_MAX_CONNECTIONS leaves no file descriptors for the engine and spool: accepts may fail"
        );
    }
    tracing::info!(
        api = bounds.api,
        prometheus = bounds.metrics,
        open_file_limit = soft,
        reserved = bounds.reserved,
        configured = configured > 0,
        "connection bounds"
    );
    bounds
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
