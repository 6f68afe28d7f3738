//! Every bad input gets its precise Connect code: identity, tenancy, bodies, content types,
//! sizes, methods, and each CreateVm rule of spec §4.1.

use std::io::Write as _;

use metald::proto::vmprovisioner::{self as pb};
use prost::Message as _;

use crate::support::*;

const PATH: &str = "/metal.vmprovisioner.v1.VmService";

async fn raw(
    m: &Metald,
    method: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}{PATH}/{method}", m.base()))
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    let body = resp.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

const AUTH: (&str, &str) = ("authorization", "Bearer dev_user_alice");
const TENANT: (&str, &str) = ("x-tenant-id", "t1");
const JSON: (&str, &str) = ("content-type", "application/json");
const PROTO: (&str, &str) = ("content-type", "application/proto");

fn code(v: &serde_json::Value) -> &str {
    v["code"].as_str().unwrap_or("<none>")
}

/// CreateVm (binary proto) for `vm_id` ("" = let the server make one) with a
/// `Connect-Timeout-Ms` of `timeout_ms`.
async fn create_within(m: &Metald, vm_id: &str, timeout_ms: &str) -> (u16, serde_json::Value) {
    let create = pb::CreateVmRequest {
        vm_id: vm_id.into(),
        config: Some(small_config()),
        ..Default::default()
    };
    raw(
        m,
        "CreateVm",
        &[AUTH, TENANT, PROTO, ("connect-timeout-ms", timeout_ms)],
        create.encode_to_vec(),
    )
    .await
}

