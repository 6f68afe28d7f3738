//! CreateVm validation (spec §4.1, in its order) and the other request checks: requests in,
//! validated domain values out. Everything below takes only what this produces.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;

use super::Error;
use crate::proto::vmprovisioner::{NetworkMode, StorageDevice, VmConfig};
use crate::vm::index::Cursor;
use crate::vm::{ExposedPort, Protocol, VmId};

/// Docker's minimum memory limit.
pub const MIN_MEMORY_BYTES: i64 = 6 * 1024 * 1024;
/// Grace period when a request gives none (spec §4.2).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 1000;

/// A VM as the backend should make it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub image: String,
    pub vcpus: i64,
    pub memory_bytes: i64,
    pub ports: Vec<ExposedPort>,
    /// `KEY=VALUE` items, in a stable order.
    pub env: Vec<String>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Validates a CreateVm config; `engine_cpus` is the engine's CPU count (0 = unknown).
pub fn vm_spec(config: Option<&VmConfig>, engine_cpus: i64) -> Result<VmSpec, Error> {
    let config = config.ok_or_else(|| invalid("config is required"))?;
    let cpu = config
        .cpu
        .as_ref()
        .ok_or_else(|| invalid("config.cpu is required"))?;
    let memory = config
        .memory
        .as_ref()
        .ok_or_else(|| invalid("config.memory is required"))?;
    let boot = config
        .boot
        .as_ref()
        .ok_or_else(|| invalid("config.boot is required"))?;
    if cpu.vcpu_count <= 0 {
        return Err(invalid(format!(
            "config.cpu.vcpu_count must be greater than 0, got {}",
            cpu.vcpu_count
        )));
    }
    if cpu.max_vcpu_count != 0 && cpu.max_vcpu_count < cpu.vcpu_count {
        return Err(invalid(format!(
            "config.cpu.max_vcpu_count must be 0 or at least vcpu_count ({}), got {}",
            cpu.vcpu_count, cpu.max_vcpu_count
        )));
    }
    if memory.size_bytes <= 0 {
        return Err(invalid(format!(
            "config.memory.size_bytes must be greater than 0, got {}",
            memory.size_bytes
        )));
    }
    if boot.kernel_path.trim().is_empty() {
        return Err(invalid("config.boot.kernel_path must not be empty"));
    }
    if config.storage.is_empty() {
        return Err(invalid("config.storage must have at least one device"));
    }
    if let Some(i) = config.storage.iter().position(|d| d.path.trim().is_empty()) {
        return Err(invalid(format!(
            "config.storage[{i}].path must not be empty"
        )));
    }

    let image = image_of(config)?;
    if memory.size_bytes < MIN_MEMORY_BYTES {
        return Err(invalid(format!(
            "config.memory.size_bytes must be at least {MIN_MEMORY_BYTES} (6 MiB, Docker's minimum), got {}",
            memory.size_bytes
        )));
    }
    if engine_cpus > 0 && i64::from(cpu.vcpu_count) > engine_cpus {
        return Err(invalid(format!(
            "config.cpu.vcpu_count {} exceeds the {engine_cpus} CPUs of this host",
            cpu.vcpu_count
        )));
    }
    let ports = match config.metadata.get("exposed_ports") {
        Some(list) => exposed_ports(list)?,
        None => Vec::new(),
    };
    let env = env(&config.metadata)?;
    // The config is stored and returned as given: a value with no name in the enum could
    // not be written as canonical JSON later, so it is refused now.
    for (i, nic) in config.network.iter().enumerate() {
        if NetworkMode::try_from(nic.mode).is_err() {
            return Err(invalid(format!(
                "config.network[{i}].mode: {} is not a NetworkMode",
                nic.mode
            )));
        }
    }
    Ok(VmSpec {
        image,
        vcpus: i64::from(cpu.vcpu_count),
        memory_bytes: memory.size_bytes,
        ports,
        env,
    })
}

