//! Test support: a real metald process per test (own scope, own data dir), a Connect client,
//! the locally built busybox image, and cleanup of every container a test made, even when it
//! fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use metald::proto::vmprovisioner as pb;
use prost::Message;

pub const IMAGE: &str = "metald-test-busybox:latest";

static IMAGE_ONCE: Once = Once::new();

/// Builds the test image once per test run.
pub fn ensure_image() {
    IMAGE_ONCE.call_once(|| {
        let root = env!("CARGO_MANIFEST_DIR");
        let status = Command::new("bash")
            .arg(format!("{root}/scripts/build-test-image.sh"))
            .arg(IMAGE)
            .status()
            .expect("run build-test-image.sh");
        assert!(status.success(), "building the test image failed");
    });
}

/// The test image with a workload that ignores SIGTERM, so a graceful stop waits out its
/// whole grace (and holds the VM's operation lock meanwhile). metald takes no command from a
/// request: the image's own command is the VM's workload.
pub const NOTERM_IMAGE: &str = "metald-test-noterm:latest";

static NOTERM_ONCE: Once = Once::new();

/// Builds [`NOTERM_IMAGE`] from the busybox test image once per test run.
pub fn ensure_noterm_image() {
    ensure_image();
    NOTERM_ONCE.call_once(|| {
        if !docker(&["image", "inspect", "-f", "{{.Id}}", NOTERM_IMAGE]).is_empty() {
            return;
        }
        let builder = format!("metald-it-noterm-{}", std::process::id());
        docker(&["create", "--name", &builder, IMAGE]);
        // `trap '' TERM` in the shell that docker-init forwards SIGTERM to.
        let committed = docker(&[
            "commit",
            "--change",
            r#"CMD ["/bin/sh", "-c", "trap '' TERM; while true; do sleep 1; done"]"#,
            &builder,
            NOTERM_IMAGE,
        ]);
        docker(&["rm", "-f", &builder]);
        assert!(!committed.is_empty(), "could not build {NOTERM_IMAGE}");
    });
}

/// A scope name unique to this test run and test.
pub fn scope(test: &str) -> String {
    let short: String = test
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!("it{}-{}", std::process::id(), short.to_ascii_lowercase())
}

/// Removes every container of a scope when dropped (also on panic).
pub struct ScopeGuard(pub String);

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        remove_scope_containers(&self.0);
    }
}

pub fn scope_containers(scope: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=unkey.vm.scope={scope}"),
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

pub fn remove_scope_containers(scope: &str) {
    let ids = scope_containers(scope);
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .arg("rm")
            .arg("-f")
            .args(&ids)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `docker <args>`, stdout as text.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A metald process under test.
pub struct Metald {
    child: Option<Child>,
    pub port: u16,
    pub scope: String,
    pub data_dir: PathBuf,
    log: PathBuf,
    extra_env: Vec<(String, String)>,
    /// A program metald runs under (e.g. `prlimit --nofile=1024:1024`), which execs it.
    wrapper: Vec<String>,
    _dir: tempfile::TempDir,
    _guard: Arc<ScopeGuard>,
}

impl Metald {
    pub async fn start(test: &str) -> Self {
        Self::start_with(test, &[]).await
    }

    pub async fn start_with(test: &str, env: &[(&str, &str)]) -> Self {
        let m = Self::launch_with(test, env);
        m.wait_healthy().await;
        m
    }

    /// Starts metald under `wrapper` (a program that execs it, so the pid is metald's).
    pub async fn start_wrapped(test: &str, wrapper: &[&str], env: &[(&str, &str)]) -> Self {
        let m = Self::launch_wrapped(test, wrapper, env);
        m.wait_healthy().await;
        m
    }

    /// Starts metald without waiting for it to become healthy.
    pub fn launch_with(test: &str, env: &[(&str, &str)]) -> Self {
        Self::launch_wrapped(test, &[], env)
    }

    fn launch_wrapped(test: &str, wrapper: &[&str], env: &[(&str, &str)]) -> Self {
        ensure_image();
        let scope = scope(test);
        remove_scope_containers(&scope);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = Metald {
            child: None,
            port: free_port(),
            data_dir: dir.path().join("data"),
            log: dir.path().join("metald.log"),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
            _guard: Arc::new(ScopeGuard(scope.clone())),
            scope,
            _dir: dir,
        };
        m.spawn();
        m
    }

    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_metald"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_metald")),
        };
        cmd.env("UNKEY_METALD_ADDRESS", "127.0.0.1")
            .env("UNKEY_METALD_PORT", self.port.to_string())
            .env("UNKEY_METALD_DOCKER_SCOPE", &self.scope)
            .env("UNKEY_METALD_DATA_DIR", &self.data_dir)
            .env("UNKEY_METALD_DOCKER_PORT_HOST_IP", "127.0.0.1")
            .env("UNKEY_METALD_BILLING_ENABLED", "false")
            .env("UNKEY_METALD_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn metald"));
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// metald's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{}/health", self.base())).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "metald not healthy in 30 s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`: no chance to clean anything up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "metald did not exit within 15 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_healthy().await;
    }

    pub fn client(&self, customer: &str) -> Client {
        Client::new(&self.base(), customer, "test-tenant")
    }
}

impl Drop for Metald {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A Connect error as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// A Connect client speaking binary proto, like the deploy workflow.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    pub customer: String,
    pub tenant: String,
}

