//! Docker's answers → the backend's own types (pure: no engine calls), so bollard types stop
//! here.

use std::time::SystemTime;

use bollard::models::ContainerInspectResponse;

use super::{ContainerStats, ContainerView};
use crate::vm::{NetworkView, PortMapping};

/// `repo:tag` → (`repo`, Some(`tag`)); a digest or no tag leaves the reference whole.
pub(super) fn split_image(image: &str) -> (&str, Option<&str>) {
    if image.contains('@') {
        return (image, None);
    }
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
        _ => (image, Some("latest")),
    }
}

/// Docker's RFC 3339 times; the zero time (never started) reads as `None`.
pub(super) fn parse_time(raw: Option<&str>) -> Option<SystemTime> {
    let raw = raw?;
    if raw.starts_with("0001-") {
        return None;
    }
    humantime::parse_rfc3339_weak(raw.trim_end_matches('Z')).ok()
}

pub(super) fn view_of(r: ContainerInspectResponse, default_network: &str) -> ContainerView {
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

pub(super) fn stats_of(r: bollard::models::ContainerStatsResponse) -> ContainerStats {
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
