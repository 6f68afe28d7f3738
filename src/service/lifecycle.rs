//! Boot, Shutdown, Pause, Resume, Reboot, Delete (spec §4.2): one operation at a time per VM,
//! under the VM's op lock, planned by `vm::state` on a fresh observation.
//!
//! Force means now (spec §5.1). A graceful stop or reboot holds the op lock for its whole
//! grace (up to `UNKEY_METALD_MAX_GRACE`); a DeleteVm(force) or ShutdownVm(force) does not
//! queue behind that: once the caller is authorized and the VM known, it kills the container
//! at once, then takes the lock and plans on a fresh observation as usual (delete → remove,
//! shutdown → already SHUTDOWN, a no-op). The lock model is unchanged; the kill is the only
//! thing done outside it, and it is what the force op would do anyway. The races, as thought
//! through:
//! - The VM being created: it is not in the index (→ `not_found`) or CREATED with no
//!   operation on it, so there is no grace to cut short.
//! - A Boot queued behind the graceful stop: the lock is FIFO, so the stop ends (SHUTDOWN),
//!   the Boot starts the VM, and the force op, last in line, kills or removes it on its fresh
//!   observation: the serial order holds, the force op waits only for the Boot's start.
//! - A graceful stop queued ahead of the force op behind some short operation: when it begins
//!   its grace it says so (`VmSlot::begin_grace`), and the waiting force op kills then.
//! - A graceful reboot: Docker's restart is stop-then-start, so a kill during its grace ends
//!   the stop early and the VM starts again (the reboot answers RUNNING, which is true); the
//!   force op then finds it RUNNING and kills or removes it.
//! - Short holders (a start, pause, inspect, remove, an event's refresh) are waited for, not
//!   raced: a kill is sent only while a grace wait is in progress, never to a VM that some
//!   other operation is in the middle of changing quickly.
//! - PAUSED: the early kill is the same call ShutdownVm(force) makes on a paused VM.
//! - The kill finds nothing to kill (the stop just ended, the VM was removed, the container
//!   was replaced): its error is logged and ignored; the locked step decides the answer.
//! - The graceful call itself answers what it then sees: its stop returns once the container
//!   is down, it inspects (SHUTDOWN) while still holding the lock, and only after it does the
//!   force delete remove the VM; so it answers SHUTDOWN, never `not_found`.

use super::{authorize, validate, Caller, Error, VmService};
use crate::backend;
use crate::vm::index::VmSlot;
use crate::vm::state::{self, Action, Op};
use crate::vm::{VmId, VmState};

impl VmService {
    /// Boot, Shutdown, Pause, Resume, Reboot, Delete: one lifecycle operation, serialised with
    /// every other operation on the same VM. Returns the state after it (`None` once deleted).
    pub async fn apply(
        &self,
        caller: &Caller,
        vm_id: &str,
        op: Op,
    ) -> Result<Option<VmState>, Error> {
        let id = validate::existing_vm_id(vm_id)?;
        let op = self.bounded(op)?;
        self.require_docker()?;
        let slot = self
            .index
            .get(&id)
            .ok_or_else(|| Error::vm_not_found(vm_id))?;
        authorize(caller, &slot.snapshot())?;

        let _serialised = if kills_at_once(op) {
            self.lock_cutting_grace(&slot).await
        } else {
            slot.op_lock.lock().await
        };
        if slot.is_removed() {
            return Err(Error::vm_not_found(vm_id));
        }
        let container_id = slot.snapshot().container_id.clone();
        // Plan on a fresh observation, not on what the index last heard.
        let current = self.refresh_locked(&id, &container_id).await?;
        let action = state::plan(current.state, op)
            .map_err(|r| Error::FailedPrecondition(format!("vm {vm_id}: {r}")))?;
        let expected = state::state_after(current.state, action);
        if action == Action::NoOp {
            return Ok(Some(current.state));
        }
        // Usage up to this moment is billed before the counters go away with the process.
        if let (Some(billing), true) = (&self.billing, ends_process(action)) {
            billing.final_sample(&current).await;
        }
        // A wait out of a grace period is announced, so a force op does not wait it out too.
        let waits_grace = matches!(
            action,
            Action::Stop { .. } | Action::Restart { grace: Some(_) }
        );
        let grace_wait = waits_grace.then(|| slot.begin_grace());
        let result = self.execute(&container_id, action).await;
        drop(grace_wait);
        match result {
            Ok(()) => {}
            Err(e) if e.kind == backend::ErrorKind::NotModified => {}
            // A 404 may be about the container or about something it needs (its network,
            // removed or never there): only a container that is really gone is a VM gone.
            Err(e) if e.is_not_found() => {
                self.refresh_locked(&id, &container_id).await?;
                return Err(Error::FailedPrecondition(format!("vm {vm_id}: {e}")));
            }
            // Docker disagrees about the state (it changed behind our back): look again; if it
            // is already where we were going, the operation is done.
            Err(e) if matches!(e.kind, backend::ErrorKind::Conflict(_)) => {
                let now = self.refresh_locked(&id, &container_id).await?;
                if Some(now.state) != expected {
                    return Err(Error::from_backend(vm_id, e));
                }
            }
            Err(e) => return Err(Error::from_backend(vm_id, e)),
        }
        if expected.is_none() {
            self.index.remove(&id, Some(&container_id));
            tracing::info!(vm_id, container_id, "vm deleted");
            return Ok(None);
        }
        let after = self.refresh_locked(&id, &container_id).await?;
        tracing::info!(vm_id, op = op.name(), state = %after.state, "vm operation done");
        Ok(Some(after.state))
    }

