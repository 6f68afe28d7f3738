//! Many VMs at once: no shared port, no error, no orphan; one VM's operations serialised.

use std::collections::HashSet;

use futures::StreamExt;
use metald::proto::vmprovisioner::{self as pb, VmState};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_create_and_boot_with_ports() {
    let m = Metald::start("fifty").await;
    let c = m.client("alice");
    let mut config = ctrl_config();
    config.memory = Some(pb::MemoryConfig {
        size_bytes: 16 * 1024 * 1024,
        ..Default::default()
    });
    let results: Vec<Result<String, String>> = futures::stream::iter(0..50)
        .map(|_| {
            let c = c.clone();
            let config = config.clone();
            async move {
                let id = c
                    .create(config)
                    .await
                    .map_err(|e| format!("create: {e:?}"))?;
                let boot = c.boot(&id).await.map_err(|e| format!("boot {id}: {e:?}"))?;
                if boot.state() != VmState::Running {
                    return Err(format!("boot {id}: state {:?}", boot.state()));
                }
                Ok(id)
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let errors: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "errors: {errors:#?}");
    let ids: Vec<String> = results.into_iter().map(Result::unwrap).collect();

    let mut ports = HashSet::new();
    for id in &ids {
        let info = c.info(id).await.unwrap();
        let mapping = &info.network_info.unwrap().port_mappings;
        assert_eq!(mapping.len(), 1, "{id}");
        assert!(
            ports.insert(mapping[0].host_port),
            "host port {} given twice",
            mapping[0].host_port
        );
    }
    assert_eq!(ports.len(), 50);
    assert_eq!(
        scope_containers(&m.scope).len(),
        50,
        "one container per VM, no orphans"
    );

    let deleted: Vec<_> = futures::stream::iter(ids.clone())
        .map(|id| {
            let c = c.clone();
            async move { c.delete(&id, true).await }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    assert!(
        deleted.iter().all(|r| r.as_ref().is_ok_and(|d| d.success)),
        "{deleted:?}"
    );
    assert!(scope_containers(&m.scope).is_empty(), "no container left");
    assert!(c.list().await.unwrap().vms.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_one_vm_are_serialised() {
    let m = Metald::start("serial").await;
    let c = m.client("alice");
    let id = c.create(small_config()).await.unwrap();
    c.boot(&id).await.unwrap();
    // Without serialisation Docker answers 409 ("already paused", "not paused") to some of
    // these; serialised, each sees the state the previous one left and succeeds.
    let results: Vec<_> = futures::stream::iter(0..40)
        .map(|i| {
            let c = c.clone();
            let id = id.clone();
            async move {
                if i % 2 == 0 {
                    c.pause(&id).await.map(|r| r.state())
                } else {
                    c.resume(&id).await.map(|r| r.state())
                }
            }
        })
        .buffer_unordered(40)
        .collect()
        .await;
    let failures: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(failures.is_empty(), "{failures:?}");
    let final_state = c.state(&id).await.unwrap();
    assert!(matches!(final_state, VmState::Running | VmState::Paused));
    let docker_state = docker(&[
        "inspect",
        "--format",
        "{{.State.Status}}",
        &format!("unkey-vm-{}-{id}", m.scope),
    ]);
    assert_eq!(
        docker_state,
        if final_state == VmState::Paused {
            "paused"
        } else {
            "running"
        }
    );

    // Parallel deletes: exactly one succeeds, the others find the VM gone.
    let deletes: Vec<_> = futures::stream::iter(0..8)
        .map(|_| {
            let c = c.clone();
            let id = id.clone();
            async move { c.delete(&id, true).await }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert_eq!(
        deletes.iter().filter(|r| r.is_ok()).count(),
        1,
        "{deletes:?}"
    );
    assert!(deletes
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(|e| e.code == "not_found"));
}
