//! What a VM's container is made of (spec §5, §5.1), as one pure function of the VM's spec and
//! the configured placement and hardening, so it can be checked without an engine.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};

use super::docker::{DockerSettings, Hardening};
use super::ContainerSpec;

/// The create request for `spec`'s container.
pub(super) fn create_body(spec: &ContainerSpec, s: &DockerSettings) -> ContainerCreateBody {
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
    let mut host_config = HostConfig {
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
    };
    harden(&mut host_config, &s.hardening);
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        env: Some(spec.env.clone()),
        labels: Some(spec.labels.to_map()),
        exposed_ports: Some(exposed),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// VMs run customers' code: bound what one can take from the host (processes, log disk) and
/// what it may gain (setuid privileges, raw sockets for spoofing on the VM network).
fn harden(hc: &mut HostConfig, h: &Hardening) {
    // 0 means no limit; Docker would read 0 as "unlimited" too on some versions and as an
    // error on others, so it is simply not sent.
    if h.pids_limit > 0 {
        hc.pids_limit = Some(h.pids_limit);
    }
    if h.no_new_privileges {
        hc.security_opt = Some(vec!["no-new-privileges:true".to_owned()]);
    }
    if !h.cap_drop.is_empty() {
        hc.cap_drop = Some(h.cap_drop.clone());
    }
    // Set per container: the host's daemon.json may rotate nothing, and a VM printing in a
    // loop would then fill the disk.
    hc.log_config = Some(HostConfigLogConfig {
        typ: Some("json-file".to_owned()),
        config: Some(HashMap::from([
            ("max-size".to_owned(), h.log_max_size.clone()),
            ("max-file".to_owned(), h.log_max_file.to_string()),
        ])),
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::VmLabels;
    use crate::vm::{ExposedPort, Protocol};

    fn settings(hardening: Hardening) -> DockerSettings {
        DockerSettings {
            host: "unix:///nonexistent".into(),
            network: "unkey-vms".into(),
            port_host_ip: "127.0.0.1".into(),
            port_range: (30000, 40000),
            pull_timeout: Duration::from_secs(1),
            hardening,
        }
    }

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "unkey-vm-t-vm-1".into(),
            image: "busybox".into(),
            env: vec!["A=1".into()],
            labels: VmLabels {
                vm_id: "vm-1".into(),
                scope: "t".into(),
                customer_id: "c".into(),
                config: vec![],
                created_at_nanos: 1,
            },
            ports: vec![ExposedPort {
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            nano_cpus: 1_000_000_000,
            memory_bytes: 1 << 24,
        }
    }

    #[test]
    fn default_hardening_is_on_the_container() {
        let body = create_body(&spec(), &settings(Hardening::default()));
        let hc = body.host_config.unwrap();
        assert_eq!(hc.pids_limit, Some(1024));
        assert_eq!(
            hc.security_opt,
            Some(vec!["no-new-privileges:true".to_owned()])
        );
        assert_eq!(hc.cap_drop, Some(vec!["NET_RAW".to_owned()]));
        let log = hc.log_config.unwrap();
        assert_eq!(log.typ.as_deref(), Some("json-file"));
        let config = log.config.unwrap();
        assert_eq!(config["max-size"], "10m");
        assert_eq!(config["max-file"], "3");
        assert_eq!(hc.network_mode.as_deref(), Some("unkey-vms"));
        assert_eq!(
            hc.extra_hosts,
            Some(vec!["host.docker.internal:host-gateway".to_owned()])
        );
        let binding = &hc.port_bindings.unwrap()["8080/tcp"];
        assert_eq!(
            binding.as_ref().unwrap()[0].host_port.as_deref(),
            Some("30000-40000")
        );
    }

    #[test]
    fn relaxed_hardening_sends_nothing_for_what_is_off() {
        let body = create_body(
            &spec(),
            &settings(Hardening {
                pids_limit: 0,
                no_new_privileges: false,
                cap_drop: vec![],
                log_max_size: "1m".into(),
                log_max_file: 2,
            }),
        );
        let hc = body.host_config.unwrap();
        assert_eq!(hc.pids_limit, None);
        assert_eq!(hc.security_opt, None);
        assert_eq!(hc.cap_drop, None);
        assert_eq!(hc.log_config.unwrap().config.unwrap()["max-file"], "2");
    }
}
