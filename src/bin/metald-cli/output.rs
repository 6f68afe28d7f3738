//! What the commands print: the compat lines scripts grep (`VM ID: <id>`, `State: VM_STATE_…`)
//! first and exact, an aligned layout for people below them, a table for `list`, and `--json`
//! documents built from the messages' canonical JSON (enum names, lowerCamelCase).

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use metald::proto::vmprovisioner as pb;
use serde::Serialize;

use crate::error::{io_error, CliError};

/// Prints exactly one JSON document on stdout.
pub fn print_json(value: &serde_json::Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Internal(format!("encoding JSON: {e}")))?;
    print_text(&format!("{text}\n"))
}

pub fn print_text(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).map_err(io_error)?;
    out.flush().map_err(io_error)
}

/// A message as proto3 canonical JSON (pbjson).
pub fn to_json<T: Serialize>(msg: &T) -> Result<serde_json::Value, CliError> {
    serde_json::to_value(msg).map_err(|e| CliError::Internal(format!("encoding JSON: {e}")))
}

pub fn state_name(state: i32) -> &'static str {
    pb::VmState::try_from(state)
        .unwrap_or(pb::VmState::Unspecified)
        .as_str_name()
}

/// The two compat lines; `VM ID:` and `State:` have the same width, so values line up.
pub fn id_and_state(vm_id: &str, state: i32) -> String {
    format!("VM ID: {vm_id}\nState: {}\n", state_name(state))
}

/// `label: value` rows under a heading, labels padded to `width`.
fn section(out: &mut String, title: &str, rows: &[(String, String)], width: usize) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n{title}");
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<width$}  {v}");
    }
}

fn row(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_owned(), v.into())
}