/// The root device: the first flagged one, else the first (the deploy workflow flags none).
pub fn root_device(config: &VmConfig) -> Option<&StorageDevice> {
    config
        .storage
        .iter()
        .find(|d| d.is_root_device)
        .or_else(|| config.storage.first())
}

fn image_of(config: &VmConfig) -> Result<String, Error> {
    let (field, image) = match config.metadata.get("docker_image").filter(|s| !s.trim().is_empty()) {
        Some(image) => ("config.metadata.docker_image", image.as_str()),
        None => match root_device(config).and_then(|d| d.options.get("docker_image")) {
            Some(image) if !image.trim().is_empty() => {
                ("config.storage[root].options.docker_image", image.as_str())
            }
            _ => {
                return Err(invalid(
                    "an image is required: set config.metadata.docker_image or the root storage device's options.docker_image",
                ))
            }
        },
    };
    let image = image.trim();
    if image.len() > 512 || !is_image_reference(image) {
        return Err(invalid(format!(
            "{field} is not a valid image reference (registry/name[:tag][@digest], name in lower case): {image:?}"
        )));
    }
    Ok(image.to_owned())
}

/// Docker's reference grammar: `[domain[:port]/]path[:tag][@algorithm:hex]`. Checked here so
/// a malformed name is the caller's `invalid_argument` (it would otherwise reach the engine's
/// URL unescaped and come back as some other error).
fn is_image_reference(reference: &str) -> bool {
    let (rest, digest) = match reference.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (reference, None),
    };
    if digest.is_some_and(|d| !is_digest(d)) {
        return false;
    }
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if tag.is_some_and(|t| !is_tag(t)) {
        return false;
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // As Docker splits it: a first part with a dot, a colon or upper case, or `localhost`,
    // is a registry.
    let first = parts[0];
    if parts.len() > 1
        && (first.contains(['.', ':'])
            || first == "localhost"
            || first.chars().any(|c| c.is_ascii_uppercase()))
    {
        if !is_registry(first) {
            return false;
        }
        parts.remove(0);
    }
    parts.iter().all(|p| is_path_component(p))
}

fn is_path_component(part: &str) -> bool {
    let lower_alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = part.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !lower_alnum(first) || !lower_alnum(last) {
        return false;
    }
    // Runs of [a-z0-9] joined by ".", "_", "__" or any number of "-".
    part.split(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        .filter(|sep| !sep.is_empty())
        .all(|sep| matches!(sep, "." | "_" | "__") || sep.bytes().all(|c| c == b'-'))
}

fn is_registry(registry: &str) -> bool {
    // An IPv6 host is bracketed and full of colons: the port, if any, follows the bracket.
    let port_at = match registry.rfind(']') {
        Some(end) => registry[end..].find(':').map(|i| end + i),
        None => registry.rfind(':'),
    };
    let (host, port) = match port_at {
        Some(i) => (&registry[..i], Some(&registry[i + 1..])),
        None => (registry, None),
    };
    if port.is_some_and(|p| p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit())) {
        return false;
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return !inner.is_empty() && inner.bytes().all(|c| c.is_ascii_hexdigit() || c == b':');
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            matches!((b.first(), b.last()), (Some(f), Some(l)) if f.is_ascii_alphanumeric() && l.is_ascii_alphanumeric())
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        })
}

fn is_tag(tag: &str) -> bool {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes.iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

fn is_digest(digest: &str) -> bool {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return false;
    };
    let algorithm_ok = algorithm.split(['+', '.', '-', '_']).all(|part| {
        let mut chars = part.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric())
    });
    algorithm_ok && hex.len() >= 32 && hex.bytes().all(|c| c.is_ascii_hexdigit())
}

