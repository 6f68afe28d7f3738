//! The lifecycle of spec §4.2 as one pure table: (current state, operation) → action or
//! rejection. No I/O; the service executes the action on the backend.

use std::fmt;
use std::time::Duration;

/// A VM's lifecycle state, derived from Docker's container status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    Created,
    Running,
    Paused,
    Shutdown,
}

impl VmState {
    /// Docker's status word → state (spec §4.2). `removing` and unknown words count as
    /// SHUTDOWN: the container is not running and will not run again by itself.
    pub fn from_docker_status(status: &str) -> Self {
        match status {
            "created" => Self::Created,
            "running" | "restarting" => Self::Running,
            "paused" => Self::Paused,
            _ => Self::Shutdown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Created => "CREATED",
            Self::Running => "RUNNING",
            Self::Paused => "PAUSED",
            Self::Shutdown => "SHUTDOWN",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A lifecycle request, with its grace rules already resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Boot,
    /// `grace: None` = kill at once (force).
    Shutdown {
        grace: Option<Duration>,
    },
    Pause,
    Resume,
    Reboot {
        grace: Option<Duration>,
    },
    Delete {
        force: bool,
    },
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Boot => "boot",
            Op::Shutdown { .. } => "shutdown",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Reboot { .. } => "reboot",
            Op::Delete { .. } => "delete",
        }
    }
}

/// What to do on the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    /// Stop signal, then kill after the grace period.
    Stop {
        grace: Duration,
    },
    Kill,
    Pause,
    Unpause,
    /// Restart; `grace: None` = no grace.
    Restart {
        grace: Option<Duration>,
    },
    Remove {
        force: bool,
    },
    /// The VM is already where the operation would take it: answer success with this state.
    NoOp,
}

/// Why an operation is refused in the current state; becomes `failed_precondition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub state: VmState,
    pub op: Op,
    pub hint: &'static str,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot {} a VM in state {}: {}",
            self.op.name(),
            self.state,
            self.hint
        )
    }
}

/// The table of spec §4.2.
pub fn plan(state: VmState, op: Op) -> Result<Action, Rejection> {
    use VmState::*;
    let reject = |hint| Err(Rejection { state, op, hint });
    match (op, state) {
        (Op::Boot, Created | Shutdown) => Ok(Action::Start),
        (Op::Boot, Running) => Ok(Action::NoOp),
        (Op::Boot, Paused) => reject("it is paused; resume it instead"),

        (Op::Shutdown { .. }, Created) => reject("it was never booted"),
        (Op::Shutdown { grace: Some(grace) }, Running | Paused) => Ok(Action::Stop { grace }),
        (Op::Shutdown { grace: None }, Running | Paused) => Ok(Action::Kill),
        (Op::Shutdown { .. }, Shutdown) => Ok(Action::NoOp),

        (Op::Pause, Running) => Ok(Action::Pause),
        (Op::Pause, Paused) => Ok(Action::NoOp),
        (Op::Pause, Created) => reject("it was never booted"),
        (Op::Pause, Shutdown) => reject("it is shut down; boot it first"),

        (Op::Resume, Paused) => Ok(Action::Unpause),
        (Op::Resume, Running) => Ok(Action::NoOp),
        (Op::Resume, Created) => reject("it was never booted"),
        (Op::Resume, Shutdown) => reject("it is shut down; boot it instead"),

        (Op::Reboot { grace }, Running) => Ok(Action::Restart { grace }),
        (Op::Reboot { .. }, Created) => reject("it was never booted; boot it instead"),
        (Op::Reboot { .. }, Paused) => reject("it is paused; resume it first"),
        (Op::Reboot { .. }, Shutdown) => reject("it is shut down; boot it instead"),

        (Op::Delete { .. }, Created | Shutdown) => Ok(Action::Remove { force: false }),
        (Op::Delete { force: true }, Running | Paused) => Ok(Action::Remove { force: true }),
        (Op::Delete { force: false }, Running | Paused) => {
            reject("it is running; shut it down first or delete with force")
        }
    }
}

