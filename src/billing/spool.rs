//! The durable billing spool (spec §8): every record is on disk before it is sent and leaves
//! only when billaged acknowledged it.
//!
//! Layout under `<data_dir>/billing/`: `queue/<vm_id>.jsonl` (one JSON record per line, in the
//! order they must be delivered), `metered.json` (VMs announced with NotifyVmStarted and not
//! yet stopped: survives restarts so nothing is announced twice), `gaps.json` (VMs whose
//! delivery was interrupted: NotifyPossibleGap is owed after their replay), `rejected/` (what
//! billaged refused as invalid, kept for inspection). Appends are synced before returning;
//! rewrites go through a temporary file and a rename.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sample::Sample;

/// One thing to tell billaged about a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Started { start_nanos: i64 },
    Sample { sample: Sample },
    Stopped { stop_nanos: i64 },
}

impl Record {
    fn timestamp(&self) -> i64 {
        match self {
            Record::Started { start_nanos } => *start_nanos,
            Record::Sample { sample } => sample.timestamp_nanos,
            Record::Stopped { stop_nanos } => *stop_nanos,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Line {
    customer_id: String,
    record: Record,
}

/// What is next for a VM: one notification, or a run of samples to batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Head {
    Started(i64),
    Samples(Vec<Sample>),
    Stopped(i64),
}

impl Head {
    /// How many records it covers (for `ack`).
    pub fn len(&self) -> usize {
        match self {
            Head::Samples(s) => s.len(),
            _ => 1,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A VM billaged has been told about (NotifyVmStarted sent or queued).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metered {
    pub customer_id: String,
    pub start_nanos: i64,
}

/// NotifyPossibleGap owed to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub customer_id: String,
    pub last_sent_nanos: i64,
}

#[derive(Debug, Default)]
struct Queue {
    customer_id: String,
    records: VecDeque<(Record, u64)>,
    bytes: u64,
}

/// The spool. Not thread-safe by itself: the billing module keeps it behind one mutex and
/// never holds that across a network call.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    queues: BTreeMap<String, Queue>,
    total_bytes: u64,
    metered: BTreeMap<String, Metered>,
    gaps: BTreeMap<String, Gap>,
    /// Timestamp of the last sample billaged acknowledged, per VM (this process's lifetime).
    last_sent: BTreeMap<String, i64>,
    pub rejected_batches: u64,
    pub dropped_samples: u64,
}

impl Spool {
    /// Opens (or creates) the spool under `dir` and loads what a previous run left.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir.join("queue"))?;
        fs::create_dir_all(dir.join("rejected"))?;
        let mut spool = Spool {
            dir: dir.to_owned(),
            max_bytes,
            queues: BTreeMap::new(),
            total_bytes: 0,
            metered: read_json(&dir.join("metered.json"))?,
            gaps: read_json(&dir.join("gaps.json"))?,
            last_sent: BTreeMap::new(),
            rejected_batches: 0,
            dropped_samples: 0,
        };
        for entry in fs::read_dir(dir.join("queue"))? {
            let path = entry?.path();
            let Some(vm) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".jsonl"))
            else {
                continue;
            };
            let vm = vm.to_owned();
            let (queue, clean) = load_queue(&path)?;
            spool.total_bytes += queue.bytes;
            spool.queues.insert(vm.clone(), queue);
            if !clean {
                // A crash cut the last line short: rewrite without it.
                spool.rewrite(&vm)?;
            }
        }
        Ok(spool)
    }

    fn queue_path(&self, vm: &str) -> PathBuf {
        self.dir.join("queue").join(format!("{vm}.jsonl"))
    }

    /// Appends records for a VM, durably, then keeps the size bound.
    pub fn append(&mut self, vm: &str, customer_id: &str, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut text = Vec::new();
        let mut sized = Vec::with_capacity(records.len());
        for record in records {
            let line = encode_line(customer_id, record)?;
            sized.push((*record, line.len() as u64));
            text.extend_from_slice(&line);
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.queue_path(vm))?;
        file.write_all(&text)?;
        file.sync_data()?;
        let queue = self.queues.entry(vm.to_owned()).or_default();
        queue.customer_id = customer_id.to_owned();
        for (record, size) in sized {
            queue.bytes += size;
            self.total_bytes += size;
            queue.records.push_back((record, size));
        }
        self.enforce_bound()
    }

    /// VMs with something to send.
    pub fn pending_vms(&self) -> Vec<String> {
        self.queues
            .iter()
            .filter(|(_, q)| !q.records.is_empty())
            .map(|(vm, _)| vm.clone())
            .collect()
    }

