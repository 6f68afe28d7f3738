//! The index's rules: paging, tombstones, counting, grace waits.

use super::*;
use crate::vm::NetworkView;
use std::time::{Duration, SystemTime};

fn snap(id: &str, customer: &str, created_s: u64, state: VmState) -> VmSnapshot {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(created_s);
    VmSnapshot {
        vm_id: VmId::parse(id).unwrap(),
        customer_id: customer.into(),
        config: Arc::default(),
        config_bytes: Arc::default(),
        created_at: t,
        container_id: format!("c-{id}"),
        container_name: format!("unkey-vm-{id}"),
        image: "img".into(),
        state,
        docker_status: "created".into(),
        started_at: None,
        finished_at: None,
        exit_code: None,
        network: NetworkView::default(),
        modified_at: t,
    }
}

#[test]
fn lists_newest_first_with_stable_paging() {
    let index = VmIndex::default();
    for i in 0..7 {
        index.upsert(snap(&format!("vm{i}"), "alice", 100 + i, VmState::Created));
    }
    index.upsert(snap("other", "bob", 500, VmState::Created));
    let p1 = index.list("alice", &[], None, 3);
    assert_eq!(p1.total, 7);
    let ids: Vec<_> = p1.vms.iter().map(|s| s.vm_id.to_string()).collect();
    assert_eq!(ids, ["vm6", "vm5", "vm4"]);
    // A VM created between pages does not shift the next page.
    index.upsert(snap("vm9", "alice", 900, VmState::Created));
    let p2 = index.list("alice", &[], p1.next.as_ref(), 3);
    let ids: Vec<_> = p2.vms.iter().map(|s| s.vm_id.to_string()).collect();
    assert_eq!(ids, ["vm3", "vm2", "vm1"]);
    let p3 = index.list("alice", &[], p2.next.as_ref(), 3);
    assert_eq!(p3.vms.len(), 1);
    assert!(p3.next.is_none());
}

#[test]
fn a_removed_container_is_not_brought_back_by_a_late_observation() {
    let index = VmIndex::default();
    assert!(index.insert_new(snap("a", "alice", 1, VmState::Created)));
    // Already there: an insert of what the index has is refused, the slot kept.
    assert!(!index.insert_new(snap("a", "alice", 1, VmState::Running)));
    let id = VmId::parse("a").unwrap();
    assert!(index.remove(&id, Some("c-a")));
    assert!(!index.insert_new(snap("a", "alice", 1, VmState::Created)));
    assert!(index.get(&id).is_none());
    // A new container under the same id is a new VM.
    let mut again = snap("a", "alice", 2, VmState::Created);
    again.container_id = "c-a-2".into();
    assert!(index.insert_new(again));
}

#[test]
fn filters_by_state() {
    let index = VmIndex::default();
    index.upsert(snap("a", "c", 1, VmState::Running));
    index.upsert(snap("b", "c", 2, VmState::Paused));
    index.upsert(snap("d", "c", 3, VmState::Shutdown));
    let page = index.list("c", &[VmState::Running, VmState::Paused], None, 50);
    assert_eq!(page.total, 2);
}

#[test]
fn counts_a_customers_vms_until_removed() {
    let index = VmIndex::default();
    index.upsert(snap("a", "alice", 1, VmState::Running));
    index.upsert(snap("b", "alice", 2, VmState::Shutdown));
    index.upsert(snap("c", "bob", 3, VmState::Created));
    assert_eq!(index.count_of("alice"), 2);
    index.remove(&VmId::parse("b").unwrap(), None);
    assert_eq!(index.count_of("alice"), 1);
    assert_eq!(index.count_of("nobody"), 0);
}

#[tokio::test]
async fn a_grace_wait_is_seen_or_announced_and_ends_with_its_guard() {
    let index = VmIndex::default();
    let slot = index.upsert(snap("a", "c", 1, VmState::Running));
    assert_eq!(slot.grace_wait(), None);
    let started = slot.grace_started();
    tokio::pin!(started);
    started.as_mut().enable();
    let wait = slot.begin_grace();
    // Announced to a waiter enabled before it began, and visible to later lookers.
    tokio::time::timeout(std::time::Duration::from_millis(100), started)
        .await
        .expect("announced");
    let seq = slot.grace_wait().expect("in progress");
    drop(wait);
    assert_eq!(slot.grace_wait(), None);
    let next = slot.begin_grace();
    assert!(slot.grace_wait().is_some_and(|s| s > seq), "numbered anew");
    drop(next);
}

#[test]
fn remove_only_matching_container() {
    let index = VmIndex::default();
    let id = VmId::parse("a").unwrap();
    let slot = index.upsert(snap("a", "c", 1, VmState::Running));
    assert!(!index.remove(&id, Some("other-container")));
    assert!(index.get(&id).is_some());
    assert!(index.remove(&id, Some("c-a")));
    assert!(slot.is_removed());
    assert!(index.get(&id).is_none());
}
