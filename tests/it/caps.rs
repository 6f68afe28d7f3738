//! Issue 9, service side: the caps on one request (ports, stored config, grace) and on one
//! customer (live VMs), and "force means now" — a force stop or delete during another call's
//! graceful stop (or reboot) of the same VM kills at once.

use std::time::{Duration, Instant};

use futures::StreamExt;
use metald::proto::vmprovisioner::{self as pb, VmState};

use crate::support::*;

fn code_of<T: std::fmt::Debug>(r: Result<T, RpcError>) -> RpcError {
    r.expect_err("expected an error")
}

async fn create_named(c: &Client, vm_id: &str, config: pb::VmConfig) -> Result<String, RpcError> {
    let r: pb::CreateVmResponse = c
        .call(
            "CreateVm",
            &pb::CreateVmRequest {
                vm_id: vm_id.into(),
                config: Some(config),
                ..Default::default()
            },
        )
        .await?;
    Ok(r.vm_id)
}

async fn shutdown_within(
    c: &Client,
    id: &str,
    timeout_seconds: i32,
) -> Result<pb::ShutdownVmResponse, RpcError> {
    c.call(
        "ShutdownVm",
        &pb::ShutdownVmRequest {
            vm_id: id.into(),
            force: false,
            timeout_seconds,
        },
    )
    .await
}

