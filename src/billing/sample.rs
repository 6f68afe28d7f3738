//! Docker stats → a usage sample (spec §8). Pure functions, no I/O.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::backend::ContainerStats;
use crate::vm::Usage;

/// One usage sample as billaged receives it. Counters are cumulative since the container
/// started; memory is the working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub timestamp_nanos: i64,
    pub cpu_time_nanos: i64,
    pub memory_usage_bytes: i64,
    pub disk_read_bytes: i64,
    pub disk_write_bytes: i64,
    pub network_rx_bytes: i64,
    pub network_tx_bytes: i64,
}

impl Sample {
    /// The cumulative counters, for checks that must hold for all of them.
    pub fn counters(&self) -> [i64; 5] {
        [
            self.cpu_time_nanos,
            self.disk_read_bytes,
            self.disk_write_bytes,
            self.network_rx_bytes,
            self.network_tx_bytes,
        ]
    }

    /// No cumulative counter went down from `self` to `next` (no container restart between).
    pub fn precedes_monotonically(&self, next: &Sample) -> bool {
        self.counters()
            .iter()
            .zip(next.counters())
            .all(|(a, b)| *a <= b)
    }
}

fn clamp(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// The working set, as `docker stats` shows it: usage minus inactive file cache
/// (`total_inactive_file` on cgroup v1, `inactive_file` on v2).
pub fn working_set(usage: u64, stat: &std::collections::HashMap<String, u64>) -> u64 {
    if let Some(v) = stat.get("total_inactive_file").filter(|v| **v < usage) {
        return usage - v;
    }
    if let Some(v) = stat.get("inactive_file").filter(|v| **v < usage) {
        return usage - v;
    }
    usage
}

/// Sums block-I/O entries by op, whatever its case (`Read` on v1, `read` on v2); the v1
/// `Total` rows repeat the others and are skipped.
pub fn blkio_read_write(entries: &[(String, u64)]) -> (u64, u64) {
    let mut read = 0u64;
    let mut write = 0u64;
    for (op, value) in entries {
        if op.eq_ignore_ascii_case("read") {
            read = read.saturating_add(*value);
        } else if op.eq_ignore_ascii_case("write") {
            write = write.saturating_add(*value);
        }
    }
    (read, write)
}

/// A sample of `stats` taken at `at`, and the usage figures shown by GetVmInfo. `previous`
/// (the VM's last sample) gives the CPU percentage.
pub fn sample_of(
    stats: &ContainerStats,
    at: SystemTime,
    previous: Option<&Sample>,
) -> (Sample, Usage) {
    let (read, write) = blkio_read_write(&stats.blkio_bytes);
    let (read_ops, write_ops) = blkio_read_write(&stats.blkio_ops);
    let (mut rx, mut tx, mut rxp, mut txp) = (0u64, 0u64, 0u64, 0u64);
    for (r, t, rp, tp) in &stats.networks {
        rx = rx.saturating_add(*r);
        tx = tx.saturating_add(*t);
        rxp = rxp.saturating_add(*rp);
        txp = txp.saturating_add(*tp);
    }
    let sample = Sample {
        timestamp_nanos: crate::vm::unix_nanos(at),
        cpu_time_nanos: clamp(stats.cpu_total_ns),
        memory_usage_bytes: clamp(working_set(stats.memory_usage, &stats.memory_stat)),
        disk_read_bytes: clamp(read),
        disk_write_bytes: clamp(write),
        network_rx_bytes: clamp(rx),
        network_tx_bytes: clamp(tx),
    };
    let usage = Usage {
        cpu_percent: previous.map(|p| cpu_percent(p, &sample)).unwrap_or(0.0),
        memory_bytes: sample.memory_usage_bytes,
        net_rx_bytes: sample.network_rx_bytes,
        net_tx_bytes: sample.network_tx_bytes,
        net_rx_packets: clamp(rxp),
        net_tx_packets: clamp(txp),
        disk_read_bytes: sample.disk_read_bytes,
        disk_write_bytes: sample.disk_write_bytes,
        disk_read_ops: clamp(read_ops),
        disk_write_ops: clamp(write_ops),
    };
    (sample, usage)
}

/// CPU time used between two samples as a percentage of one CPU's wall time.
pub fn cpu_percent(prev: &Sample, cur: &Sample) -> f64 {
    let wall = cur.timestamp_nanos - prev.timestamp_nanos;
    let cpu = cur.cpu_time_nanos - prev.cpu_time_nanos;
    if wall <= 0 || cpu < 0 {
        return 0.0;
    }
    cpu as f64 / wall as f64 * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    fn stats() -> ContainerStats {
        ContainerStats {
            cpu_total_ns: 5_000_000_000,
            memory_usage: 300 << 20,
            memory_stat: HashMap::from([
                ("total_inactive_file".into(), 200 << 20),
                ("inactive_file".into(), 1),
            ]),
            blkio_bytes: vec![
                ("Read".into(), 10),
                ("Write".into(), 20),
                ("Read".into(), 1),
                ("Total".into(), 31),
                ("Sync".into(), 7),
            ],
            blkio_ops: vec![("read".into(), 3), ("write".into(), 4)],
            networks: vec![(100, 200, 1, 2), (5, 6, 1, 1)],
            running: true,
        }
    }

    #[test]
    fn memory_is_the_working_set() {
        assert_eq!(
            working_set(300, &HashMap::from([("total_inactive_file".into(), 200)])),
            100
        );
        assert_eq!(
            working_set(300, &HashMap::from([("inactive_file".into(), 50)])),
            250,
            "cgroup v2"
        );
        assert_eq!(
            working_set(300, &HashMap::from([("inactive_file".into(), 500)])),
            300,
            "never negative"
        );
        assert_eq!(working_set(300, &HashMap::new()), 300);
    }

    #[test]
    fn disk_counts_both_cases_and_skips_totals() {
        assert_eq!(blkio_read_write(&stats().blkio_bytes), (11, 20));
        assert_eq!(
            blkio_read_write(&[
                ("read".into(), 4),
                ("write".into(), 5),
                ("rbytes".into(), 9)
            ]),
            (4, 5)
        );
    }

    #[test]
    fn sample_sums_interfaces_and_computes_cpu_percent() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let (s0, _) = sample_of(&stats(), t0, None);
        assert_eq!(s0.memory_usage_bytes, 100 << 20);
        assert_eq!((s0.network_rx_bytes, s0.network_tx_bytes), (105, 206));
        let mut later = stats();
        later.cpu_total_ns += 1_500_000_000;
        let (s1, usage) = sample_of(&later, t0 + Duration::from_secs(1), Some(&s0));
        assert!(
            (usage.cpu_percent - 150.0).abs() < 1e-9,
            "{}",
            usage.cpu_percent
        );
        assert_eq!((usage.disk_read_ops, usage.disk_write_ops), (3, 4));
        assert!(s0.precedes_monotonically(&s1));
        assert!(!s1.precedes_monotonically(&s0));
    }
}
