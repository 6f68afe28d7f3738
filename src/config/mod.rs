//! Configuration (spec §9): built-in defaults → optional TOML file → `UNKEY_METALD_*`
//! environment, loaded with the `config` crate and validated into typed values before anything
//! starts. A value that does not parse is an error naming its variable — never a silent default.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::backend::docker::{DockerSettings, Hardening};
use crate::service::Limits;

mod parser;
use parser::Parser;

/// Prefix of every environment variable.
pub const ENV_PREFIX: &str = "UNKEY_METALD_";

/// Every key: (name in the TOML file, default). The variable is `UNKEY_METALD_<NAME>`.
const KEYS: &[(&str, &str)] = &[
    ("address", "0.0.0.0"),
    ("port", "8080"),
    ("backend", "docker"),
    ("data_dir", "/opt/metald/data"),
    ("docker_host", "unix:///var/run/docker.sock"),
    ("docker_network", "unkey-vms"),
    ("docker_port_range_min", "30000"),
    ("docker_port_range_max", "40000"),
    ("docker_port_host_ip", "0.0.0.0"),
    ("docker_pull_timeout", "300s"),
    ("docker_scope", "default"),
    ("vm_pids_limit", "1024"),
    ("vm_no_new_privileges", "true"),
    ("vm_cap_drop", "NET_RAW"),
    ("vm_log_max_size", "10m"),
    ("vm_log_max_file", "3"),
    ("vm_max_ports", "16"),
    ("vm_max_config_bytes", "65536"),
    ("max_grace", "300s"),
    ("max_vms_per_customer", "1000"),
    ("max_inflight_rpcs", "1024"),
    ("max_connections", "0"),
    ("billing_enabled", "true"),
    ("billing_mock_mode", "false"),
    ("billing_endpoint", "http://localhost:8081"),
    ("billing_interval", "15s"),
    ("billing_flush_interval", "60s"),
    ("billing_tenant_id", "metald"),
    ("billing_spool_max_bytes", "268435456"),
    ("billing_heartbeat_interval", "30s"),
    ("billing_retry_max", "60s"),
    ("tls_mode", "disabled"),
    ("tls_cert_file", ""),
    ("tls_key_file", ""),
    ("tls_ca_file", ""),
    ("spiffe_socket", "/var/lib/spire/agent/agent.sock"),
    ("otel_enabled", "false"),
    ("otel_endpoint", "localhost:4318"),
    ("otel_service_name", "metald"),
    ("otel_sampling_rate", "1.0"),
    ("otel_prometheus_enabled", "true"),
    ("otel_prometheus_port", "9464"),
    ("otel_prometheus_interface", "127.0.0.1"),
    ("log_level", "info"),
    ("assetmanager_enabled", "true"),
    ("assetmanager_endpoint", "http://localhost:8083"),
];

/// Keys whose values are never printed.
const SECRET_SUFFIXES: &[&str] = &["_token", "_password", "_secret"];

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub address: IpAddr,
    pub port: u16,
    pub data_dir: PathBuf,
    pub docker: DockerSettings,
    /// Which containers this instance owns (spec §6).
    pub scope: String,
    /// What one request may ask for (spec §5.1).
    pub limits: Limits,
    /// RPCs served at once; beyond it `resource_exhausted` at once (spec §5.1).
    pub max_inflight_rpcs: usize,
    /// Open connections per listener; 0 = derived from the file-descriptor limit.
    pub max_connections: usize,
    pub billing: BillingConfig,
    pub tls: TlsConfig,
    pub otel: OtelConfig,
    /// An `EnvFilter` directive (`info`, or `RUST_LOG` syntax).
    pub log_level: String,
    pub assetmanager_enabled: bool,
    pub assetmanager_endpoint: String,
    /// Every key with its effective value, for `--print-config`.
    effective: BTreeMap<&'static str, String>,
}

#[derive(Debug, Clone)]
pub struct BillingConfig {
    pub enabled: bool,
    pub mock_mode: bool,
    pub endpoint: String,
    pub interval: Duration,
    pub flush_interval: Duration,
    pub tenant_id: String,
    pub spool_max_bytes: u64,
    pub heartbeat_interval: Duration,
    /// Longest wait between retries while billaged is unreachable.
    pub retry_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    Disabled,
    /// rustls with cert/key files; client certificates required when a CA file is given.
    File {
        cert: PathBuf,
        key: PathBuf,
        ca: Option<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub mode: TlsMode,
}

#[derive(Debug, Clone)]
pub struct OtelConfig {
    pub enabled: bool,
    pub endpoint: String,
    pub service_name: String,
    pub sampling_rate: f64,
    pub prometheus_enabled: bool,
    pub prometheus_port: u16,
    pub prometheus_interface: IpAddr,
}

/// A configuration that cannot be used; names where the bad value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("{source_name}: {reason}")]
    Value { source_name: String, reason: String },
}

