//! Serving connections on a listener: cleartext (HTTP/1.1 and h2c by prior knowledge) or TLS
//! (HTTP/1.1 and h2 by ALPN), with the timeouts a public port needs, a bound on open
//! connections, the refusal of VM networks, and a graceful stop.
//!
//! Hand-written over hyper-util rather than `axum::serve` because that one sets no timer:
//! without it hyper cannot time out a request head that never completes, and a stalled
//! client holds its connection for ever. Hyper-util's protocol sniffing has no timer either,
//! so the first bytes are read here, under one. It also lets every listener share one loop.

mod conns;
pub mod fd_limit;
mod io;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub(crate) use self::conns::Throttle;
use self::conns::{Admitted, ConnService, Connections};
use self::io::{first_bytes, handshake, Prefixed};
use crate::peer_guard::PeerGuard;

/// Longest a new connection may take to show which protocol it speaks (its first bytes:
/// an HTTP/1.1 request line or the HTTP/2 preface). A client that connects and sends
/// nothing is dropped after this (or sooner, to make room: see `conns`).
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest hyper waits for an HTTP/1.1 request head. Hyper counts it from the moment the
/// connection is ready for a request, so it is also the idle limit of a kept-alive
/// connection: it stays above the 90 s that Go's and reqwest's pools keep idle connections,
/// so the client always closes first (a POST sent as the server closes is not retried).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// The start of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 connections are pinged when quiet this long, and closed when a ping goes
/// unanswered for [`H2_PING_TIMEOUT`]: a peer that vanished does not hold its connection.
const H2_PING_INTERVAL: Duration = Duration::from_secs(60);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a connection from a VM network lives: long enough to read its refusal, too short
/// to park connections here.
const REFUSED_LIFETIME: Duration = Duration::from_secs(5);
/// Warnings about refused connections and failing accepts: at most one per this time.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// How one listener serves.
pub struct Options {
    /// Which listener, for log lines ("api", "prometheus").
    pub name: &'static str,
    /// TLS when configured; cleartext otherwise.
    pub tls: Option<Arc<ServerConfig>>,
    /// Peers in a VM subnet get refusals and nothing else (spec §5.1).
    pub peer_guard: Arc<PeerGuard>,
    /// Open connections at most (see [`fd_limit::bounds`]).
    pub max_connections: usize,
}

/// The hyper settings every listener uses. Refused peers get no HTTP/1.1 keep-alive: one
/// answer, then the connection closes.
fn builder(keep_alive: bool) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(keep_alive);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

/// Serves `router` on `listener` until `stop` is cancelled; then stops accepting at once
/// (the listener is closed, so new clients are refused rather than left waiting) and lets
/// open connections finish their requests. The caller bounds how long that may take.
///
/// Each accepted peer is checked against the VM subnets as they are at that moment (they
/// change as the engine's networks do): a VM's connection is served by
/// [`crate::api::refusal_router`] only, so nothing of the service runs for it.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: Options,
    stop: CancellationToken,
) {
    let Options {
        name,
        tls,
        peer_guard,
        max_connections,
    } = options;
    let acceptor = tls.map(TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let serving = builder(true);
    let refusing = builder(false);
    let refusal = crate::api::refusal_router();
    let conns = Connections::new(max_connections);
    let full_warn = Throttle::new(WARN_EVERY);
    let accept_warn = Throttle::new(WARN_EVERY);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(name, &e, &conns, &accept_warn).await;
                    continue;
                }
            },
        };
        let from_vm = peer_guard.is_vm(peer.ip());
        if from_vm && peer_guard.should_warn(peer.ip()) {
            tracing::warn!(
                listener = name,
                %peer,
                "refusing a connection from a VM network: metald's API is not for VMs"
            );
        }
        let Some(admitted) = conns.admit() else {
            if let Some(held) = full_warn.ready() {
                tracing::warn!(
                    listener = name,
                    bound = max_connections,
                    also_closed = held,
                    "closed a new connection: all open connections have requests in flight"
                );
            }
            drop(tcp);
            continue;
        };
        // Small unary answers go out at once, not after Nagle's delay.
        let _ = tcp.set_nodelay(true);
        let (router, builder) = if from_vm {
            (refusal.clone(), refusing.clone())
        } else {
            (router.clone(), serving.clone())
        };
        let connection = Connection {
            tcp,
            peer,
            acceptor: acceptor.clone(),
            service: ConnService::new(router, admitted.conn.clone()),
            builder,
            watcher: graceful.watcher(),
            stop: stop.clone(),
        };
        let lifetime = from_vm.then_some(REFUSED_LIFETIME);
        tokio::spawn(run_connection(connection, admitted, lifetime));
    }
    drop(listener);
    graceful.shutdown().await;
}

