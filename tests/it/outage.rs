//! The engine goes away and comes back: `unavailable` meanwhile, recovery without a restart.

use std::time::Duration;

use metald::proto::vmprovisioner::VmState;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_outage_answers_unavailable_then_recovers() {
    ensure_image();
    let dir = tempfile::tempdir().unwrap();
    let proxy = DockerProxy::new(dir.path());
    proxy.start();
    let host = format!("unix://{}", proxy.path.display());
    let m = Metald::start_with("outage", &[("UNKEY_METALD_DOCKER_HOST", &host)]).await;
    let c = m.client("alice");
    let id = c.create(small_config()).await.unwrap();
    c.boot(&id).await.unwrap();

    proxy.stop();
    eventually(Duration::from_secs(10), "RPCs answer unavailable", || {
        let c = c.clone();
        let id = id.clone();
        async move { matches!(c.boot(&id).await, Err(e) if e.code == "unavailable" && e.status == 503) }
    })
    .await;
    assert_eq!(
        c.create(small_config()).await.unwrap_err().code,
        "unavailable"
    );
    assert_eq!(c.list().await.unwrap_err().code, "unavailable");
    let health = reqwest::get(format!("{}/health", m.base())).await.unwrap();
    assert_eq!(health.status(), 503);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["status"], "error");

    // Meanwhile the VM is shut down behind metald's back.
    docker(&["kill", &format!("unkey-vm-{}-{id}", m.scope)]);

    proxy.start();
    m.wait_healthy().await;
    // The re-list after reconnecting saw the change that happened during the outage.
    assert_eq!(c.state(&id).await.unwrap(), VmState::Shutdown);
    assert_eq!(c.boot(&id).await.unwrap().state(), VmState::Running);
    c.delete(&id, true).await.unwrap();
    let metrics = reqwest::get(format!("{}/metrics", m.base()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("metald_docker_event_stream_reconnects_total 1"),
        "{metrics}"
    );
}
