//! Serving connections on a listener: cleartext (HTTP/1.1 and h2c by prior knowledge) or TLS
//! (HTTP/1.1 and h2 by ALPN), with the timeouts a public port needs, and a graceful stop.
//!
//! Hand-written over hyper-util rather than `axum::serve` because that one sets no timer:
//! without it hyper cannot time out a request head that never completes, and a stalled
//! client holds its connection for ever. Hyper-util's protocol sniffing has no timer either,
//! so the first bytes are read here, under one. It also lets both listeners share one loop.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Longest a new connection may take to show which protocol it speaks (its first bytes:
/// an HTTP/1.1 request line or the HTTP/2 preface). A client that connects and sends
/// nothing is dropped after this.
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

/// The hyper settings both listeners use.
fn builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
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
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    router: Router,
    stop: CancellationToken,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = builder();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small unary answers go out at once, not after Nagle's delay.
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            // Until hyper has the connection, a stop ends it here: a client that has not
            // shown its first request yet does not hold the drain up.
            let result = match acceptor {
                None => serve_on(&builder, tcp, service, watcher, &stop).await,
                Some(acceptor) => {
                    let tls = tokio::select! {
                        tls = handshake(&acceptor, tcp, peer) => tls,
                        () = stop.cancelled() => None,
                    };
                    match tls {
                        Some(tls) => serve_on(&builder, tls, service, watcher, &stop).await,
                        None => return,
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Reads the connection's first bytes (within [`FIRST_BYTES_TIMEOUT`]) and hands hyper the
/// connection with them put back. Hyper's own look at them, to tell HTTP/1.1 from HTTP/2,
/// runs under no timer at all.
async fn serve_on<I>(
    builder: &Builder<TokioExecutor>,
    mut io: I,
    service: TowerToHyperService<Router>,
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

/// Reads until the bytes tell HTTP/2 (the whole preface) from HTTP/1.1 (anything else).
async fn first_bytes<I: AsyncRead + Unpin>(io: &mut I) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let mut first = Vec::with_capacity(H2_PREFACE.len());
    loop {
        let mut chunk = [0u8; H2_PREFACE.len()];
        let want = H2_PREFACE.len() - first.len();
        let n = io.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        first.extend_from_slice(&chunk[..n]);
        if first.len() == H2_PREFACE.len() || !H2_PREFACE.starts_with(&first) {
            return Ok(first);
        }
    }
}

/// A connection whose first bytes were already read: they are read again first.
struct Prefixed<I> {
    prefix: Vec<u8>,
    at: usize,
    inner: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    #[tokio::test]
    async fn first_bytes_stop_as_soon_as_the_protocol_shows() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"POST /x HTTP/1.1\r\n")
            .await
            .unwrap();
        // "PO" is not the start of the preface: two bytes or more decide it.
        let first = first_bytes(&mut server).await.unwrap();
        assert!(first.starts_with(b"PO") && !H2_PREFACE.starts_with(&first));
        let (mut client, mut server) = tokio::io::duplex(64);
        let reading = tokio::spawn(async move { first_bytes(&mut server).await });
        tokio::io::AsyncWriteExt::write_all(&mut client, &H2_PREFACE[..10])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !reading.is_finished(),
            "a partial preface waits for the rest"
        );
        tokio::io::AsyncWriteExt::write_all(&mut client, &H2_PREFACE[10..])
            .await
            .unwrap();
        assert_eq!(reading.await.unwrap().unwrap(), H2_PREFACE);
    }

    #[tokio::test]
    async fn prefixed_reads_the_prefix_then_the_rest() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b" world")
            .await
            .unwrap();
        drop(client);
        let mut io = Prefixed {
            prefix: b"hello".to_vec(),
            at: 0,
            inner: server,
        };
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