/// The state an action leads to when it succeeds (`None` for removal).
pub fn state_after(before: VmState, action: Action) -> Option<VmState> {
    match action {
        Action::Start | Action::Unpause | Action::Restart { .. } => Some(VmState::Running),
        Action::Stop { .. } | Action::Kill => Some(VmState::Shutdown),
        Action::Pause => Some(VmState::Paused),
        Action::Remove { .. } => None,
        Action::NoOp => Some(before),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    const G: Duration = Duration::from_secs(30);

    enum Expect {
        Do(Action),
        Refuse,
    }
    use Expect::*;

    fn check(state: VmState, op: Op, expect: Expect) {
        let got = plan(state, op);
        match expect {
            Do(action) => assert_eq!(got, Ok(action), "{op:?} in {state}"),
            Refuse => assert!(
                got.is_err(),
                "{op:?} in {state} should be refused, got {got:?}"
            ),
        }
    }

    #[test]
    fn boot_row() {
        check(Created, Op::Boot, Do(Action::Start));
        check(Running, Op::Boot, Do(Action::NoOp));
        check(Paused, Op::Boot, Refuse);
        check(Shutdown, Op::Boot, Do(Action::Start));
    }

    #[test]
    fn shutdown_row() {
        let graceful = Op::Shutdown { grace: Some(G) };
        let forced = Op::Shutdown { grace: None };
        check(Created, graceful, Refuse);
        check(Running, graceful, Do(Action::Stop { grace: G }));
        check(Paused, graceful, Do(Action::Stop { grace: G }));
        check(Shutdown, graceful, Do(Action::NoOp));
        check(Created, forced, Refuse);
        check(Running, forced, Do(Action::Kill));
        check(Paused, forced, Do(Action::Kill));
        check(Shutdown, forced, Do(Action::NoOp));
    }

    #[test]
    fn pause_row() {
        check(Created, Op::Pause, Refuse);
        check(Running, Op::Pause, Do(Action::Pause));
        check(Paused, Op::Pause, Do(Action::NoOp));
        check(Shutdown, Op::Pause, Refuse);
    }

    #[test]
    fn resume_row() {
        check(Created, Op::Resume, Refuse);
        check(Running, Op::Resume, Do(Action::NoOp));
        check(Paused, Op::Resume, Do(Action::Unpause));
        check(Shutdown, Op::Resume, Refuse);
    }

    #[test]
    fn reboot_row() {
        let op = Op::Reboot { grace: Some(G) };
        check(Created, op, Refuse);
        check(Running, op, Do(Action::Restart { grace: Some(G) }));
        check(Paused, op, Refuse);
        check(Shutdown, op, Refuse);
        check(
            Running,
            Op::Reboot { grace: None },
            Do(Action::Restart { grace: None }),
        );
    }

    #[test]
    fn delete_row() {
        let plain = Op::Delete { force: false };
        let forced = Op::Delete { force: true };
        check(Created, plain, Do(Action::Remove { force: false }));
        check(Running, plain, Refuse);
        check(Paused, plain, Refuse);
        check(Shutdown, plain, Do(Action::Remove { force: false }));
        check(Created, forced, Do(Action::Remove { force: false }));
        check(Running, forced, Do(Action::Remove { force: true }));
        check(Paused, forced, Do(Action::Remove { force: true }));
        check(Shutdown, forced, Do(Action::Remove { force: false }));
    }

    #[test]
    fn docker_status_mapping() {
        assert_eq!(VmState::from_docker_status("created"), Created);
        assert_eq!(VmState::from_docker_status("running"), Running);
        assert_eq!(VmState::from_docker_status("restarting"), Running);
        assert_eq!(VmState::from_docker_status("paused"), Paused);
        assert_eq!(VmState::from_docker_status("exited"), Shutdown);
        assert_eq!(VmState::from_docker_status("dead"), Shutdown);
        assert_eq!(VmState::from_docker_status("removing"), Shutdown);
    }

    #[test]
    fn rejection_names_state_and_op() {
        let r = plan(Paused, Op::Boot).unwrap_err();
        assert_eq!(
            r.to_string(),
            "cannot boot a VM in state PAUSED: it is paused; resume it instead"
        );
    }
}