/// Writes `request` on a fresh connection and returns what comes back until the server
/// closes it or `wait` passes.
async fn raw_exchange(port: u16, request: &[u8], wait: std::time::Duration) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(request).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(wait, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    // One answer is enough: stop at the end of its JSON body.
                    if got.ends_with(b"}") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_tenancy() {
    let m = Metald::start("identity").await;
    let list = br#"{}"#.to_vec();
    for (headers, want, status) in [
        (vec![TENANT, JSON], "unauthenticated", 401),
        (
            vec![("authorization", "Bearer nope"), TENANT, JSON],
            "unauthenticated",
            401,
        ),
        (
            vec![("authorization", "Bearer dev_user_"), TENANT, JSON],
            "unauthenticated",
            401,
        ),
        (
            vec![("authorization", "Basic dev_user_alice"), TENANT, JSON],
            "unauthenticated",
            401,
        ),
        (vec![AUTH, JSON], "unauthenticated", 401),
        (
            vec![AUTH, ("x-tenant-id", ""), JSON],
            "unauthenticated",
            401,
        ),
        (
            vec![AUTH, ("x-tenant-id", "restricted-tenant"), JSON],
            "permission_denied",
            403,
        ),
    ] {
        let (s, body) = raw(&m, "ListVms", &headers, list.clone()).await;
        assert_eq!((s, code(&body)), (status, want), "{headers:?}: {body}");
    }
    let (s, _) = raw(
        &m,
        "ListVms",
        &[
            ("authorization", "Bearer dev_user_admin-user"),
            ("x-tenant-id", "restricted-tenant"),
            JSON,
        ],
        list.clone(),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = raw(
        &m,
        "ListVms",
        &[
            ("authorization", "Bearer dev_customer_legacy"),
            TENANT,
            JSON,
        ],
        list,
    )
    .await;
    assert_eq!(s, 200, "legacy dev_customer_ tokens work");

    let alice = m.client("alice");
    let bob = m.client("bob");
    let id = alice.create(small_config()).await.unwrap();
    for e in [
        bob.info(&id).await.unwrap_err(),
        bob.boot(&id).await.unwrap_err(),
        bob.delete(&id, true).await.unwrap_err(),
        bob.shutdown(&id, true).await.unwrap_err(),
    ] {
        assert_eq!(
            (e.code.as_str(), e.status),
            ("permission_denied", 403),
            "{e:?}"
        );
    }
    assert!(bob.list().await.unwrap().vms.is_empty());
    let e = bob.info("vm-does-not-exist").await.unwrap_err();
    assert_eq!((e.code.as_str(), e.status), ("not_found", 404));
    let e = alice.info("").await.unwrap_err();
    assert_eq!(e.code, "invalid_argument");
    let mut req = pb::CreateVmRequest {
        config: Some(small_config()),
        customer_id: "mallory".into(),
        ..Default::default()
    };
    let e = alice
        .call::<_, pb::CreateVmResponse>("CreateVm", &req)
        .await
        .unwrap_err();
    assert_eq!(e.code, "permission_denied");
    req.customer_id = "alice".into();
    assert!(alice
        .call::<_, pb::CreateVmResponse>("CreateVm", &req)
        .await
        .is_ok());
    let e = alice
        .call::<_, pb::ShutdownVmResponse>(
            "ShutdownVm",
            &pb::ShutdownVmRequest {
                vm_id: id.clone(),
                force: false,
                timeout_seconds: -1,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "invalid_argument");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_content_types_sizes_methods() {
    let m = Metald::start("bodies").await;
    let (s, b) = raw(&m, "CreateVm", &[AUTH, TENANT, JSON], b"{not json".to_vec()).await;
    assert_eq!((s, code(&b)), (400, "invalid_argument"));
    assert!(b["message"].as_str().unwrap().contains("JSON"), "{b}");
    let (s, b) = raw(
        &m,
        "CreateVm",
        &[AUTH, TENANT, JSON],
        br#"{"config": {"cpu": {"vcpuCount": "lots"}}}"#.to_vec(),
    )
    .await;
    assert_eq!((s, code(&b)), (400, "invalid_argument"), "{b}");
    let (s, b) = raw(
        &m,
        "CreateVm",
        &[AUTH, TENANT, PROTO],
        vec![0x12, 0xff, 0xff, 0xff, 0x0f, 1],
    )
    .await;
    assert_eq!((s, code(&b)), (400, "invalid_argument"), "{b}");
    let (s, b) = raw(
        &m,
        "CreateVm",
        &[AUTH, TENANT, ("content-type", "text/plain")],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!((s, code(&b)), (415, "invalid_argument"), "{b}");
    let (s, b) = raw(
        &m,
        "CreateVm",
        &[AUTH, TENANT, JSON, ("content-encoding", "br")],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!((s, code(&b)), (501, "unimplemented"), "{b}");
    let (s, b) = raw(
        &m,
        "CreateVm",
        &[AUTH, TENANT, JSON, ("content-encoding", "gzip")],
        b"not gzip".to_vec(),
    )
    .await;
    assert_eq!((s, code(&b)), (400, "invalid_argument"), "{b}");
    let (s, b) = raw(
        &m,
        "CreateVm",
        &[AUTH, TENANT, JSON, ("connect-timeout-ms", "soon")],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!((s, code(&b)), (400, "invalid_argument"), "{b}");
    let big = vec![b' '; 5 * 1024 * 1024];
    let (s, b) = raw(&m, "CreateVm", &[AUTH, TENANT, JSON], big).await;
    assert_eq!((s, code(&b)), (429, "resource_exhausted"), "{b}");
    // A gzip body that inflates past the limit.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&vec![b' '; 6 * 1024 * 1024]).unwrap();
    let (s, b) = raw(
        &m,
        "ListVms",
        &[AUTH, TENANT, JSON, ("content-encoding", "gzip")],
        enc.finish().unwrap(),
    )
    .await;
    assert_eq!((s, code(&b)), (429, "resource_exhausted"), "{b}");
    let (s, b) = raw(&m, "LaunchMissiles", &[AUTH, TENANT, PROTO], vec![]).await;
    assert_eq!((s, code(&b)), (404, "unimplemented"), "{b}");
    let resp = reqwest::Client::new()
        .post(format!("{}/other.Service/Method", m.base()))
        .header("content-type", "application/proto")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // Valid gzip request works; unknown JSON fields are ignored; an empty body is the empty message.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(br#"{"pageSize": 5, "someFutureField": true}"#)
        .unwrap();
    let (s, b) = raw(
        &m,
        "ListVms",
        &[AUTH, TENANT, JSON, ("content-encoding", "gzip")],
        enc.finish().unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, _) = raw(&m, "ListVms", &[AUTH, TENANT, PROTO], vec![]).await;
    assert_eq!(s, 200);
    // A gzip body of several members is read whole; an empty gzip body is the empty message.
    let member = |text: &[u8]| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(text).unwrap();
        enc.finish().unwrap()
    };
    let mut two = member(br#"{"vmId": "#);
    two.extend(member(br#""two-members"}"#));
    let (s, b) = raw(
        &m,
        "GetVmInfo",
        &[AUTH, TENANT, JSON, ("content-encoding", "gzip")],
        two,
    )
    .await;
    assert_eq!((s, code(&b)), (404, "not_found"), "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("two-members"),
        "{b}"
    );
    let (s, b) = raw(
        &m,
        "ListVms",
        &[AUTH, TENANT, JSON, ("content-encoding", "gzip")],
        vec![],
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // A method segment is matched as sent: percent-encoded names are unknown methods.
    for segment in ["%FF", "List%56ms"] {
        let (s, b) = raw(&m, segment, &[AUTH, TENANT, JSON], b"{}".to_vec()).await;
        assert_eq!((s, code(&b)), (404, "unimplemented"), "{segment}: {b}");
    }
    // The wrong HTTP method: 405 with Allow and a Connect error body.
    for (method, path, allow) in [
        (reqwest::Method::GET, format!("{PATH}/ListVms"), "POST"),
        (reqwest::Method::POST, "/health".to_owned(), "GET, HEAD"),
    ] {
        let resp = reqwest::Client::new()
            .request(method.clone(), format!("{}{path}", m.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        assert_eq!(resp.headers()["allow"], allow, "{method} {path}");
        let b: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(code(&b), "unimplemented", "{method} {path}: {b}");
    }
    // An unsupported encoding over gRPC: status 12 and the encodings we take.
    let resp = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
        .post(format!("{}{PATH}/ListVms", m.base()))
        .header("content-type", "application/grpc")
        .header("grpc-encoding", "snappy")
        .header(AUTH.0, AUTH.1)
        .header(TENANT.0, TENANT.1)
        .body(vec![0u8; 5])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["grpc-status"], "12");
    assert_eq!(resp.headers()["grpc-accept-encoding"], "gzip,identity");
    // The deadline counts from the request's arrival: a body that stalls gets
    // deadline_exceeded when it passes, not an answer after the body finally arrives.
    let started = std::time::Instant::now();
    let head = format!(
        "POST {PATH}/ListVms HTTP/1.1\r\nhost: x\r\nauthorization: Bearer dev_user_alice\r\n\
         x-tenant-id: t1\r\ncontent-type: application/json\r\nconnect-timeout-ms: 300\r\n\
         content-length: 100\r\n\r\n{{"
    );
    let answer = raw_exchange(m.port, head.as_bytes(), std::time::Duration::from_secs(10)).await;
    assert!(
        answer.starts_with("HTTP/1.1 504") && answer.contains("deadline_exceeded"),
        "{answer}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // A deadline already passed when the request is read starts nothing.
    let (s, b) = create_within(&m, "deadline-zero", "0").await;
    assert_eq!((s, code(&b)), (504, "deadline_exceeded"), "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("nothing was done"),
        "{b}"
    );
    // The deadline passes while Docker works: deadline_exceeded; the VM is still made whole.
    // 5 ms is well under a Docker create and over the reading of a local request; on a
    // machine so loaded that reading took longer, the answer says nothing was started.
    let (s, b) = create_within(&m, "deadline-vm", "5").await;
    assert_eq!((s, code(&b)), (504, "deadline_exceeded"), "{b}");
    let c = m.client("alice");
    let e = c.info("deadline-zero").await.unwrap_err();
    assert_eq!(e.code, "not_found", "{e:?}");
    if b["message"].as_str().unwrap().contains("nothing was done") {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert_eq!(c.info("deadline-vm").await.unwrap_err().code, "not_found");
    } else {
        eventually(
            std::time::Duration::from_secs(10),
            "the create finished in the background",
            || {
                let c = c.clone();
                async move { c.info("deadline-vm").await.is_ok() }
            },
        )
        .await;
    }
    // Without a vm_id the caller cannot learn the id of a VM made after its deadline: that
    // VM is removed again, so a retry does not leave an orphan behind.
    let (s, b) = create_within(&m, "", "5").await;
    assert_eq!((s, code(&b)), (504, "deadline_exceeded"), "{b}");
    if b["message"].as_str().unwrap().contains("removed again") {
        eventually(
            std::time::Duration::from_secs(15),
            "the unseen VM was made and removed",
            || async {
                m.log_text()
                    .contains("removed a vm whose id never reached its caller")
            },
        )
        .await;
    }
    eventually(
        std::time::Duration::from_secs(15),
        "only the named VM is left",
        || {
            let c = c.clone();
            async move {
                let ids: Vec<String> = c
                    .list()
                    .await
                    .map(|l| l.vms.into_iter().map(|v| v.vm_id).collect())
                    .unwrap_or_default();
                ids.iter().all(|id| id == "deadline-vm")
            }
        },
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let left = c.list().await.unwrap().vms.len();
    assert!(left <= 1, "{left} VMs left");
}

/// A client that goes away before its CreateVm (no vm_id) is answered never learns the id:
/// the VM is made, then removed again, instead of staying as an orphan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_caller_left_leaves_no_vm() {
    use tokio::io::AsyncWriteExt as _;
    let m = Metald::start("callerleft").await;
    let body = pb::CreateVmRequest {
        config: Some(small_config()),
        ..Default::default()
    }
    .encode_to_vec();
    let head = format!(
        "POST {PATH}/CreateVm HTTP/1.1\r\nhost: x\r\nauthorization: Bearer dev_user_alice\r\n\
         x-tenant-id: t1\r\ncontent-type: application/proto\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", m.port))
        .await
        .unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body).await.unwrap();
    // Gone before Docker is done.
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    drop(tcp);
    eventually(
        std::time::Duration::from_secs(20),
        "the VM was made and removed again",
        || async {
            m.log_text()
                .contains("removed a vm whose id never reached its caller")
        },
    )
    .await;
    assert!(m.client("alice").list().await.unwrap().vms.is_empty());
    assert!(scope_containers(&m.scope).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_create_rule_names_its_field() {
    let m = Metald::start("rules").await;
    let c = m.client("alice");
    type Edit = fn(&mut pb::VmConfig);
    let cases: Vec<(&str, Edit)> = vec![
        ("config.cpu", |c| c.cpu = None),
        ("config.memory", |c| c.memory = None),
        ("config.boot", |c| c.boot = None),
        ("vcpu_count", |c| c.cpu.as_mut().unwrap().vcpu_count = 0),
        ("max_vcpu_count", |c| {
            c.cpu.as_mut().unwrap().vcpu_count = 2;
            c.cpu.as_mut().unwrap().max_vcpu_count = 1;
        }),
        ("size_bytes", |c| c.memory.as_mut().unwrap().size_bytes = -5),
        ("kernel_path", |c| {
            c.boot.as_mut().unwrap().kernel_path = String::new()
        }),
        ("config.storage", |c| c.storage.clear()),
        ("config.storage[0].path", |c| {
            c.storage[0].path = String::new()
        }),
        ("image", |c| {
            c.metadata.remove("docker_image");
        }),
        ("6 MiB", |c| c.memory.as_mut().unwrap().size_bytes = 1024),
        ("vcpu_count", |c| c.cpu.as_mut().unwrap().vcpu_count = 4096),
        ("exposed_ports", |c| {
            c.metadata
                .insert("exposed_ports".into(), "8080/sctp".into());
        }),
        ("exposed_ports", |c| {
            c.metadata.insert("exposed_ports".into(), "70000".into());
        }),
        ("env_vars", |c| {
            c.metadata.insert("env_vars".into(), "JUSTAKEY".into());
        }),
        ("env.1BAD", |c| {
            c.metadata.insert("env.1BAD".into(), "x".into());
        }),
        ("not a valid image reference", |c| {
            c.metadata.insert("docker_image".into(), "app?x=1".into());
        }),
        // Binary proto can carry an enum number with no name; JSON could not return it.
        ("config.network[0].mode", |c| {
            c.network = vec![pb::NetworkInterface {
                mode: 7,
                ..Default::default()
            }]
        }),
    ];
    for (field, edit) in cases {
        let mut config = small_config();
        edit(&mut config);
        let e = c.create(config).await.unwrap_err();
        assert_eq!(
            (e.code.as_str(), e.status),
            ("invalid_argument", 400),
            "{field}: {e:?}"
        );
        assert!(e.message.contains(field), "{field}: {}", e.message);
    }
    let e = c
        .call::<_, pb::CreateVmResponse>("CreateVm", &pb::CreateVmRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.message.as_str()),
        ("invalid_argument", "config is required")
    );

    // The image from the root device's options (the example config files' format).
    let mut config = small_config();
    config.metadata.remove("docker_image");
    config.storage[0]
        .options
        .insert("docker_image".into(), IMAGE.into());
    assert!(c.create(config).await.is_ok());
    // An image that cannot be had (a registry on loopback that is not there).
    let mut config = small_config();
    config
        .metadata
        .insert("docker_image".into(), "127.0.0.1:1/nothing-here:v1".into());
    let e = c.create(config).await.unwrap_err();
    assert_eq!(e.code, "failed_precondition", "{e:?}");
    assert!(
        e.message.contains("127.0.0.1:1/nothing-here:v1"),
        "{}",
        e.message
    );
    assert_eq!(
        scope_containers(&m.scope).len(),
        1,
        "failed creates leave nothing behind"
    );
}

/// Stalled clients cannot pile up connections: one that sends nothing, or stops inside the
/// HTTP/2 preface, is dropped after the first-bytes timeout; one that stops inside an
/// HTTP/1.1 request head, after the header read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_are_dropped() {
    use metald::listener::{FIRST_BYTES_TIMEOUT, HEADER_READ_TIMEOUT};
    let m = Metald::start("stalled").await;
    let slack = std::time::Duration::from_secs(10);
    let head = format!("POST {PATH}/ListVms HTTP/1.1\r\nhost: x\r\n");
    let cases: [(&str, &[u8], std::time::Duration); 3] = [
        ("nothing", b"", FIRST_BYTES_TIMEOUT),
        (
            "part of the HTTP/2 preface",
            b"PRI * HT",
            FIRST_BYTES_TIMEOUT,
        ),
        (
            "part of a request head",
            head.as_bytes(),
            HEADER_READ_TIMEOUT,
        ),
    ];
    let port = m.port;
    let runs = cases.map(|(what, bytes, limit)| async move {
        let started = std::time::Instant::now();
        let got = raw_exchange(port, bytes, limit + slack).await;
        (what, limit, started.elapsed(), got)
    });
    let [a, b, c] = runs;
    let (a, b, c) = tokio::join!(a, b, c);
    for (what, limit, waited, got) in [a, b, c] {
        assert!(
            waited < limit + slack,
            "{what}: the connection was still open after {waited:?}"
        );
        assert!(
            waited + std::time::Duration::from_secs(1) >= limit,
            "{what}: closed after {waited:?}, before {limit:?}: {got:?}"
        );
    }
}