/// Parses `exposed_ports`: a comma list of `N`, `N/tcp`, `N/udp`, each port 1–65535.
pub fn exposed_ports(list: &str) -> Result<Vec<ExposedPort>, Error> {
    let mut ports = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || {
            invalid(format!(
                "config.metadata.exposed_ports: {item:?} is not a port (N, N/tcp or N/udp with N in 1-65535)"
            ))
        };
        let (number, protocol) = match item.split_once('/') {
            None => (item, Protocol::Tcp),
            Some((n, p)) if p.eq_ignore_ascii_case("tcp") => (n, Protocol::Tcp),
            Some((n, p)) if p.eq_ignore_ascii_case("udp") => (n, Protocol::Udp),
            Some(_) => return Err(bad()),
        };
        // Digits only: Rust's parse would also take "+8080"; no leading zero either.
        if number.is_empty()
            || number.starts_with('0')
            || !number.bytes().all(|c| c.is_ascii_digit())
        {
            return Err(bad());
        }
        let port: u16 = number.parse().map_err(|_| bad())?;
        let p = ExposedPort { port, protocol };
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    Ok(ports)
}

/// The environment: `env_vars` (comma list of `K=V`) then every `env.K` key (its value may
/// hold commas). A later definition of the same key wins.
pub fn env(metadata: &BTreeMap<String, String>) -> Result<Vec<String>, Error> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    if let Some(list) = metadata.get("env_vars") {
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((key, value)) = item.split_once('=') else {
                return Err(invalid(format!(
                    "config.metadata.env_vars: {item:?} is not KEY=VALUE"
                )));
            };
            check_env_key(key, "config.metadata.env_vars")?;
            vars.insert(key.to_owned(), value.to_owned());
        }
    }
    for (k, value) in metadata {
        if let Some(key) = k.strip_prefix("env.") {
            check_env_key(key, &format!("config.metadata[{k:?}]"))?;
            vars.insert(key.to_owned(), value.clone());
        }
    }
    Ok(vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

fn check_env_key(key: &str, field: &str) -> Result<(), Error> {
    let mut chars = key.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "{field}: {key:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"
        )))
    }
}

/// A vm_id in a request naming an existing VM.
pub fn existing_vm_id(raw: &str) -> Result<VmId, Error> {
    if raw.is_empty() {
        return Err(invalid("vm_id is required"));
    }
    // An id that could never have been created names no VM.
    VmId::parse(raw).map_err(|_| Error::vm_not_found(raw))
}

/// The grace period of ShutdownVm: `force` = none, 0 = the default, negative = invalid.
pub fn shutdown_grace(force: bool, timeout_seconds: i32) -> Result<Option<Duration>, Error> {
    if timeout_seconds < 0 {
        return Err(invalid(format!(
            "timeout_seconds must not be negative, got {timeout_seconds}"
        )));
    }
    if force {
        return Ok(None);
    }
    Ok(Some(match timeout_seconds {
        0 => DEFAULT_GRACE,
        n => Duration::from_secs(n as u64),
    }))
}

/// ListVms page size: 0 = default, larger than the maximum = clamped.
pub fn page_size(raw: i32) -> Result<usize, Error> {
    match raw {
        n if n < 0 => Err(invalid(format!("page_size must not be negative, got {n}"))),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as usize).min(MAX_PAGE_SIZE)),
    }
}

const TOKEN_VERSION: &str = "v1";

/// The opaque page token for a cursor.
pub fn encode_page_token(c: &Cursor) -> String {
    B64URL.encode(format!("{TOKEN_VERSION}:{}:{}", c.created_nanos, c.vm_id))
}

