//! Every RPC in every state of the spec §4.2 table, the deploy workflow's payload end to end,
//! and containers changed behind metald's back.

use std::time::Duration;

use futures::StreamExt;
use metald::proto::vmprovisioner::{self as pb, VmState};

use crate::support::*;

#[derive(Debug, Clone, Copy)]
enum Op {
    Boot,
    Shutdown,
    ShutdownForce,
    Pause,
    Resume,
    Reboot,
    Delete,
    DeleteForce,
}

/// What the table says: the state after, `None` = deleted, or the refusal code.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    State(VmState),
    Deleted,
    Refused,
}

fn table(state: VmState, op: Op) -> Expect {
    use Expect::*;
    use VmState::*;
    match (op, state) {
        (Op::Boot, Created | Running | Shutdown) => State(Running),
        (Op::Boot, Paused) => Refused,
        (Op::Shutdown | Op::ShutdownForce, Created) => Refused,
        (Op::Shutdown | Op::ShutdownForce, _) => State(Shutdown),
        (Op::Pause, Running | Paused) => State(Paused),
        (Op::Pause, _) => Refused,
        (Op::Resume, Running | Paused) => State(Running),
        (Op::Resume, _) => Refused,
        (Op::Reboot, Running) => State(Running),
        (Op::Reboot, _) => Refused,
        (Op::Delete, Running | Paused) => Refused,
        (Op::Delete | Op::DeleteForce, _) => Deleted,
        (_, Unspecified) => unreachable!(),
    }
}

async fn vm_in(c: &Client, state: VmState) -> String {
    let id = c.create(small_config()).await.expect("create");
    match state {
        VmState::Created => {}
        VmState::Running => {
            c.boot(&id).await.expect("boot");
        }
        VmState::Paused => {
            c.boot(&id).await.expect("boot");
            c.pause(&id).await.expect("pause");
        }
        VmState::Shutdown => {
            c.boot(&id).await.expect("boot");
            c.shutdown(&id, true).await.expect("shutdown");
        }
        VmState::Unspecified => unreachable!(),
    }
    assert_eq!(c.state(&id).await.expect("info"), state);
    id
}

