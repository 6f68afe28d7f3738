//! The reaper (spec §6 seed rule): a container named like one of this scope's VMs but without
//! valid labels is the leftover of an interrupted create, and is removed, but only if it
//! never ran. A container that ran held someone's workload, and whatever it is, deleting it
//! is not metald's call: such containers, and the old service's (its compat labels only),
//! are left alone and logged once each.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::backend::{self, labels, Listed};
use crate::service::VmService;

/// Containers already reported as left alone, so each re-list does not report them again.
#[derive(Default)]
pub(super) struct LeftAlone(Mutex<HashSet<String>>);

impl LeftAlone {
    /// True the first time `id` is seen.
    fn first(&self, id: &str) -> bool {
        let mut seen = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        seen.insert(id.to_owned())
    }
}

/// What the reaper does with a container named like one of this scope's VMs, judging by the
/// listing alone.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A valid VM (of this scope or, for the default scope's shorter prefix, another).
    Vm,
    /// Another scope's: its own instance decides.
    OtherScope,
    /// The service we replace made it.
    Legacy,
    /// No valid labels, and it has run: not a create that never finished.
    HasRun(String),
    /// No valid labels and never started, as listed (an inspect confirms before removing).
    Leftover(String),
}

fn verdict(c: &Listed, scope: &str) -> Verdict {
    let why = match backend::VmLabels::from_map(&c.labels) {
        Ok(_) => return Verdict::Vm,
        Err(why) => why,
    };
    if labels::is_legacy(&c.labels) {
        return Verdict::Legacy;
    }
    // The default scope's names are a prefix of every scope's: a container that says it
    // belongs to another scope is that scope's to reap.
    if c.labels.get(labels::SCOPE).is_some_and(|s| s != scope) {
        return Verdict::OtherScope;
    }
    if c.status == "created" {
        Verdict::Leftover(why)
    } else {
        Verdict::HasRun(why)
    }
}

/// One pass over this scope's names. `Err` only when the engine is gone.
pub(super) async fn reap(
    service: &VmService,
    left_alone: &LeftAlone,
) -> Result<(), backend::Error> {
    let backend = service.backend();
    for c in backend
        .list_named(&labels::name_prefix(service.scope()))
        .await?
    {
        let why = match verdict(&c, service.scope()) {
            Verdict::Vm | Verdict::OtherScope => continue,
            Verdict::Legacy => {
                if left_alone.first(&c.id) {
                    tracing::warn!(
                        container = c.name,
                        container_id = c.id,
                        vm_id = c.labels.get(labels::VM_ID).map(String::as_str).unwrap_or(""),
                        "a container of the service metald replaces (compat labels only): not managed, not removed"
                    );
                }
                continue;
            }
            Verdict::HasRun(why) => {
                if left_alone.first(&c.id) {
                    tracing::warn!(
                        container = c.name,
                        container_id = c.id,
                        status = c.status,
                        reason = why,
                        "a container named like a VM has no valid labels but has run: left alone"
                    );
                }
                continue;
            }
            Verdict::Leftover(why) => why,
        };
        // The listing shows no start time: an inspect does, and it is the one that counts
        // (a failed start also leaves `created`, with a start time of zero).
        match backend.inspect(&c.id).await {
            Ok(view) if view.status == "created" && view.started_at.is_none() => {}
            Ok(_) => continue,
            Err(e) if e.is_not_found() => continue,
            Err(e) => {
                if e.is_unavailable() && backend.ping().await.is_err() {
                    return Err(e);
                }
                tracing::warn!(container = c.name, error = %e, "could not inspect a possible leftover container; passing over it");
                continue;
            }
        }
        tracing::warn!(
            container = c.name,
            container_id = c.id,
            reason = why,
            "removing leftover container of an interrupted create (never started)"
        );
        if let Err(e) = backend.remove(&c.id, true).await {
            if e.is_unavailable() && backend.ping().await.is_err() {
                return Err(e);
            }
            if !e.is_not_found() {
                tracing::warn!(container = c.name, error = %e, "could not remove leftover container; passing over it");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn listed(status: &str, labels: &[(&str, &str)]) -> Listed {
        Listed {
            id: "c".into(),
            name: "unkey-vm-s-x".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<HashMap<_, _>>(),
            status: status.into(),
        }
    }

    #[test]
    fn only_never_started_leftovers_of_this_scope_are_reaped() {
        assert!(matches!(
            verdict(&listed("created", &[]), "s"),
            Verdict::Leftover(_)
        ));
        assert!(matches!(
            verdict(&listed("exited", &[]), "s"),
            Verdict::HasRun(_)
        ));
        assert!(matches!(
            verdict(&listed("running", &[]), "s"),
            Verdict::HasRun(_)
        ));
        let other = [(labels::SCOPE, "t")];
        assert_eq!(
            verdict(&listed("created", &other), "s"),
            Verdict::OtherScope
        );
    }

    #[test]
    fn the_old_services_containers_are_never_reaped() {
        let compat = [
            (labels::VM_ID, "ud-1"),
            (labels::CREATED_BY, labels::CREATED_BY_VALUE),
        ];
        assert_eq!(
            verdict(&listed("created", &compat), "default"),
            Verdict::Legacy
        );
        assert_eq!(verdict(&listed("exited", &compat), "s"), Verdict::Legacy);
    }

    #[test]
    fn valid_vms_are_not_leftovers() {
        let vm = backend::VmLabels {
            vm_id: "vm-1".into(),
            scope: "s".into(),
            customer_id: "c".into(),
            config: vec![],
            created_at_nanos: 1,
        }
        .to_map();
        let mut c = listed("created", &[]);
        c.labels = vm;
        assert_eq!(verdict(&c, "s"), Verdict::Vm);
    }
}
