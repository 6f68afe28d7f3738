//! `kill -9` of metald and a restart lose nothing: Docker labels are the only VM store.

use std::time::Duration;

use metald::proto::vmprovisioner::{self as pb, VmState};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_and_restart_loses_nothing() {
    let mut m = Metald::start("restart").await;
    let alice = m.client("alice");
    let bob = m.client("bob");
    let created = alice.create(small_config()).await.unwrap();
    let running = alice.create(ctrl_config()).await.unwrap();
    let paused = alice.create(small_config()).await.unwrap();
    let stopped = alice.create(small_config()).await.unwrap();
    let bobs = bob.create(small_config()).await.unwrap();
    alice.boot(&running).await.unwrap();
    alice.boot(&paused).await.unwrap();
    alice.pause(&paused).await.unwrap();
    alice.boot(&stopped).await.unwrap();
    alice.shutdown(&stopped, true).await.unwrap();

    let before_list = alice.list().await.unwrap();
    let before_info = alice.info(&running).await.unwrap();
    let port = before_info.network_info.as_ref().unwrap().port_mappings[0].host_port;

    m.restart().await;

    let after_list = alice.list().await.unwrap();
    assert_eq!(after_list, before_list, "list unchanged across kill -9");
    let after_info = alice.info(&running).await.unwrap();
    assert_eq!(after_info.config, before_info.config);
    assert_eq!(
        after_info.network_info, before_info.network_info,
        "ports and addresses unchanged"
    );
    assert_eq!(after_info.state(), VmState::Running);
    assert_eq!(bob.list().await.unwrap().vms.len(), 1);
    assert_eq!(
        alice.info(&bobs).await.unwrap_err().code,
        "permission_denied"
    );
    assert_eq!(bob.state(&bobs).await.unwrap(), VmState::Created);
    assert!(http_get(&format!("http://127.0.0.1:{port}/"))
        .await
        .is_some_and(|b| b.contains("metald test vm")));

    // Every RPC works on the recovered VMs.
    assert_eq!(
        alice.boot(&created).await.unwrap().state(),
        VmState::Running
    );
    assert_eq!(
        alice.resume(&paused).await.unwrap().state(),
        VmState::Running
    );
    assert_eq!(
        alice.pause(&running).await.unwrap().state(),
        VmState::Paused
    );
    assert_eq!(
        alice.resume(&running).await.unwrap().state(),
        VmState::Running
    );
    assert_eq!(
        alice.reboot(&running, true).await.unwrap().state(),
        VmState::Running
    );
    assert_eq!(
        alice.boot(&stopped).await.unwrap().state(),
        VmState::Running
    );
    assert_eq!(
        alice.shutdown(&stopped, false).await.unwrap().state(),
        VmState::Shutdown
    );
    for id in [&created, &running, &paused, &stopped] {
        assert!(alice.delete(id, true).await.unwrap().success);
    }
    assert!(alice.list().await.unwrap().vms.is_empty());

    // SIGTERM: clean exit, VMs keep running.
    bob.boot(&bobs).await.unwrap();
    let status = m.terminate();
    assert!(status.success(), "exit status {status:?}");
    let name = format!("unkey-vm-{}-{bobs}", m.scope);
    assert_eq!(
        docker(&["inspect", "--format", "{{.State.Status}}", &name]),
        "running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_interrupted_creates_are_removed_at_start() {
    let mut m = Metald::start("zombies").await;
    let c = m.client("alice");
    let keep = c.create(small_config()).await.unwrap();
    // A container named like a VM of this scope, without VM labels.
    let zombie = format!("unkey-vm-{}-zombie", m.scope);
    docker(&[
        "create",
        "--name",
        &zombie,
        "--label",
        &format!("unkey.vm.scope={}", m.scope),
        IMAGE,
    ]);
    // A VM of another scope is never touched.
    let other = format!("unkey-vm-other{}-x", std::process::id());
    docker(&[
        "create",
        "--name",
        &other,
        "--label",
        "unkey.vm.created_by=metald",
        "--label",
        "unkey.vm.id=x",
        IMAGE,
    ]);
    // A broken container of a scope whose name extends ours (`<scope>-x`): its name starts
    // with our prefix, but its scope label says it is not ours to reap.
    let neighbour = format!("unkey-vm-{}-x-leftover", m.scope);
    docker(&[
        "create",
        "--name",
        &neighbour,
        "--label",
        &format!("unkey.vm.scope={}-x", m.scope),
        IMAGE,
    ]);
    m.restart().await;
    eventually(Duration::from_secs(10), "zombie removed", || async {
        docker(&["ps", "-aq", "--filter", &format!("name=^{zombie}$")]).is_empty()
    })
    .await;
    assert!(m.log_text().contains("leftover container"));
    assert_eq!(c.state(&keep).await.unwrap(), VmState::Created);
    assert!(!docker(&["ps", "-aq", "--filter", &format!("name=^{other}$")]).is_empty());
    assert!(!docker(&["ps", "-aq", "--filter", &format!("name=^{neighbour}$")]).is_empty());
    docker(&["rm", "-f", &other, &neighbour]);
    let _ = pb::VmState::Created;
}

/// A connection that has not sent its first request yet does not hold SIGTERM's drain up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_not_held_by_a_silent_connection() {
    let mut m = Metald::start("silentconn").await;
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", m.port))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let status = m.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        started.elapsed()
    );
}