    /// The next thing to send for a VM (at most `max_batch` samples), with its customer.
    pub fn head(&self, vm: &str, max_batch: usize) -> Option<(String, Head)> {
        let queue = self.queues.get(vm)?;
        let (first, _) = queue.records.front()?;
        let head = match first {
            Record::Started { start_nanos } => Head::Started(*start_nanos),
            Record::Stopped { stop_nanos } => Head::Stopped(*stop_nanos),
            Record::Sample { .. } => Head::Samples(
                queue
                    .records
                    .iter()
                    .map_while(|(r, _)| match r {
                        Record::Sample { sample } => Some(*sample),
                        _ => None,
                    })
                    .take(max_batch)
                    .collect(),
            ),
        };
        Some((queue.customer_id.clone(), head))
    }

    /// billaged acknowledged the first `n` records of a VM.
    pub fn ack(&mut self, vm: &str, n: usize) -> io::Result<()> {
        let Some(queue) = self.queues.get_mut(vm) else {
            return Ok(());
        };
        for _ in 0..n {
            let Some((record, size)) = queue.records.pop_front() else {
                break;
            };
            if let Record::Sample { sample } = record {
                self.last_sent.insert(vm.to_owned(), sample.timestamp_nanos);
            }
            queue.bytes -= size;
            self.total_bytes -= size;
        }
        self.rewrite(vm)
    }

    /// billaged refused the first `n` records as invalid: keep them aside, never resend.
    pub fn reject(&mut self, vm: &str, n: usize, reason: &str) -> io::Result<()> {
        if let Some(queue) = self.queues.get(vm) {
            let mut text = Vec::new();
            for (record, _) in queue.records.iter().take(n) {
                text.extend_from_slice(&encode_line(&queue.customer_id, record)?);
            }
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("rejected").join(format!("{vm}.jsonl")))?;
            writeln!(file, "# rejected: {}", reason.replace('\n', " "))?;
            file.write_all(&text)?;
            file.sync_data()?;
        }
        self.rejected_batches += 1;
        self.ack(vm, n)
    }

    pub fn depth(&self) -> usize {
        self.queues.values().map(|q| q.records.len()).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Timestamp of the oldest record waiting.
    pub fn oldest_nanos(&self) -> Option<i64> {
        self.queues
            .values()
            .filter_map(|q| q.records.front().map(|(r, _)| r.timestamp()))
            .min()
    }

    pub fn metered(&self) -> &BTreeMap<String, Metered> {
        &self.metered
    }

    /// Records the VM as announced (or no longer announced), durably.
    pub fn set_metered(&mut self, vm: &str, entry: Option<Metered>) -> io::Result<()> {
        match entry {
            Some(m) => self.metered.insert(vm.to_owned(), m),
            None => self.metered.remove(vm),
        };
        write_json(&self.dir.join("metered.json"), &self.metered)
    }

    /// Notes that a VM's delivery was interrupted (kept from the first interruption).
    pub fn mark_gap(&mut self, vm: &str) -> io::Result<()> {
        if self.gaps.contains_key(vm) {
            return Ok(());
        }
        let customer_id = self
            .queues
            .get(vm)
            .map(|q| q.customer_id.clone())
            .unwrap_or_default();
        // The last sample billaged took; after a restart the VM's start is the best bound known.
        let last_sent_nanos = self
            .last_sent
            .get(vm)
            .copied()
            .or_else(|| self.metered.get(vm).map(|m| m.start_nanos))
            .or_else(|| {
                self.queues
                    .get(vm)
                    .and_then(|q| q.records.front())
                    .map(|(r, _)| r.timestamp())
            })
            .unwrap_or(0);
        self.gaps.insert(
            vm.to_owned(),
            Gap {
                customer_id,
                last_sent_nanos,
            },
        );
        write_json(&self.dir.join("gaps.json"), &self.gaps)
    }

    /// Gaps whose VM has nothing left to replay: NotifyPossibleGap can go now.
    pub fn due_gaps(&self) -> Vec<(String, Gap)> {
        self.gaps
            .iter()
            .filter(|(vm, _)| self.queues.get(*vm).is_none_or(|q| q.records.is_empty()))
            .map(|(vm, g)| (vm.clone(), g.clone()))
            .collect()
    }

    pub fn clear_gap(&mut self, vm: &str) -> io::Result<()> {
        if self.gaps.remove(vm).is_some() {
            write_json(&self.dir.join("gaps.json"), &self.gaps)?;
        }
        Ok(())
    }

    pub fn has_gaps(&self) -> bool {
        !self.gaps.is_empty()
    }

    /// Keeps the spool under its bound: first by thinning runs of samples (lossless for the
    /// cumulative counters), only then by dropping the oldest samples, counted.
    fn enforce_bound(&mut self) -> io::Result<()> {
        while self.total_bytes > self.max_bytes {
            let candidates: Vec<String> = {
                let mut v: Vec<(&String, usize)> = self
                    .queues
                    .iter()
                    .map(|(vm, q)| (vm, q.records.len()))
                    .collect();
                v.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
                v.into_iter().map(|(vm, _)| vm.clone()).collect()
            };
            let mut thinned = false;
            for vm in &candidates {
                if self.thin(vm) {
                    self.rewrite(vm)?;
                    thinned = true;
                    break;
                }
            }
            if thinned {
                continue;
            }
            // Nothing can be thinned: the oldest sample of the largest queue goes.
            let Some(vm) = candidates.first().cloned() else {
                break;
            };
            let Some(queue) = self.queues.get_mut(&vm) else {
                break;
            };
            let Some(pos) = queue
                .records
                .iter()
                .position(|(r, _)| matches!(r, Record::Sample { .. }))
            else {
                break;
            };
            if let Some((_, size)) = queue.records.remove(pos) {
                queue.bytes -= size;
                self.total_bytes -= size;
                self.dropped_samples += 1;
                tracing::error!(
                    vm,
                    "billing spool full: dropped a sample that could not be compacted"
                );
            }
            self.rewrite(&vm)?;
        }
        Ok(())
    }

    /// Removes every other sample whose neighbours are samples with counters that do not go
    /// down across it: the usage between the kept neighbours is unchanged (only memory loses
    /// resolution). Returns whether anything was removed.
    fn thin(&mut self, vm: &str) -> bool {
        let Some(queue) = self.queues.get_mut(vm) else {
            return false;
        };
        let records: Vec<(Record, u64)> = queue.records.drain(..).collect();
        let mut kept: VecDeque<(Record, u64)> = VecDeque::with_capacity(records.len());
        let mut removed_bytes = 0u64;
        let mut skip_next_candidate = false;
        for i in 0..records.len() {
            let (record, size) = records[i];
            let removable = match (kept.back(), record, records.get(i + 1)) {
                (
                    Some((Record::Sample { sample: prev }, _)),
                    Record::Sample { sample: cur },
                    Some((Record::Sample { sample: next }, _)),
                ) => prev.precedes_monotonically(&cur) && cur.precedes_monotonically(next),
                _ => false,
            };
            if removable && !skip_next_candidate {
                removed_bytes += size;
                skip_next_candidate = true;
            } else {
                if removable {
                    skip_next_candidate = false;
                }
                kept.push_back((record, size));
            }
        }
        queue.records = kept;
        queue.bytes -= removed_bytes;
        self.total_bytes -= removed_bytes;
        removed_bytes > 0
    }

    /// Writes a VM's queue file anew from memory (or removes it when empty).
    fn rewrite(&mut self, vm: &str) -> io::Result<()> {
        let path = self.queue_path(vm);
        let Some(queue) = self.queues.get(vm) else {
            return Ok(());
        };
        if queue.records.is_empty() {
            self.queues.remove(vm);
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let mut text = Vec::with_capacity(queue.bytes as usize);
        for (record, _) in &queue.records {
            text.extend_from_slice(&encode_line(&queue.customer_id, record)?);
        }
        write_atomically(&path, &text)
    }
}

fn encode_line(customer_id: &str, record: &Record) -> io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(&Line {
        customer_id: customer_id.to_owned(),
        record: *record,
    })?;
    line.push(b'\n');
    Ok(line)
}

