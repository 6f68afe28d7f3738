//! DockerBackend: the bollard calls that make, drive and observe VM containers (spec §5).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, HostConfig, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, InspectContainerOptions,
    KillContainerOptions, ListContainersOptions, RemoveContainerOptions, RestartContainerOptions,
    StartContainerOptions, StatsOptions, StopContainerOptions,
};
use bollard::Docker;
use futures::{Stream, StreamExt, TryStreamExt};

use super::labels::{self, VmLabels};
use super::{
    ContainerEvent, ContainerSpec, ContainerStats, ContainerView, EngineInfo, Error, ErrorKind,
};
use crate::vm::{NetworkView, PortMapping};

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

/// Binding "address already in use" happens when a non-Docker process holds a port of the
/// range; Docker picks the next port on a retry, so a few tries almost always succeed.
const START_TRIES: usize = 3;

/// Containers as listed and inspected.
#[derive(Debug, Default)]
pub struct Listing {
    pub views: Vec<ContainerView>,
    /// The labels (from the listing) of containers that could not be inspected, though the
    /// engine answered: logged and passed over.
    pub unreadable: Vec<HashMap<String, String>>,
}

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

    fn docker(&self) -> Result<Docker, Error> {
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
        let s = &self.settings;
        let range = format!("{}-{}", s.port_range.0, s.port_range.1);
        let mut exposed = Vec::new();
        let mut bindings = HashMap::new();
        for p in &spec.ports {
            let key = format!("{}/{}", p.port, p.protocol.as_str());
            exposed.push(key.clone());
            // Docker picks a free host port from the range itself: no two VMs can get the
            // same port, and nothing needs tracking here.
            bindings.insert(
                key,
                Some(vec![PortBinding {
                    host_ip: Some(s.port_host_ip.clone()),
                    host_port: Some(range.clone()),
                }]),
            );
        }
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.to_map()),
            exposed_ports: Some(exposed),
            host_config: Some(HostConfig {
                nano_cpus: Some(spec.nano_cpus),
                memory: Some(spec.memory_bytes),
                // Equal to memory: no swap beyond the limit.
                memory_swap: Some(spec.memory_bytes),
                port_bindings: Some(bindings),
                extra_hosts: Some(vec!["host.docker.internal:host-gateway".to_owned()]),
                network_mode: Some(s.network.clone()),
                // A real init as PID 1: signals reach the workload (graceful stops) and
                // zombies are reaped, whatever the image's entrypoint does.
                init: Some(true),
                // A VM that exits stays SHUTDOWN until asked to boot: metald, not Docker,
                // decides when VMs run.
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                auto_remove: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
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
        let r = self
            .docker()?
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
            .map_err(|e| Error::new("inspect container", container, &e))?;
        Ok(view_of(r, &self.settings.network))
    }

    #[tracing::instrument(name = "docker.start", level = "info", skip_all, fields(otel.kind = "client", container = %container))]
    pub async fn start(&self, container: &str) -> Result<(), Error> {
        let mut tries = 0;
        loop {
            tries += 1;
            let result = self
                .docker()?
                .start_container(container, None::<StartContainerOptions>)
                .await
                .map_err(|e| Error::new("start container", container, &e));
            match result {
                Err(e) if tries < START_TRIES && is_address_in_use(&e) => {
                    tracing::warn!(container, error = %e, "host port taken outside Docker; retrying start");
                }
                other => return other,
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
        self.docker_for(grace.unwrap_or_default())?
            .restart_container(container, Some(options))
            .await
            .map_err(|e| Error::new("restart container", container, &e))
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

    /// Every container that claims to be a VM made by metald (any scope), inspected.
    pub async fn list_vm_containers(&self) -> Result<Listing, Error> {
        let filter = format!("{}={}", labels::CREATED_BY, labels::CREATED_BY_VALUE);
        self.list_inspected(HashMap::from([("label".to_owned(), vec![filter])]))
            .await
    }

    /// Every container whose name starts with `prefix`, inspected.
    pub async fn list_named(&self, prefix: &str) -> Result<Vec<ContainerView>, Error> {
        let views = self
            .list_inspected(HashMap::from([(
                "name".to_owned(),
                vec![prefix.to_owned()],
            )]))
            .await?
            .views;
        // Docker's name filter matches anywhere in the name: keep true prefixes only.
        Ok(views
            .into_iter()
            .filter(|v| v.name.starts_with(prefix))
            .collect())
    }

    async fn list_inspected(
        &self,
        filters: HashMap<String, Vec<String>>,
    ) -> Result<Listing, Error> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let summaries = self
            .docker()?
            .list_containers(Some(options))
            .await
            .map_err(|e| Error::new("list containers", "", &e))?;
        let listed: Vec<(String, HashMap<String, String>)> = summaries
            .into_iter()
            .filter_map(|s| Some((s.id?, s.labels.unwrap_or_default())))
            .collect();
        // Inspections are independent; a handful at a time keeps startup quick on big hosts
        // without flooding the engine.
        let views: Vec<_> = futures::stream::iter(listed)
            .map(|(id, labels)| async move { (self.inspect(&id).await, labels) })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut listing = Listing::default();
        for (view, labels) in views {
            match view {
                Ok(v) => listing.views.push(v),
                // Removed between list and inspect: simply not there any more.
                Err(e) if e.is_not_found() => {}
                // One container can hang an inspect until it times out: the engine is only
                // gone if it does not answer a ping either.
                Err(e) if e.is_unavailable() && self.ping().await.is_err() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "could not inspect a VM container; passing over it");
                    listing.unreadable.push(labels);
                }
            }
        }
        Ok(listing)
    }

    /// Whether the engine has a network of that name (or id).
    #[tracing::instrument(name = "docker.network", level = "info", skip_all, fields(otel.kind = "client", network = %network))]
    pub async fn network_exists(&self, network: &str) -> Result<bool, Error> {
        match self
            .docker()?
            .inspect_network(
                network,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => {
                let err = Error::new("inspect network", network, &e);
                if err.is_not_found() {
                    Ok(false)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// Container events of VM containers since `since` (Unix seconds), as they happen.
    pub fn events(
        &self,
        since: i64,
    ) -> impl Stream<Item = Result<ContainerEvent, Error>> + Send + 'static {
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            (
                "label".to_owned(),
                vec![format!(
                    "{}={}",
                    labels::CREATED_BY,
                    labels::CREATED_BY_VALUE
                )],
            ),
        ]);
        let options = EventsOptions {
            since: Some(since.to_string()),
            filters: Some(filters),
            ..Default::default()
        };
        let docker = match self.docker() {
            Ok(docker) => docker,
            Err(e) => return futures::stream::once(async { Err(e) }).left_stream(),
        };
        docker
            .events(Some(options))
            .map_err(|e| Error::new("follow events", "", &e))
            .try_filter_map(|m| async move {
                let actor = m.actor.unwrap_or_default();
                let attributes = actor.attributes.unwrap_or_default();
                let (Some(container_id), Some(vm_id)) =
                    (actor.id, attributes.get(labels::VM_ID).cloned())
                else {
                    return Ok(None);
                };
                // "exec_start: sh" and the like carry a suffix after the action word.
                let action = m.action.unwrap_or_default();
                let action = action
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                let scope = labels::scope_of(&attributes).to_owned();
                Ok(Some(ContainerEvent {
                    container_id,
                    vm_id,
                    scope,
                    action,
                }))
            })
            .right_stream()
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

fn is_address_in_use(e: &Error) -> bool {
    matches!(&e.kind, ErrorKind::PortsExhausted(m) if m.contains("address already in use"))
}

fn secs(d: Duration) -> i32 {
    d.as_secs().min(i32::MAX as u64) as i32
}

/// `repo:tag` → (`repo`, Some(`tag`)); a digest or no tag leaves the reference whole.
fn split_image(image: &str) -> (&str, Option<&str>) {
    if image.contains('@') {
        return (image, None);
    }
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
        _ => (image, Some("latest")),
    }
}

/// Docker's RFC 3339 times; the zero time (never started) reads as `None`.
fn parse_time(raw: Option<&str>) -> Option<SystemTime> {
    let raw = raw?;
    if raw.starts_with("0001-") {
        return None;
    }
    humantime::parse_rfc3339_weak(raw.trim_end_matches('Z')).ok()
}

fn view_of(r: ContainerInspectResponse, default_network: &str) -> ContainerView {
    let state = r.state.unwrap_or_default();
    let status = state.status.map(|s| s.to_string()).unwrap_or_default();
    let config = r.config.unwrap_or_default();
    let settings = r.network_settings.unwrap_or_default();
    let mut network = NetworkView {
        network: default_network.to_owned(),
        ..Default::default()
    };
    if let Some(networks) = settings.networks {
        let chosen = networks
            .get(default_network)
            .map(|e| (default_network.to_owned(), e.clone()))
            .or_else(|| networks.into_iter().next());
        if let Some((name, endpoint)) = chosen {
            network.network = name;
            network.ip_address = endpoint.ip_address.unwrap_or_default();
            network.mac_address = endpoint.mac_address.unwrap_or_default();
            network.gateway = endpoint.gateway.unwrap_or_default();
        }
    }
    for (key, bindings) in settings.ports.unwrap_or_default() {
        let Some((port, proto)) = key.split_once('/') else {
            continue;
        };
        let Ok(container_port) = port.parse::<u16>() else {
            continue;
        };
        // One binding per address family; the first parseable one is the host port.
        let host_port = bindings
            .unwrap_or_default()
            .into_iter()
            .find_map(|b| b.host_port.and_then(|p| p.parse::<u16>().ok()));
        if let Some(host_port) = host_port {
            network.ports.push(PortMapping {
                container_port,
                host_port,
                protocol: proto.to_owned(),
            });
        }
    }
    network.ports.sort();
    let exit_code = state.exit_code;
    ContainerView {
        id: r.id.unwrap_or_default(),
        name: r
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        labels: config.labels.unwrap_or_default(),
        image: config.image.unwrap_or_default(),
        status,
        started_at: parse_time(state.started_at.as_deref()),
        finished_at: parse_time(state.finished_at.as_deref()),
        exit_code,
        network,
    }
}

fn stats_of(r: bollard::models::ContainerStatsResponse) -> ContainerStats {
    let cpu_total_ns = r
        .cpu_stats
        .and_then(|c| c.cpu_usage)
        .and_then(|u| u.total_usage)
        .unwrap_or(0);
    let memory = r.memory_stats.unwrap_or_default();
    let entries =
        |list: Option<Vec<bollard::models::ContainerBlkioStatEntry>>| -> Vec<(String, u64)> {
            list.unwrap_or_default()
                .into_iter()
                .map(|e| (e.op.unwrap_or_default(), e.value.unwrap_or(0)))
                .collect()
        };
    let blkio = r.blkio_stats.unwrap_or_default();
    let networks = r
        .networks
        .unwrap_or_default()
        .into_values()
        .map(|n| {
            (
                n.rx_bytes.unwrap_or(0),
                n.tx_bytes.unwrap_or(0),
                n.rx_packets.unwrap_or(0),
                n.tx_packets.unwrap_or(0),
            )
        })
        .collect();
    ContainerStats {
        cpu_total_ns,
        running: memory.usage.is_some() || cpu_total_ns > 0,
        memory_usage: memory.usage.unwrap_or(0),
        memory_stat: memory.stats.unwrap_or_default(),
        blkio_bytes: entries(blkio.io_service_bytes_recursive),
        blkio_ops: entries(blkio.io_serviced_recursive),
        networks,
    }
}

/// Reads a container's VM labels, if it is a valid VM.
pub fn vm_labels(view: &ContainerView) -> Result<VmLabels, String> {
    VmLabels::from_map(&view.labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_image_references() {
        assert_eq!(split_image("busybox"), ("busybox", Some("latest")));
        assert_eq!(split_image("busybox:1.36"), ("busybox", Some("1.36")));
        assert_eq!(
            split_image("localhost:5000/app"),
            ("localhost:5000/app", Some("latest"))
        );
        assert_eq!(
            split_image("localhost:5000/app:v2"),
            ("localhost:5000/app", Some("v2"))
        );
        assert_eq!(split_image("app@sha256:abc"), ("app@sha256:abc", None));
    }

    #[test]
    fn parses_docker_times() {
        assert!(parse_time(Some("0001-01-01T00:00:00Z")).is_none());
        let t = parse_time(Some("2026-11-22T06:00:00.123456789Z")).unwrap();
        assert_eq!(crate::vm::unix_seconds(t), 1_795_327_200);
    }
}
