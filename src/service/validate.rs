//! CreateVm validation (spec §4.1, in its order), the caps of §5.1 and the other request
//! checks: requests in, validated domain values out. Everything below takes only what this
//! produces. Pure: no engine, no clock.

mod image;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;

use super::{Error, Limits};
use crate::proto::vmprovisioner::{NetworkMode, StorageDevice, VmConfig};
use crate::vm::index::Cursor;
use crate::vm::{ExposedPort, Protocol, VmId};
use image::is_image_reference;

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

/// Parses `exposed_ports`: a comma list of `N`, `N/tcp`, `N/udp`, each port 1–65535.
pub fn exposed_ports(list: &str) -> Result<Vec<ExposedPort>, Error> {
    let mut ports = Vec::new();
    // A set beside the list: a hostile list of thousands of items must not cost n² to dedupe
    // before the port cap can refuse it.
    let mut seen = HashSet::new();
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
        if seen.insert(p) {
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

/// How a figure and its limit read in a refusal: "at most 16 (UNKEY_METALD_VM_MAX_PORTS)".
fn over(what: String, max: impl std::fmt::Display, variable: &str) -> Error {
    invalid(format!("{what}; at most {max} ({variable})"))
}

/// The stored config cap (spec §5.1), on the canonical encoding that goes into the label.
/// Checked before the other config rules: it bounds the work every later rule does.
pub fn config_size(encoded_len: usize, limits: &Limits) -> Result<(), Error> {
    if encoded_len > limits.max_config_bytes {
        return Err(over(
            format!("config is {encoded_len} bytes encoded"),
            limits.max_config_bytes,
            "UNKEY_METALD_VM_MAX_CONFIG_BYTES",
        ));
    }
    Ok(())
}

/// The exposed-ports cap (spec §5.1), counted after parsing (duplicates count once).
pub fn port_count(spec: &VmSpec, limits: &Limits) -> Result<(), Error> {
    let n = spec.ports.len();
    if n > limits.max_ports {
        return Err(over(
            format!("config.metadata.exposed_ports has {n} ports"),
            limits.max_ports,
            "UNKEY_METALD_VM_MAX_PORTS",
        ));
    }
    Ok(())
}

/// The grace cap (spec §5.1) on a ShutdownVm/RebootVm grace; `field` names it in the refusal.
///
/// The default grace (30 s) is no choice of the caller's (ShutdownVm's 0, and RebootVm, which
/// has no timeout field at all), so when the cap is below it, it is lowered to the cap rather
/// than refused: otherwise no plain RebootVm could succeed. An explicit 30 is
/// indistinguishable from the default here and is lowered too.
pub fn bounded_grace(grace: Duration, field: &str, limits: &Limits) -> Result<Duration, Error> {
    let max = limits.max_grace;
    if grace <= max {
        return Ok(grace);
    }
    if grace == DEFAULT_GRACE {
        return Ok(max);
    }
    Err(over(
        format!("{field} is {}", seconds(grace)),
        seconds(max),
        "UNKEY_METALD_MAX_GRACE",
    ))
}

fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// The live-VMs-per-customer cap (spec §5.1): `count` is what the customer would have with
/// this create (live VMs and creates in flight, this one included). 0 = no limit.
pub fn vms_per_customer(customer: &str, count: usize, limits: &Limits) -> Result<(), Error> {
    let max = limits.max_vms_per_customer;
    if max != 0 && count > max {
        return Err(Error::ResourceExhausted(format!(
            "customer {customer:?} has {} VMs (creates in flight included); at most {max} (UNKEY_METALD_MAX_VMS_PER_CUSTOMER): delete one first",
            count - 1
        )));
    }
    Ok(())
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
mod tests;