impl Client {
    pub fn new(base: &str, customer: &str, tenant: &str) -> Self {
        Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("client"),
            base: base.to_owned(),
            customer: customer.to_owned(),
            tenant: tenant.to_owned(),
        }
    }

    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, RpcError> {
        let resp = self
            .http
            .post(format!(
                "{}/metal.vmprovisioner.v1.VmService/{method}",
                self.base
            ))
            .header("content-type", "application/proto")
            .header(
                "authorization",
                format!("Bearer dev_user_{}", self.customer),
            )
            .header("x-tenant-id", &self.tenant)
            .body(req.encode_to_vec())
            .send()
            .await
            .expect("send");
        let status = resp.status().as_u16();
        let body = resp.bytes().await.expect("body");
        if status == 200 {
            return Ok(Resp::decode(body).expect("decode response"));
        }
        let v: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("error body is not JSON: {body:?}"));
        Err(RpcError {
            status,
            code: v["code"].as_str().unwrap_or_default().to_owned(),
            message: v["message"].as_str().unwrap_or_default().to_owned(),
        })
    }

    pub async fn create(&self, config: pb::VmConfig) -> Result<String, RpcError> {
        let r: pb::CreateVmResponse = self
            .call(
                "CreateVm",
                &pb::CreateVmRequest {
                    config: Some(config),
                    ..Default::default()
                },
            )
            .await?;
        Ok(r.vm_id)
    }

    pub async fn boot(&self, id: &str) -> Result<pb::BootVmResponse, RpcError> {
        self.call("BootVm", &pb::BootVmRequest { vm_id: id.into() })
            .await
    }

    pub async fn shutdown(
        &self,
        id: &str,
        force: bool,
    ) -> Result<pb::ShutdownVmResponse, RpcError> {
        self.call(
            "ShutdownVm",
            &pb::ShutdownVmRequest {
                vm_id: id.into(),
                force,
                timeout_seconds: 0,
            },
        )
        .await
    }

    pub async fn pause(&self, id: &str) -> Result<pb::PauseVmResponse, RpcError> {
        self.call("PauseVm", &pb::PauseVmRequest { vm_id: id.into() })
            .await
    }

    pub async fn resume(&self, id: &str) -> Result<pb::ResumeVmResponse, RpcError> {
        self.call("ResumeVm", &pb::ResumeVmRequest { vm_id: id.into() })
            .await
    }

    pub async fn reboot(&self, id: &str, force: bool) -> Result<pb::RebootVmResponse, RpcError> {
        self.call(
            "RebootVm",
            &pb::RebootVmRequest {
                vm_id: id.into(),
                force,
            },
        )
        .await
    }

    pub async fn delete(&self, id: &str, force: bool) -> Result<pb::DeleteVmResponse, RpcError> {
        self.call(
            "DeleteVm",
            &pb::DeleteVmRequest {
                vm_id: id.into(),
                force,
            },
        )
        .await
    }

    pub async fn info(&self, id: &str) -> Result<pb::GetVmInfoResponse, RpcError> {
        self.call("GetVmInfo", &pb::GetVmInfoRequest { vm_id: id.into() })
            .await
    }

    pub async fn list(&self) -> Result<pb::ListVmsResponse, RpcError> {
        self.call(
            "ListVms",
            &pb::ListVmsRequest {
                page_size: 1000,
                ..Default::default()
            },
        )
        .await
    }

    pub async fn state(&self, id: &str) -> Result<pb::VmState, RpcError> {
        Ok(self.info(id).await?.state())
    }
}

/// The deploy workflow's CreateVm config (spec §4.1), with the test image.
pub fn ctrl_config() -> pb::VmConfig {
    pb::VmConfig {
        cpu: Some(pb::CpuConfig {
            vcpu_count: 1,
            ..Default::default()
        }),
        memory: Some(pb::MemoryConfig {
            size_bytes: 536_870_912,
            ..Default::default()
        }),
        boot: Some(pb::BootConfig {
            kernel_path: "/boot/vmlinux".into(),
            initrd_path: "/boot/initrd".into(),
            kernel_args: "console=ttyS0 quiet".into(),
            ..Default::default()
        }),
        storage: vec![pb::StorageDevice {
            id: "root".into(),
            path: "/dev/vda".into(),
            ..Default::default()
        }],
        metadata: [
            ("docker_image", IMAGE),
            ("exposed_ports", "8080/tcp"),
            ("env_vars", "PORT=8080"),
            ("version_id", "v_123"),
            ("workspace_id", "ws_123"),
            ("project_id", "proj_123"),
            ("created_by", "deploy-workflow"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        ..Default::default()
    }
}

/// A small VM: 16 MiB, no ports.
pub fn small_config() -> pb::VmConfig {
    let mut c = ctrl_config();
    c.memory = Some(pb::MemoryConfig {
        size_bytes: 16 * 1024 * 1024,
        ..Default::default()
    });
    c.metadata.remove("exposed_ports");
    c
}

/// Polls `f` until it returns true, up to `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET over loopback, body as text.
pub async fn http_get(url: &str) -> Option<String> {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    r.text().await.ok()
}

/// A stand-in Docker socket: forwards to the real one until stopped, so a test can take the
/// engine away from metald and give it back.
pub struct DockerProxy {
    pub path: PathBuf,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl DockerProxy {
    pub fn new(dir: &Path) -> Self {
        DockerProxy {
            path: dir.join("docker.sock"),
            server: Mutex::new(None),
            conns: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn start(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).expect("bind proxy socket");
        let conns = self.conns.clone();
        let handle = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(task.abort_handle());
            }
        });
        *self.server.lock().unwrap() = Some(handle);
    }

    /// The engine "goes down": no new connections, existing ones cut.
    pub fn stop(&self) {
        if let Some(h) = self.server.lock().unwrap().take() {
            h.abort();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.stop();
    }
}
