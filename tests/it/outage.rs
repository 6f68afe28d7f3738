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

/// dockerd removes its socket while it is down: metald started then stays up, answers
/// `unavailable`, says why once, and connects when the socket appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_without_a_docker_socket_and_connects_later() {
    ensure_image();
    let dir = tempfile::tempdir().unwrap();
    let proxy = DockerProxy::new(dir.path());
    let host = format!("unix://{}", proxy.path.display());
    let mut m = Metald::launch_with("nosocket", &[("UNKEY_METALD_DOCKER_HOST", &host)]);
    eventually(Duration::from_secs(10), "health answers 503", || async {
        matches!(reqwest::get(format!("{}/health", m.base())).await, Ok(r) if r.status() == 503)
    })
    .await;
    assert!(m.exited().is_none(), "metald exited: {}", m.log_text());
    let c = m.client("alice");
    assert_eq!(c.list().await.unwrap_err().code, "unavailable");
    assert!(
        m.log_text().contains("cannot reach the docker engine"),
        "{}",
        m.log_text()
    );
    proxy.start();
    m.wait_healthy().await;
    let id = c.create(small_config()).await.unwrap();
    c.delete(&id, true).await.unwrap();
}

/// metald makes its VM network when it is missing (spec §5); one removed behind its back
/// while it runs makes Docker answer 404 to a start: that is a failed precondition of a VM
/// that still exists, not a VM that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_removed_behind_metalds_back_fails_boot_and_keeps_the_vm() {
    let network = format!("metald-missing-{}", std::process::id());
    struct RemoveNetwork(String);
    impl Drop for RemoveNetwork {
        fn drop(&mut self) {
            let _ = std::process::Command::new("docker")
                .args(["network", "rm", &self.0])
                .output();
        }
    }
    let _cleanup = RemoveNetwork(network.clone());
    let m = Metald::start_with("nonet", &[("UNKEY_METALD_DOCKER_NETWORK", &network)]).await;
    assert!(
        m.log_text().contains("created the VM network"),
        "{}",
        m.log_text()
    );
    let c = m.client("alice");
    let id = c.create(small_config()).await.unwrap();
    let removed = std::process::Command::new("docker")
        .args(["network", "rm", &network])
        .output()
        .expect("docker network rm");
    assert!(removed.status.success(), "{removed:?}");
    let e = c.boot(&id).await.unwrap_err();
    assert_eq!(e.code, "failed_precondition", "{e:?}");
    assert!(e.message.contains(&network), "{e:?}");
    assert_eq!(c.state(&id).await.unwrap(), VmState::Created);
    assert_eq!(c.list().await.unwrap().vms.len(), 1);
    c.delete(&id, false).await.unwrap();
}
