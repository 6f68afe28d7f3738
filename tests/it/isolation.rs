//! Untrusted VMs (spec §5.1): VMs cannot reach each other but reach the host gateway, the
//! hardening is on every container, a fork bomb does not take metald down. The port-retry and
//! event-storm proofs, and the reaper's, are in the submodules.

mod reaper;
mod reboots;
mod storm;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metald::proto::vmprovisioner::{self as pb, VmState};

use crate::support::*;

/// The network metald makes for VMs when none is configured (left in place by the tests:
/// it is metald's infrastructure, shared by every instance).
const VM_NETWORK: &str = "unkey-vms";

/// The container of a VM of this test's metald.
fn container(m: &Metald, vm_id: &str) -> String {
    format!("unkey-vm-{}-{vm_id}", m.scope)
}

/// `docker exec <container> sh -c <script>`: success, and stdout + stderr.
fn exec(container: &str, script: &str) -> (bool, String) {
    let out = Command::new("docker")
        .args(["exec", container, "sh", "-c", script])
        .output()
        .expect("docker exec");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn ip_of(container: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        container,
    ])
}

/// `host.docker.internal`'s address, as the VM's /etc/hosts has it.
fn host_gateway_of(container: &str) -> String {
    let (ok, hosts) = exec(container, "cat /etc/hosts");
    assert!(ok, "{hosts}");
    hosts
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == "host.docker.internal"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no host.docker.internal in /etc/hosts:\n{hosts}"))
        .to_owned()
}

/// One HTTP request from inside `from` to `ip:port`, by IP (busybox wget may crash on names).
fn http_from(from: &str, ip: &str, port: u16) -> (bool, String) {
    exec(
        from,
        &format!("(printf 'GET / HTTP/1.0\\r\\n\\r\\n'; sleep 1) | nc -w 2 {ip} {port}"),
    )
}

