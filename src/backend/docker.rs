//! DockerBackend: the bollard calls that make, drive and observe VM containers (spec §5).

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, KillContainerOptions,
    RemoveContainerOptions, RestartContainerOptions, StartContainerOptions, StatsOptions,
    StopContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;

use super::convert::{split_image, stats_of, view_of};
use super::labels::VmLabels;
use super::{ContainerSpec, ContainerStats, ContainerView, EngineInfo, Error, ErrorKind};

/// How containers are placed; from configuration.
#[derive(Debug, Clone)]
pub struct DockerSettings {
    /// `unix:///path` or `tcp://host:port` / `http://host:port`.
    pub host: String,
    pub network: String,
    pub port_host_ip: String,
    pub port_range: (u16, u16),
    pub pull_timeout: Duration,
    /// What every VM container is denied (spec §5, §5.1).
    pub hardening: Hardening,
}

/// Limits and privileges every VM container gets; VMs run customers' code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardening {
    /// Processes per container; 0 = no limit.
    pub pids_limit: i64,
    pub no_new_privileges: bool,
    /// Capabilities dropped from Docker's default set, without `CAP_`.
    pub cap_drop: Vec<String>,
    /// json-file log rotation, set on each container (hosts' daemon.json may set none).
    pub log_max_size: String,
    pub log_max_file: u32,
}

impl Default for Hardening {
    fn default() -> Self {
        Self {
            pids_limit: 1024,
            no_new_privileges: true,
            cap_drop: vec!["NET_RAW".to_owned()],
            log_max_size: "10m".to_owned(),
            log_max_file: 3,
        }
    }
}

/// Longest a single engine request may take. Stops carry their own grace period on top.
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// Picks of a host port per start before giving up. A bind fails with "address already in
/// use" when a process outside Docker holds the port Docker picked (see `host_ports`); Docker's
/// range allocator moves on to the next port on every call, so each try gets another one.
/// With one port in ten held, eight misses in a row happen once in 10⁸ starts.
const START_TRIES: u32 = 8;

/// The Docker Engine, through bollard.
#[derive(Clone)]
pub struct DockerBackend {
    /// Replaced after version negotiation (the engine may be older or newer than bollard).
    /// `None` until a socket exists: dockerd removes its socket while it is down, and
    /// metald must start anyway and connect once the engine is back.
    client: Arc<RwLock<Option<Docker>>>,
    engine: Arc<RwLock<EngineInfo>>,
    settings: Arc<DockerSettings>,
}

impl DockerBackend {
    /// Prepares a client; does not contact the engine (it may be down at start, its socket
    /// not even there). Fails only for a host setting no client can be made of.
    pub fn new(settings: DockerSettings) -> Result<Self, Error> {
        let client = match connect(&settings.host) {
            Ok(client) => Some(client),
            Err(e) if e.is_unavailable() => None,
            Err(e) => return Err(e),
        };
        Ok(Self {
            client: Arc::new(RwLock::new(client)),
            engine: Arc::new(RwLock::new(EngineInfo::default())),
            settings: Arc::new(settings),
        })
    }

    pub fn settings(&self) -> &DockerSettings {
        &self.settings
    }

    pub(super) fn docker(&self) -> Result<Docker, Error> {
        let client = match self.client.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        client.ok_or_else(|| Error {
            op: "connect",
            target: self.settings.host.clone(),
            kind: ErrorKind::Unavailable("the Docker socket is not there (yet)".into()),
        })
    }

    /// A client whose request timeout leaves room for a grace period: the engine answers a
    /// stop only once the container is down.
    fn docker_for(&self, grace: Duration) -> Result<Docker, Error> {
        Ok(self
            .docker()?
            .with_timeout(Duration::from_secs(REQUEST_TIMEOUT_SECS) + grace))
    }

    /// Talks to the engine: agrees on an API version and reads its version and CPU count.
    pub async fn negotiate(&self) -> Result<EngineInfo, Error> {
        let fresh = connect(&self.settings.host)?;
        let negotiated = fresh
            .negotiate_version()
            .await
            .map_err(|e| Error::new("negotiate version", &self.settings.host, &e))?;
        let version = negotiated
            .version()
            .await
            .map_err(|e| Error::new("version", &self.settings.host, &e))?;
        let info = negotiated
            .info()
            .await
            .map_err(|e| Error::new("info", &self.settings.host, &e))?;
        let engine = EngineInfo {
            version: version.version.unwrap_or_default(),
            api_version: version.api_version.unwrap_or_default(),
            ncpu: info.ncpu.unwrap_or(0),
        };
        if let Ok(mut g) = self.client.write() {
            *g = Some(negotiated);
        }
        if let Ok(mut g) = self.engine.write() {
            *g = engine.clone();
        }
        Ok(engine)
    }

