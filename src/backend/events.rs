//! The container events metald follows, and only those: a VM can make Docker emit events at
//! will (`exec` in itself, a health check every second, resizes), and each one followed costs
//! an inspect. So the engine is asked for lifecycle actions only, and what arrives is checked
//! again here (an engine may ignore a filter it does not know).

use std::collections::HashMap;

use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptions;
use futures::{Stream, StreamExt, TryStreamExt};

use super::labels;
use super::{ContainerEvent, DockerBackend, Error};

/// The actions that change what the index records of a VM (its existence, state, start and
/// finish times, exit code, ports, name):
///
/// - `create`, `destroy`: a VM appears or goes (another instance of this scope, `docker rm`);
/// - `start`, `restart`, `die`, `stop`: it runs or ends (`die` is sent once the state says
///   exited; `stop` and `restart` close a stop or restart that Docker drove);
/// - `pause`, `unpause`: frozen or thawed;
/// - `rename`: its container name.
///
/// Left out on purpose: `kill` (a signal was sent; if it ends the process, `die` follows),
/// `oom` (the workload can trigger it over and over by allocating in a child; if the VM itself
/// ends, `die` follows), `update` (changes resources, none of which the index reads from
/// Docker), and everything a VM or a client can cause without changing its state: `exec_*`,
/// `health_status`, `attach`, `detach`, `resize`, `top`, `copy`, `export`, `commit`.
pub const LIFECYCLE_ACTIONS: [&str; 9] = [
    "create", "start", "restart", "die", "stop", "pause", "unpause", "destroy", "rename",
];

impl DockerBackend {
    /// Lifecycle events of VM containers since `since` (Unix seconds), as they happen.
    pub fn events(
        &self,
        since: i64,
    ) -> impl Stream<Item = Result<ContainerEvent, Error>> + Send + 'static {
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            (
                "label".to_owned(),
                vec![format!(
                    "{}={}",
                    labels::CREATED_BY,
                    labels::CREATED_BY_VALUE
                )],
            ),
            (
                "event".to_owned(),
                LIFECYCLE_ACTIONS.iter().map(|a| (*a).to_owned()).collect(),
            ),
        ]);
        let options = EventsOptions {
            since: Some(since.to_string()),
            filters: Some(filters),
            ..Default::default()
        };
        let docker = match self.docker() {
            Ok(docker) => docker,
            Err(e) => return futures::stream::once(async { Err(e) }).left_stream(),
        };
        docker
            .events(Some(options))
            .map_err(|e| Error::new("follow events", "", &e))
            .try_filter_map(|m| async move { Ok(event_of(m)) })
            .right_stream()
    }
}

/// The event, if it is a lifecycle event of a container that may be one of our VMs.
fn event_of(m: EventMessage) -> Option<ContainerEvent> {
    // "exec_start: sh" and the like carry a suffix after the action word.
    let action = m.action.unwrap_or_default();
    let action = action.split(':').next().unwrap_or_default().trim();
    if !LIFECYCLE_ACTIONS.contains(&action) {
        return None;
    }
    let actor = m.actor?;
    let attributes = actor.attributes.unwrap_or_default();
    // Docker copies the container's labels into the attributes. The old service's containers
    // are not ours to follow (spec §6): nothing to read, nothing to inspect.
    if labels::is_legacy(&attributes) {
        return None;
    }
    Some(ContainerEvent {
        container_id: actor.id?,
        vm_id: attributes.get(labels::VM_ID)?.clone(),
        scope: labels::scope_of(&attributes).to_owned(),
        action: action.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use bollard::models::EventActor;

    use super::*;

    fn message(action: &str, labels: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            action: Some(action.to_owned()),
            actor: Some(EventActor {
                id: Some("c1".to_owned()),
                attributes: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
            }),
            ..Default::default()
        }
    }

    const OURS: &[(&str, &str)] = &[
        (labels::VM_ID, "vm-1"),
        (labels::CREATED_BY, labels::CREATED_BY_VALUE),
        (labels::SCOPE, "s"),
        (labels::CUSTOMER, "c"),
    ];

    #[test]
    fn lifecycle_events_are_followed() {
        for action in LIFECYCLE_ACTIONS {
            let e = event_of(message(action, OURS)).expect(action);
            assert_eq!(
                (e.container_id.as_str(), e.vm_id.as_str(), e.scope.as_str()),
                ("c1", "vm-1", "s")
            );
            assert_eq!(e.action, action);
        }
    }

    #[test]
    fn what_a_vm_can_cause_at_will_is_not() {
        for action in [
            "exec_create: sh -c true",
            "exec_start: sh -c true",
            "exec_die",
            "health_status: healthy",
            "health_status: unhealthy",
            "attach",
            "resize",
            "top",
            "kill",
            "oom",
            "update",
        ] {
            assert_eq!(event_of(message(action, OURS)), None, "{action}");
        }
    }

    #[test]
    fn the_old_service_containers_are_not_followed() {
        let legacy = &[
            (labels::VM_ID, "vm-1"),
            (labels::CREATED_BY, labels::CREATED_BY_VALUE),
        ];
        assert_eq!(event_of(message("start", legacy)), None);
    }
}
