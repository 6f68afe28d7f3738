//! Configuration (spec §9): built-in defaults → optional TOML file → `UNKEY_METALD_*`
//! environment, loaded with the `config` crate and validated into typed values before anything
//! starts. A value that does not parse is an error naming its variable — never a silent default.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::backend::docker::DockerSettings;

/// Prefix of every environment variable.
pub const ENV_PREFIX: &str = "UNKEY_METALD_";

/// Every key: (name in the TOML file, default). The variable is `UNKEY_METALD_<NAME>`.
const KEYS: &[(&str, &str)] = &[
    ("address", "0.0.0.0"),
    ("port", "8080"),
    ("backend", "docker"),
    ("data_dir", "/opt/metald/data"),
    ("docker_host", "unix:///var/run/docker.sock"),
    ("docker_network", "bridge"),
    ("docker_port_range_min", "30000"),
    ("docker_port_range_max", "40000"),
    ("docker_port_host_ip", "0.0.0.0"),
    ("docker_pull_timeout", "300s"),
    ("docker_scope", "default"),
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
        let built = builder.build().map_err(|e| ConfigError::File {
            path: file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            reason: e.to_string(),
        })?;
        let Raw(values) = built.try_deserialize().map_err(|e| ConfigError::File {
            path: file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            reason: e.to_string(),
        })?;
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

struct Parser<'a> {
    values: &'a BTreeMap<String, String>,
    source_of: &'a dyn Fn(&str) -> String,
}

