//! The config-file format callers already have (spec §10): its types, reading one, and turning
//! it into the wire's `VmConfig`. Checking a file lives in `validate.rs`.

use std::collections::BTreeMap;
use std::io::Read as _;

use metald::proto::vmprovisioner as pb;
use serde::{Deserialize, Serialize};

use crate::error::CliError;
use crate::validate;
use crate::values::{network_mode, split_prefix};

/// Bytes in one MB of a config file or `--memory` (callers' files assume 1024 × 1024).
pub const MB: i64 = 1024 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigFile {
    pub name: String,
    pub description: String,
    pub template: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    pub storage: Vec<Storage>,
    pub network: Vec<Network>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<Console>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cpu {
    pub vcpu_count: i32,
    pub max_vcpu_count: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Memory {
    pub size_mb: i64,
    pub max_size_mb: i64,
    pub hotplug_enabled: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Boot {
    pub kernel_path: String,
    pub initrd_path: String,
    pub kernel_args: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Storage {
    pub id: String,
    pub path: String,
    pub read_only: bool,
    pub is_root_device: bool,
    pub interface_type: String,
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Network {
    pub id: String,
    pub interface_type: String,
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ipv4 {
    pub dhcp: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub static_ip: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ipv6 {
    pub slaac: bool,
    pub privacy_extensions: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub static_ip: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Console {
    pub enabled: bool,
    pub output: String,
    pub console_type: String,
}

/// Reads a config file (`-` = stdin) as JSON, without judging its contents.
pub fn read_json(path: &str) -> Result<serde_json::Value, CliError> {
    let text = if path == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::Invalid(format!("reading the config from stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| CliError::Invalid(format!("cannot read config file {path}: {e}")))?
    };
    serde_json::from_str(&text)
        .map_err(|e| CliError::Invalid(format!("{}: not valid JSON: {e}", display_name(path))))
}

pub fn display_name(path: &str) -> &str {
    if path == "-" {
        "<stdin>"
    } else {
        path
    }
}

/// Fails with every problem of a config document in one message.
pub fn check(value: &serde_json::Value, what: &str) -> Result<(), CliError> {
    let report = validate::validate(value);
    if report.problems.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
    Err(CliError::Invalid(format!(
        "{what}: {} problem{}: {}",
        list.len(),
        if list.len() == 1 { "" } else { "s" },
        list.join("; ")
    )))
}

impl ConfigFile {
    /// The image the server will use: `metadata.docker_image`, else the root device's option.
    pub fn image(&self) -> Option<&str> {
        self.metadata
            .get("docker_image")
            .map(String::as_str)
            .filter(|s| !s.trim().is_empty())
            .or_else(|| {
                self.root_device()
                    .and_then(|d| d.options.get("docker_image"))
                    .map(String::as_str)
                    .filter(|s| !s.trim().is_empty())
            })
    }

    /// The first flagged device, else the first one (the server's rule).
    pub fn root_device(&self) -> Option<&Storage> {
        self.storage
            .iter()
            .find(|d| d.is_root_device)
            .or_else(|| self.storage.first())
    }

    fn root_index(&self) -> Option<usize> {
        self.storage
            .iter()
            .position(|d| d.is_root_device)
            .or(if self.storage.is_empty() {
                None
            } else {
                Some(0)
            })
    }

    /// `--docker-image`: replaces the image wherever the config names it, so the two places
    /// never disagree; a config naming none gets `metadata.docker_image`.
    pub fn set_image(&mut self, image: &str) {
        let mut placed = false;
        if let Some(v) = self.metadata.get_mut("docker_image") {
            *v = image.to_owned();
            placed = true;
        }
        if let Some(i) = self.root_index() {
            if let Some(v) = self.storage[i].options.get_mut("docker_image") {
                *v = image.to_owned();
                placed = true;
            }
        }
        if !placed {
            self.metadata
                .insert("docker_image".into(), image.to_owned());
        }
    }

    /// The wire config. `name` and `template` are copied into metadata (unless it has them)
    /// so that `list` and `info` can show which VM is which.
    pub fn to_vm_config(&self) -> pb::VmConfig {
        let mut metadata = self.metadata.clone();
        for (key, value) in [("name", &self.name), ("template", &self.template)] {
            if !value.is_empty() {
                metadata
                    .entry(key.to_owned())
                    .or_insert_with(|| value.clone());
            }
        }
        pb::VmConfig {
            cpu: self.cpu.as_ref().map(|c| pb::CpuConfig {
                vcpu_count: c.vcpu_count,
                max_vcpu_count: c.max_vcpu_count,
                ..Default::default()
            }),
            memory: self.memory.as_ref().map(|m| pb::MemoryConfig {
                size_bytes: m.size_mb.saturating_mul(MB),
                max_size_bytes: m.max_size_mb.saturating_mul(MB),
                hotplug_enabled: m.hotplug_enabled,
                ..Default::default()
            }),
            boot: self.boot.as_ref().map(|b| pb::BootConfig {
                kernel_path: b.kernel_path.clone(),
                initrd_path: b.initrd_path.clone(),
                kernel_args: b.kernel_args.clone(),
                ..Default::default()
            }),
            storage: self
                .storage
                .iter()
                .map(|s| pb::StorageDevice {
                    id: s.id.clone(),
                    path: s.path.clone(),
                    read_only: s.read_only,
                    is_root_device: s.is_root_device,
                    interface_type: s.interface_type.clone(),
                    options: s.options.clone(),
                })
                .collect(),
            network: self.network.iter().map(network).collect(),
            console: self.console.as_ref().map(|c| pb::ConsoleConfig {
                enabled: c.enabled,
                output: c.output.clone(),
                console_type: c.console_type.clone(),
                ..Default::default()
            }),
            metadata,
        }
    }
}

fn network(n: &Network) -> pb::NetworkInterface {
    let mode = network_mode(&n.mode).unwrap_or(pb::NetworkMode::Unspecified);
    pb::NetworkInterface {
        id: n.id.clone(),
        interface_type: n.interface_type.clone(),
        mode: mode as i32,
        ipv4_config: n.ipv4.as_ref().map(|v4| {
            let (address, prefix) = split_prefix(&v4.static_ip);
            pb::IPv4Config {
                address: address.to_owned(),
                netmask: prefix.map(netmask_v4).unwrap_or_default(),
                gateway: v4.gateway.clone(),
                dns_servers: v4.dns_servers.clone(),
                dhcp: v4.dhcp,
            }
        }),
        ipv6_config: n.ipv6.as_ref().map(|v6| {
            let (address, prefix) = split_prefix(&v6.static_ip);
            pb::IPv6Config {
                address: address.to_owned(),
                prefix_length: prefix.map(i32::from).unwrap_or_default(),
                gateway: v6.gateway.clone(),
                dns_servers: v6.dns_servers.clone(),
                slaac: v6.slaac,
                privacy_extensions: v6.privacy_extensions,
                ..Default::default()
            }
        }),
        ..Default::default()
    }
}

fn netmask_v4(prefix: u8) -> String {
    let bits: u32 = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    std::net::Ipv4Addr::from(bits).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_mebibytes_and_network_maps() {
        let cfg: ConfigFile = serde_json::from_value(serde_json::json!({
            "name": "a",
            "memory": {"size_mb": 256},
            "network": [{"id": "eth0", "mode": "ipv4_only",
                         "ipv4": {"static_ip": "10.0.0.2/24", "gateway": "10.0.0.1"},
                         "ipv6": {"static_ip": "fd00::2/64"}}]
        }))
        .expect("parse");
        let vm = cfg.to_vm_config();
        assert_eq!(vm.memory.map(|m| m.size_bytes), Some(268_435_456));
        let n = &vm.network[0];
        assert_eq!(n.mode, pb::NetworkMode::Ipv4Only as i32);
        let v4 = n.ipv4_config.clone().expect("v4");
        assert_eq!(
            (v4.address.as_str(), v4.netmask.as_str()),
            ("10.0.0.2", "255.255.255.0")
        );
        assert_eq!(n.ipv6_config.as_ref().map(|c| c.prefix_length), Some(64));
        assert_eq!(vm.metadata.get("name").map(String::as_str), Some("a"));
    }

    #[test]
    fn set_image_replaces_where_named() {
        let mut cfg = ConfigFile {
            storage: vec![Storage {
                path: "/dev/vda".into(),
                options: [("docker_image".to_owned(), "old".to_owned())].into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        cfg.set_image("new");
        assert_eq!(cfg.image(), Some("new"));
        assert!(!cfg.metadata.contains_key("docker_image"));
        cfg.storage[0].options.clear();
        cfg.set_image("other");
        assert_eq!(
            cfg.metadata.get("docker_image").map(String::as_str),
            Some("other")
        );
    }
}
