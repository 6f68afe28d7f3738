//! `make bench`, billing part: wall time and metald CPU of one collection tick (a stats
//! reading per running VM, samples computed and written to the spool) for 50 and 200 running
//! VMs on the real engine. Prints figures; asserts nothing.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use metald::backend::docker::DockerSettings;
use metald::backend::DockerBackend;
use metald::billing::Billing;
use metald::config::BillingConfig;
use metald::service::{watch, Caller, CreateVm, Parts, VmService};
use metald::vm::index::VmIndex;
use metald::vm::state::Op;
use metald::vm::UsageBoard;
use tokio_util::sync::CancellationToken;

mod common;
use common::{vm_config, Cleanup};

const TICKS: usize = 5;

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    common::ensure_image();
    let scope = format!("billbench{}", std::process::id());
    let _cleanup = Cleanup {
        scope: scope.clone(),
        child: None,
    };
    let data = tempfile::tempdir().expect("tempdir");
    let backend = DockerBackend::new(DockerSettings {
        host: "unix:///var/run/docker.sock".into(),
        network: "bridge".into(),
        port_host_ip: "127.0.0.1".into(),
        port_range: (30000, 40000),
        pull_timeout: Duration::from_secs(60),
        hardening: Default::default(),
    })
    .expect("docker");
    let index = Arc::new(VmIndex::default());
    let usage = Arc::new(UsageBoard::default());
    let ready = Arc::new(AtomicBool::new(false));
    let billing_config = BillingConfig {
        enabled: true,
        mock_mode: false,
        // Nothing is sent here (no sender task); the tick writes to the spool as in production.
        endpoint: "http://127.0.0.1:1".into(),
        interval: Duration::from_secs(15),
        flush_interval: Duration::from_secs(60),
        tenant_id: "metald".into(),
        spool_max_bytes: 256 << 20,
        heartbeat_interval: Duration::from_secs(30),
        retry_max: Duration::from_secs(60),
    };
    let billing = Arc::new(
        Billing::open(
            &billing_config,
            data.path(),
            backend.clone(),
            index.clone(),
            usage.clone(),
            ready.clone(),
        )
        .expect("billing"),
    );
    let service = Arc::new(VmService::new(Parts {
        backend,
        scope: scope.clone(),
        index,
        usage,
        docker_up: ready,
        billing: None,
        limits: Default::default(),
        peer_guard: Default::default(),
    }));
    let cancel = CancellationToken::new();
    tokio::spawn(watch::run(service.clone(), cancel.clone()));
    while !service.docker_up() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let caller = Caller {
        customer_id: "bench".into(),
        tenant_id: "bench".into(),
    };
    let mut running = 0usize;
    println!(
        "billing collection tick (stats reads concurrent, bound {}):",
        metald::billing::collector::STATS_CONCURRENCY
    );
    for target in [50usize, 200] {
        let started: Vec<_> = futures::stream::iter(running..target)
            .map(|_| {
                let service = service.clone();
                let caller = caller.clone();
                async move {
                    let vm = service
                        .create(
                            &caller,
                            CreateVm {
                                config: Some(vm_config(16 << 20, false)),
                                ..Default::default()
                            },
                        )
                        .await
                        .expect("create");
                    service
                        .apply(&caller, vm.vm_id.as_str(), Op::Boot)
                        .await
                        .expect("boot");
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        running += started.len();
        billing.reconcile();
        let mut walls = Vec::new();
        let mut cpus = Vec::new();
        for _ in 0..TICKS {
            let (t, c) = (Instant::now(), cpu_time());
            billing.collect().await;
            walls.push(t.elapsed());
            cpus.push(cpu_time().saturating_sub(c));
        }
        walls.sort();
        cpus.sort();
        println!(
            "  {running:>3} running VMs: tick wall p50 {:>7.1} ms (max {:>7.1} ms), metald CPU p50 {:>6.1} ms per tick; spool {} records",
            walls[TICKS / 2].as_secs_f64() * 1e3,
            walls[TICKS - 1].as_secs_f64() * 1e3,
            cpus[TICKS / 2].as_secs_f64() * 1e3,
            billing.status().spool_depth,
        );
    }
    cancel.cancel();
}
