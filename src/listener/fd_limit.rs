//! The open-file limit and the connection bounds derived from it. Every connection holds a
//! file descriptor; so do the engine's socket (one per Docker call in flight), spool files,
//! the log and the runtime. If connections could take them all, accept would fail with
//! EMFILE and a new client would wait until some connection timed out (measured: 1,140
//! silent connections under a 1024 limit kept /health away for 30 s).

/// The soft and hard `RLIMIT_NOFILE`, as the process has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Where Linux caps `RLIMIT_NOFILE` when the hard limit says "infinity".
const NR_OPEN: &str = "/proc/sys/fs/nr_open";
/// Largest bound derived, whatever the limit: past it memory, not descriptors, is the limit.
const DERIVED_MAX: usize = 1_000_000;
/// The Prometheus listener serves a scraper or two: it gets a small share.
const METRICS_SHARE_MAX: usize = 64;

/// The current limit.
pub fn current() -> std::io::Result<FdLimit> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(FdLimit {
        soft: rl.rlim_cur,
        hard: rl.rlim_max,
    })
}

/// Raises the soft limit to the hard one (systemd and shells often start services at 1024
/// while allowing far more). Returns the limit before and after.
pub fn raise() -> std::io::Result<(FdLimit, FdLimit)> {
    let before = current()?;
    let mut target = before.hard;
    if target == libc::RLIM_INFINITY {
        // Linux refuses more than nr_open, "infinity" included.
        target = std::fs::read_to_string(NR_OPEN)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if target <= before.soft {
        return Ok((before, before));
    }
    let rl = libc::rlimit {
        rlim_cur: target,
        rlim_max: before.hard,
    };
    // SAFETY: setrlimit reads one `rlimit` through a pointer to a live local.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((before, current()?))
}

/// Open connections each listener may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub api: usize,
    pub metrics: usize,
    /// Descriptors left for everything else (0 when the bound was configured).
    pub reserved: u64,
}

/// `configured` (per listener) when set; otherwise the soft limit less a reserve for
/// everything that is not a connection (an eighth of the limit, at least 128, at most
/// half), split between the API listener and, when it runs, the Prometheus one (an eighth
/// of what is left, at most 64).
pub fn bounds(configured: usize, soft: u64, metrics_listener: bool) -> Bounds {
    if configured > 0 {
        return Bounds {
            api: configured,
            metrics: configured,
            reserved: 0,
        };
    }
    let reserved = (soft / 8).max(128).min(soft / 2);
    let available = usize::try_from(soft - reserved)
        .unwrap_or(usize::MAX)
        .clamp(2, DERIVED_MAX);
    let metrics = if metrics_listener {
        (available / 8).clamp(1, METRICS_SHARE_MAX)
    } else {
        0
    };
    Bounds {
        api: available - metrics,
        metrics,
        reserved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_bounds_leave_room_below_the_limit() {
        assert_eq!(
            bounds(0, 1024, false),
            Bounds {
                api: 896,
                metrics: 0,
                reserved: 128
            }
        );
        assert_eq!(
            bounds(0, 1024, true),
            Bounds {
                api: 832,
                metrics: 64,
                reserved: 128
            }
        );
        let big = bounds(0, 65536, true);
        assert_eq!(big.reserved, 8192);
        assert_eq!(big.api + big.metrics, 65536 - 8192);
        // A tiny limit still leaves half for the rest.
        assert_eq!(bounds(0, 100, false).api, 50);
        assert_eq!(bounds(0, u64::MAX, false).api, DERIVED_MAX);
        assert_eq!(bounds(500, 1024, true).api, 500);
    }

    #[test]
    fn the_limit_reads_and_raising_never_lowers_it() {
        let now = current().unwrap();
        assert!(now.soft <= now.hard);
        let (before, after) = raise().unwrap();
        assert!(after.soft >= before.soft);
        assert_eq!(after.hard, before.hard);
    }
}
