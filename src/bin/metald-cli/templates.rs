//! Where a VM's config comes from: the built-in templates, and the flags (`--cpu`, `--memory`,
//! `--docker-image`, `--env`, `--port`) laid over a template or a config file.

use std::collections::BTreeMap;

use crate::config_file::{Boot, ConfigFile, Console, Cpu, Ipv4, Ipv6, Memory, Network, Storage};
use crate::values::parse_port;

pub const TEMPLATE_NAMES: [&str; 5] = [
    "minimal",
    "standard",
    "high-cpu",
    "high-memory",
    "development",
];

/// The image of every template unless `--docker-image` says otherwise: small, common, and it
/// serves something on port 80 (`--port 80/tcp` publishes it).
pub const DEFAULT_IMAGE: &str = "nginx:alpine";

/// A built-in template as a config file; `None` for an unknown name.
pub fn template(name: &str) -> Option<ConfigFile> {
    // (vcpus, max vcpus, MB, max MB, hotplug, network, console)
    let (vcpu, max_vcpu, mb, max_mb, hotplug, net, console) = match name {
        "minimal" => (1, 1, 128, 0, false, false, false),
        "standard" => (1, 2, 512, 1024, false, true, true),
        "high-cpu" => (4, 8, 1024, 2048, false, true, true),
        "high-memory" => (2, 4, 4096, 8192, true, true, true),
        "development" => (2, 4, 1024, 2048, true, true, true),
        _ => return None,
    };
    let mut metadata = BTreeMap::new();
    if name == "development" {
        metadata.insert("environment".to_owned(), "development".to_owned());
    }
    Some(ConfigFile {
        name: format!("{name}-vm"),
        description: format!("metald-cli template {name}"),
        template: name.to_owned(),
        cpu: Some(Cpu {
            vcpu_count: vcpu,
            max_vcpu_count: max_vcpu,
        }),
        memory: Some(Memory {
            size_mb: mb,
            max_size_mb: max_mb,
            hotplug_enabled: hotplug,
        }),
        // The Docker backend keeps boot and storage only as the stored config, but the server
        // requires them (spec §4.1), so templates carry the conventional Firecracker paths.
        boot: Some(Boot {
            kernel_path: "/opt/vm-assets/vmlinux".into(),
            initrd_path: String::new(),
            kernel_args: "console=ttyS0 reboot=k panic=1 pci=off".into(),
        }),
        // The image sits where callers' example files put it: the root device's options.
        storage: vec![Storage {
            id: "rootfs".into(),
            path: "/opt/vm-assets/rootfs.ext4".into(),
            read_only: false,
            is_root_device: true,
            interface_type: "virtio-blk".into(),
            options: [("docker_image".to_owned(), DEFAULT_IMAGE.to_owned())].into(),
        }],
        network: if net {
            vec![Network {
                id: "eth0".into(),
                interface_type: "virtio-net".into(),
                mode: "dual_stack".into(),
                ipv4: Some(Ipv4 {
                    dhcp: true,
                    ..Default::default()
                }),
                ipv6: Some(Ipv6 {
                    slaac: true,
                    privacy_extensions: true,
                    ..Default::default()
                }),
            }]
        } else {
            Vec::new()
        },
        console: Some(Console {
            enabled: console,
            output: if console {
                format!("/tmp/{name}-vm-console.log")
            } else {
                String::new()
            },
            console_type: "serial".into(),
        }),
        metadata,
    })
}

/// The config flags of create, create-and-boot and config-gen.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub cpu: Option<i32>,
    pub memory_mb: Option<i64>,
    pub docker_image: Option<String>,
    pub env: Vec<(String, String)>,
    pub ports: Vec<String>,
}

impl Overrides {
    /// Lays the flags over a config. Maxima below a new value are raised to it, so that
    /// `--cpu 4` on a template with `max_vcpu_count: 2` still gives a valid config.
    pub fn apply(&self, cfg: &mut ConfigFile) {
        if let Some(n) = self.cpu {
            let cpu = cfg.cpu.get_or_insert_with(Cpu::default);
            cpu.vcpu_count = n;
            if cpu.max_vcpu_count != 0 && cpu.max_vcpu_count < n {
                cpu.max_vcpu_count = n;
            }
        }
        if let Some(mb) = self.memory_mb {
            let m = cfg.memory.get_or_insert_with(Memory::default);
            m.size_mb = mb;
            if m.max_size_mb != 0 && m.max_size_mb < mb {
                m.max_size_mb = mb;
            }
        }
        if let Some(image) = &self.docker_image {
            cfg.set_image(image);
        }
        // `env.K` rather than `env_vars`: values may then hold commas (spec §5).
        for (k, v) in &self.env {
            cfg.metadata.insert(format!("env.{k}"), v.clone());
        }
        if !self.ports.is_empty() {
            let mut list: Vec<String> = cfg
                .metadata
                .get("exposed_ports")
                .map(|s| {
                    s.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            for p in &self.ports {
                let same = |q: &String| match (parse_port(q), parse_port(p)) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => q == p,
                };
                if !list.iter().any(same) {
                    list.push(p.clone());
                }
            }
            cfg.metadata.insert("exposed_ports".into(), list.join(","));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::validate;

    #[test]
    fn every_template_validates() {
        for name in TEMPLATE_NAMES {
            let cfg = template(name).expect("template");
            let doc = serde_json::to_value(&cfg).expect("json");
            let report = validate(&doc);
            assert!(report.problems.is_empty(), "{name}: {:?}", report.problems);
            assert!(report.warnings.is_empty(), "{name}: {:?}", report.warnings);
            assert_eq!(cfg.image(), Some(DEFAULT_IMAGE));
        }
        assert!(template("huge").is_none());
    }

    #[test]
    fn overrides() {
        let mut cfg = template("standard").expect("template");
        Overrides {
            cpu: Some(3),
            memory_mb: Some(32),
            docker_image: Some("img:1".into()),
            env: vec![("A".into(), "x,y".into())],
            ports: vec!["8080/tcp".into(), "8080".into(), "53/udp".into()],
        }
        .apply(&mut cfg);
        assert_eq!(
            cfg.cpu.as_ref().map(|c| (c.vcpu_count, c.max_vcpu_count)),
            Some((3, 3))
        );
        assert_eq!(
            cfg.memory.as_ref().map(|m| (m.size_mb, m.max_size_mb)),
            Some((32, 1024))
        );
        assert_eq!(cfg.image(), Some("img:1"));
        assert_eq!(cfg.metadata.get("env.A").map(String::as_str), Some("x,y"));
        assert_eq!(
            cfg.metadata.get("exposed_ports").map(String::as_str),
            Some("8080/tcp,53/udp")
        );
    }
}