    /// The grace cap (spec §5.1), before anything touches the engine.
    fn bounded(&self, op: Op) -> Result<Op, Error> {
        let limits = &self.limits;
        Ok(match op {
            Op::Shutdown { grace: Some(g) } => Op::Shutdown {
                grace: Some(validate::bounded_grace(g, "timeout_seconds", limits)?),
            },
            Op::Reboot { grace: Some(g) } => Op::Reboot {
                grace: Some(validate::bounded_grace(g, "grace", limits)?),
            },
            other => other,
        })
    }

    /// Takes the VM's op lock for a force op; while waiting for it, kills the container
    /// whenever the holder is waiting out a grace period (see the module comment).
    async fn lock_cutting_grace<'a>(&self, slot: &'a VmSlot) -> tokio::sync::MutexGuard<'a, ()> {
        // Polled once before anything else, so this op joins the lock's queue (it is fair) at
        // its arrival; the future is kept across the loop to keep that place.
        let lock = slot.op_lock.lock();
        tokio::pin!(lock);
        if let std::task::Poll::Ready(free) = futures::poll!(&mut lock) {
            return free;
        }
        let mut killed: Option<u64> = None;
        loop {
            // Enabled before the check: a grace wait that begins after the check still wakes us.
            let started = slot.grace_started();
            tokio::pin!(started);
            started.as_mut().enable();
            if let Some(wait) = slot.grace_wait().filter(|w| killed != Some(*w)) {
                killed = Some(wait);
                self.kill_now(slot).await;
            }
            tokio::select! {
                biased;
                guard = &mut lock => return guard,
                () = &mut started => {}
            }
        }
    }

    /// The force op's kill while another operation holds the VM: last billing sample
    /// (bounded), then SIGKILL. Failures are logged only; the locked step decides the answer.
    async fn kill_now(&self, slot: &VmSlot) {
        let vm = slot.snapshot();
        if let Some(billing) = &self.billing {
            billing.final_sample(&vm).await;
        }
        match self.backend.kill(&vm.container_id).await {
            Ok(()) => {
                tracing::info!(vm_id = %vm.vm_id, "force: killed during another operation's grace period")
            }
            Err(e) => {
                tracing::info!(vm_id = %vm.vm_id, error = %e, "force: nothing to kill during the grace period")
            }
        }
    }

    async fn execute(&self, container: &str, action: Action) -> Result<(), backend::Error> {
        match action {
            Action::Start => self.backend.start(container).await,
            Action::Stop { grace } => self.backend.stop(container, grace).await,
            Action::Kill => self.backend.kill(container).await,
            Action::Pause => self.backend.pause(container).await,
            Action::Unpause => self.backend.unpause(container).await,
            Action::Restart { grace } => self.backend.restart(container, grace).await,
            Action::Remove { force } => self.backend.remove(container, force).await,
            Action::NoOp => Ok(()),
        }
    }

    /// Inspects a VM's container and records what it is now. Caller holds the VM's op lock.
    pub(super) async fn refresh_locked(
        &self,
        id: &VmId,
        container_id: &str,
    ) -> Result<std::sync::Arc<crate::vm::VmSnapshot>, Error> {
        match self.observe(id.as_str(), container_id).await {
            Ok(snapshot) => Ok(self.index.upsert(snapshot).snapshot()),
            Err(Error::NotFound(_)) => {
                self.index.remove(id, Some(container_id));
                Err(Error::vm_not_found(id.as_str()))
            }
            Err(e) => Err(e),
        }
    }
}

/// DeleteVm(force) and ShutdownVm(force): the operations that kill at once (spec §5.1).
fn kills_at_once(op: Op) -> bool {
    matches!(
        op,
        Op::Delete { force: true } | Op::Shutdown { grace: None }
    )
}

/// Actions after which the container's processes (and counters) are gone.
fn ends_process(action: Action) -> bool {
    matches!(
        action,
        Action::Stop { .. }
            | Action::Kill
            | Action::Restart { .. }
            | Action::Remove { force: true }
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::service::tests::{caller, service};

    #[tokio::test]
    async fn grace_above_the_cap_is_refused_before_the_engine() {
        // The service's socket does not exist: an answer other than invalid_argument would
        // mean the engine was asked first.
        let svc = service();
        for op in [
            Op::Shutdown {
                grace: Some(Duration::from_secs(301)),
            },
            Op::Reboot {
                grace: Some(Duration::from_secs(301)),
            },
        ] {
            match svc.apply(&caller(), "vm-x", op).await {
                Err(Error::InvalidArgument(m)) => {
                    assert!(m.contains("301 s"), "{m}");
                    assert!(m.contains("UNKEY_METALD_MAX_GRACE"), "{m}");
                }
                other => panic!("{op:?}: {other:?}"),
            }
        }
        // At the cap, and force (no grace), pass the cap and meet the engine's absence.
        for op in [
            Op::Reboot {
                grace: Some(Duration::from_secs(300)),
            },
            Op::Shutdown { grace: None },
        ] {
            assert!(
                matches!(
                    svc.apply(&caller(), "vm-x", op).await,
                    Err(Error::Unavailable(_))
                ),
                "{op:?}"
            );
        }
    }

    #[test]
    fn only_force_stop_and_force_delete_kill_at_once() {
        assert!(kills_at_once(Op::Delete { force: true }));
        assert!(kills_at_once(Op::Shutdown { grace: None }));
        assert!(!kills_at_once(Op::Delete { force: false }));
        assert!(!kills_at_once(Op::Reboot { grace: None }));
        assert!(!kills_at_once(Op::Shutdown {
            grace: Some(Duration::from_secs(1))
        }));
    }
}
