//! Live VMs per customer (spec §5.1, `UNKEY_METALD_MAX_VMS_PER_CUSTOMER`).
//!
//! A customer's count is its VMs in the index (every state; a deleted VM has left it) plus its
//! creates in flight, so concurrent creates cannot overshoot: each create reserves its vm_id
//! before it touches the engine and holds the reservation until it ends, either way. An id
//! counts once whether it is reserved, in the index, or both (a create's VM enters the index,
//! by its own insert or by its create event, before its reservation goes), so the count never
//! doubles a VM. Checking and reserving happen under one mutex, so two creates cannot both
//! see room for one.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{validate, Error, Limits};
use crate::vm::index::VmIndex;
use crate::vm::VmId;

/// Creates in flight: customer → vm_id → how many creates of that id (a caller-named id may
/// be retried while its first try runs).
#[derive(Debug, Default)]
pub(super) struct Quota {
    in_flight: Mutex<HashMap<String, HashMap<VmId, usize>>>,
}

/// One create's place in its customer's count; given back when dropped.
#[derive(Debug)]
pub(super) struct Reservation<'a> {
    quota: &'a Quota,
    customer: String,
    id: VmId,
}

impl Quota {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<VmId, usize>>> {
        match self.in_flight.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Reserves `id` for `customer`, or refuses with `resource_exhausted` when the customer
    /// would have more VMs than the cap. `None` when there is no cap (nothing to count).
    pub(super) fn reserve(
        &self,
        index: &VmIndex,
        customer: &str,
        id: &VmId,
        limits: &Limits,
    ) -> Result<Option<Reservation<'_>>, Error> {
        if limits.max_vms_per_customer == 0 {
            return Ok(None);
        }
        let mut in_flight = self.lock();
        let mine = in_flight.entry(customer.to_owned()).or_default();
        // Reserved ids not yet in the index, this one included (once).
        let pending = mine
            .keys()
            .filter(|reserved| *reserved != id)
            .chain(std::iter::once(id))
            .filter(|reserved| !index.contains(reserved))
            .count();
        let count = index.count_of(customer) + pending;
        if let Err(e) = validate::vms_per_customer(customer, count, limits) {
            if mine.is_empty() {
                in_flight.remove(customer);
            }
            return Err(e);
        }
        *mine.entry(id.clone()).or_insert(0) += 1;
        Ok(Some(Reservation {
            quota: self,
            customer: customer.to_owned(),
            id: id.clone(),
        }))
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.quota.lock();
        let Some(mine) = in_flight.get_mut(&self.customer) else {
            return;
        };
        if let Some(n) = mine.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                mine.remove(&self.id);
            }
        }
        if mine.is_empty() {
            in_flight.remove(&self.customer);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::vm::{NetworkView, VmSnapshot, VmState};

    fn limits(max: usize) -> Limits {
        Limits {
            max_vms_per_customer: max,
            ..Limits::default()
        }
    }

    fn id(s: &str) -> VmId {
        VmId::parse(s).expect("id")
    }

    fn live(index: &VmIndex, vm: &str, customer: &str) {
        index.upsert(VmSnapshot {
            vm_id: id(vm),
            customer_id: customer.into(),
            config: Arc::default(),
            config_bytes: Arc::default(),
            created_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            container_id: format!("c-{vm}"),
            container_name: format!("unkey-vm-{vm}"),
            image: "img".into(),
            state: VmState::Created,
            docker_status: "created".into(),
            started_at: None,
            finished_at: None,
            exit_code: None,
            network: NetworkView::default(),
            modified_at: SystemTime::UNIX_EPOCH,
        });
    }

    fn refused(r: Result<Option<Reservation<'_>>, Error>) -> bool {
        matches!(r, Err(Error::ResourceExhausted(m)) if m.contains("UNKEY_METALD_MAX_VMS_PER_CUSTOMER"))
    }

    #[test]
    fn creates_in_flight_count_and_their_reservations_go_either_way() {
        let (quota, index, two) = (Quota::default(), VmIndex::default(), limits(2));
        live(&index, "a", "alice");
        let b = quota.reserve(&index, "alice", &id("b"), &two).unwrap();
        assert!(b.is_some());
        // a live, b in flight: a third is refused, another customer is not.
        assert!(refused(quota.reserve(&index, "alice", &id("c"), &two)));
        assert!(quota
            .reserve(&index, "bob", &id("x"), &two)
            .unwrap()
            .is_some());
        // A retry of the id in flight is the same VM, not one more.
        let b_again = quota.reserve(&index, "alice", &id("b"), &two).unwrap();
        // b made it into the index: counted once, not twice.
        live(&index, "b", "alice");
        assert!(refused(quota.reserve(&index, "alice", &id("c"), &two)));
        drop(b);
        drop(b_again);
        // b failed after all (removed): its room is back.
        index.remove(&id("b"), None);
        assert!(quota
            .reserve(&index, "alice", &id("c"), &two)
            .unwrap()
            .is_some());
        assert!(quota.is_empty(), "every reservation given back");
    }

    #[test]
    fn zero_means_no_limit() {
        let (quota, index) = (Quota::default(), VmIndex::default());
        for i in 0..5 {
            live(&index, &format!("v{i}"), "alice");
        }
        assert!(quota
            .reserve(&index, "alice", &id("more"), &limits(0))
            .unwrap()
            .is_none());
        assert!(refused(quota.reserve(
            &index,
            "alice",
            &id("more"),
            &limits(5)
        )));
    }
}