/// What one connection's task needs.
struct Connection {
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    service: ConnService,
    builder: Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    stop: CancellationToken,
}

/// Serves one connection until it ends, its `lifetime` (if any) is up, or it is evicted to
/// make room; then gives its place up.
async fn run_connection(c: Connection, admitted: Admitted, lifetime: Option<Duration>) {
    let peer = c.peer;
    let evicted = admitted.conn.evict.clone();
    let work = async move {
        // Until hyper has the connection, a stop ends it here: a client that has not
        // shown its first request yet does not hold the drain up.
        match c.acceptor {
            None => serve_on(&c.builder, c.tcp, c.service, c.watcher, &c.stop).await,
            Some(acceptor) => {
                let tls = tokio::select! {
                    tls = handshake(&acceptor, c.tcp, peer) => tls,
                    () = c.stop.cancelled() => None,
                };
                match tls {
                    Some(tls) => serve_on(&c.builder, tls, c.service, c.watcher, &c.stop).await,
                    None => Ok(()),
                }
            }
        }
    };
    let bounded = async move {
        match lifetime {
            Some(limit) => tokio::time::timeout(limit, work)
                .await
                .unwrap_or_else(|_| Err("a refused peer's time is up".into())),
            None => work.await,
        }
    };
    tokio::select! {
        result = bounded => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        () = evicted.cancelled() => {
            tracing::debug!(%peer, "closed an idle connection to make room for a new one");
        }
    }
    drop(admitted);
}

/// An accept that failed. Out of file descriptors (EMFILE, ENFILE) the waiting client can
/// only get in once one is freed: the oldest idle connection is closed for it. Then a short
/// wait, as the same error would come back at once and the loop would spin. A client that
/// gave up before its accept is nobody's problem: the next one is accepted at once.
async fn accept_failed(name: &str, e: &std::io::Error, conns: &Connections, warn: &Throttle) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
    let freed = out_of_fds && conns.evict_oldest_idle();
    if let Some(held) = warn.ready() {
        tracing::warn!(
            listener = name,
            error = %e,
            closed_an_idle_connection = freed,
            also_failed = held,
            "accept failed"
        );
    }
    let pause = if freed { 5 } else { 50 };
    tokio::time::sleep(Duration::from_millis(pause)).await;
}

/// Reads the connection's first bytes (within [`FIRST_BYTES_TIMEOUT`]) and hands hyper the
/// connection with them put back. Hyper's own look at them, to tell HTTP/1.1 from HTTP/2,
/// runs under no timer at all.
async fn serve_on<I>(
    builder: &Builder<TokioExecutor>,
    mut io: I,
    service: ConnService,
    watcher: hyper_util::server::graceful::Watcher,
    stop: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let first = tokio::select! {
        read = tokio::time::timeout(FIRST_BYTES_TIMEOUT, first_bytes(&mut io)) => match read {
            Ok(read) => read?,
            Err(_) => return Err("no request within the first-bytes timeout".into()),
        },
        () = stop.cancelled() => return Ok(()),
    };
    let io = Prefixed {
        prefix: first,
        at: 0,
        inner: io,
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    watcher.watch(connection.into_owned()).await
}
