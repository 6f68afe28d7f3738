//! Whether the configured host-port range shares ports with the kernel's ephemeral range.
//!
//! Outgoing connections on this host take local ports from `net.ipv4.ip_local_port_range`
//! (32768–60999 by default) unless `net.ipv4.ip_local_reserved_ports` holds them back. Docker's
//! allocator does not know those ports: when it picks one an outgoing connection holds, its
//! proxy's bind fails with "address already in use". Starts retry on another port
//! (`DockerBackend::start`); this check tells the operator once how to make it never happen.

use std::path::Path;

/// Inclusive port interval.
pub type Ports = (u16, u16);

const LOCAL_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The warning to log for `range` on this host, if any. Hosts without these files (not Linux,
/// no procfs) give none.
pub fn check_this_host(range: Ports) -> Option<String> {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).ok();
    warning(
        range,
        &read(LOCAL_RANGE)?,
        &read(RESERVED).unwrap_or_default(),
    )
}

/// The warning for `range` given the two files' contents.
pub fn warning(range: Ports, local_range: &str, reserved: &str) -> Option<String> {
    let ephemeral = parse_local_range(local_range)?;
    let reserved = parse_reserved(reserved)?;
    let exposed = uncovered(intersect(range, ephemeral)?, &reserved);
    if exposed.is_empty() {
        return None;
    }
    let shown: Vec<String> = exposed.iter().map(|r| show(*r)).collect();
    let count: u32 = exposed
        .iter()
        .map(|(a, b)| u32::from(*b) - u32::from(*a) + 1)
        .sum();
    Some(format!(
        "the host port range {} overlaps the kernel's ephemeral ports {} (net.ipv4.ip_local_port_range): \
         {count} ports ({}) may be held by outgoing connections, and a VM start that picks one is retried \
         on another port; reserve them with sysctl net.ipv4.ip_local_reserved_ports={}",
        show(range),
        show(ephemeral),
        shown.join(","),
        show(intersect(range, ephemeral)?),
    ))
}

fn show((a, b): Ports) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("{a}-{b}")
    }
}

/// `"32768\t60999\n"` → (32768, 60999).
fn parse_local_range(text: &str) -> Option<Ports> {
    let mut words = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(a)), Some(Ok(b))) = (words.next(), words.next()) else {
        return None;
    };
    Some((a.min(b), a.max(b)))
}

/// `"30000-40000,50000\n"` → [(30000, 40000), (50000, 50000)]; empty → none. `None` when the
/// text is not that format (nothing is concluded from a file we cannot read).
fn parse_reserved(text: &str) -> Option<Vec<Ports>> {
    text.trim()
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let item = item.trim();
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let (a, b) = (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?);
            Some((a.min(b), a.max(b)))
        })
        .collect()
}

fn intersect((a1, b1): Ports, (a2, b2): Ports) -> Option<Ports> {
    let (a, b) = (a1.max(a2), b1.min(b2));
    (a <= b).then_some((a, b))
}

/// The parts of `range` that no interval of `reserved` covers, in order.
fn uncovered(range: Ports, reserved: &[Ports]) -> Vec<Ports> {
    let mut holes = vec![range];
    for &(ra, rb) in reserved {
        holes = holes
            .into_iter()
            .flat_map(|(a, b)| {
                // A reservation wholly outside leaves the hole as it is.
                if rb < a || ra > b {
                    return vec![(a, b)];
                }
                let mut left = Vec::with_capacity(2);
                if ra > a {
                    left.push((a, ra - 1));
                }
                if rb < b {
                    left.push((rb + 1, b));
                }
                left
            })
            .collect();
    }
    holes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_proc_files() {
        assert_eq!(parse_local_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_local_range("garbage"), None);
        assert_eq!(parse_reserved("\n"), Some(vec![]));
        assert_eq!(
            parse_reserved("30000-40000,50000\n"),
            Some(vec![(30000, 40000), (50000, 50000)])
        );
        assert_eq!(parse_reserved("3x"), None);
    }

    #[test]
    fn finds_what_no_reservation_covers() {
        assert_eq!(uncovered((10, 20), &[]), vec![(10, 20)]);
        assert_eq!(uncovered((10, 20), &[(5, 25)]), vec![]);
        assert_eq!(uncovered((10, 20), &[(12, 13)]), vec![(10, 11), (14, 20)]);
        assert_eq!(uncovered((10, 20), &[(10, 10), (20, 20)]), vec![(11, 19)]);
        assert_eq!(uncovered((10, 20), &[(1, 2), (30, 40)]), vec![(10, 20)]);
        assert_eq!(uncovered((0, 65535), &[(0, 65535)]), vec![]);
    }

    #[test]
    fn warns_for_the_default_range_on_a_default_kernel() {
        let text = warning((30000, 40000), "32768\t60999\n", "\n").expect("a warning");
        assert!(text.contains("32768-40000"), "{text}");
        assert!(text.contains("7233 ports"), "{text}");
        assert!(
            text.contains("ip_local_reserved_ports=32768-40000"),
            "{text}"
        );
    }

    #[test]
    fn no_warning_when_reserved_or_apart() {
        assert_eq!(
            warning((30000, 40000), "32768 60999", "30000-40000,50000"),
            None
        );
        assert_eq!(warning((20000, 30000), "32768 60999", ""), None);
        assert!(warning((30000, 40000), "32768 60999", "32768-39999").is_some());
        assert_eq!(warning((30000, 40000), "unreadable", ""), None);
    }
}
