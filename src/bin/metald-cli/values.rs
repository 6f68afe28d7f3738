//! The small value rules shared by the flags and the config-file check, the same ones the
//! server applies (spec §4.1): ports, environment names, IP addresses, network modes.

use std::net::IpAddr;

use metald::proto::vmprovisioner as pb;

/// `dual_stack|ipv4_only|ipv6_only` (the wire names are accepted too); empty = unspecified.
pub fn network_mode(s: &str) -> Option<pb::NetworkMode> {
    let lower = s.trim().to_ascii_lowercase();
    let short = lower.strip_prefix("network_mode_").unwrap_or(&lower);
    match short {
        "" | "unspecified" => Some(pb::NetworkMode::Unspecified),
        "dual_stack" => Some(pb::NetworkMode::DualStack),
        "ipv4_only" => Some(pb::NetworkMode::Ipv4Only),
        "ipv6_only" => Some(pb::NetworkMode::Ipv6Only),
        _ => None,
    }
}

/// `10.0.0.2/24` → (`10.0.0.2`, Some(24)); a prefix that is not a number stays in the address
/// (validation reports it before this is ever used).
pub fn split_prefix(s: &str) -> (&str, Option<u8>) {
    match s.split_once('/') {
        Some((addr, p)) => match p.parse::<u8>() {
            Ok(p) => (addr, Some(p)),
            Err(_) => (s, None),
        },
        None => (s, None),
    }
}

/// An address with an optional prefix, of the wanted family.
pub fn check_ip(s: &str, v6: bool, allow_prefix: bool) -> Result<(), String> {
    let (addr, prefix) = if allow_prefix {
        match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        }
    } else {
        (s, None)
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address"))?;
    if ip.is_ipv6() != v6 {
        return Err(format!(
            "{s:?} is not an {} address",
            if v6 { "IPv6" } else { "IPv4" }
        ));
    }
    if let Some(p) = prefix {
        let max = if v6 { 128 } else { 32 };
        match p.parse::<u8>() {
            Ok(n) if n <= max => {}
            _ => return Err(format!("{s:?} has a prefix outside 0-{max}")),
        }
    }
    Ok(())
}

/// One `exposed_ports` item: `N`, `N/tcp` or `N/udp`, N in 1–65535 (the server's rule).
pub fn parse_port(item: &str) -> Result<(u16, &'static str), String> {
    let bad = || format!("{item:?} is not a port (N, N/tcp or N/udp with N in 1-65535)");
    let (number, proto) = match item.trim().split_once('/') {
        None => (item.trim(), "tcp"),
        Some((n, p)) if p.eq_ignore_ascii_case("tcp") => (n, "tcp"),
        Some((n, p)) if p.eq_ignore_ascii_case("udp") => (n, "udp"),
        Some(_) => return Err(bad()),
    };
    match number.trim().parse::<u16>() {
        Ok(n) if n > 0 => Ok((n, proto)),
        _ => Err(bad()),
    }
}

/// An environment variable name the server accepts: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_env_keys() {
        assert_eq!(parse_port("8080/tcp"), Ok((8080, "tcp")));
        assert_eq!(parse_port("53/UDP"), Ok((53, "udp")));
        assert_eq!(parse_port("80"), Ok((80, "tcp")));
        assert!(parse_port("0").is_err());
        assert!(parse_port("80/sctp").is_err());
        assert!(valid_env_key("_A1"));
        assert!(!valid_env_key("1A"));
        assert!(check_ip("10.0.0.1/33", false, true).is_err());
        assert!(check_ip("fd00::1", false, false).is_err());
    }
}
