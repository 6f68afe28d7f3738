//! Typed validation of the layered raw values: each key's rule, errors naming the source.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

pub(super) struct Parser<'a> {
    pub(super) values: &'a BTreeMap<String, String>,
    pub(super) source_of: &'a dyn Fn(&str) -> String,
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

    /// A whole number within `range`.
    fn count(&self, key: &str, range: std::ops::RangeInclusive<u64>) -> Result<u64, ConfigError> {
        let v = self.raw(key);
        match v.parse::<u64>() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => self.fail(
                key,
                format!(
                    "{v:?} must be a whole number from {} to {}",
                    range.start(),
                    range.end()
                ),
            ),
        }
    }

    fn hardening(&self) -> Result<Hardening, ConfigError> {
        let cap_drop: Vec<String> = self
            .raw("vm_cap_drop")
            .split(',')
            .map(|c| c.trim().to_ascii_uppercase())
            .filter(|c| !c.is_empty())
            .map(|c| c.strip_prefix("CAP_").map(str::to_owned).unwrap_or(c))
            .collect();
        if let Some(bad) = cap_drop
            .iter()
            .find(|c| !c.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_'))
        {
            return self.fail(
                "vm_cap_drop",
                format!("{bad:?} is not a capability name like NET_RAW"),
            );
        }
        let log_max_size = self.raw("vm_log_max_size").to_ascii_lowercase();
        let size_ok = log_max_size
            .strip_suffix(['k', 'm', 'g'])
            .unwrap_or(&log_max_size)
            .parse::<u64>()
            .is_ok_and(|n| n > 0);
        if !size_ok {
            return self.fail(
                "vm_log_max_size",
                format!("{log_max_size:?} is not a size like 10m (k, m or g)"),
            );
        }
        Ok(Hardening {
            // 0 = no limit (Docker's own reading of 0 and -1).
            pids_limit: self.count("vm_pids_limit", 0..=4_194_304)? as i64,
            no_new_privileges: self.bool("vm_no_new_privileges")?,
            cap_drop,
            log_max_size,
            log_max_file: self.count("vm_log_max_file", 1..=100)? as u32,
        })
    }

    fn limits(&self) -> Result<Limits, ConfigError> {
        let max_grace = self.duration("max_grace")?;
        Ok(Limits {
            max_ports: self.count("vm_max_ports", 0..=65_535)? as usize,
            max_config_bytes: self.count("vm_max_config_bytes", 1024..=4 * 1024 * 1024)? as usize,
            max_grace,
            max_vms_per_customer: self.count("max_vms_per_customer", 0..=u32::MAX as u64)? as usize,
        })
    }

    pub(super) fn build(self) -> Result<Config, ConfigError> {
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
                hardening: self.hardening()?,
            },
            scope,
            limits: self.limits()?,
            max_inflight_rpcs: self.count("max_inflight_rpcs", 1..=1_000_000)? as usize,
            max_connections: self.count("max_connections", 0..=1_000_000)? as usize,
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
