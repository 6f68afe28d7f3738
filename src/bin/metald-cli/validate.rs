//! Client-side validation of a config file: walks the JSON itself (not a typed struct) so that
//! every problem is found in one pass, wrong types included, instead of stopping at the first.
//! Problems are what the server would refuse or what makes the file ambiguous; unknown keys are
//! only warnings, because callers' existing files may carry extra fields.

use serde_json::Value;
use std::collections::BTreeSet;

use crate::config_file::MB;
use crate::report::kind;
pub use crate::report::Report;
use crate::templates::TEMPLATE_NAMES;
use crate::values::{check_ip, network_mode, parse_port, valid_env_key};

/// Docker's minimum memory limit, as the server enforces it (6 MiB).
const MIN_MEMORY_MB: i64 = 6;

/// Every problem and warning of a config document.
pub fn validate(doc: &Value) -> Report {
    let mut r = Report::default();
    let Some(top) = r.object(
        doc,
        "",
        &[
            "name",
            "description",
            "template",
            "cpu",
            "memory",
            "boot",
            "storage",
            "network",
            "console",
            "metadata",
        ],
    ) else {
        return r;
    };
    r.string(top, "", "name");
    r.string(top, "", "description");
    if let Some(t) = r.string(top, "", "template") {
        if !t.is_empty() && !TEMPLATE_NAMES.contains(&t) {
            r.warn(
                "template",
                format!("{t:?} is not one of {}", TEMPLATE_NAMES.join(", ")),
            );
        }
    }
    cpu(&mut r, top.get("cpu"));
    memory(&mut r, top.get("memory"));
    boot(&mut r, top.get("boot"));
    let root_image = storage(&mut r, top.get("storage"));
    network(&mut r, top.get("network"));
    if let Some(c) = top.get("console") {
        if let Some(o) = r.object(c, "console", &["enabled", "output", "console_type"]) {
            r.boolean(o, "console", "enabled");
            r.string(o, "console", "output");
            r.string(o, "console", "console_type");
        }
    }
    let metadata = r.string_map(top, "", "metadata");
    let mut image = None;
    for (key, value) in &metadata {
        let field = format!("metadata.{key}");
        match *key {
            "docker_image" if !value.trim().is_empty() => image = Some((field, *value)),
            "exposed_ports" => {
                for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    if let Err(e) = parse_port(item) {
                        r.problem(&field, e);
                    }
                }
            }
            "env_vars" => {
                for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match item.split_once('=') {
                        Some((k, _)) if valid_env_key(k) => {}
                        Some((k, _)) => r.problem(
                            &field,
                            format!("{k:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"),
                        ),
                        None => r.problem(&field, format!("{item:?} is not KEY=VALUE")),
                    }
                }
            }
            k if k.starts_with("env.") && !valid_env_key(&k[4..]) => {
                r.problem(
                    &field,
                    format!(
                        "{:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)",
                        &k[4..]
                    ),
                );
            }
            _ => {}
        }
    }
    match image.or(root_image) {
        Some((field, image)) => {
            if image.len() > 512 || image.trim().chars().any(|c| c.is_whitespace() || c.is_control()) {
                r.problem(&field, format!("{image:?} is not a valid image reference"));
            }
        }
        None => r.problem(
            "metadata.docker_image",
            "no image: set metadata.docker_image or options.docker_image of the root storage device",
        ),
    }
    r
}

fn cpu(r: &mut Report, v: Option<&Value>) {
    let Some(v) = v else {
        return r.problem("cpu", "is required");
    };
    let Some(o) = r.object(v, "cpu", &["vcpu_count", "max_vcpu_count"]) else {
        return;
    };
    let count = r.int(o, "cpu", "vcpu_count", true);
    if let Some(n) = count {
        if !(1..=i64::from(i32::MAX)).contains(&n) {
            r.problem("cpu.vcpu_count", format!("must be greater than 0, got {n}"));
        }
    }
    if let Some(max) = r.int(o, "cpu", "max_vcpu_count", false) {
        match count {
            _ if !(0..=i64::from(i32::MAX)).contains(&max) => r.problem(
                "cpu.max_vcpu_count",
                format!("must be 0 or a positive number, got {max}"),
            ),
            Some(n) if max != 0 && max < n => r.problem(
                "cpu.max_vcpu_count",
                format!("must be 0 or at least vcpu_count ({n}), got {max}"),
            ),
            _ => {}
        }
    }
}

