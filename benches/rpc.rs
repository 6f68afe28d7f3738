//! `make bench`: metald's lifecycle latency next to the same Docker operations sent straight
//! to the engine, and read throughput with 100 VMs. Prints figures; asserts nothing.
//!
//! Runs a release `metald` (METALD_BIN, default target/release/metald) in a scope of its own
//! on 127.0.0.1 and removes every container it made at the end.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metald::backend::docker::DockerSettings;
use metald::backend::{ContainerSpec, DockerBackend, VmLabels};
use metald::proto::vmprovisioner as pb;
use metald::vm::{ExposedPort, Protocol};
use prost::Message;

mod common;
use common::{vm_config, Cleanup, IMAGE};

const LIFECYCLE_ROUNDS: usize = 30;
const READ_VMS: usize = 100;
const READ_SECONDS: u64 = 5;
const READ_CONCURRENCY: usize = 64;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(mut xs: Vec<Duration>) -> (Duration, Duration) {
    xs.sort();
    (percentile(&xs, 0.50), percentile(&xs, 0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// CPU time (user + system) a process has used so far, from /proc (clock ticks of 10 ms).
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime: fields 14 and 15 of the line; the state (field 3) is index 0 here.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

struct Rpc {
    http: reqwest::Client,
    base: String,
}

impl Rpc {
    async fn call<Req: Message, Resp: Message + Default>(&self, method: &str, req: &Req) -> Resp {
        let r = self
            .http
            .post(format!(
                "{}/metal.vmprovisioner.v1.VmService/{method}",
                self.base
            ))
            .header("content-type", "application/proto")
            .header("authorization", "Bearer dev_user_bench")
            .header("x-tenant-id", "bench")
            .body(req.encode_to_vec())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "{method} failed: {:?}", r.text().await);
        Resp::decode(r.bytes().await.expect("body")).expect("decode")
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let root = env!("CARGO_MANIFEST_DIR");
    common::ensure_image();
    let bin =
        std::env::var("METALD_BIN").unwrap_or_else(|_| format!("{root}/target/release/metald"));
    let scope = format!("bench{}", std::process::id());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = tempfile::tempdir().unwrap();
    let child = Command::new(&bin)
        .env("UNKEY_METALD_ADDRESS", "127.0.0.1")
        .env("UNKEY_METALD_PORT", port.to_string())
        .env("UNKEY_METALD_DOCKER_SCOPE", &scope)
        .env("UNKEY_METALD_DATA_DIR", data.path())
        .env("UNKEY_METALD_DOCKER_PORT_HOST_IP", "127.0.0.1")
        .env("UNKEY_METALD_BILLING_ENABLED", "false")
        .env("UNKEY_METALD_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e} (run `cargo build --release` first)"));
    let server_pid = child.id().to_string();
    let _cleanup = Cleanup {
        scope: scope.clone(),
        child: Some(child),
    };
    let rpc = Arc::new(Rpc {
        http: reqwest::Client::new(),
        base: format!("http://127.0.0.1:{port}"),
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while rpc
        .http
        .get(format!("{}/health", rpc.base))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "metald did not become healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The same container as metald makes: its network (made by metald at start, a bridge
    // with inter-container traffic off) and its hardening.
    let raw = DockerBackend::new(DockerSettings {
        host: "unix:///var/run/docker.sock".into(),
        network: "unkey-vms".into(),
        port_host_ip: "127.0.0.1".into(),
        port_range: (30000, 40000),
        pull_timeout: Duration::from_secs(60),
        hardening: Default::default(),
    })
    .unwrap();
    raw.negotiate().await.expect("docker");

    println!(
        "metald benchmark: {LIFECYCLE_ROUNDS} rounds each, sequential, one published port per VM"
    );
    // Interleave metald and raw rounds so both see the same engine conditions.
    let (mut m_up, mut m_down, mut r_up, mut r_down) = (vec![], vec![], vec![], vec![]);
    for i in 0..LIFECYCLE_ROUNDS {
        let t = Instant::now();
        let created: pb::CreateVmResponse = rpc
            .call(
                "CreateVm",
                &pb::CreateVmRequest {
                    config: Some(vm_config(64 << 20, true)),
                    ..Default::default()
                },
            )
            .await;
        let _: pb::BootVmResponse = rpc
            .call(
                "BootVm",
                &pb::BootVmRequest {
                    vm_id: created.vm_id.clone(),
                },
            )
            .await;
        m_up.push(t.elapsed());
        let t = Instant::now();
        let _: pb::ShutdownVmResponse = rpc
            .call(
                "ShutdownVm",
                &pb::ShutdownVmRequest {
                    vm_id: created.vm_id.clone(),
                    force: true,
                    timeout_seconds: 0,
                },
            )
            .await;
        let _: pb::DeleteVmResponse = rpc
            .call(
                "DeleteVm",
                &pb::DeleteVmRequest {
                    vm_id: created.vm_id,
                    force: false,
                },
            )
            .await;
        m_down.push(t.elapsed());

        let spec = ContainerSpec {
            name: format!("unkey-vm-{scope}-raw{i}"),
            image: IMAGE.into(),
            env: vec!["PORT=8080".into()],
            labels: VmLabels {
                vm_id: format!("raw{i}"),
                scope: scope.clone(),
                customer_id: "bench".into(),
                config: vec![],
                created_at_nanos: 0,
            },
            ports: vec![ExposedPort {
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            nano_cpus: 1_000_000_000,
            memory_bytes: 64 << 20,
        };
        let t = Instant::now();
        let id = raw.create(&spec).await.expect("raw create");
        raw.start(&id).await.expect("raw start");
        r_up.push(t.elapsed());
        let t = Instant::now();
        raw.kill(&id).await.expect("raw kill");
        raw.remove(&id, false).await.expect("raw remove");
        r_down.push(t.elapsed());
    }
    let row = |name: &str, m: Vec<Duration>, r: Vec<Duration>| {
        let (mp50, mp99) = summary(m);
        let (rp50, rp99) = summary(r);
        println!(
            "{name:<22} metald p50 {:>7.1} ms p99 {:>7.1} ms | docker p50 {:>7.1} ms p99 {:>7.1} ms | ratio p50 {:.3}x p99 {:.3}x",
            ms(mp50), ms(mp99), ms(rp50), ms(rp99), mp50.as_secs_f64() / rp50.as_secs_f64(), mp99.as_secs_f64() / rp99.as_secs_f64()
        );
    };
    row("CreateVm+BootVm", m_up, r_up);
    row("ShutdownVm+DeleteVm", m_down, r_down);

    // Reads: 100 VMs (created, not booted), many clients, for a fixed time.
    let mut ids = Vec::new();
    for _ in 0..READ_VMS {
        let r: pb::CreateVmResponse = rpc
            .call(
                "CreateVm",
                &pb::CreateVmRequest {
                    config: Some(vm_config(64 << 20, false)),
                    ..Default::default()
                },
            )
            .await;
        ids.push(r.vm_id);
    }
    let ids = Arc::new(ids);
    for method in ["GetVmInfo", "ListVms"] {
        let count = Arc::new(AtomicU64::new(0));
        let stop = Instant::now() + Duration::from_secs(READ_SECONDS);
        let started = Instant::now();
        let (server_cpu, client_cpu) = (cpu_time(&server_pid), cpu_time("self"));
        let mut tasks = Vec::new();
        for w in 0..READ_CONCURRENCY {
            let count = count.clone();
            let ids = ids.clone();
            // Several connections, as many clients would open.
            let client = Rpc {
                http: reqwest::Client::new(),
                base: rpc.base.clone(),
            };
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                while Instant::now() < stop {
                    if method == "GetVmInfo" {
                        let _: pb::GetVmInfoResponse = client
                            .call(
                                method,
                                &pb::GetVmInfoRequest {
                                    vm_id: ids[i % ids.len()].clone(),
                                },
                            )
                            .await;
                    } else {
                        let _: pb::ListVmsResponse =
                            client.call(method, &pb::ListVmsRequest::default()).await;
                    }
                    i += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.expect("worker");
        }
        let n = count.load(Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64();
        // CPU per request tells what the server costs apart from the load generator, which
        // shares the same two cores: the server alone could serve 2 cores / that cost.
        let per_request = |used: Duration| used.as_secs_f64() * 1e6 / n.max(1) as f64;
        let server_us = per_request(cpu_time(&server_pid).saturating_sub(server_cpu));
        let client_us = per_request(cpu_time("self").saturating_sub(client_cpu));
        println!(
            "{method:<22} {:>9.0} requests/s ({n} in {elapsed:.1} s, {READ_CONCURRENCY} concurrent clients, {READ_VMS} VMs, client on the same 2 cores)",
            n as f64 / elapsed,
        );
        println!(
            "{:<22} CPU per request: metald {server_us:.1} us, client {client_us:.1} us; metald alone on 2 cores: {:.0} requests/s",
            "",
            2e6 / server_us.max(f64::MIN_POSITIVE),
        );
    }
}