    /// The engine as last negotiated (zeroes before the first success).
    pub fn engine(&self) -> EngineInfo {
        match self.engine.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub async fn ping(&self) -> Result<(), Error> {
        self.docker()?
            .ping()
            .await
            .map(|_| ())
            .map_err(|e| Error::new("ping", &self.settings.host, &e))
    }

    /// Makes sure the image is present, pulling it within the configured time.
    #[tracing::instrument(name = "docker.image", level = "info", skip_all, fields(otel.kind = "client", image = %image))]
    pub async fn ensure_image(&self, image: &str) -> Result<(), Error> {
        let docker = self.docker()?;
        match docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                let err = Error::new("inspect image", image, &e);
                if !err.is_not_found() {
                    return Err(err);
                }
            }
        }
        let (from_image, tag) = split_image(image);
        let options = CreateImageOptions {
            from_image: Some(from_image.to_owned()),
            tag: tag.map(str::to_owned),
            ..Default::default()
        };
        let pull = async {
            let mut progress = docker.create_image(Some(options), None, None);
            while let Some(item) = progress.next().await {
                let info = item.map_err(|e| {
                    let mut err = Error::new("pull image", image, &e);
                    if !err.is_unavailable() {
                        err.kind = ErrorKind::ImageUnavailable(err.kind.to_string());
                    }
                    err
                })?;
                // Errors can arrive inside a 200 progress stream: read them.
                if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                    return Err(Error {
                        op: "pull image",
                        target: image.to_owned(),
                        kind: ErrorKind::ImageUnavailable(detail),
                    });
                }
            }
            Ok(())
        };
        match tokio::time::timeout(self.settings.pull_timeout, pull).await {
            Ok(result) => result,
            Err(_) => Err(Error {
                op: "pull image",
                target: image.to_owned(),
                kind: ErrorKind::ImageUnavailable(format!(
                    "pull did not finish within {}",
                    humantime::format_duration(self.settings.pull_timeout)
                )),
            }),
        }
    }

    /// Creates (does not start) the container of a VM.
    #[tracing::instrument(name = "docker.create", level = "info", skip_all, fields(otel.kind = "client", container = %spec.name))]
    pub async fn create(&self, spec: &ContainerSpec) -> Result<String, Error> {
        let body = super::container::create_body(spec, &self.settings);
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        self.docker()?
            .create_container(Some(options), body)
            .await
            .map(|r| r.id)
            .map_err(|e| Error::new("create container", &spec.name, &e))
    }

    #[tracing::instrument(name = "docker.inspect", level = "info", skip_all, fields(otel.kind = "client", container = %container))]
    pub async fn inspect(&self, container: &str) -> Result<ContainerView, Error> {
        let docker = self.docker()?;
        super::INSPECTS.fetch_add(1, Ordering::Relaxed);
        let r = docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
            .map_err(|e| Error::new("inspect container", container, &e))?;
        Ok(view_of(r, &self.settings.network))
    }

    #[tracing::instrument(name = "docker.start", level = "info", skip_all, fields(otel.kind = "client", container = %container))]
    pub async fn start(&self, container: &str) -> Result<(), Error> {
        self.start_picking_ports(container, 0).await
    }

    /// Starts until a start does not fail for a host port held outside Docker, `START_TRIES`
    /// picks in all (`tried` of them already spent); the error then says how many.
    async fn start_picking_ports(&self, container: &str, mut tried: u32) -> Result<(), Error> {
        loop {
            tried += 1;
            let result = self
                .docker()?
                .start_container(container, None::<StartContainerOptions>)
                .await
                .map_err(|e| Error::new("start container", container, &e));
            match result {
                Err(e) if e.is_host_port_in_use() && tried < START_TRIES => {
                    tracing::info!(container, tried, error = %e, "host port held outside Docker; starting again on another port");
                }
                Err(mut e) => {
                    if let ErrorKind::HostPortInUse { tries, .. } = &mut e.kind {
                        *tries = tried;
                    }
                    return Err(e);
                }
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Stop signal, then kill after `grace`.
    #[tracing::instrument(name = "docker.stop", level = "info", skip_all, fields(otel.kind = "client", container = %container, grace_s = grace.as_secs()))]
    pub async fn stop(&self, container: &str, grace: Duration) -> Result<(), Error> {
        let options = StopContainerOptions {
            t: Some(secs(grace)),
            ..Default::default()
        };
        self.docker_for(grace)?
            .stop_container(container, Some(options))
            .await
            .map_err(|e| Error::new("stop container", container, &e))
    }

    #[tracing::instrument(name = "docker.kill", level = "info", skip_all, fields(otel.kind = "client", container = %container))]
    pub async fn kill(&self, container: &str) -> Result<(), Error> {
        let options = KillContainerOptions {
            signal: "SIGKILL".to_owned(),
        };
        self.docker()?
            .kill_container(container, Some(options))
            .await
            .map_err(|e| Error::new("kill container", container, &e))
    }

    #[tracing::instrument(name = "docker.pause", level = "info", skip_all, fields(otel.kind = "client", container = %container))]
    pub async fn pause(&self, container: &str) -> Result<(), Error> {
        self.docker()?
            .pause_container(container)
            .await
            .map_err(|e| Error::new("pause container", container, &e))
    }

    #[tracing::instrument(name = "docker.unpause", level = "info", skip_all, fields(otel.kind = "client", container = %container))]
    pub async fn unpause(&self, container: &str) -> Result<(), Error> {
        self.docker()?
            .unpause_container(container)
            .await
            .map_err(|e| Error::new("unpause container", container, &e))
    }

    /// Restart; `grace: None` kills at once.
    #[tracing::instrument(name = "docker.restart", level = "info", skip_all, fields(otel.kind = "client", container = %container))]
    pub async fn restart(&self, container: &str, grace: Option<Duration>) -> Result<(), Error> {
        let t = grace.map(secs).unwrap_or(0);
        let options = RestartContainerOptions {
            t: Some(t),
            ..Default::default()
        };
        let result = self
            .docker_for(grace.unwrap_or_default())?
            .restart_container(container, Some(options))
            .await
            .map_err(|e| Error::new("restart container", container, &e));
        match result {
            // The stop half went through and the start half could not bind: the container is
            // down now. Start it on other ports, so a reboot never leaves a VM stopped.
            Err(e) if e.is_host_port_in_use() => {
                tracing::info!(container, error = %e, "restart could not bind a host port held outside Docker; starting on another port");
                self.start_picking_ports(container, 1).await
            }
            other => other,
        }
    }

    #[tracing::instrument(name = "docker.remove", level = "info", skip_all, fields(otel.kind = "client", container = %container, force))]
    pub async fn remove(&self, container: &str, force: bool) -> Result<(), Error> {
        let options = RemoveContainerOptions {
            force,
            v: true,
            ..Default::default()
        };
        self.docker()?
            .remove_container(container, Some(options))
            .await
            .map_err(|e| Error::new("remove container", container, &e))
    }

    /// One reading of the container's counters, without Docker's one-second pre-read.
    #[tracing::instrument(name = "docker.stats", level = "info", skip_all, fields(otel.kind = "client", container = %container))]
    pub async fn stats(&self, container: &str) -> Result<ContainerStats, Error> {
        let options = StatsOptions {
            stream: false,
            one_shot: true,
        };
        let mut stream = self.docker()?.stats(container, Some(options));
        let reading = stream
            .next()
            .await
            .ok_or_else(|| Error {
                op: "read stats",
                target: container.to_owned(),
                // The engine closes the stream without a reading when the container went
                // away between listing and reading: it is gone, not failing.
                kind: ErrorKind::NotFound("the stats stream ended without a reading".into()),
            })?
            .map_err(|e| Error::new("read stats", container, &e))?;
        Ok(stats_of(reading))
    }
}

fn connect(host: &str) -> Result<Docker, Error> {
    let version = bollard::API_DEFAULT_VERSION;
    let result = if let Some(path) = host.strip_prefix("unix://") {
        Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, version)
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(host, REQUEST_TIMEOUT_SECS, version)
    } else {
        Docker::connect_with_unix(host, REQUEST_TIMEOUT_SECS, version)
    };
    result.map_err(|e| Error::new("connect", host, &e))
}

fn secs(d: Duration) -> i32 {
    d.as_secs().min(i32::MAX as u64) as i32
}

/// Reads a container's VM labels, if it is a valid VM.
pub fn vm_labels(view: &ContainerView) -> Result<VmLabels, String> {
    VmLabels::from_map(&view.labels)
}