fn with_ports(n: u16) -> pb::VmConfig {
    let mut c = small_config();
    let list: Vec<String> = (0..n).map(|i| (8000 + i).to_string()).collect();
    c.metadata.insert("exposed_ports".into(), list.join(","));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cap_is_invalid_argument_naming_its_limit() {
    let m = Metald::start("capsrequest").await;
    let c = m.client("alice");

    let e = code_of(c.create(with_ports(17)).await);
    println!("17 ports: {} {:?}", e.code, e.message);
    assert_eq!(e.code, "invalid_argument");
    assert!(e.message.contains("17 ports"), "{}", e.message);
    assert!(
        e.message.contains("UNKEY_METALD_VM_MAX_PORTS"),
        "{}",
        e.message
    );
    c.create(with_ports(16))
        .await
        .expect("16 ports are allowed");

    let mut big = small_config();
    big.metadata.insert("notes".into(), "x".repeat(70_000));
    let e = code_of(c.create(big).await);
    println!("big config: {} {:?}", e.code, e.message);
    assert_eq!(e.code, "invalid_argument");
    assert!(e.message.contains("at most 65536"), "{}", e.message);
    assert!(
        e.message.contains("UNKEY_METALD_VM_MAX_CONFIG_BYTES"),
        "{}",
        e.message
    );
    assert_eq!(
        scope_containers(&m.scope).len(),
        1,
        "a refused create makes no container"
    );

    let id = c.create(small_config()).await.expect("create");
    c.boot(&id).await.expect("boot");
    let e = code_of(shutdown_within(&c, &id, 301).await);
    println!("ShutdownVm grace 301 s: {} {:?}", e.code, e.message);
    assert_eq!(e.code, "invalid_argument");
    assert!(e.message.contains("301"), "{}", e.message);
    assert!(
        e.message.contains("UNKEY_METALD_MAX_GRACE"),
        "{}",
        e.message
    );
    assert_eq!(c.state(&id).await.unwrap(), VmState::Running, "untouched");
    // At the cap: allowed (busybox httpd stops at once on SIGTERM).
    let r = shutdown_within(&c, &id, 300).await.expect("grace 300 s");
    assert_eq!(r.state(), VmState::Shutdown);
}

/// RebootVm carries no timeout on the wire: its grace is always the default (30 s), which a
/// cap below it lowers rather than refuses. The refusal of an explicit grace over the cap on
/// RebootVm is covered by the service's unit test (`lifecycle::tests`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_cap_below_the_default_lowers_the_default() {
    let m = Metald::start_with("capsgrace", &[("UNKEY_METALD_MAX_GRACE", "10s")]).await;
    let c = m.client("alice");
    let id = c.create(small_config()).await.expect("create");
    c.boot(&id).await.expect("boot");
    let e = code_of(shutdown_within(&c, &id, 11).await);
    assert_eq!(e.code, "invalid_argument");
    assert!(
        e.message
            .contains("timeout_seconds is 11 s; at most 10 s (UNKEY_METALD_MAX_GRACE)"),
        "{}",
        e.message
    );
    assert_eq!(
        c.reboot(&id, false).await.expect("reboot").state(),
        VmState::Running
    );
    assert_eq!(
        c.shutdown(&id, false).await.expect("default grace").state(),
        VmState::Shutdown
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_per_customer_counts_live_vms_and_creates_in_flight() {
    let m = Metald::start_with("capsquota", &[("UNKEY_METALD_MAX_VMS_PER_CUSTOMER", "2")]).await;
    let alice = m.client("alice");
    let bob = m.client("bob");

    let first = create_named(&alice, "quota-a", small_config())
        .await
        .expect("first");
    let second = alice.create(small_config()).await.expect("second");
    let e = code_of(alice.create(small_config()).await);
    println!("third VM: {} {:?}", e.code, e.message);
    assert_eq!(e.code, "resource_exhausted");
    assert!(
        e.message.contains("UNKEY_METALD_MAX_VMS_PER_CUSTOMER"),
        "{}",
        e.message
    );
    // Another customer is not held back; a retry of an existing VM is not a new VM.
    bob.create(small_config()).await.expect("bob");
    let again = create_named(&alice, "quota-a", small_config())
        .await
        .expect("idempotent retry at the quota");
    assert_eq!(again, first);
    // A shut-down VM still counts; a deleted one does not.
    alice.boot(&second).await.expect("boot");
    alice.shutdown(&second, true).await.expect("shutdown");
    assert_eq!(
        code_of(alice.create(small_config()).await).code,
        "resource_exhausted"
    );
    alice.delete(&second, false).await.expect("delete");
    alice
        .create(small_config())
        .await
        .expect("room again after a delete");

    // Concurrent creates cannot overshoot: six at once for a fresh customer, two made.
    let carol = m.client("carol");
    let results: Vec<Result<String, RpcError>> = futures::stream::iter(0..6)
        .map(|_| {
            let carol = carol.clone();
            async move { carol.create(small_config()).await }
        })
        .buffer_unordered(6)
        .collect()
        .await;
    let made = results.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    println!(
        "six concurrent creates at quota 2: {made} made, {} refused",
        refused.len()
    );
    assert_eq!(made, 2, "{results:?}");
    assert!(
        refused.iter().all(|e| e.code == "resource_exhausted"),
        "{refused:?}"
    );
    assert_eq!(carol.list().await.unwrap().total_count, 2);
    assert_eq!(
        scope_containers(&m.scope).len(),
        5,
        "alice 2, bob 1, carol 2: no container for a refused create"
    );
}

/// What metald logs when a force op kills during another call's grace period.
const KILLED_EARLY: &str = "killed during another operation's grace period";

/// A VM whose workload ignores SIGTERM, booted.
async fn stubborn_vm(c: &Client) -> String {
    ensure_noterm_image();
    let mut config = small_config();
    config
        .metadata
        .insert("docker_image".into(), NOTERM_IMAGE.into());
    let id = c.create(config).await.expect("create");
    c.boot(&id).await.expect("boot");
    id
}

/// Starts a graceful call, lets it begin its grace, then runs `force`; returns the force
/// call's result and time, and the graceful call's result and its time after the force call
/// began.
async fn force_during<G, F, GFut, FFut, GR, FR>(
    graceful: G,
    force: F,
) -> (GR, Duration, FR, Duration)
where
    G: FnOnce() -> GFut,
    GFut: std::future::Future<Output = GR> + Send + 'static,
    GR: Send + 'static,
    F: FnOnce() -> FFut,
    FFut: std::future::Future<Output = FR>,
{
    let waiting = tokio::spawn(graceful());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "the graceful call should still be in its grace"
    );
    let t0 = Instant::now();
    let forced = force().await;
    let force_took = t0.elapsed();
    let graceful = tokio::time::timeout(Duration::from_secs(70), waiting)
        .await
        .expect("graceful call answered")
        .expect("task");
    (graceful, t0.elapsed(), forced, force_took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_delete_cuts_a_graceful_shutdown_short() {
    let m = Metald::start("forcedelete").await;
    let c = m.client("alice");
    let id = stubborn_vm(&c).await;
    let (g, gid, f, fid) = (c.clone(), id.clone(), c.clone(), id.clone());
    let (graceful, graceful_took, forced, force_took) = force_during(
        move || async move { shutdown_within(&g, &gid, 60).await },
        || async move { f.delete(&fid, true).await },
    )
    .await;
    println!("DeleteVm(force) during a 60-s graceful ShutdownVm: force {force_took:?}, graceful answered {graceful_took:?} after the force call began: {graceful:?}");
    forced.expect("force delete");
    assert!(force_took < Duration::from_secs(5), "{force_took:?}");
    // The graceful call holds the VM until it has seen it stopped; the delete comes after.
    assert_eq!(
        graceful.expect("graceful shutdown").state(),
        VmState::Shutdown
    );
    assert!(graceful_took < Duration::from_secs(10), "{graceful_took:?}");
    assert!(scope_containers(&m.scope).is_empty(), "deleted");
    assert!(m.log_text().contains(KILLED_EARLY), "{}", m.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_shutdown_cuts_a_graceful_shutdown_short() {
    let m = Metald::start("forcestop").await;
    let c = m.client("alice");
    let id = stubborn_vm(&c).await;
    let (g, gid, f, fid) = (c.clone(), id.clone(), c.clone(), id.clone());
    let (graceful, graceful_took, forced, force_took) = force_during(
        move || async move { shutdown_within(&g, &gid, 60).await },
        || async move { f.shutdown(&fid, true).await },
    )
    .await;
    println!("ShutdownVm(force) during a 60-s graceful ShutdownVm: force {force_took:?}, graceful answered {graceful_took:?} after the force call began");
    assert_eq!(forced.expect("force shutdown").state(), VmState::Shutdown);
    assert!(force_took < Duration::from_secs(5), "{force_took:?}");
    assert_eq!(
        graceful.expect("graceful shutdown").state(),
        VmState::Shutdown
    );
    assert!(graceful_took < Duration::from_secs(10), "{graceful_took:?}");
    assert_eq!(c.state(&id).await.unwrap(), VmState::Shutdown);
    assert!(m.log_text().contains(KILLED_EARLY), "{}", m.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_delete_cuts_a_graceful_reboot_short() {
    let m = Metald::start("forcereboot").await;
    let c = m.client("alice");
    let id = stubborn_vm(&c).await;
    let (g, gid, f, fid) = (c.clone(), id.clone(), c.clone(), id.clone());
    let (rebooted, reboot_took, forced, force_took) = force_during(
        move || async move { g.reboot(&gid, false).await },
        || async move { f.delete(&fid, true).await },
    )
    .await;
    println!("DeleteVm(force) during a 30-s graceful RebootVm: force {force_took:?}, reboot answered {reboot_took:?} after the force call began: {rebooted:?}");
    forced.expect("force delete");
    assert!(force_took < Duration::from_secs(5), "{force_took:?}");
    // The kill ends the restart's stop early; Docker then starts the VM again, and the delete,
    // next in line, removes it.
    assert_eq!(rebooted.expect("reboot").state(), VmState::Running);
    assert!(reboot_took < Duration::from_secs(10), "{reboot_took:?}");
    assert_eq!(code_of(c.info(&id).await).code, "not_found");
    assert!(m.log_text().contains(KILLED_EARLY), "{}", m.log_text());
}

/// Queued in this order behind a graceful stop in its grace: a Boot, a second graceful stop,
/// then the force stop. The force stop kills the first grace at once; the Boot then starts the
/// VM (the serial order holds); the second graceful stop begins its grace while the force stop
/// waits, which wakes it and it kills again. No one waits out a grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_shutdown_cuts_every_grace_queued_ahead_of_it() {
    let m = Metald::start("forcequeue").await;
    let c = m.client("alice");
    let id = stubborn_vm(&c).await;
    let spawn_after = |delay_ms: u64, call: &'static str| {
        let (c, id) = (c.clone(), id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let t = Instant::now();
            let state = match call {
                "boot" => c.boot(&id).await.map(|r| r.state()),
                "graceful" => shutdown_within(&c, &id, 60).await.map(|r| r.state()),
                _ => c.shutdown(&id, true).await.map(|r| r.state()),
            };
            (call, state, t.elapsed())
        })
    };
    let calls = vec![
        spawn_after(0, "graceful"),
        spawn_after(1500, "boot"),
        spawn_after(2000, "graceful"),
        spawn_after(2500, "force"),
    ];
    let mut answers = Vec::new();
    for call in calls {
        let answer = tokio::time::timeout(Duration::from_secs(70), call)
            .await
            .expect("answered")
            .expect("task");
        println!("queued behind a grace: {answer:?}");
        answers.push(answer);
    }
    let (_, forced, force_took) = &answers[3];
    assert_eq!(forced.as_ref().expect("force"), &VmState::Shutdown);
    assert!(*force_took < Duration::from_secs(5), "{force_took:?}");
    assert_eq!(answers[1].1.as_ref().expect("boot"), &VmState::Running);
    for (call, state, took) in &answers {
        assert!(state.is_ok(), "{call}: {state:?}");
        assert!(*took < Duration::from_secs(10), "{call} took {took:?}");
    }
    let kills = m.log_text().matches(KILLED_EARLY).count();
    assert_eq!(kills, 2, "one kill per grace cut short");
    assert_eq!(c.state(&id).await.unwrap(), VmState::Shutdown);
}
