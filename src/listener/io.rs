//! The bytes of a connection before hyper sees them: the TLS handshake, the first bytes that
//! tell HTTP/1.1 from HTTP/2 (read here under a timer, since hyper-util's sniffing has none),
//! and a stream that puts them back.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;

use super::{H2_PREFACE, HANDSHAKE_TIMEOUT};

/// The TLS handshake within [`HANDSHAKE_TIMEOUT`]; `None` (logged at debug level) when it
/// fails or takes too long.
pub(super) async fn handshake(
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

/// Reads until the bytes tell HTTP/2 (the whole preface) from HTTP/1.1 (anything else).
pub(super) async fn first_bytes<I: AsyncRead + Unpin>(io: &mut I) -> std::io::Result<Vec<u8>> {
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
pub(super) struct Prefixed<I> {
    pub(super) prefix: Vec<u8>,
    pub(super) at: usize,
    pub(super) inner: I,
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
    use std::time::Duration;
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
