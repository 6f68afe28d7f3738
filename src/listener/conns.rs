//! The open connections of one listener and the bound on them, so that a new client always
//! gets in: the bound stays below the process's file limit, and at the bound the oldest idle
//! connection is closed to make room. Idle means no request in flight: a connection that has
//! sent nothing yet (or is in its TLS handshake, or is still sending a request head), and a
//! kept-alive one between requests. An HTTP/2 connection is busy while any stream is.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

/// One open connection.
#[derive(Debug, Default)]
pub(super) struct Conn {
    /// Requests (HTTP/2: streams) whose response has not been sent in full.
    in_flight: AtomicUsize,
    /// Cancelled to close the connection and make room for a new one.
    pub(super) evict: CancellationToken,
}

impl Conn {
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }
}

/// A listener's open connections, oldest first.
#[derive(Debug)]
pub(super) struct Connections {
    bound: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    next_id: u64,
    /// By id, which grows with every accept: the first idle entry is the oldest idle one.
    by_age: BTreeMap<u64, Arc<Conn>>,
}

/// A connection's place among the open ones; given up when dropped (the connection ended,
/// or was evicted).
#[derive(Debug)]
pub(super) struct Admitted {
    conns: Arc<Connections>,
    id: u64,
    pub(super) conn: Arc<Conn>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.conns.lock().by_age.remove(&self.id);
    }
}

impl Connections {
    pub(super) fn new(bound: usize) -> Arc<Self> {
        Arc::new(Self {
            bound: bound.max(1),
            open: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Open> {
        match self.open.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Makes room for a new connection: at the bound the oldest idle one is evicted. `None`
    /// when every open connection has a request in flight: the new one is to be closed
    /// (closing a busy one would break a request that is being served).
    pub(super) fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut open = self.lock();
        if open.by_age.len() >= self.bound && !evict_oldest_idle(&mut open) {
            return None;
        }
        let id = open.next_id;
        open.next_id += 1;
        let conn = Arc::new(Conn::default());
        open.by_age.insert(id, conn.clone());
        Some(Admitted {
            conns: self.clone(),
            id,
            conn,
        })
    }

    /// Closes the oldest idle connection, if any (the accept loop's way to free a file
    /// descriptor when accept itself fails for want of one).
    pub(super) fn evict_oldest_idle(&self) -> bool {
        evict_oldest_idle(&mut self.lock())
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().by_age.len()
    }
}

/// Leaves the registry at once, so the connection no longer counts; its task closes the
/// socket when it sees the token. A request that arrives on it in that instant is lost
/// with it, as with any connection the server closes while idle.
fn evict_oldest_idle(open: &mut Open) -> bool {
    let victim = open
        .by_age
        .iter()
        .find(|(_, conn)| conn.idle())
        .map(|(id, _)| *id);
    match victim.and_then(|id| open.by_age.remove(&id)) {
        Some(conn) => {
            conn.evict.cancel();
            true
        }
        None => false,
    }
}

/// The router as one connection's hyper service: counts the connection's requests in flight
/// from the call until its response has been sent in full (or dropped).
#[derive(Clone)]
pub(super) struct ConnService {
    router: Router,
    conn: Arc<Conn>,
}

impl ConnService {
    pub(super) fn new(router: Router, conn: Arc<Conn>) -> Self {
        Self { router, conn }
    }
}

impl hyper::service::Service<http::Request<Incoming>> for ConnService {
    type Response = http::Response<Tracked>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let busy = Busy::new(self.conn.clone());
        let router = self.router.clone();
        Box::pin(async move {
            let response = match tower::ServiceExt::oneshot(router, request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok(response.map(|inner| Tracked { inner, _busy: busy }))
        })
    }
}

/// One request in flight on a connection.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted until hyper has sent it (or dropped it).
pub(super) struct Tracked {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Lets a log line through at most once per interval, and counts what it held back: a
/// flood of refusals must not become a flood of log lines.
#[derive(Debug)]
pub(crate) struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    held: AtomicU64,
}

impl Throttle {
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(None),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may go out now, `n` being how many were held back since the
    /// last one; `None` (and one more held back) otherwise.
    pub(crate) fn ready(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = match self.last.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if last.is_some_and(|at| now.duration_since(at) < self.every) {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_bound_the_oldest_idle_connection_makes_room() {
        let conns = Connections::new(3);
        let a = conns.admit().unwrap();
        let b = conns.admit().unwrap();
        let c = conns.admit().unwrap();
        let busy_a = Busy::new(a.conn.clone());
        // `a` is busy: `b` is the oldest idle one.
        let d = conns.admit().unwrap();
        assert!(!a.conn.evict.is_cancelled());
        assert!(b.conn.evict.is_cancelled());
        assert_eq!(conns.len(), 3);
        drop(b); // its task ends: nothing else leaves the registry
        assert_eq!(conns.len(), 3);
        let _busy_c = Busy::new(c.conn.clone());
        let _busy_d = Busy::new(d.conn.clone());
        assert!(
            conns.admit().is_none(),
            "every connection busy: the new one is refused"
        );
        drop(busy_a);
        let _e = conns.admit().unwrap();
        assert!(
            a.conn.evict.is_cancelled(),
            "idle again, and now the oldest"
        );
        assert!(!c.conn.evict.is_cancelled() && !d.conn.evict.is_cancelled());
    }

    #[test]
    fn throttle_counts_what_it_holds_back() {
        let t = Throttle::new(Duration::from_secs(60));
        assert_eq!(t.ready(), Some(0));
        assert_eq!(t.ready(), None);
        assert_eq!(t.ready(), None);
        *t.last.lock().unwrap() = Some(Instant::now() - Duration::from_secs(61));
        assert_eq!(t.ready(), Some(2));
    }
}
