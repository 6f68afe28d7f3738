//! The in-memory VM index: what Docker said last, keyed by vm_id.
//!
//! A cache rebuilt from container labels at start and kept true by the event follower; Docker
//! stays the only source of truth. The map lock is a `std::sync::RwLock` whose guard is never
//! held across an `.await`; each VM has its own async mutex held for one lifecycle operation,
//! so operations on one VM are serialised and operations on different VMs never wait on each
//! other. Readers (GetVmInfo, ListVms) take snapshots and never queue behind operations.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::{VmId, VmSnapshot, VmState};

/// One VM's place in the index.
#[derive(Debug)]
pub struct VmSlot {
    /// Held for the whole of one operation on this VM (including its Docker calls).
    pub op_lock: tokio::sync::Mutex<()>,
    snapshot: RwLock<Arc<VmSnapshot>>,
    /// Set when the VM is removed from the index, so an operation that waited on `op_lock`
    /// finds out the VM is gone instead of acting on a dead slot.
    removed: AtomicBool,
    /// The grace wait in progress under `op_lock` (a graceful stop or reboot), 0 = none: a
    /// force stop or delete does not queue behind it but kills at once (spec §5.1).
    grace_wait: AtomicU64,
    /// Numbers grace waits, so a force op kills once per wait.
    grace_seq: AtomicU64,
    /// Wakes force ops already waiting for `op_lock` when a grace wait begins.
    grace_started: tokio::sync::Notify,
}

/// A grace wait in progress on one VM; over when dropped (also when its task is cancelled).
pub struct GraceWait<'a> {
    slot: &'a VmSlot,
    seq: u64,
}

