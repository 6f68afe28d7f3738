//! An event storm (spec §5.1): `docker exec` in a loop and a health check every second make
//! Docker emit events for a VM without end. metald must not inspect for them, and must still
//! see real changes.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metald::proto::vmprovisioner::VmState;

use super::container;
use crate::support::*;

const EXECS: usize = 200;

/// An image built for this test run, removed when dropped.
struct TestImage(String);

impl TestImage {
    /// `FROM` the test image, with a health check every second; legacy builder (no BuildKit
    /// here), Dockerfile on stdin (no context).
    fn with_healthcheck() -> Self {
        ensure_image();
        let tag = format!("metald-it-healthcheck-{}:latest", std::process::id());
        let mut build = Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", &tag, "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker build");
        {
            use std::io::Write;
            let mut stdin = build.stdin.take().expect("stdin");
            write!(
                stdin,
                "FROM {IMAGE}\nHEALTHCHECK --interval=1s --timeout=1s CMD true\n"
            )
            .expect("write Dockerfile");
        }
        let out = build.wait_with_output().expect("build");
        assert!(
            out.status.success(),
            "docker build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestImage(tag)
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn inspects(m: &Metald) -> u64 {
    let text = http_get(&format!("{}/metrics", m.base()))
        .await
        .expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("metald_docker_inspects_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metald_docker_inspects_total in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_storm_costs_no_inspects() {
    let image = TestImage::with_healthcheck();
    // Containers go first (the scope guard inside Metald), then the image.
    let m = Metald::start("evstorm").await;
    let c = m.client("alice");
    let mut config = small_config();
    config
        .metadata
        .insert("docker_image".into(), image.0.clone());
    let id = c.create(config).await.expect("create");
    c.boot(&id).await.expect("boot");
    let vm = container(&m, &id);
    eventually(Duration::from_secs(20), "the health check runs", || {
        let vm = vm.clone();
        async move { docker(&["inspect", "-f", "{{.State.Health.Status}}", &vm]) == "healthy" }
    })
    .await;

    let before = inspects(&m).await;
    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(AtomicBool::new(false));
    // Four exec loops at once: a burst, not a trickle.
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let vm = vm.clone();
            let done = done.clone();
            let held = held.clone();
            std::thread::spawn(move || {
                while done.load(Ordering::Relaxed) < EXECS {
                    if held.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    let ok = Command::new("docker")
                        .args(["exec", &vm, "true"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    // Mid-storm, real changes are still seen. (Not by pausing: on this engine (20.10, cgroup
    // v1) a pause that meets an exec being started can freeze it half-way and hang the pause
    // or the unpause, and the container with them, until its freezer is thawed by hand;
    // seen here with the docker CLI alone.)
    eventually(Duration::from_secs(60), "half the execs", || {
        let done = done.clone();
        async move { done.load(Ordering::Relaxed) >= EXECS / 2 }
    })
    .await;
    held.store(true, Ordering::Relaxed);
    let r = c.shutdown(&id, true).await.expect("shutdown");
    assert_eq!(r.state(), VmState::Shutdown);
    assert_eq!(c.state(&id).await.unwrap(), VmState::Shutdown);
    assert_eq!(c.boot(&id).await.expect("boot").state(), VmState::Running);
    held.store(false, Ordering::Relaxed);
    // And a change made behind metald's back, seen through its event only.
    docker(&["kill", &vm]);
    eventually(Duration::from_secs(10), "SHUTDOWN from the event", || {
        let c = c.clone();
        let id = id.clone();
        async move { c.state(&id).await.ok() == Some(VmState::Shutdown) }
    })
    .await;
    docker(&["start", &vm]);
    eventually(Duration::from_secs(10), "RUNNING from the event", || {
        let c = c.clone();
        let id = id.clone();
        async move { c.state(&id).await.ok() == Some(VmState::Running) }
    })
    .await;

    for w in workers {
        w.join().expect("exec loop");
    }
    let window = started.elapsed();
    let spent = inspects(&m).await - before;
    let health_checks = window.as_secs();
    println!(
        "{} execs and ~{health_checks} health checks in {window:.1?}: metald made {spent} inspects \
         ({:.1} per minute), a shutdown, a boot, a kill and a start included",
        done.load(Ordering::Relaxed),
        spent as f64 * 60.0 / window.as_secs_f64(),
    );
    assert!(spent < 30, "{spent} inspects in {window:?}");
    assert_eq!(c.state(&id).await.unwrap(), VmState::Running);
    c.delete(&id, true).await.expect("delete");
    drop(m);
    drop(image);
}
