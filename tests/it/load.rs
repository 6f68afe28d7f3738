//! Issue 9 under load, against a real metald binary and the real engine: the bound on RPCs
//! in flight (5,000 requests at once against 64 slots) and the bound on open connections
//! (2,000 silent connections against a 1024-descriptor limit). Traffic goes to 127.0.0.1
//! only.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metald::proto::vmprovisioner as pb;

use crate::support::*;

/// The two tests here each load both cores: one at a time, so neither measures the other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A metald started by this file: possibly under a wrapper (`prlimit`), with readings of its
/// /proc entries.
struct Proc {
    m: Metald,
}

impl Proc {
    async fn start(test: &str, wrapper: &[&str], env: &[(&str, &str)]) -> Self {
        ensure_noterm_image();
        Proc {
            m: Metald::start_wrapped(test, wrapper, env).await,
        }
    }

    fn base(&self) -> String {
        self.m.base()
    }

    fn log_text(&self) -> String {
        self.m.log_text()
    }

    fn pid(&self) -> u32 {
        self.m.pid().expect("metald running")
    }

    fn proc_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("metald's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc status"))
    }

    fn rss_kib(&self) -> u64 {
        self.proc_status("VmRSS:")
    }

    /// CPU time used so far (user + system).
    fn cpu(&self) -> Duration {
        cpu_of(&format!("/proc/{}/stat", self.pid()))
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn client(&self) -> Client {
        Client::new(&self.base(), "alice", "test-tenant")
    }

    /// A /metrics gauge's value.
    async fn gauge(&self, name: &str) -> u64 {
        // A fresh connection with time to spare: during a burst the cores are busy.
        let text = reqwest::Client::new()
            .get(format!("{}/metrics", self.base()))
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .expect("/metrics")
            .text()
            .await
            .expect("/metrics body");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics"))
    }
}

/// The code [`timed_call`] gives a `deadline_exceeded` whose call never started.
const NOTHING_STARTED: &str = "deadline_exceeded (nothing started)";

/// One unary Connect call on `http` (binary proto), with a deadline if given: the code
/// ("ok" for success) and how long the answer took.
async fn timed_call<Req: prost::Message>(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    req: &Req,
    timeout_ms: Option<u64>,
) -> (String, Duration) {
    let started = Instant::now();
    let mut request = http
        .post(format!("{base}/metal.vmprovisioner.v1.VmService/{method}"))
        .header("content-type", "application/proto")
        .header("authorization", "Bearer dev_user_alice")
        .header("x-tenant-id", "test-tenant")
        .body(req.encode_to_vec());
    if let Some(ms) = timeout_ms {
        request = request.header("connect-timeout-ms", ms.to_string());
    }
    let code = match request.send().await {
        Err(e) => format!("transport: {e}"),
        Ok(r) if r.status() == 200 => "ok".to_owned(),
        Ok(r) => {
            let body = r.bytes().await.unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let code = v["code"].as_str().unwrap_or("<no code>");
            let message = v["message"].as_str().unwrap_or_default();
            // A deadline that passed before the call got under way frees its slot at
            // once; one that passed while the call ran leaves the slot with its task.
            if code == "deadline_exceeded" && message.contains("nothing was done") {
                NOTHING_STARTED.to_owned()
            } else {
                code.to_owned()
            }
        }
    };
    (code, started.elapsed())
}

/// User + system CPU time from a /proc `stat` file.
fn cpu_of(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).expect("/proc stat");
    // After the command name (which may hold spaces, hence the last ')'): state is the
    // first field, utime the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let used = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(used * 1000 / ticks)
}

fn vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

const SLOTS: u64 = 64;
const BURST: usize = 5_000;
const CONNECTIONS: usize = 250;

/// What one burst saw.
struct Round {
    /// Latencies of the `resource_exhausted` answers, sorted.
    exhausted: Vec<Duration>,
    /// Codes and latencies of the calls that got a slot.
    admitted: Vec<(String, Duration)>,
    /// `metald_rpcs_in_flight` while the admitted ones wait.
    in_flight_during: u64,
    took: Duration,
    /// How long the stall still had to run when the burst began: a refusal that waited
    /// for a slot would come after it.
    stall_left: Duration,
    metald_cpu: Duration,
    client_cpu: Duration,
    /// A call after the burst, once the callers' deadline has passed and while their tasks
    /// still wait (rounds with a deadline only).
    late_call: Option<(String, Duration)>,
    rss_peak: u64,
    /// RSS a second after every slot was free again.
    rss_after: u64,
}