async fn run_op(c: &Client, id: &str, op: Op) -> Result<Option<VmState>, RpcError> {
    Ok(match op {
        Op::Boot => Some(c.boot(id).await?.state()),
        Op::Shutdown => {
            let r: pb::ShutdownVmResponse = c
                .call(
                    "ShutdownVm",
                    &pb::ShutdownVmRequest {
                        vm_id: id.into(),
                        force: false,
                        timeout_seconds: 5,
                    },
                )
                .await?;
            assert!(r.success);
            Some(r.state())
        }
        Op::ShutdownForce => Some(c.shutdown(id, true).await?.state()),
        Op::Pause => Some(c.pause(id).await?.state()),
        Op::Resume => Some(c.resume(id).await?.state()),
        Op::Reboot => Some(c.reboot(id, false).await?.state()),
        Op::Delete => {
            assert!(c.delete(id, false).await?.success);
            None
        }
        Op::DeleteForce => {
            assert!(c.delete(id, true).await?.success);
            None
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_in_every_state() {
    let m = Metald::start("statetable").await;
    let c = m.client("alice");
    let states = [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
    ];
    let ops = [
        Op::Boot,
        Op::Shutdown,
        Op::ShutdownForce,
        Op::Pause,
        Op::Resume,
        Op::Reboot,
        Op::Delete,
        Op::DeleteForce,
    ];
    let cells: Vec<(VmState, Op)> = states
        .iter()
        .flat_map(|s| ops.iter().map(move |o| (*s, *o)))
        .collect();
    let results: Vec<String> = futures::stream::iter(cells)
        .map(|(state, op)| {
            let c = c.clone();
            async move {
                let id = vm_in(&c, state).await;
                let expect = table(state, op);
                let got = run_op(&c, &id, op).await;
                let after = c.info(&id).await;
                match (expect, &got, &after) {
                    (Expect::State(s), Ok(Some(answer)), Ok(info))
                        if *answer == s && info.state() == s =>
                    {
                        String::new()
                    }
                    (Expect::Deleted, Ok(None), Err(e)) if e.code == "not_found" => String::new(),
                    (Expect::Refused, Err(e), Ok(info))
                        if e.code == "failed_precondition"
                            && e.status == 400
                            && info.state() == state =>
                    {
                        String::new()
                    }
                    _ => format!(
                        "{op:?} in {state:?}: expected {expect:?}, got {got:?}, then info {:?}",
                        after.map(|i| i.state())
                    ),
                }
            }
        })
        .buffer_unordered(6)
        .collect()
        .await;
    let failures: Vec<_> = results.into_iter().filter(|r| !r.is_empty()).collect();
    assert!(
        failures.is_empty(),
        "table cells that failed:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_workflow_payload_serves_http_on_the_published_port() {
    let m = Metald::start("ctrlpayload").await;
    let c = Client::new(&m.base(), "ctrl", "ctrl-tenant");
    let r: pb::CreateVmResponse = c
        .call(
            "CreateVm",
            &pb::CreateVmRequest {
                config: Some(ctrl_config()),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    assert!(r.vm_id.starts_with("vm-"), "{}", r.vm_id);
    assert_eq!(r.state(), VmState::Created);
    let boot = c.boot(&r.vm_id).await.expect("boot");
    assert!(boot.success);
    assert_eq!(boot.state(), VmState::Running);

    let info = c.info(&r.vm_id).await.expect("info");
    assert_eq!(
        info.config.as_ref(),
        Some(&ctrl_config()),
        "config exactly as given"
    );
    let net = info.network_info.expect("network info");
    let mapping = net
        .port_mappings
        .iter()
        .find(|p| p.container_port == 8080)
        .expect("port 8080 mapped");
    assert_eq!(mapping.protocol, "tcp");
    assert!(
        (30000..=40000).contains(&mapping.host_port),
        "{}",
        mapping.host_port
    );
    assert_eq!(info.backend_info["backend"], "docker");
    assert_eq!(info.backend_info["image"], IMAGE);

    let url = format!("http://127.0.0.1:{}/", mapping.host_port);
    eventually(Duration::from_secs(15), "httpd in the VM answers", || {
        let url = url.clone();
        async move {
            http_get(&url)
                .await
                .is_some_and(|b| b.contains("metald test vm"))
        }
    })
    .await;

    // The container is what spec §5 says.
    let name = &info.backend_info["container_name"];
    let inspect = docker(&["inspect", "--format", "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.MemorySwap}} {{json .HostConfig.ExtraHosts}} {{index .Config.Labels \"unkey.vm.id\"}} {{index .Config.Labels \"unkey.vm.created_by\"}} {{.HostConfig.RestartPolicy.Name}} {{.HostConfig.AutoRemove}}", name]);
    assert_eq!(
        inspect,
        format!("1000000000 536870912 536870912 [\"host.docker.internal:host-gateway\"] {} metald no false", r.vm_id)
    );
    assert!(docker(&["inspect", "--format", "{{json .Config.Env}}", name]).contains("PORT=8080"));
    c.delete(&r.vm_id, true).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_changed_behind_metalds_back() {
    let m = Metald::start("behindback").await;
    let c = m.client("alice");
    let killed = c.create(small_config()).await.unwrap();
    let removed = c.create(small_config()).await.unwrap();
    c.boot(&killed).await.unwrap();
    c.boot(&removed).await.unwrap();
    let name_of = |id: &str| format!("unkey-vm-{}-{id}", m.scope);

    docker(&["kill", &name_of(&killed)]);
    eventually(Duration::from_secs(10), "killed VM shows SHUTDOWN", || {
        let c = c.clone();
        let id = killed.clone();
        async move { c.state(&id).await == Ok(VmState::Shutdown) }
    })
    .await;
    let info = c.info(&killed).await.unwrap();
    assert_eq!(
        info.backend_info.get("exit_code").map(String::as_str),
        Some("137")
    );
    // And it boots again.
    assert_eq!(c.boot(&killed).await.unwrap().state(), VmState::Running);

    docker(&["rm", "-f", &name_of(&removed)]);
    eventually(Duration::from_secs(10), "removed VM is not_found", || {
        let c = c.clone();
        let id = removed.clone();
        async move { matches!(c.info(&id).await, Err(e) if e.code == "not_found") }
    })
    .await;
    assert_eq!(c.boot(&removed).await.unwrap_err().code, "not_found");
    assert!(!c
        .list()
        .await
        .unwrap()
        .vms
        .iter()
        .any(|v| v.vm_id == removed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_create_and_ids() {
    let m = Metald::start("idempotent").await;
    let alice = m.client("alice");
    let req = pb::CreateVmRequest {
        vm_id: "my-vm.1".into(),
        config: Some(small_config()),
        customer_id: "alice".into(),
    };
    let first: pb::CreateVmResponse = alice.call("CreateVm", &req).await.unwrap();
    assert_eq!(first.vm_id, "my-vm.1");
    let again: pb::CreateVmResponse = alice.call("CreateVm", &req).await.unwrap();
    assert_eq!(again.vm_id, "my-vm.1");
    alice.boot("my-vm.1").await.unwrap();
    let retried: pb::CreateVmResponse = alice.call("CreateVm", &req).await.unwrap();
    assert_eq!(
        retried.state(),
        VmState::Running,
        "a retry reports the VM as it is"
    );

    let mut different = req.clone();
    different
        .config
        .as_mut()
        .unwrap()
        .cpu
        .as_mut()
        .unwrap()
        .max_vcpu_count = 2;
    let e = alice
        .call::<_, pb::CreateVmResponse>("CreateVm", &different)
        .await
        .unwrap_err();
    assert_eq!((e.code.as_str(), e.status), ("already_exists", 409));

    let bob = m.client("bob");
    let mut bobs = req.clone();
    bobs.customer_id = String::new();
    let e = bob
        .call::<_, pb::CreateVmResponse>("CreateVm", &bobs)
        .await
        .unwrap_err();
    assert_eq!(e.code, "already_exists");
    // Exactly one container.
    assert_eq!(scope_containers(&m.scope).len(), 1);

    for bad in ["UPPER", "-lead", "has space", &"a".repeat(64)] {
        let r = pb::CreateVmRequest {
            vm_id: bad.into(),
            config: Some(small_config()),
            ..Default::default()
        };
        let e = alice
            .call::<_, pb::CreateVmResponse>("CreateVm", &r)
            .await
            .unwrap_err();
        assert_eq!(e.code, "invalid_argument", "{bad}");
        assert!(e.message.contains("vm_id"), "{}", e.message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_filters_and_scopes_by_customer() {
    let m = Metald::start("listing").await;
    let alice = m.client("alice");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(alice.create(small_config()).await.unwrap());
    }
    alice.boot(&ids[0]).await.unwrap();
    m.client("bob").create(small_config()).await.unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page: pb::ListVmsResponse = alice
            .call(
                "ListVms",
                &pb::ListVmsRequest {
                    page_size: 2,
                    page_token: token.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(page.total_count, 5);
        assert!(page.vms.len() <= 2);
        assert!(page.vms.iter().all(|v| v.customer_id == "alice"));
        seen.extend(page.vms.iter().map(|v| v.vm_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    let running: pb::ListVmsResponse = alice
        .call(
            "ListVms",
            &pb::ListVmsRequest {
                state_filter: vec![VmState::Running as i32],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(running.total_count, 1);
    let v = &running.vms[0];
    assert_eq!(
        (v.vm_id.as_str(), v.vcpu_count, v.memory_size_bytes),
        (ids[0].as_str(), 1, 16 * 1024 * 1024)
    );
    assert_eq!(v.metadata["created_by"], "deploy-workflow");
    assert!(v.created_timestamp > 1_700_000_000 && v.modified_timestamp >= v.created_timestamp);

    let bad: Result<pb::ListVmsResponse, _> = alice
        .call(
            "ListVms",
            &pb::ListVmsRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(bad.unwrap_err().code, "invalid_argument");
}