impl Drop for GraceWait<'_> {
    fn drop(&mut self) {
        let _ =
            self.slot
                .grace_wait
                .compare_exchange(self.seq, 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl VmSlot {
    fn new(snapshot: VmSnapshot) -> Self {
        Self {
            op_lock: tokio::sync::Mutex::new(()),
            snapshot: RwLock::new(Arc::new(snapshot)),
            removed: AtomicBool::new(false),
            grace_wait: AtomicU64::new(0),
            grace_seq: AtomicU64::new(0),
            grace_started: tokio::sync::Notify::new(),
        }
    }

    /// Marks the start of a wait out of a grace period by the holder of `op_lock`, and wakes
    /// the force ops waiting for that lock.
    pub fn begin_grace(&self) -> GraceWait<'_> {
        let seq = self.grace_seq.fetch_add(1, Ordering::AcqRel) + 1;
        self.grace_wait.store(seq, Ordering::Release);
        self.grace_started.notify_waiters();
        GraceWait { slot: self, seq }
    }

    /// The grace wait in progress, by number, if any.
    pub fn grace_wait(&self) -> Option<u64> {
        match self.grace_wait.load(Ordering::Acquire) {
            0 => None,
            seq => Some(seq),
        }
    }

    /// Resolves when a grace wait begins after this future was enabled (`Notified::enable`)
    /// or first polled: check `grace_wait` after enabling it, and no beginning is missed.
    pub fn grace_started(&self) -> tokio::sync::futures::Notified<'_> {
        self.grace_started.notified()
    }

    pub fn snapshot(&self) -> Arc<VmSnapshot> {
        match self.snapshot.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    fn set(&self, mut next: VmSnapshot) {
        let mut guard = match self.snapshot.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        // modified_at moves only when the state does (or Docker reports a later time).
        if next.state == guard.state {
            next.modified_at = next.modified_at.max(guard.modified_at);
        }
        *guard = Arc::new(next);
    }
}

/// How many removed containers the index remembers (see `VmIndex::insert_new`).
const TOMBSTONES: usize = 4096;

/// Container ids recently removed from the index, oldest first.
#[derive(Debug, Default)]
struct Tombstones {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl Tombstones {
    fn add(&mut self, container_id: &str) {
        if self.set.insert(container_id.to_owned()) {
            self.order.push_back(container_id.to_owned());
            if self.order.len() > TOMBSTONES {
                if let Some(oldest) = self.order.pop_front() {
                    self.set.remove(&oldest);
                }
            }
        }
    }
}

/// All VMs this instance manages.
#[derive(Debug, Default)]
pub struct VmIndex {
    slots: RwLock<HashMap<VmId, Arc<VmSlot>>>,
    /// Taken after `slots`, never alone across an insert.
    removed: Mutex<Tombstones>,
    /// Signalled when a VM appears, disappears or changes state (billing follows it).
    changes: tokio::sync::Notify,
}

/// One page of a listing.
#[derive(Debug)]
pub struct Page {
    pub vms: Vec<Arc<VmSnapshot>>,
    /// Set when more VMs follow: the position after the last VM of this page.
    pub next: Option<Cursor>,
    pub total: usize,
}

/// A position in the newest-first order: (created time in ns, vm_id) of the last VM served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_nanos: i64,
    pub vm_id: String,
}

impl VmIndex {
    pub fn get(&self, id: &VmId) -> Option<Arc<VmSlot>> {
        self.read().get(id).cloned()
    }

    /// Inserts or updates a VM from a fresh observation; returns its slot.
    pub fn upsert(&self, snapshot: VmSnapshot) -> Arc<VmSlot> {
        let mut map = self.write();
        match map.get(&snapshot.vm_id) {
            // A different container under the same id means the old one was replaced.
            Some(slot) if slot.snapshot().container_id == snapshot.container_id => {
                let changed = slot.snapshot().state != snapshot.state;
                slot.set(snapshot);
                if changed {
                    self.changes.notify_one();
                }
                slot.clone()
            }
            _ => {
                let id = snapshot.vm_id.clone();
                let slot = Arc::new(VmSlot::new(snapshot));
                if let Some(old) = map.insert(id, slot.clone()) {
                    old.removed.store(true, Ordering::Release);
                }
                self.changes.notify_one();
                slot
            }
        }
    }

    /// Adds a VM seen in Docker that the index does not have, unless the index has it by
    /// now or removed that very container: an observation made before a delete (an event's
    /// inspect still in flight) must not bring the deleted VM back.
    pub fn insert_new(&self, snapshot: VmSnapshot) -> bool {
        let mut map = self.write();
        if map.contains_key(&snapshot.vm_id)
            || self.tombstones().set.contains(&snapshot.container_id)
        {
            return false;
        }
        let id = snapshot.vm_id.clone();
        map.insert(id, Arc::new(VmSlot::new(snapshot)));
        self.changes.notify_one();
        true
    }

    fn tombstones(&self) -> std::sync::MutexGuard<'_, Tombstones> {
        match self.removed.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Removes a VM; only when `container_id` still matches (a late event about an old
    /// container must not remove its replacement). `None` removes unconditionally.
    pub fn remove(&self, id: &VmId, container_id: Option<&str>) -> bool {
        let mut map = self.write();
        let matches = match (map.get(id), container_id) {
            (Some(slot), Some(cid)) => slot.snapshot().container_id == cid,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if matches {
            if let Some(slot) = map.remove(id) {
                slot.removed.store(true, Ordering::Release);
                self.tombstones().add(&slot.snapshot().container_id);
                self.changes.notify_one();
            }
        }
        matches
    }

    /// Resolves after the next change of the set of VMs or of a VM's state.
    pub async fn changed(&self) {
        self.changes.notified().await
    }

    /// Every VM as last observed.
    pub fn snapshots(&self) -> Vec<Arc<VmSnapshot>> {
        self.read().values().map(|slot| slot.snapshot()).collect()
    }

    /// Ids of every VM, for reconciliation.
    pub fn ids(&self) -> Vec<VmId> {
        self.read().keys().cloned().collect()
    }

    /// How many VMs a customer has in the index (every state counts; deleted ones are gone).
    pub fn count_of(&self, customer_id: &str) -> usize {
        self.read()
            .values()
            .filter(|slot| slot.snapshot().customer_id == customer_id)
            .count()
    }

    pub fn contains(&self, id: &VmId) -> bool {
        self.read().contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts of VMs per state.
    pub fn count_by_state(&self) -> HashMap<VmState, usize> {
        let mut counts = HashMap::new();
        for slot in self.read().values() {
            *counts.entry(slot.snapshot().state).or_insert(0) += 1;
        }
        counts
    }

    /// A customer's VMs, newest first, filtered by state (empty filter = all), one page after
    /// `after`.
    pub fn list(
        &self,
        customer_id: &str,
        states: &[VmState],
        after: Option<&Cursor>,
        page_size: usize,
    ) -> Page {
        let mut matching: Vec<Arc<VmSnapshot>> = self
            .read()
            .values()
            .map(|slot| slot.snapshot())
            .filter(|s| s.customer_id == customer_id)
            .filter(|s| states.is_empty() || states.contains(&s.state))
            .collect();
        let total = matching.len();
        matching.sort_by(|a, b| sort_key(b).cmp(&sort_key(a)));
        let start = match after {
            None => 0,
            Some(c) => {
                let key = (c.created_nanos, c.vm_id.as_str());
                matching.partition_point(|s| sort_key(s) >= key)
            }
        };
        let end = (start + page_size).min(matching.len());
        let vms: Vec<_> = matching
            .get(start..end)
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        let next = if end < matching.len() {
            vms.last().map(|s| Cursor {
                created_nanos: super::unix_nanos(s.created_at),
                vm_id: s.vm_id.as_str().to_owned(),
            })
        } else {
            None
        };
        Page { vms, next, total }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<VmId, Arc<VmSlot>>> {
        match self.slots.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<VmId, Arc<VmSlot>>> {
        match self.slots.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

fn sort_key(s: &VmSnapshot) -> (i64, &str) {
    (super::unix_nanos(s.created_at), s.vm_id.as_str())
}

#[cfg(test)]
mod tests;