async fn running_vm(c: &Client, config: pb::VmConfig) -> String {
    let id = c.create(config).await.expect("create");
    assert_eq!(c.boot(&id).await.expect("boot").state(), VmState::Running);
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_cannot_reach_each_other_but_reach_the_host() {
    let m = Metald::start("isolnet").await;
    let c = m.client("alice");
    // Both serve HTTP on 8080 inside, published nowhere (small_config exposes no port).
    let a = container(&m, &running_vm(&c, small_config()).await);
    let b = container(&m, &running_vm(&c, small_config()).await);

    let network = docker(&[
        "network",
        "inspect",
        "-f",
        "{{index .Options \"com.docker.network.bridge.enable_icc\"}} {{index .Labels \"unkey.network.created_by\"}}",
        VM_NETWORK,
    ]);
    assert_eq!(network, "false metald", "the VM network as metald makes it");
    let on = docker(&[
        "inspect",
        "-f",
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}",
        &a,
    ]);
    assert_eq!(on, VM_NETWORK);
    // Its subnets went to the listeners' guard.
    let subnets = docker(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
        VM_NETWORK,
    ]);
    let log = m.log_text();
    for subnet in subnets.split_whitespace() {
        assert!(
            log.lines()
                .any(|l| l.contains("API closed to VM subnets") && l.contains(subnet)),
            "subnet {subnet} not handed to the guard:\n{log}"
        );
    }

    let (ip_a, ip_b) = (ip_of(&a), ip_of(&b));
    // B serves: from itself, on its own address.
    let (_, own) = http_from(&b, &ip_b, 8080);
    assert!(own.contains("metald test vm"), "B does not serve: {own}");
    // A cannot open B's port, nor B A's.
    let started = Instant::now();
    let (ok, text) = http_from(&a, &ip_b, 8080);
    println!(
        "A -> B {ip_b}:8080: ok={ok} after {:?}: {}",
        started.elapsed(),
        text.trim()
    );
    assert!(
        !ok && !text.contains("metald test vm"),
        "A reached B: {text}"
    );
    let (ok, text) = http_from(&b, &ip_a, 8080);
    assert!(
        !ok && !text.contains("metald test vm"),
        "B reached A: {text}"
    );

    // Both reach the host through host.docker.internal's address.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let heard = Arc::new(Mutex::new(Vec::<String>::new()));
    let server = {
        let heard = heard.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            loop {
                let Ok((mut conn, peer)) = listener.accept().await else {
                    return;
                };
                let heard = heard.clone();
                tokio::spawn(async move {
                    let mut text = String::new();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(3),
                        conn.read_to_string(&mut text),
                    )
                    .await;
                    heard
                        .lock()
                        .unwrap()
                        .push(format!("{} from {peer}", text.trim()));
                });
            }
        })
    };
    for (name, vm) in [("vm-a", &a), ("vm-b", &b)] {
        let gateway = host_gateway_of(vm);
        let (ok, text) = tokio::task::spawn_blocking({
            let vm = vm.clone();
            let gateway = gateway.clone();
            move || {
                exec(
                    &vm,
                    &format!("(echo hello-from-{name}; sleep 1) | nc -w 3 {gateway} {port}"),
                )
            }
        })
        .await
        .unwrap();
        assert!(
            ok,
            "{name} could not reach the host at {gateway}:{port}: {text}"
        );
    }
    eventually(Duration::from_secs(5), "the host heard both VMs", || {
        let heard = heard.clone();
        async move { heard.lock().unwrap().len() >= 2 }
    })
    .await;
    let heard = heard.lock().unwrap().clone();
    println!("host listener on 0.0.0.0:{port} heard: {heard:?}");
    assert!(heard.iter().any(|h| h.starts_with("hello-from-vm-a")));
    assert!(heard.iter().any(|h| h.starts_with("hello-from-vm-b")));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vm_container_is_hardened() {
    let m = Metald::start("hardening").await;
    let c = m.client("alice");
    let vm = container(&m, &running_vm(&c, small_config()).await);
    let hc = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.PidsLimit}}|{{.HostConfig.SecurityOpt}}|{{.HostConfig.CapDrop}}|{{.HostConfig.LogConfig.Type}}|{{index .HostConfig.LogConfig.Config \"max-size\"}}|{{index .HostConfig.LogConfig.Config \"max-file\"}}",
        &vm,
    ]);
    println!("host config: {hc}");
    assert_eq!(
        hc,
        "1024|[no-new-privileges:true]|[NET_RAW]|json-file|10m|3"
    );
    // ping needs a raw socket.
    let (ok, text) = exec(&vm, "ping -c 1 -W 1 127.0.0.1");
    println!("ping inside the VM: ok={ok}: {}", text.trim());
    assert!(!ok, "ping worked without NET_RAW: {text}");
    assert!(text.contains("permission denied"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_does_not_take_metald_down() {
    let m = Metald::start("forkbomb").await;
    let c = m.client("alice");
    // Memory enough that the pids limit, not the OOM killer, is what stops the bomb.
    let mut config = small_config();
    config.memory = Some(pb::MemoryConfig {
        size_bytes: 512 * 1024 * 1024,
        ..Default::default()
    });
    let id = running_vm(&c, config).await;
    let vm = container(&m, &id);
    // Detached: the bomb runs in the VM's cgroup, under its pids limit and one vCPU. Each
    // process forks two and then spins: the classic `b | b &` dies out once forks fail (ash
    // exits on a failed fork), this one holds every pid and the whole vCPU.
    let status = Command::new("docker")
        .args([
            "exec",
            "-d",
            &vm,
            "sh",
            "-c",
            "f() { f & f & while :; do :; done; }; f",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids = docker(&["stats", "--no-stream", "--format", "{{.PIDs}}", &vm]);
    println!("processes in the VM during the bomb: {pids}");
    assert!(
        pids.parse::<u32>().is_ok_and(|n| n > 512),
        "the bomb did not go off: {pids} processes"
    );
    assert_eq!(c.state(&id).await.unwrap(), VmState::Running);

    let http = reqwest::Client::new();
    let mut worst = Duration::ZERO;
    let mut times = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        let r = http
            .get(format!("{}/health", m.base()))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("health answers");
        let took = started.elapsed();
        assert_eq!(r.status(), 200);
        times.push(format!("{:.0?}", took));
        worst = worst.max(took);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let pids = docker(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.PIDs}} {{.CPUPerc}}",
        &vm,
    ]);
    println!(
        "/health during the bomb: {}; then {pids} (processes, CPU)",
        times.join(" ")
    );
    assert!(worst < Duration::from_secs(1), "slowest /health {worst:?}");

    let started = Instant::now();
    c.delete(&id, true).await.expect("force delete");
    println!("DeleteVm(force) took {:?}", started.elapsed());
    assert_eq!(c.info(&id).await.unwrap_err().code, "not_found");
    assert!(
        docker(&["ps", "-aq", "--filter", &format!("name=^/{vm}$")]).is_empty(),
        "container still there"
    );
}

/// Removes every network of a name when dropped (after the VMs on it: declare it first).
struct NetworkGuard(String);

impl NetworkGuard {
    fn ids(&self) -> Vec<String> {
        docker(&[
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("name=^{}$", self.0),
        ])
        .split_whitespace()
        .map(str::to_owned)
        .collect()
    }
}

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        for id in self.ids() {
            docker(&["network", "rm", &id]);
        }
    }
}

/// A missing network is made by metald, once, even when several instances start together
/// (the engine's own duplicate check is not atomic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_make_one_network() {
    let network = NetworkGuard(format!("metald-it-net-{}", std::process::id()));
    let env = [("UNKEY_METALD_DOCKER_NETWORK", network.0.as_str())];
    let instances: Vec<Metald> = (0..4)
        .map(|i| Metald::launch_with(&format!("netrace{i}"), &env))
        .collect();
    for m in &instances {
        m.wait_healthy().await;
    }
    let ids = network.ids();
    let created = instances
        .iter()
        .filter(|m| m.log_text().contains("created the VM network"))
        .count();
    let removed: usize = instances
        .iter()
        .map(|m| m.log_text().matches("removed a duplicate").count())
        .sum();
    println!(
        "4 instances at once: {} network(s) named {} left; {created} logged a create, \
         {removed} duplicate(s) removed",
        ids.len(),
        network.0
    );
    assert_eq!(ids.len(), 1, "networks named {}: {ids:?}", network.0);
    let made = docker(&[
        "network",
        "inspect",
        "-f",
        "{{.Driver}} {{index .Options \"com.docker.network.bridge.enable_icc\"}} {{index .Labels \"unkey.network.created_by\"}}",
        &network.0,
    ]);
    assert_eq!(made, "bridge false metald");
    for m in [&instances[0], &instances[3]] {
        let c = m.client("alice");
        let vm = container(m, &running_vm(&c, small_config()).await);
        let on = docker(&[
            "inspect",
            "-f",
            "{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}",
            &vm,
        ]);
        assert_eq!(on, network.0);
    }
    drop(instances);
}