fn memory(r: &mut Report, v: Option<&Value>) {
    let Some(v) = v else {
        return r.problem("memory", "is required");
    };
    let Some(o) = r.object(v, "memory", &["size_mb", "max_size_mb", "hotplug_enabled"]) else {
        return;
    };
    let limit = i64::MAX / MB;
    let size = r.int(o, "memory", "size_mb", true);
    if let Some(n) = size {
        if n < MIN_MEMORY_MB || n > limit {
            r.problem(
                "memory.size_mb",
                format!("must be between {MIN_MEMORY_MB} (Docker's minimum) and {limit}, got {n}"),
            );
        }
    }
    if let Some(max) = r.int(o, "memory", "max_size_mb", false) {
        match size {
            _ if !(0..=limit).contains(&max) => r.problem(
                "memory.max_size_mb",
                format!("must be between 0 and {limit}, got {max}"),
            ),
            Some(n) if max != 0 && max < n => r.problem(
                "memory.max_size_mb",
                format!("must be 0 or at least size_mb ({n}), got {max}"),
            ),
            _ => {}
        }
    }
    r.boolean(o, "memory", "hotplug_enabled");
}

fn boot(r: &mut Report, v: Option<&Value>) {
    let Some(v) = v else {
        return r.problem("boot", "is required");
    };
    let Some(o) = r.object(v, "boot", &["kernel_path", "initrd_path", "kernel_args"]) else {
        return;
    };
    match r.string(o, "boot", "kernel_path") {
        Some(p) if !p.trim().is_empty() => {}
        Some(_) => r.problem("boot.kernel_path", "must not be empty"),
        None if o.get("kernel_path").is_none_or(Value::is_null) => {
            r.problem("boot.kernel_path", "is required")
        }
        None => {}
    }
    r.string(o, "boot", "initrd_path");
    r.string(o, "boot", "kernel_args");
}

/// Checks the devices; returns the root device's `options.docker_image` with its field name.
fn storage<'a>(r: &mut Report, v: Option<&'a Value>) -> Option<(String, &'a str)> {
    let items = match v {
        Some(Value::Array(items)) if !items.is_empty() => items,
        None | Some(Value::Null) | Some(Value::Array(_)) => {
            r.problem("storage", "at least one device is required");
            return None;
        }
        Some(other) => {
            r.problem("storage", format!("must be a list, got {}", kind(other)));
            return None;
        }
    };
    let known = [
        "id",
        "path",
        "read_only",
        "is_root_device",
        "interface_type",
        "options",
    ];
    let mut ids = BTreeSet::new();
    let mut roots = Vec::new();
    let mut images = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("storage[{i}]");
        let Some(o) = r.object(item, &field, &known) else {
            images.push(None);
            continue;
        };
        if let Some(id) = r.string(o, &field, "id") {
            if !id.is_empty() && !ids.insert(id) {
                r.problem(
                    &format!("{field}.id"),
                    format!("{id:?} is used by another device"),
                );
            }
        }
        match (r.string(o, &field, "path"), o.get("path")) {
            (Some(p), _) if !p.trim().is_empty() => {}
            (Some(_), _) => r.problem(&format!("{field}.path"), "must not be empty"),
            (None, None | Some(Value::Null)) => r.problem(&format!("{field}.path"), "is required"),
            // A wrong type was reported by `string`.
            (None, Some(_)) => {}
        }
        r.boolean(o, &field, "read_only");
        if r.boolean(o, &field, "is_root_device") == Some(true) {
            roots.push(i);
        }
        r.string(o, &field, "interface_type");
        let image = r
            .string_map(o, &field, "options")
            .into_iter()
            .find(|(k, v)| *k == "docker_image" && !v.trim().is_empty())
            .map(|(_, v)| (format!("{field}.options.docker_image"), v));
        images.push(image);
    }
    if roots.len() > 1 {
        let list: Vec<String> = roots.iter().map(|i| format!("storage[{i}]")).collect();
        r.problem(
            "storage",
            format!(
                "only one device may be the root device, flagged: {}",
                list.join(", ")
            ),
        );
    }
    let root = roots.first().copied().unwrap_or(0);
    images.into_iter().nth(root).flatten()
}