/// Boots the VM, holds its operation lock with a graceful stop of `grace_s` (its command
/// ignores SIGTERM), fires [`BURST`] PauseVm calls at it, with a deadline of `deadline_ms`
/// if given (shorter than the grace: the admitted callers give up while their tasks, and
/// slots, live on), then waits for the stop to end and every slot to be free again.
async fn burst_round(
    m: &Proc,
    clients: &[reqwest::Client],
    id: &str,
    grace_s: i32,
    deadline_ms: Option<u64>,
) -> Round {
    let c = m.client();
    c.boot(id).await.expect("boot");
    // A SIGTERM before the VM's shell has set its trap would end it: give it a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopping = {
        let c = c.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            c.call::<_, pb::ShutdownVmResponse>(
                "ShutdownVm",
                &pb::ShutdownVmRequest {
                    vm_id: id,
                    force: false,
                    timeout_seconds: grace_s,
                },
            )
            .await
        })
    };
    let stop_started = Instant::now();
    // Its call reaches the engine (and takes the lock) within moments.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !stopping.is_finished(),
        "the graceful stop should hold the lock: {:?}",
        stopping.await
    );

    let sampling = Arc::new(AtomicBool::new(true));
    let rss_peak = Arc::new(AtomicU64::new(m.rss_kib()));
    let sampler = {
        let sampling = sampling.clone();
        let rss_peak = rss_peak.clone();
        let status = format!("/proc/{}/status", m.pid());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(kib) = std::fs::read_to_string(&status)
                    .ok()
                    .and_then(|s| vm_rss(&s))
                {
                    rss_peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let started = Instant::now();
    let stall_left = Duration::from_secs(grace_s as u64).saturating_sub(stop_started.elapsed());
    let metald_cpu = m.cpu();
    let client_cpu = cpu_of("/proc/self/stat");
    let base = m.base();
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..BURST {
        let http = clients[i % clients.len()].clone();
        let base = base.clone();
        let req = pb::PauseVmRequest { vm_id: id.into() };
        burst.spawn(async move { timed_call(&http, &base, "PauseVm", &req, deadline_ms).await });
    }
    // While the admitted ones wait on the lock, the gauge shows the bound full.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let in_flight_during = m.gauge("metald_rpcs_in_flight").await;
    let mut exhausted = Vec::new();
    let mut admitted = Vec::new();
    while let Some(joined) = burst.join_next().await {
        let (code, took) = joined.expect("burst task");
        if code == "resource_exhausted" {
            exhausted.push(took);
        } else {
            admitted.push((code, took));
        }
    }
    exhausted.sort();
    let took = started.elapsed();
    let metald_cpu = m.cpu() - metald_cpu;
    let client_cpu = cpu_of("/proc/self/stat") - client_cpu;

    let mut late_call = None;
    if deadline_ms.is_some() {
        assert!(
            stop_started.elapsed() < Duration::from_secs(grace_s as u64),
            "the stop should still hold the lock: {:.1?} of {grace_s} s passed",
            stop_started.elapsed()
        );
        late_call = Some(
            timed_call(
                &clients[0],
                &base,
                "GetVmInfo",
                &pb::GetVmInfoRequest { vm_id: id.into() },
                Some(5_000),
            )
            .await,
        );
    }

    // The stop ends; the queued pauses take their turns on the lock (and fail: the VM is
    // stopped), one engine call each; the slots free.
    let stopped = stopping.await.expect("shutdown task");
    assert!(stopped.is_ok(), "ShutdownVm: {stopped:?}");
    let waited = Instant::now();
    while m.gauge("metald_rpcs_in_flight").await > 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "RPCs still in flight 30 s after the stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.await.expect("sampler");
    tokio::time::sleep(Duration::from_secs(1)).await;
    Round {
        exhausted,
        admitted,
        in_flight_during,
        took,
        stall_left,
        metald_cpu,
        client_cpu,
        late_call,
        rss_peak: rss_peak.load(Ordering::Relaxed),
        rss_after: m.rss_kib(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_rpcs_against_64_slots() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let m = Proc::start(
        "inflight",
        &[],
        &[("UNKEY_METALD_MAX_INFLIGHT_RPCS", &SLOTS.to_string())],
    )
    .await;
    let c = m.client();
    let mut config = small_config();
    config
        .metadata
        .insert("docker_image".into(), NOTERM_IMAGE.into());
    let id = c.create(config).await.expect("create");

    // A few hundred HTTP/2 connections, open before the bursts and kept through them, so
    // the RSS figures compare like with like (/health takes no slot).
    let clients: Vec<reqwest::Client> = (0..CONNECTIONS)
        .map(|_| {
            reqwest::Client::builder()
                .http2_prior_knowledge()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("client")
        })
        .collect();
    for http in &clients {
        let r = http.get(format!("{}/health", m.base())).send().await;
        assert_eq!(r.expect("warm-up").status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = m.rss_kib();

    // Burst 1: the callers' deadline (10 s) passes while the stop (40 s) still holds the
    // lock. Burst 2: no deadline; the admitted wait out a shorter stop (20 s).
    let rounds = [
        burst_round(&m, &clients, &id, 40, Some(10_000)).await,
        burst_round(&m, &clients, &id, 20, None).await,
    ];
    // The client's connections close; metald trims its heap every 10 s.
    drop(clients);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let rss_final = m.rss_kib();

    let mut rss_last = rss_before;
    println!("RSS before the bursts: {rss_before} KiB");
    for (n, r) in rounds.iter().enumerate() {
        let mut codes: Vec<&str> = r.admitted.iter().map(|(c, _)| c.as_str()).collect();
        codes.sort();
        codes.dedup();
        println!(
            "burst {}: {BURST} PauseVm over {CONNECTIONS} h2 connections against {SLOTS} slots, all answered in {:.1?} (the stall had {:.1?} left at the start): \
             {} resource_exhausted (p50 {:.1?}, p99 {:.1?}, max {:.1?}), {} admitted {codes:?} (first answer {:.1?}); \
             in flight while stalled: {}; a call after the deadline: {:?}; \
             CPU: metald {:.1?} ({:.0?} a request), test client {:.1?}; \
             RSS peak {} KiB, after {} KiB ({:+} KiB)",
            n + 1,
            r.took,
            r.stall_left,
            r.exhausted.len(),
            percentile(&r.exhausted, 0.5),
            percentile(&r.exhausted, 0.99),
            r.exhausted.last().copied().unwrap_or_default(),
            r.admitted.len(),
            r.admitted.iter().map(|(_, t)| *t).min().unwrap_or_default(),
            r.in_flight_during,
            r.late_call,
            r.metald_cpu,
            r.metald_cpu / BURST as u32,
            r.client_cpu,
            r.rss_peak,
            r.rss_after,
            r.rss_after as i64 - rss_last as i64,
        );
        rss_last = r.rss_after;
    }
    println!(
        "RSS with the {CONNECTIONS} connections closed, 12 s later: {rss_final} KiB ({:+} KiB from before the bursts)",
        rss_final as i64 - rss_before as i64
    );
    let peak = m.gauge("metald_rpcs_in_flight_peak").await;
    println!("most RPCs ever in flight at once: {peak}");

    // Never more than the bound at once, and the bound was reached.
    assert_eq!(peak, SLOTS);
    for r in &rounds {
        assert_eq!(r.in_flight_during, SLOTS, "the bound is full while stalled");
        assert_eq!(r.exhausted.len() + r.admitted.len(), BURST);
        // At most the free slots (one is the ShutdownVm's) hold on through the stall.
        // Besides them, a loaded machine may admit a few whose deadline passed before
        // their call got under way: they start nothing and give their slot back at once.
        let held = r
            .admitted
            .iter()
            .filter(|(code, _)| code != NOTHING_STARTED)
            .count();
        assert!(held > 0 && held < SLOTS as usize, "{held} held a slot");
        assert!(
            r.admitted
                .iter()
                .all(|(code, _)| !code.starts_with("transport")),
            "{:?}",
            r.admitted
        );
        // "At once": no queue. A refusal in the burst waits only for CPU (client and
        // server, debug builds, share 2 cores with other builders: with the machine
        // loaded, the last of 5,000 has come after 10 s), never for a slot: slots free
        // only when the stall ends, and every refusal came before that. The time of one
        // refusal is the call after the deadline, below.
        let slowest_refusal = r.exhausted.last().copied().unwrap_or_default();
        assert!(
            slowest_refusal < r.stall_left,
            "refusals do not wait for a slot: the slowest took {slowest_refusal:?}, the stall had {:?} left",
            r.stall_left
        );
    }
    // Burst 1's callers gave up at their deadline, their tasks did not: the slots stayed
    // taken, and a new call was refused at once.
    assert!(
        rounds[0]
            .admitted
            .iter()
            .all(|(code, _)| code.starts_with("deadline_exceeded")),
        "{:?}",
        rounds[0].admitted
    );
    let (code, took) = rounds[0].late_call.clone().expect("burst 1 has a deadline");
    assert_eq!(code, "resource_exhausted");
    assert!(took < Duration::from_secs(1), "{took:?}");

    let health = reqwest::get(format!("{}/health", m.base()))
        .await
        .expect("health");
    assert_eq!(health.status(), 200, "metald stays up");
    // While the client's connections stay open, their HTTP/2 state keeps the buffers the
    // bursts grew (the bursts' peaks and "after" figures above); closed, that goes, and
    // metald's periodic heap trim hands freed pages back. Measured: back to within a few
    // MiB of before, often below (before counted the 250 connections). The slack allows
    // for heap fragmentation the trim cannot return (pages partly in use); growth with
    // the bursts' size (a queue, leaked tasks or bodies: 5,000 requests at even 2 KiB
    // each are 10 MiB a burst) would not fit in it.
    assert!(
        rss_final <= rss_before + 8 * 1024,
        "RSS after the bursts {rss_final} KiB vs {rss_before} KiB before"
    );

    let deleted = c.delete(&id, true).await.expect("force delete");
    assert!(deleted.success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_keep_a_new_client_out() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const SILENT: usize = 2_000;
    // The test holds every connection open: make sure it may.
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit to a live local.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) }, 0);
    assert!(
        rl.rlim_cur >= (SILENT + 512) as u64,
        "the test needs more than {SILENT} descriptors; has {}",
        rl.rlim_cur
    );

    let m = Proc::start("silent", &["prlimit", "--nofile=1024:1024"], &[]).await;
    let c = m.client();
    let id = c.create(small_config()).await.expect("create");
    let fds_before = m.open_fds();

    let opened = Instant::now();
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", m.m.port))
                .await
                .expect("connect"),
        );
    }
    // Let metald accept them all (closing the oldest as it goes).
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "{SILENT} silent connections opened in {:.1?}; metald's open descriptors: {fds_before} before, {} now (limit 1024)",
        opened.elapsed(),
        m.open_fds()
    );

    let started = Instant::now();
    let health = reqwest::Client::new()
        .get(format!("{}/health", m.base()))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("health answered");
    let health_took = started.elapsed();
    assert_eq!(health.status(), 200);

    let started = Instant::now();
    let info = Client::new(&m.base(), "alice", "test-tenant")
        .info(&id)
        .await;
    let info_took = started.elapsed();
    let info = info.expect("GetVmInfo");
    assert_eq!(
        info.config.map(|c| c.metadata["docker_image"].clone()),
        Some(IMAGE.to_owned())
    );
    println!(
        "with {SILENT} silent connections open: /health in {health_took:.1?}, GetVmInfo in {info_took:.1?}; \
         metald's open descriptors {}",
        m.open_fds()
    );
    assert!(
        health_took < Duration::from_secs(1),
        "/health took {health_took:?}"
    );
    assert!(
        info_took < Duration::from_secs(1),
        "GetVmInfo took {info_took:?}"
    );
    assert!(
        !m.log_text().contains("accept failed"),
        "the bound kept accept from running out of descriptors"
    );
    drop(silent);
    c.delete(&id, true).await.expect("delete");
}