/// GetVmInfo for a person: compat lines, then config, network, metrics and backend.
pub fn info_text(r: &pb::GetVmInfoResponse) -> String {
    let mut out = id_and_state(&r.vm_id, r.state);
    let width = 12;
    let cfg = r.config.clone().unwrap_or_default();
    let mut config = Vec::new();
    if let Some(name) = cfg.metadata.get("name") {
        config.push(row("Name", name));
    }
    if let Some(c) = &cfg.cpu {
        let max = match c.max_vcpu_count {
            0 => String::new(),
            m => format!(" (max {m})"),
        };
        config.push(row("vCPUs", format!("{}{max}", c.vcpu_count)));
    }
    if let Some(m) = &cfg.memory {
        let max = match m.max_size_bytes {
            0 => String::new(),
            b => format!(" (max {})", bytes(b)),
        };
        config.push(row("Memory", format!("{}{max}", bytes(m.size_bytes))));
    }
    let root = cfg
        .storage
        .iter()
        .find(|d| d.is_root_device)
        .or(cfg.storage.first());
    let image = cfg
        .metadata
        .get("docker_image")
        .or_else(|| root.and_then(|d| d.options.get("docker_image")));
    if let Some(image) = image.or(r.backend_info.get("image")) {
        config.push(row("Image", image));
    }
    if let Some(b) = &cfg.boot {
        config.push(row("Kernel", b.kernel_path.as_str()));
    }
    for d in &cfg.storage {
        let mut flags = Vec::new();
        if Some(d) == root {
            flags.push("root");
        }
        if d.read_only {
            flags.push("read-only");
        }
        let flags = if flags.is_empty() {
            String::new()
        } else {
            format!(" ({})", flags.join(", "))
        };
        config.push(row(
            "Storage",
            format!("{} {}{flags}", or_dash(&d.id), d.path),
        ));
    }
    for n in &cfg.network {
        let mode = pb::NetworkMode::try_from(n.mode)
            .map(|m| {
                m.as_str_name()
                    .trim_start_matches("NETWORK_MODE_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        config.push(row(
            "Interface",
            format!("{} {}", or_dash(&n.id), mode).trim_end().to_owned(),
        ));
    }
    if let Some(p) = cfg.metadata.get("exposed_ports") {
        config.push(row("Exposed", p.as_str()));
    }
    // Names only: values may be secrets, and `--json` has them for whoever needs them.
    let mut env: Vec<&str> = cfg
        .metadata
        .get("env_vars")
        .map(|l| {
            l.split(',')
                .filter_map(|i| i.split_once('=').map(|(k, _)| k.trim()))
                .collect()
        })
        .unwrap_or_default();
    env.extend(cfg.metadata.keys().filter_map(|k| k.strip_prefix("env.")));
    if !env.is_empty() {
        env.sort_unstable();
        env.dedup();
        config.push(row("Env", env.join(", ")));
    }
    let skip = |k: &str| {
        matches!(k, "name" | "docker_image" | "exposed_ports" | "env_vars") || k.starts_with("env.")
    };
    let other: Vec<String> = cfg
        .metadata
        .iter()
        .filter(|(k, _)| !skip(k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !other.is_empty() {
        config.push(row("Metadata", other.join(", ")));
    }
    section(&mut out, "Config", &config, width);

    let mut net = Vec::new();
    if let Some(n) = &r.network_info {
        for (k, v) in [
            ("IP address", &n.ip_address),
            ("MAC address", &n.mac_address),
            ("Network", &n.tap_device),
            ("Gateway", &n.gateway),
        ] {
            if !v.is_empty() {
                net.push(row(k, v.as_str()));
            }
        }
        if !n.dns_servers.is_empty() {
            net.push(row("DNS", n.dns_servers.join(", ")));
        }
        for p in &n.port_mappings {
            let proto = if p.protocol.is_empty() {
                "tcp"
            } else {
                &p.protocol
            };
            net.push(row(
                "Port",
                format!("{}/{proto} -> host port {}", p.container_port, p.host_port),
            ));
        }
    }
    section(&mut out, "Network", &net, width);

    let mut metrics = Vec::new();
    if let Some(m) = &r.metrics {
        // A running container always uses some memory: zero means the collector has not
        // sampled this VM yet, and zeros would read as a measurement.
        if m.memory_usage_bytes == 0 && m.cpu_usage_percent == 0.0 {
            metrics.push(row("Usage", "not sampled yet"));
        } else {
            metrics.push(row("CPU", format!("{:.1} %", m.cpu_usage_percent)));
            metrics.push(row("Memory", bytes(m.memory_usage_bytes)));
            if let Some(n) = &m.network_stats {
                metrics.push(row(
                    "Network",
                    format!(
                        "rx {}, tx {}",
                        bytes(n.bytes_received),
                        bytes(n.bytes_transmitted)
                    ),
                ));
            }
            if let Some(s) = &m.storage_stats {
                metrics.push(row(
                    "Disk",
                    format!(
                        "read {}, written {}",
                        bytes(s.bytes_read),
                        bytes(s.bytes_written)
                    ),
                ));
            }
        }
        let up = Duration::from_secs(u64::try_from(m.uptime_seconds).unwrap_or(0));
        metrics.push(row("Uptime", humantime::format_duration(up).to_string()));
    } else if matches!(r.state(), pb::VmState::Running | pb::VmState::Paused) {
        // metald sends no metrics until its collector has sampled the VM.
        metrics.push(row("Usage", "not sampled yet"));
    }
    section(&mut out, "Metrics", &metrics, width);

    let backend: Vec<(String, String)> = r
        .backend_info
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bwidth = backend
        .iter()
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(0)
        .max(width);
    section(&mut out, "Backend", &backend, bwidth);
    out
}

/// ListVms as a table with a header line.
pub fn list_table(vms: &[pb::VmInfo]) -> String {
    let header = ["VM ID", "STATE", "VCPU", "MEMORY", "CREATED", "NAME"];
    let rows: Vec<[String; 6]> = vms
        .iter()
        .map(|v| {
            [
                v.vm_id.clone(),
                state_name(v.state).to_owned(),
                v.vcpu_count.to_string(),
                bytes(v.memory_size_bytes),
                unix_time(v.created_timestamp),
                v.metadata
                    .get("name")
                    .cloned()
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, &header);
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(&mut out, &cells);
    }
    out
}

/// Bytes in binary units, as Docker and the config files count memory.
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n.max(0) as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn unix_time(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) if s > 0 => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string()
        }
        _ => "-".into(),
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compat_lines_are_exact() {
        let t = id_and_state("vm-1", pb::VmState::Running as i32);
        assert!(t.lines().any(|l| l == "State: VM_STATE_RUNNING"));
        assert!(t.lines().any(|l| l == "VM ID: vm-1"));
    }

    #[test]
    fn units_and_table() {
        assert_eq!(bytes(32 * 1024 * 1024), "32 MiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        let t = list_table(&[pb::VmInfo {
            vm_id: "vm-a".into(),
            state: 2,
            vcpu_count: 1,
            memory_size_bytes: 1 << 30,
            created_timestamp: 1_700_000_000,
            ..Default::default()
        }]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("VM ID  STATE"));
        assert!(
            lines[1].contains("VM_STATE_RUNNING  1     1 GiB   2023-11-14T22:13:20Z  -"),
            "{t}"
        );
    }
}