fn network(r: &mut Report, v: Option<&Value>) {
    let items = match v {
        None | Some(Value::Null) => return,
        Some(Value::Array(items)) => items,
        Some(other) => return r.problem("network", format!("must be a list, got {}", kind(other))),
    };
    let mut ids = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("network[{i}]");
        let Some(o) = r.object(
            item,
            &field,
            &["id", "interface_type", "mode", "ipv4", "ipv6"],
        ) else {
            continue;
        };
        if let Some(id) = r.string(o, &field, "id") {
            if !id.is_empty() && !ids.insert(id) {
                r.problem(
                    &format!("{field}.id"),
                    format!("{id:?} is used by another interface"),
                );
            }
        }
        r.string(o, &field, "interface_type");
        let mode = r.string(o, &field, "mode").unwrap_or("");
        if network_mode(mode).is_none() {
            r.problem(
                &format!("{field}.mode"),
                format!("{mode:?} is not one of dual_stack, ipv4_only, ipv6_only"),
            );
        }
        let mode = mode.trim().to_ascii_lowercase();
        for (family, v6) in [("ipv4", false), ("ipv6", true)] {
            let Some(cfg) = o.get(family).filter(|v| !v.is_null()) else {
                continue;
            };
            let sub = format!("{field}.{family}");
            let flags: &[&str] = if v6 {
                &["slaac", "privacy_extensions"]
            } else {
                &["dhcp"]
            };
            let mut known = vec!["static_ip", "gateway", "dns_servers"];
            known.extend_from_slice(flags);
            let Some(c) = r.object(cfg, &sub, &known) else {
                continue;
            };
            // dhcp / slaac configure the address themselves; privacy_extensions does not.
            let mut auto = false;
            for f in flags {
                let on = r.boolean(c, &sub, f) == Some(true);
                auto |= on && *f != "privacy_extensions";
            }
            let static_ip = r.string(c, &sub, "static_ip").filter(|s| !s.is_empty());
            if let Some(ip) = static_ip {
                if let Err(e) = check_ip(ip, v6, true) {
                    r.problem(&format!("{sub}.static_ip"), e);
                }
                if auto {
                    r.warn(
                        &format!("{sub}.static_ip"),
                        format!("given together with {}", flags[0]),
                    );
                }
            }
            if let Some(gw) = r.string(c, &sub, "gateway").filter(|s| !s.is_empty()) {
                if let Err(e) = check_ip(gw, v6, false) {
                    r.problem(&format!("{sub}.gateway"), e);
                }
            }
            for (path, dns) in r.string_list(c, &sub, "dns_servers") {
                if dns.parse::<std::net::IpAddr>().is_err() {
                    r.problem(&path, format!("{dns:?} is not an IP address"));
                }
            }
            let unused =
                (v6 && mode.ends_with("ipv4_only")) || (!v6 && mode.ends_with("ipv6_only"));
            if unused {
                r.warn(&sub, format!("ignored with mode {mode}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(r: &Report) -> Vec<&str> {
        r.problems.iter().map(|p| p.field.as_str()).collect()
    }

    #[test]
    fn a_good_file_has_no_problems() {
        let r = validate(&json!({
            "cpu": {"vcpu_count": 1}, "memory": {"size_mb": 32},
            "boot": {"kernel_path": "/boot/vmlinux"},
            "storage": [{"id": "root", "path": "/dev/vda", "is_root_device": true,
                         "options": {"docker_image": "busybox"}}],
            "network": [{"id": "eth0", "mode": "dual_stack", "ipv4": {"dhcp": true}}],
            "metadata": {"exposed_ports": "8080/tcp", "env.PORT": "8080"}
        }));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }

    #[test]
    fn every_problem_at_once() {
        let r = validate(&json!({
            "cpu": {"vcpu_count": 0, "vcpus": 2}, "memory": {"size_mb": "lots"},
            "storage": [{"id": "a", "path": ""}, {"id": "a", "path": "/x"}],
            "network": [{"mode": "dual", "ipv4": {"static_ip": "300.1.1.1"}}],
            "metadata": {"exposed_ports": "http", "env.1X": "y"}
        }));
        assert_eq!(
            fields(&r),
            [
                "cpu.vcpu_count",
                "memory.size_mb",
                "boot",
                "storage[0].path",
                "storage[1].id",
                "network[0].mode",
                "network[0].ipv4.static_ip",
                "metadata.env.1X",
                "metadata.exposed_ports",
                "metadata.docker_image",
            ]
        );
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    }

    #[test]
    fn image_comes_from_the_root_device() {
        let r = validate(&json!({
            "cpu": {"vcpu_count": 1}, "memory": {"size_mb": 32}, "boot": {"kernel_path": "/k"},
            "storage": [{"path": "/a"}, {"path": "/b", "is_root_device": true,
                         "options": {"docker_image": "img"}}]
        }));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }
}
