//! Issue 9, spec §5.1: a VM cannot drive metald's API, even with metald on every interface.
//! From inside a VM (raw HTTP through busybox `nc`: its `wget` crashes on this image) every
//! listener — the API and the Prometheus one — answers 403 / `permission_denied` and serves
//! nothing; the same requests from the host are answered.
//!
//! Traffic goes only to the host's own docker bridge address (the VM's `host.docker.internal`)
//! and to loopback.

use std::time::Duration;

use crate::support::{self, Metald};

const LIST_VMS: &str = "/metal.vmprovisioner.v1.VmService/ListVms";

/// A raw HTTP/1.0 request sent from inside `container` to `ip:port`; the whole answer.
fn from_vm(container: &str, ip: &str, port: u16, request: &str) -> String {
    // printf interprets the \r\n escapes; the sleep keeps nc's stdin open for the answer.
    let script = format!("(printf '{request}'; sleep 1) | nc -w 3 {ip} {port}");
    support::docker(&["exec", container, "sh", "-c", &script])
}

fn connect_list_request(customer: &str) -> String {
    format!(
        "POST {LIST_VMS} HTTP/1.0\\r\\nHost: metald\\r\\nContent-Type: application/json\\r\\n\
         Authorization: Bearer dev_user_{customer}\\r\\nX-Tenant-ID: t\\r\\n\
         Content-Length: 2\\r\\n\\r\\n{{}}"
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test]
async fn a_vm_gets_no_answer_from_any_listener_while_the_host_does() {
    let prometheus = free_port();
    let prometheus_port = prometheus.to_string();
    let metald = Metald::start_with(
        "vm_refused",
        &[
            ("UNKEY_METALD_ADDRESS", "0.0.0.0"),
            // The Prometheus listener runs with OTel on; spans go to a closed loopback port.
            ("UNKEY_METALD_OTEL_ENABLED", "true"),
            ("UNKEY_METALD_OTEL_ENDPOINT", "127.0.0.1:9"),
            ("UNKEY_METALD_OTEL_PROMETHEUS_INTERFACE", "0.0.0.0"),
            ("UNKEY_METALD_OTEL_PROMETHEUS_PORT", &prometheus_port),
        ],
    )
    .await;
    let alice = metald.client("alice");
    let vm = alice.create(support::small_config()).await.expect("create");
    alice.boot(&vm).await.expect("boot");
    let container = format!("unkey-vm-{}-{vm}", metald.scope);

    // The VM's view of the host, as Docker wrote it.
    let hosts = support::docker(&["exec", &container, "cat", "/etc/hosts"]);
    let gateway = hosts
        .lines()
        .find(|l| l.contains("host.docker.internal"))
        .and_then(|l| l.split_whitespace().next())
        .expect("host.docker.internal in the VM's /etc/hosts")
        .to_owned();

    let rpc = from_vm(
        &container,
        &gateway,
        metald.port,
        &connect_list_request("alice"),
    );
    assert!(
        rpc.starts_with("HTTP/1.0 403") || rpc.starts_with("HTTP/1.1 403"),
        "ListVms from the VM: {rpc:?}"
    );
    assert!(rpc.contains("permission_denied"), "{rpc}");
    assert!(!rpc.contains(&vm), "the VM's own id leaked: {rpc}");

    let health = from_vm(
        &container,
        &gateway,
        metald.port,
        "GET /health HTTP/1.0\\r\\nHost: metald\\r\\n\\r\\n",
    );
    assert!(health.contains(" 403 "), "/health from the VM: {health:?}");
    assert!(
        !health.contains("docker"),
        "/health leaked its body: {health}"
    );

    let metrics = from_vm(
        &container,
        &gateway,
        prometheus,
        "GET /metrics HTTP/1.0\\r\\nHost: metald\\r\\n\\r\\n",
    );
    assert!(
        metrics.contains(" 403 "),
        "/metrics from the VM: {metrics:?}"
    );
    assert!(!metrics.contains("metald_"), "/metrics leaked: {metrics}");

    // The host is answered, on loopback and on the very address the VM used.
    for host in ["127.0.0.1", gateway.as_str()] {
        let client = support::Client::new(&format!("http://{host}:{}", metald.port), "alice", "t");
        let listed = client.list().await.expect("ListVms from the host");
        assert!(listed.vms.iter().any(|v| v.vm_id == vm), "{host}");
    }
    let prom = support::http_get(&format!("http://127.0.0.1:{prometheus}/metrics"))
        .await
        .expect("metrics from the host");
    assert!(prom.contains("metald_"), "{prom}");

    // One warning for the source, however often it knocked.
    for _ in 0..3 {
        from_vm(
            &container,
            &gateway,
            metald.port,
            &connect_list_request("alice"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = metald.log_text();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("refusing a connection"))
        .count();
    assert!(
        (1..=3).contains(&warnings),
        "expected one refusal warning per source and listener, got {warnings}:\n{log}"
    );
    alice.delete(&vm, true).await.expect("delete");
}