impl Parser<'_> {
    fn raw(&self, key: &str) -> String {
        self.values
            .get(key)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    }

    fn fail<T>(&self, key: &str, reason: impl Into<String>) -> Result<T, ConfigError> {
        Err(ConfigError::Value {
            source_name: (self.source_of)(key),
            reason: reason.into(),
        })
    }

    fn string(&self, key: &str) -> String {
        self.raw(key)
    }

    fn non_empty(&self, key: &str) -> Result<String, ConfigError> {
        let v = self.raw(key);
        if v.is_empty() {
            return self.fail(key, "must not be empty");
        }
        Ok(v)
    }

    fn bool(&self, key: &str) -> Result<bool, ConfigError> {
        let v = self.raw(key);
        match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => self.fail(key, format!("{v:?} is not a boolean (true or false)")),
        }
    }

    fn port(&self, key: &str, allow_zero: bool) -> Result<u16, ConfigError> {
        let v = self.raw(key);
        match v.parse::<u16>() {
            Ok(0) if !allow_zero => self.fail(key, "port must be 1-65535, got 0"),
            Ok(p) => Ok(p),
            Err(_) => self.fail(key, format!("{v:?} is not a port number (0-65535)")),
        }
    }

    fn ip(&self, key: &str) -> Result<IpAddr, ConfigError> {
        let v = self.raw(key);
        v.parse()
            .or_else(|_| self.fail(key, format!("{v:?} is not an IP address")))
    }

    fn duration(&self, key: &str) -> Result<Duration, ConfigError> {
        let v = self.raw(key);
        let parsed = match v.parse::<u64>() {
            Ok(secs) => Ok(Duration::from_secs(secs)),
            Err(_) => humantime::parse_duration(&v),
        };
        match parsed {
            Ok(d) if d.is_zero() => self.fail(key, "must be greater than zero"),
            Ok(d) => Ok(d),
            Err(e) => self.fail(key, format!("{v:?} is not a duration like 15s or 5m: {e}")),
        }
    }

    fn build(self) -> Result<Config, ConfigError> {
        let backend = self.raw("backend");
        match backend.as_str() {
            "docker" => {}
            "firecracker" => {
                return self.fail(
                    "backend",
                    "firecracker is not supported by this build; use docker",
                )
            }
            other => return self.fail("backend", format!("unknown backend {other:?}; use docker")),
        }
        let scope = self.non_empty("docker_scope")?;
        let scope_ok = scope.len() <= 32
            && scope.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && scope
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !scope_ok {
            return self.fail(
                "docker_scope",
                format!("{scope:?} must be 1-32 chars of a-z, 0-9, '-', '_'"),
            );
        }
        let min = self.port("docker_port_range_min", false)?;
        let max = self.port("docker_port_range_max", false)?;
        if min > max {
            return self.fail(
                "docker_port_range_max",
                format!("{max} is below the range minimum {min}"),
            );
        }
        let port_host_ip = self.ip("docker_port_host_ip")?.to_string();
        let docker_host = self.non_empty("docker_host")?;
        if !(docker_host.starts_with("unix://")
            || docker_host.starts_with("tcp://")
            || docker_host.starts_with("http://"))
        {
            return self.fail(
                "docker_host",
                format!("{docker_host:?} must start with unix://, tcp:// or http://"),
            );
        }
        let billing_endpoint = self.non_empty("billing_endpoint")?;
        if !(billing_endpoint.starts_with("http://") || billing_endpoint.starts_with("https://")) {
            return self.fail(
                "billing_endpoint",
                format!("{billing_endpoint:?} must be an http:// or https:// URL"),
            );
        }
        let spool_max = self.raw("billing_spool_max_bytes");
        let spool_max_bytes = match spool_max.parse::<u64>() {
            Ok(n) if n >= 4096 => n,
            _ => {
                return self.fail(
                    "billing_spool_max_bytes",
                    format!("{spool_max:?} must be a byte count of at least 4096"),
                )
            }
        };
        let sampling = self.raw("otel_sampling_rate");
        let sampling_rate = match sampling.parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => r,
            _ => {
                return self.fail(
                    "otel_sampling_rate",
                    format!("{sampling:?} must be a number from 0.0 to 1.0"),
                )
            }
        };
        let log_level = self.non_empty("log_level")?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
            return self.fail(
                "log_level",
                format!("{log_level:?} is not a level or RUST_LOG directive: {e}"),
            );
        }
        // RUST_LOG reads a bare word as a target name, so a misspelt level ("warnig", or
        // "warnig,hyper=off") would silently log nothing: a bare word must be a level, a
        // path (`a::b`) or this crate; any other target is written `target=level`.
        if let Some(word) = log_level.split(',').map(str::trim).find(|d| {
            !d.is_empty()
                && !d.contains(['=', '[', ':'])
                && *d != "metald"
                && d.parse::<tracing_subscriber::filter::LevelFilter>()
                    .is_err()
        }) {
            return self.fail(
                "log_level",
                format!(
                    "{word:?} is not a level (trace, debug, info, warn, error, off); for one target's logs write target=level"
                ),
            );
        }
        let otel_enabled = self.bool("otel_enabled")?;
        let otel_endpoint = self.string("otel_endpoint");
        let traces_url = crate::telemetry::otlp_traces_url(&otel_endpoint);
        let valid_endpoint = traces_url.parse::<http::Uri>().is_ok_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some_and(|h| !h.is_empty())
        });
        // Checked when it is used: an unused endpoint in a shared env file does no harm.
        if otel_enabled && !valid_endpoint {
            return self.fail(
                "otel_endpoint",
                format!("{otel_endpoint:?} is not an OTLP/HTTP host:port or http(s):// URL"),
            );
        }
        let tls = self.tls()?;
        let effective = KEYS.iter().map(|(k, _)| (*k, self.raw(k))).collect();
        Ok(Config {
            address: self.ip("address")?,
            port: self.port("port", true)?,
            data_dir: PathBuf::from(self.non_empty("data_dir")?),
            docker: DockerSettings {
                host: docker_host,
                network: self.non_empty("docker_network")?,
                port_host_ip,
                port_range: (min, max),
                pull_timeout: self.duration("docker_pull_timeout")?,
            },
            scope,
            billing: BillingConfig {
                enabled: self.bool("billing_enabled")?,
                mock_mode: self.bool("billing_mock_mode")?,
                endpoint: billing_endpoint,
                interval: self.duration("billing_interval")?,
                flush_interval: self.duration("billing_flush_interval")?,
                tenant_id: self.non_empty("billing_tenant_id")?,
                spool_max_bytes,
                heartbeat_interval: self.duration("billing_heartbeat_interval")?,
                retry_max: self.duration("billing_retry_max")?,
            },
            tls,
            otel: OtelConfig {
                enabled: otel_enabled,
                endpoint: otel_endpoint,
                service_name: self.non_empty("otel_service_name")?,
                sampling_rate,
                prometheus_enabled: self.bool("otel_prometheus_enabled")?,
                prometheus_port: self.port("otel_prometheus_port", true)?,
                prometheus_interface: self.ip("otel_prometheus_interface")?,
            },
            log_level,
            assetmanager_enabled: self.bool("assetmanager_enabled")?,
            assetmanager_endpoint: self.string("assetmanager_endpoint"),
            effective,
        })
    }

    fn tls(&self) -> Result<TlsConfig, ConfigError> {
        let mode = self.raw("tls_mode").to_ascii_lowercase();
        let mode = match mode.as_str() {
            "disabled" | "" => TlsMode::Disabled,
            "file" => {
                let cert = PathBuf::from(self.non_empty("tls_cert_file")?);
                let key = PathBuf::from(self.non_empty("tls_key_file")?);
                for (k, p) in [("tls_cert_file", &cert), ("tls_key_file", &key)] {
                    if !p.is_file() {
                        return self.fail(k, format!("{} is not a readable file", p.display()));
                    }
                }
                let ca = Some(self.raw("tls_ca_file"))
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from);
                TlsMode::File { cert, key, ca }
            }
            "spiffe" => {
                let socket = self.raw("spiffe_socket");
                if Path::new(&socket).exists() {
                    return self.fail("tls_mode", format!("spiffe: this build does not speak SPIFFE (agent socket {socket} exists); use file or disabled"));
                }
                tracing::warn!(
                    socket,
                    "tls mode spiffe: agent socket missing; falling back to disabled"
                );
                TlsMode::Disabled
            }
            other => {
                return self.fail(
                    "tls_mode",
                    format!("{other:?} is not one of disabled, file, spiffe"),
                )
            }
        };
        Ok(TlsConfig { mode })
    }
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
mod tests {
    use super::*;
    use std::io::Write as _;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        Config::from_sources(None, &env(pairs))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::from_sources(None, &env(&[])).unwrap();
        assert_eq!(c.address.to_string(), "0.0.0.0");
        assert_eq!(c.port, 8080);
        assert_eq!(c.docker.port_range, (30000, 40000));
        assert_eq!(c.docker.pull_timeout, Duration::from_secs(300));
        assert_eq!(c.billing.interval, Duration::from_secs(15));
        assert_eq!(c.billing.flush_interval, Duration::from_secs(60));
        assert_eq!(c.scope, "default");
        assert_eq!(c.tls.mode, TlsMode::Disabled);
        assert!(c.billing.enabled && !c.billing.mock_mode);
    }

    #[test]
    fn environment_overrides_and_errors_name_the_variable() {
        let c = Config::from_sources(
            None,
            &env(&[
                ("UNKEY_METALD_PORT", "9000"),
                ("UNKEY_METALD_BILLING_INTERVAL", "2s"),
            ]),
        )
        .unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.billing.interval, Duration::from_secs(2));
        assert!(err(&[("UNKEY_METALD_PORT", "abc")]).starts_with("UNKEY_METALD_PORT:"));
        assert!(err(&[("UNKEY_METALD_BILLING_ENABLED", "maybe")])
            .starts_with("UNKEY_METALD_BILLING_ENABLED:"));
        assert!(err(&[("UNKEY_METALD_BILLING_INTERVAL", "soon")])
            .starts_with("UNKEY_METALD_BILLING_INTERVAL:"));
        assert!(err(&[
            ("UNKEY_METALD_DOCKER_PORT_RANGE_MIN", "500"),
            ("UNKEY_METALD_DOCKER_PORT_RANGE_MAX", "400")
        ])
        .starts_with("UNKEY_METALD_DOCKER_PORT_RANGE_MAX:"));
        assert!(
            err(&[("UNKEY_METALD_BACKEND", "firecracker")]).contains("not supported by this build")
        );
        assert!(err(&[("UNKEY_METALD_TLS_MODE", "mtls")]).starts_with("UNKEY_METALD_TLS_MODE:"));
        assert!(err(&[("UNKEY_METALD_LOG_LEVEL", "info,[")]).starts_with("UNKEY_METALD_LOG_LEVEL:"));
        for bad in ["warnig", "warnig,hyper=off", "info,hyper"] {
            assert!(
                err(&[("UNKEY_METALD_LOG_LEVEL", bad)]).contains("is not a level"),
                "{bad}"
            );
        }
        for ok in [
            "WARN",
            "info,metald::billing=debug",
            "debug,hyper=off",
            "info,metald",
        ] {
            let c = Config::from_sources(None, &env(&[("UNKEY_METALD_LOG_LEVEL", ok)]));
            assert!(c.is_ok(), "{ok}: {:?}", c.err());
        }
        for bad in ["bad host:43 18", "ftp://collector:4318", ""] {
            assert!(err(&[
                ("UNKEY_METALD_OTEL_ENABLED", "true"),
                ("UNKEY_METALD_OTEL_ENDPOINT", bad)
            ])
            .starts_with("UNKEY_METALD_OTEL_ENDPOINT:"));
            // Not used, not checked.
            assert!(
                Config::from_sources(None, &env(&[("UNKEY_METALD_OTEL_ENDPOINT", bad)])).is_ok()
            );
        }
        for ok in [
            "localhost:4318",
            "http://otel:4318",
            "https://otel.example/v1/traces",
        ] {
            let c = Config::from_sources(
                None,
                &env(&[
                    ("UNKEY_METALD_OTEL_ENABLED", "true"),
                    ("UNKEY_METALD_OTEL_ENDPOINT", ok),
                ]),
            );
            assert!(c.is_ok(), "{ok}: {:?}", c.err());
        }
        assert!(err(&[("UNKEY_METALD_DOCKER_SCOPE", "Bad Scope")])
            .starts_with("UNKEY_METALD_DOCKER_SCOPE:"));
    }

    #[test]
    fn docker_host_falls_back_to_docker_host() {
        let c =
            Config::from_sources(None, &env(&[("DOCKER_HOST", "tcp://127.0.0.1:2375")])).unwrap();
        assert_eq!(c.docker.host, "tcp://127.0.0.1:2375");
        let c = Config::from_sources(
            None,
            &env(&[
                ("DOCKER_HOST", "tcp://x:1"),
                ("UNKEY_METALD_DOCKER_HOST", "unix:///d.sock"),
            ]),
        )
        .unwrap();
        assert_eq!(c.docker.host, "unix:///d.sock");
    }

    #[test]
    fn file_layer_sits_between_defaults_and_environment() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "port = 7000\ndocker_scope = \"from-file\"\nbilling_enabled = false"
        )
        .unwrap();
        let c =
            Config::from_sources(Some(f.path()), &env(&[("UNKEY_METALD_PORT", "7001")])).unwrap();
        assert_eq!(c.port, 7001);
        assert_eq!(c.scope, "from-file");
        assert!(!c.billing.enabled);
        let round = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(round.path(), c.to_toml()).unwrap();
        let again = Config::from_sources(Some(round.path()), &env(&[])).unwrap();
        assert_eq!(again.port, 7001);
    }

    #[test]
    fn file_errors_name_the_file_and_key() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "prot = 7000").unwrap();
        let e = Config::from_sources(Some(f.path()), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key \"prot\""), "{e}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "port = \"x\"").unwrap();
        let e = Config::from_sources(Some(f.path()), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("port in "), "{e}");
        let e = Config::from_sources(Some(Path::new("/nonexistent.toml")), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config file /nonexistent.toml"), "{e}");
    }
}
