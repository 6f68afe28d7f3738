//! The accept loop in process, on 127.0.0.1: VM peers refused, the connection bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::routing::{get, post};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

const RPC: &str = "/metal.vmprovisioner.v1.VmService/GetVmInfo";

struct Server {
    base: String,
    addr: SocketAddr,
    /// Calls that reached the service's routes.
    calls: Arc<AtomicUsize>,
    /// Requests to `/slow` wait for this.
    release: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(guard: Arc<PeerGuard>, max_connections: usize) -> Server {
    let calls = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let counted = calls.clone();
    let waiting = release.clone();
    let router = Router::new()
        .route(
            "/metal.vmprovisioner.v1.VmService/{method}",
            post(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { "called" }
            }),
        )
        .route("/health", get(|| async { "ok" }))
        .route(
            "/slow",
            get(move || async move {
                waiting.notified().await;
                "slow"
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let options = Options {
        name: "test",
        tls: None,
        peer_guard: guard,
        max_connections,
    };
    tokio::spawn(serve(listener, router, options, stop.clone()));
    Server {
        base: format!("http://{addr}"),
        addr,
        calls,
        release,
        stop,
    }
}

/// A Connect call, a gRPC call (HTTP/2) and `/health`, each on a fresh client (so on a
/// new connection): (status, body) for Connect and health, (status, grpc-status) for gRPC.
async fn three_answers(s: &Server) -> [(u16, String); 3] {
    let connect = reqwest::Client::new()
        .post(format!("{}{RPC}", s.base))
        .header("content-type", "application/proto")
        .body(vec![10, 3, b'v', b'm', b'1'])
        .send()
        .await
        .unwrap();
    let connect = (connect.status().as_u16(), connect.text().await.unwrap());
    let grpc = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
        .post(format!("{}{RPC}", s.base))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(vec![0, 0, 0, 0, 0])
        .send()
        .await
        .unwrap();
    let grpc_status = grpc
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let grpc = (grpc.status().as_u16(), grpc_status);
    let health = reqwest::Client::new()
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap();
    let health = (health.status().as_u16(), health.text().await.unwrap());
    [connect, grpc, health]
}

fn code_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["code"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn peers_in_a_vm_subnet_are_refused_per_connection() {
    let guard = Arc::new(PeerGuard::default());
    guard.set_vm_subnets(vec!["127.0.0.0/8".parse().unwrap()]);
    let s = start(guard.clone(), 100).await;

    let [connect, grpc, health] = three_answers(&s).await;
    assert_eq!(connect.0, 403, "{connect:?}");
    assert_eq!(code_of(&connect.1), "permission_denied", "{connect:?}");
    assert_eq!(grpc, (200, "7".to_owned()), "gRPC PERMISSION_DENIED");
    assert_eq!(health.0, 403, "{health:?}");
    assert_eq!(code_of(&health.1), "permission_denied", "{health:?}");
    assert_eq!(
        s.calls.load(Ordering::SeqCst),
        0,
        "the service is never called"
    );

    // The subnets are read at each accept: once 127/8 is no VM network, new connections
    // get the normal answers.
    guard.set_vm_subnets(vec!["10.0.0.0/8".parse().unwrap()]);
    let [connect, grpc, health] = three_answers(&s).await;
    assert_eq!(connect, (200, "called".to_owned()));
    assert_eq!(grpc.0, 200);
    assert_eq!(health, (200, "ok".to_owned()));
    assert_eq!(s.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_refused_peer_gets_one_answer_then_the_connection_closes() {
    let guard = Arc::new(PeerGuard::default());
    guard.set_vm_subnets(vec!["127.0.0.0/8".parse().unwrap()]);
    let s = start(guard, 100).await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(
        b"GET /health HTTP/1.1\r\nhost: x\r\n\r\nGET /health HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut got))
        .await
        .expect("closed after the answer")
        .unwrap();
    assert!(got.starts_with("HTTP/1.1 403"), "{got}");
    assert_eq!(got.matches("HTTP/1.1").count(), 1, "one answer: {got}");
}

/// Whether the server has closed `tcp` (read gives EOF or a reset) within `wait`.
async fn closed_within(tcp: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn at_the_bound_the_oldest_idle_connection_makes_room() {
    let s = start(Arc::default(), 4).await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(s.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let health = reqwest::Client::new()
        .get(format!("{}/health", s.base))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        closed_within(&mut silent[0], Duration::from_secs(1)).await,
        "the oldest silent connection was closed for the new one"
    );
    assert!(
        !closed_within(&mut silent[3], Duration::from_millis(100)).await,
        "the others stay"
    );
}

#[tokio::test]
async fn with_every_connection_busy_a_new_one_is_closed() {
    let s = start(Arc::default(), 2).await;
    let slow = |s: &Server| {
        let url = format!("{}/slow", s.base);
        tokio::spawn(async move { reqwest::Client::new().get(url).send().await })
    };
    let a = slow(&s);
    let b = slow(&s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut new = TcpStream::connect(s.addr).await.unwrap();
    assert!(
        closed_within(&mut new, Duration::from_secs(1)).await,
        "no idle connection to close: the new one is"
    );
    // The busy ones were left alone and finish.
    s.release.notify_waiters();
    assert_eq!(a.await.unwrap().unwrap().text().await.unwrap(), "slow");
    assert_eq!(b.await.unwrap().unwrap().text().await.unwrap(), "slow");
}