/// Loads a queue file; `false` when its tail was damaged (and dropped).
fn load_queue(path: &Path) -> io::Result<(Queue, bool)> {
    let mut queue = Queue::default();
    let mut clean = true;
    for line in io::BufReader::new(File::open(path)?).lines() {
        let line = line?;
        match serde_json::from_str::<Line>(&line) {
            Ok(l) => {
                let size = line.len() as u64 + 1;
                queue.customer_id = l.customer_id;
                queue.bytes += size;
                queue.records.push_back((l.record, size));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "billing spool: dropping a damaged line (interrupted write)");
                clean = false;
            }
        }
    }
    Ok((queue, clean))
}

fn read_json<T: serde::de::DeserializeOwned + Default>(path: &Path) -> io::Result<T> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    write_atomically(path, &serde_json::to_vec_pretty(value)?)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: i64, cpu: i64) -> Record {
        Record::Sample {
            sample: Sample {
                timestamp_nanos: t,
                cpu_time_nanos: cpu,
                memory_usage_bytes: 1000 + t,
                disk_read_bytes: cpu / 2,
                disk_write_bytes: cpu / 3,
                network_rx_bytes: cpu / 4,
                network_tx_bytes: cpu / 5,
            },
        }
    }

    fn samples_of(spool: &Spool, vm: &str) -> Vec<Record> {
        spool
            .queues
            .get(vm)
            .map(|q| q.records.iter().map(|(r, _)| *r).collect())
            .unwrap_or_default()
    }

    #[test]
    fn records_survive_reopen_in_order_and_leave_on_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool
            .append(
                "vm-a",
                "alice",
                &[
                    Record::Started { start_nanos: 1 },
                    sample(2, 10),
                    sample(3, 20),
                ],
            )
            .unwrap();
        spool
            .append("vm-a", "alice", &[Record::Stopped { stop_nanos: 4 }])
            .unwrap();
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.depth(), 4);
        assert_eq!(
            spool.head("vm-a", 100),
            Some(("alice".into(), Head::Started(1)))
        );
        spool.ack("vm-a", 1).unwrap();
        let (_, head) = spool.head("vm-a", 100).unwrap();
        assert_eq!(head.len(), 2, "consecutive samples batch together");
        spool.ack("vm-a", 2).unwrap();
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            spool.head("vm-a", 100),
            Some(("alice".into(), Head::Stopped(4)))
        );
        spool.ack("vm-a", 1).unwrap();
        assert_eq!(spool.depth(), 0);
        assert!(!dir.path().join("queue/vm-a.jsonl").exists());
    }

    #[test]
    fn a_torn_last_line_is_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool
            .append("vm-a", "alice", &[sample(1, 1), sample(2, 2)])
            .unwrap();
        drop(spool);
        let path = dir.path().join("queue/vm-a.jsonl");
        let mut text = fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"customer_id\":\"alice\",\"rec");
        fs::write(&path, text).unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.depth(), 2);
    }

    #[test]
    fn compaction_keeps_usage_totals_and_counter_resets() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 4096).unwrap();
        let mut records = vec![Record::Started { start_nanos: 0 }];
        // 40 samples, a container restart (counters reset) in the middle.
        for t in 1..=20 {
            records.push(sample(t, t * 100));
        }
        for t in 21..=40 {
            records.push(sample(t, (t - 20) * 7));
        }
        records.push(Record::Stopped { stop_nanos: 41 });
        for r in &records {
            spool
                .append("vm-a", "alice", std::slice::from_ref(r))
                .unwrap();
        }
        assert!(spool.bytes() <= 4096, "{} bytes", spool.bytes());
        assert_eq!(spool.dropped_samples, 0);
        let kept = samples_of(&spool, "vm-a");
        assert!(kept.len() < records.len());
        assert_eq!(kept.first(), records.first());
        assert_eq!(kept.last(), records.last());
        // Usage per run (last - first) is unchanged, and the samples around the reset stay.
        let cpu: Vec<i64> = kept
            .iter()
            .filter_map(|r| {
                if let Record::Sample { sample } = r {
                    Some(sample.cpu_time_nanos)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(cpu.first(), Some(&100));
        assert!(
            cpu.contains(&2000),
            "last sample before the reset kept: {cpu:?}"
        );
        assert!(
            cpu.contains(&7),
            "first sample after the reset kept: {cpu:?}"
        );
        assert_eq!(cpu.last(), Some(&140));
        assert!(
            cpu.windows(2).filter(|w| w[1] < w[0]).count() == 1,
            "exactly one reset: {cpu:?}"
        );
    }

    #[test]
    fn over_the_bound_with_nothing_to_thin_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 4096).unwrap();
        // Every sample resets the counters: none can be thinned.
        for t in 0..60 {
            spool
                .append(
                    "vm-a",
                    "alice",
                    &[sample(t, if t % 2 == 0 { 100 } else { 1 })],
                )
                .unwrap();
        }
        assert!(spool.bytes() <= 4096);
        assert!(spool.dropped_samples > 0);
    }

    #[test]
    fn rejected_records_are_set_aside_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool
            .append("vm-a", "alice", &[sample(1, 1), sample(2, 2)])
            .unwrap();
        spool.reject("vm-a", 2, "invalid_argument: bad").unwrap();
        assert_eq!(spool.depth(), 0);
        assert_eq!(spool.rejected_batches, 1);
        let aside = fs::read_to_string(dir.path().join("rejected/vm-a.jsonl")).unwrap();
        assert_eq!(aside.lines().count(), 3);
    }

    #[test]
    fn gaps_wait_for_the_replay_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append("vm-a", "alice", &[sample(5, 1)]).unwrap();
        spool.mark_gap("vm-a").unwrap();
        assert!(spool.due_gaps().is_empty(), "replay first");
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.ack("vm-a", 1).unwrap();
        let due = spool.due_gaps();
        assert_eq!(
            due,
            vec![(
                "vm-a".into(),
                Gap {
                    customer_id: "alice".into(),
                    last_sent_nanos: 5
                }
            )]
        );
        spool.clear_gap("vm-a").unwrap();
        assert!(!spool.has_gaps());
        spool
            .set_metered(
                "vm-a",
                Some(Metered {
                    customer_id: "alice".into(),
                    start_nanos: 1,
                }),
            )
            .unwrap();
        drop(spool);
        assert_eq!(Spool::open(dir.path(), 1 << 20).unwrap().metered().len(), 1);
    }
}