/// Reads a page token; empty = first page.
pub fn page_token(raw: &str) -> Result<Option<Cursor>, Error> {
    if raw.is_empty() {
        return Ok(None);
    }
    let bad = || invalid("page_token is not a token from a previous ListVms response");
    let bytes = B64URL.decode(raw).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let mut parts = text.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(TOKEN_VERSION), Some(nanos), Some(vm_id)) if VmId::parse(vm_id).is_ok() => {
            Ok(Some(Cursor {
                created_nanos: nanos.parse().map_err(|_| bad())?,
                vm_id: vm_id.to_owned(),
            }))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::vmprovisioner::{BootConfig, CpuConfig, MemoryConfig};

    /// The deploy workflow's payload (spec §4.1).
    fn ctrl_config() -> VmConfig {
        VmConfig {
            cpu: Some(CpuConfig {
                vcpu_count: 1,
                ..Default::default()
            }),
            memory: Some(MemoryConfig {
                size_bytes: 536_870_912,
                ..Default::default()
            }),
            boot: Some(BootConfig {
                kernel_path: "/boot/vmlinux".into(),
                initrd_path: "/boot/initrd".into(),
                kernel_args: "console=ttyS0 quiet".into(),
                ..Default::default()
            }),
            storage: vec![StorageDevice {
                id: "root".into(),
                path: "/dev/vda".into(),
                ..Default::default()
            }],
            metadata: [
                ("docker_image", "app:v1"),
                ("exposed_ports", "8080/tcp"),
                ("env_vars", "PORT=8080"),
                ("created_by", "deploy-workflow"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            ..Default::default()
        }
    }

    fn err_of(config: &VmConfig) -> String {
        match vm_spec(Some(config), 2) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected invalid_argument, got {other:?}"),
        }
    }

    #[test]
    fn accepts_the_deploy_workflow_payload() {
        let spec = vm_spec(Some(&ctrl_config()), 2).unwrap();
        assert_eq!(spec.image, "app:v1");
        assert_eq!(spec.vcpus, 1);
        assert_eq!(spec.memory_bytes, 536_870_912);
        assert_eq!(
            spec.ports,
            vec![ExposedPort {
                port: 8080,
                protocol: Protocol::Tcp
            }]
        );
        assert_eq!(spec.env, vec!["PORT=8080"]);
    }

    #[test]
    fn image_references_follow_dockers_grammar() {
        let digest = format!("app@sha256:{}", "ab".repeat(32));
        for good in [
            "busybox",
            "metald-test-busybox:latest",
            "ghcr.io/unkeyed/app:v1.2.3",
            "localhost:5000/app",
            "127.0.0.1:1/nope:latest",
            "Registry.Example:443/team/app_one__two--three:TAG_1.x",
            "[::1]:5000/app",
            "[2001:db8:1::1:2]/app",
            digest.as_str(),
        ] {
            assert!(is_image_reference(good), "{good}");
        }
        for bad in [
            "UPPER:x",
            "a?b",
            "a#b",
            "app:",
            ":tag",
            "a//b",
            "-a",
            "a-",
            "a:b:c",
            "app@sha256:12",
            "app@:abc",
            "a..b",
            "a___b",
            "host:port/app",
            "app:-tag",
        ] {
            assert!(!is_image_reference(bad), "{bad}");
        }
    }

    #[test]
    fn unknown_network_mode_is_refused() {
        use crate::proto::vmprovisioner::NetworkInterface;
        let mut config = ctrl_config();
        config.network = vec![
            NetworkInterface {
                mode: NetworkMode::Ipv4Only as i32,
                ..Default::default()
            },
            NetworkInterface {
                mode: 7,
                ..Default::default()
            },
        ];
        assert_eq!(
            err_of(&config),
            "config.network[1].mode: 7 is not a NetworkMode"
        );
        config.network.truncate(1);
        assert!(vm_spec(Some(&config), 2).is_ok());
    }

    #[test]
    fn rules_in_order_each_name_the_field() {
        assert_eq!(vm_spec(None, 2), Err(invalid("config is required")));
        let mut c = ctrl_config();
        c.cpu = None;
        c.memory = None;
        assert!(
            err_of(&c).contains("config.cpu is required"),
            "cpu is checked before memory"
        );
        let mut c = ctrl_config();
        c.memory = None;
        assert!(err_of(&c).contains("config.memory"));
        let mut c = ctrl_config();
        c.boot = None;
        assert!(err_of(&c).contains("config.boot"));
        let mut c = ctrl_config();
        c.cpu.as_mut().unwrap().vcpu_count = 0;
        assert!(err_of(&c).contains("vcpu_count"));
        let mut c = ctrl_config();
        c.cpu.as_mut().unwrap().vcpu_count = 2;
        c.cpu.as_mut().unwrap().max_vcpu_count = 1;
        assert!(err_of(&c).contains("max_vcpu_count"));
        let mut c = ctrl_config();
        c.memory.as_mut().unwrap().size_bytes = 0;
        assert!(err_of(&c).contains("size_bytes"));
        let mut c = ctrl_config();
        c.boot.as_mut().unwrap().kernel_path.clear();
        assert!(err_of(&c).contains("kernel_path"));
        let mut c = ctrl_config();
        c.storage.clear();
        assert!(err_of(&c).contains("config.storage"));
        let mut c = ctrl_config();
        c.storage.push(StorageDevice::default());
        assert!(err_of(&c).contains("config.storage[1].path"));
    }

    #[test]
    fn our_rules() {
        let mut c = ctrl_config();
        c.metadata.remove("docker_image");
        assert!(err_of(&c).contains("an image is required"));
        c.storage[0]
            .options
            .insert("docker_image".into(), "from-root:1".into());
        assert_eq!(vm_spec(Some(&c), 2).unwrap().image, "from-root:1");

        let mut c = ctrl_config();
        c.memory.as_mut().unwrap().size_bytes = MIN_MEMORY_BYTES - 1;
        assert!(err_of(&c).contains("6 MiB"));
        let mut c = ctrl_config();
        c.cpu.as_mut().unwrap().vcpu_count = 3;
        assert!(err_of(&c).contains("exceeds the 2 CPUs"));
        for bad in ["0", "65536", "80/sctp", "http", "8080/", "-1"] {
            let mut c = ctrl_config();
            c.metadata.insert("exposed_ports".into(), bad.into());
            assert!(err_of(&c).contains("exposed_ports"), "{bad}");
        }
        for bad in ["NOVALUE", "1A=b", "=x", "A-B=c"] {
            let mut c = ctrl_config();
            c.metadata.insert("env_vars".into(), bad.into());
            assert!(err_of(&c).contains("env_vars"), "{bad}");
        }
        let mut c = ctrl_config();
        c.metadata.insert("env.BAD-KEY".into(), "x".into());
        assert!(err_of(&c).contains("env.BAD-KEY"));
    }

    #[test]
    fn ports_and_env_forms() {
        let ports = exposed_ports("80, 53/udp,8080/TCP,80").unwrap();
        assert_eq!(ports.len(), 3);
        for bad in [
            "+8080",
            "080",
            "80 /tcp",
            "0",
            "65536",
            "8080/sctp",
            "/tcp",
            "8o",
        ] {
            assert!(exposed_ports(bad).is_err(), "{bad}");
        }
        assert_eq!(
            ports[1],
            ExposedPort {
                port: 53,
                protocol: Protocol::Udp
            }
        );
        let meta: BTreeMap<String, String> = [
            ("env_vars", "A=1,B=x=y"),
            ("env.C", "a,b,c"),
            ("env.A", "2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(env(&meta).unwrap(), vec!["A=2", "B=x=y", "C=a,b,c"]);
    }

    #[test]
    fn grace_and_paging_rules() {
        assert_eq!(shutdown_grace(false, 0), Ok(Some(DEFAULT_GRACE)));
        assert_eq!(shutdown_grace(false, 5), Ok(Some(Duration::from_secs(5))));
        assert_eq!(shutdown_grace(true, 5), Ok(None));
        assert!(shutdown_grace(false, -1).is_err());
        assert_eq!(page_size(0), Ok(50));
        assert_eq!(page_size(5000), Ok(1000));
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let c = Cursor {
            created_nanos: 123,
            vm_id: "vm-abc".into(),
        };
        assert_eq!(page_token(&encode_page_token(&c)), Ok(Some(c)));
        assert_eq!(page_token(""), Ok(None));
        for bad in [
            "x",
            "!!!",
            &B64URL.encode("v2:1:a"),
            &B64URL.encode("v1:zz:a"),
            &B64URL.encode("v1:1:BAD"),
        ] {
            assert!(page_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vm_id_rules() {
        assert_eq!(existing_vm_id(""), Err(invalid("vm_id is required")));
        assert!(matches!(existing_vm_id("NOPE"), Err(Error::NotFound(_))));
    }
}