/// The raw layered values, all as text; the file may not carry unknown keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw(BTreeMap<String, String>);

impl Config {
    /// Loads from the process environment and an optional file (`--config` wins over
    /// `UNKEY_METALD_CONFIG_FILE`).
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Self::from_sources(file, &env)
    }

    /// Loads from an explicit environment (tests).
    pub fn from_sources(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let file: Option<PathBuf> = file.map(Path::to_path_buf).or_else(|| {
            env.get("UNKEY_METALD_CONFIG_FILE")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        });
        let mut builder = config::Config::builder();
        for (key, default) in KEYS {
            builder = builder
                .set_default(*key, *default)
                .map_err(|e| ConfigError::Value {
                    source_name: key.to_string(),
                    reason: e.to_string(),
                })?;
        }
        let mut from_file = Vec::new();
        if let Some(path) = &file {
            let display = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: display.clone(),
                reason: e.to_string(),
            })?;
            let table: toml_keys::Table =
                toml_keys::parse(&text).map_err(|reason| ConfigError::File {
                    path: display.clone(),
                    reason,
                })?;
            for key in table {
                if !KEYS.iter().any(|(k, _)| *k == key) {
                    return Err(ConfigError::File {
                        path: display,
                        reason: format!("unknown key {key:?}"),
                    });
                }
                from_file.push(key);
            }
            builder = builder
                .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
        }
        let mut from_env = Vec::new();
        for (key, _) in KEYS {
            let var = env_name(key);
            if let Some(value) = env.get(&var) {
                builder =
                    builder
                        .set_override(*key, value.as_str())
                        .map_err(|e| ConfigError::Value {
                            source_name: var.clone(),
                            reason: e.to_string(),
                        })?;
                from_env.push(*key);
            }
        }
        // Docker's own variable is honoured when ours is not set anywhere.
        if !from_env.contains(&"docker_host") && !from_file.iter().any(|k| k == "docker_host") {
            if let Some(host) = env.get("DOCKER_HOST").filter(|s| !s.is_empty()) {
                builder = builder
                    .set_override("docker_host", host.as_str())
                    .map_err(|e| ConfigError::Value {
                        source_name: "DOCKER_HOST".into(),
                        reason: e.to_string(),
                    })?;
            }
        }
        let file_error = |e: config::ConfigError| ConfigError::File {
            path: file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            reason: e.to_string(),
        };
        let built = builder.build().map_err(file_error)?;
        let Raw(values) = built.try_deserialize().map_err(file_error)?;
        let source_of = |key: &str| -> String {
            if from_env.contains(&key) {
                env_name(key)
            } else if from_file.iter().any(|k| k == key) {
                format!(
                    "{key} in {}",
                    file.as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )
            } else if key == "docker_host" && env.contains_key("DOCKER_HOST") {
                "DOCKER_HOST".into()
            } else {
                env_name(key)
            }
        };
        Parser {
            values: &values,
            source_of: &source_of,
        }
        .build()
    }

    /// The effective configuration as TOML, loadable with `--config`; secrets redacted.
    pub fn to_toml(&self) -> String {
        let mut out =
            String::from("# effective metald configuration (defaults, file, environment)\n");
        for (key, value) in &self.effective {
            let shown = if SECRET_SUFFIXES.iter().any(|s| key.ends_with(s)) && !value.is_empty() {
                "<redacted>".to_owned()
            } else {
                value.clone()
            };
            out.push_str(&format!("{key} = {}\n", toml_string(&shown)));
        }
        out
    }

    /// Where the spool and the instance id live.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Reads only the top-level keys of a TOML document, to reject unknown ones by name.
mod toml_keys {
    pub type Table = Vec<String>;

    pub fn parse(text: &str) -> Result<Table, String> {
        let value: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        Ok(value.keys().cloned().collect())
    }
}

#[cfg(test)]
mod tests;
