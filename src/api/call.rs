//! One RPC from its body to its answer: identity, the body read under the deadline, decode,
//! the service call in its own task (finished even when the caller leaves), and the undo of
//! a VM whose server-made id never reached its caller.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::connect::{self, Rpc};
use super::error::{Code, RpcError};
use super::{tenant, AppState};
use crate::service::{self, Caller, VmService};

/// A service call whose answer has not reached the caller yet. Dropped while still holding
/// the task (the deadline passed, or the client went away and took the request future with
/// it), it hands a create with a server-made id to [`undo_unseen_vm`].
struct Unanswered<Resp: RevealsVm + Send + 'static> {
    task: Option<tokio::task::JoinHandle<Result<Resp, service::Error>>>,
    undo: Option<(Arc<VmService>, Caller, TaskTracker)>,
}

impl<Resp: RevealsVm + Send + 'static> Unanswered<Resp> {
    /// The call's result, once it is in (by `until`, if given); `None` when `until` came
    /// first. A result taken here counts as answered: nothing is undone after it.
    async fn wait(
        &mut self,
        until: Option<Instant>,
    ) -> Option<Result<Result<Resp, service::Error>, tokio::task::JoinError>> {
        let task = self.task.as_mut()?;
        let joined = match until {
            Some(at) => tokio::time::timeout_at(at.into(), task).await.ok()?,
            None => task.await,
        };
        self.task = None;
        Some(joined)
    }
}

impl<Resp: RevealsVm + Send + 'static> Drop for Unanswered<Resp> {
    fn drop(&mut self) {
        if let (Some(task), Some((service, caller, tasks))) = (self.task.take(), self.undo.take()) {
            // Outside a runtime (it is being dropped) there is nothing left to run it on.
            if tokio::runtime::Handle::try_current().is_ok() {
                tasks.spawn(undo_unseen_vm(service, caller, task).in_current_span());
            }
        }
    }
}

/// Waits for a call whose caller gave up before it could learn the VM's id, and deletes
/// the VM it made, if it made one.
async fn undo_unseen_vm<Resp: RevealsVm>(
    service: Arc<VmService>,
    caller: Caller,
    task: tokio::task::JoinHandle<Result<Resp, service::Error>>,
) {
    let Ok(Ok(resp)) = task.await else {
        return;
    };
    let Some(vm_id) = resp.revealed_vm_id() else {
        return;
    };
    match service
        .apply(&caller, vm_id, crate::vm::state::Op::Delete { force: true })
        .await
    {
        Ok(_) => tracing::info!(vm_id, "removed a vm whose id never reached its caller"),
        Err(e) => {
            tracing::warn!(vm_id, error = %e, "could not remove a vm whose id never reached its caller")
        }
    }
}

/// Longest a request body may take to arrive, whatever the caller's deadline.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

fn deadline_passed(deadline: Duration, when: &str) -> RpcError {
    RpcError::new(
        Code::DeadlineExceeded,
        format!("deadline of {} ms passed {when}", deadline.as_millis()),
    )
}

/// One request in flight.
pub(super) struct Call<'a> {
    pub(super) app: &'a AppState,
    pub(super) rpc: &'a Rpc,
    pub(super) headers: &'a http::HeaderMap,
    pub(super) body: Body,
    /// When the request arrived: deadlines count from here.
    pub(super) arrived: Instant,
    /// This RPC's in-flight slot: held through the body read, then by the service task.
    pub(super) slot: OwnedSemaphorePermit,
}

/// What happened, for the log line and metrics.
pub(super) struct Outcome {
    pub(super) response: Response,
    pub(super) code: Code,
    pub(super) error: Option<RpcError>,
    pub(super) customer: String,
    pub(super) vm_id: String,
}

/// Requests that name a VM, for logs.
pub(super) trait NamesVm {
    fn vm_id(&self) -> &str;
}

macro_rules! names_vm {
    ($($t:ty),*) => {$(impl NamesVm for $t { fn vm_id(&self) -> &str { &self.vm_id } })*};
}
use crate::proto::vmprovisioner as pb;
names_vm!(
    pb::CreateVmRequest,
    pb::BootVmRequest,
    pb::ShutdownVmRequest,
    pb::PauseVmRequest,
    pb::ResumeVmRequest,
    pb::RebootVmRequest,
    pb::DeleteVmRequest,
    pb::GetVmInfoRequest
);
impl NamesVm for pb::ListVmsRequest {
    fn vm_id(&self) -> &str {
        ""
    }
}

/// Responses that name a VM the request did not (CreateVm with a server-made id), for logs.
pub(super) trait RevealsVm {
    /// Whether this response can carry the id of a VM the call made.
    const REVEALS: bool = false;

    fn revealed_vm_id(&self) -> Option<&str> {
        None
    }
}

impl RevealsVm for pb::CreateVmResponse {
    const REVEALS: bool = true;

    fn revealed_vm_id(&self) -> Option<&str> {
        Some(&self.vm_id)
    }
}

macro_rules! reveals_nothing {
    ($($t:ty),*) => {$(impl RevealsVm for $t {})*};
}
reveals_nothing!(
    pb::BootVmResponse,
    pb::ShutdownVmResponse,
    pb::PauseVmResponse,
    pb::ResumeVmResponse,
    pb::RebootVmResponse,
    pb::DeleteVmResponse,
    pb::GetVmInfoResponse,
    pb::ListVmsResponse
);

impl Call<'_> {
    /// Authenticate, read, decode, run, encode. The service call runs in its own task: once
    /// started it finishes even if the deadline passes or the client goes away, so no
    /// operation is left half-done.
    pub(super) async fn unary<Req, Resp, F, Fut>(self, handler: F) -> Outcome
    where
        Req: prost::Message + Default + serde::de::DeserializeOwned + NamesVm + Send + 'static,
        Resp: prost::Message + serde::Serialize + RevealsVm + Send + 'static,
        F: FnOnce(Arc<VmService>, Caller, Req) -> Fut,
        Fut: Future<Output = Result<Resp, service::Error>> + Send + 'static,
    {
        let rpc = self.rpc;
        let mut outcome = Outcome {
            response: Response::default(),
            code: Code::Ok,
            error: None,
            customer: String::new(),
            vm_id: String::new(),
        };
        match self.run(handler, &mut outcome).await {
            Ok(resp) => {
                if outcome.vm_id.is_empty() {
                    outcome.vm_id = resp.revealed_vm_id().unwrap_or_default().to_owned();
                }
                outcome.response = connect::respond(rpc, &resp);
            }
            Err(err) => {
                outcome.code = err.code;
                outcome.response = connect::error_response(rpc, &err);
                outcome.error = Some(err);
            }
        }
        outcome
    }

    async fn run<Req, Resp, F, Fut>(
        self,
        handler: F,
        outcome: &mut Outcome,
    ) -> Result<Resp, RpcError>
    where
        Req: prost::Message + Default + serde::de::DeserializeOwned + NamesVm + Send + 'static,
        Resp: RevealsVm + Send + 'static,
        F: FnOnce(Arc<VmService>, Caller, Req) -> Fut,
        Fut: Future<Output = Result<Resp, service::Error>> + Send + 'static,
    {
        let caller = match tenant::caller(self.headers) {
            Ok(caller) => caller,
            Err(err) => {
                connect::discard_body(self.body).await;
                return Err(err.into());
            }
        };
        outcome.customer = caller.customer_id.clone();
        // The caller's deadline runs from the request's arrival, reading included; without
        // one, a body must still arrive within a bound, so a stalled client holds nothing.
        // (A deadline too far off to represent is no deadline.)
        let deadline = self
            .rpc
            .deadline
            .and_then(|d| Some((self.arrived.checked_add(d)?, d)));
        let body_by = self.arrived + BODY_READ_TIMEOUT;
        let read_by = deadline.map_or(body_by, |(at, _)| at.min(body_by));
        let bytes = match tokio::time::timeout_at(
            read_by.into(),
            connect::read_message(self.rpc, self.body),
        )
        .await
        {
            Ok(read) => read?,
            Err(_) => {
                return Err(match deadline {
                    Some((_, d)) if read_by < body_by => {
                        deadline_passed(d, "before the request was read")
                    }
                    _ => RpcError::new(
                        Code::DeadlineExceeded,
                        format!(
                            "the request body did not arrive within {} s",
                            BODY_READ_TIMEOUT.as_secs()
                        ),
                    ),
                })
            }
        };
        let request: Req = connect::decode(self.rpc, &bytes)?;
        outcome.vm_id = request.vm_id().to_owned();
        // A deadline that has already passed starts nothing: the caller was told no.
        if let Some((at, d)) = deadline {
            if Instant::now() >= at {
                return Err(deadline_passed(
                    d,
                    "before the operation started; nothing was done",
                ));
            }
        }
        // A VM whose id the server made could only be found by listing if its caller never
        // receives the answer (deadline passed, client gone): it is removed again once made,
        // so a retry starts clean. A VM the caller named finishes, so a retry finds it.
        let undo = (Resp::REVEALS && outcome.vm_id.is_empty()).then(|| {
            let app = self.app;
            (app.service.clone(), caller.clone(), app.rpc_tasks.clone())
        });
        let work = handler(self.app.service.clone(), caller, request);
        let slot = self.slot;
        let task = self.app.rpc_tasks.spawn(
            async move {
                // The slot is the task's: it is given back when the work ends, whether
                // or not anyone still waits for the answer.
                let _slot = slot;
                work.await
            }
            .in_current_span(),
        );
        let mut answer = Unanswered {
            task: Some(task),
            undo,
        };
        let Some(joined) = answer.wait(deadline.map(|(at, _)| at)).await else {
            let what = if answer.undo.is_some() {
                "while the operation ran; the VM it was making is removed again, as its id never reached you"
            } else {
                "while the operation ran; it continues in the background"
            };
            return Err(deadline_passed(
                deadline.map_or(Duration::ZERO, |(_, d)| d),
                what,
            ));
        };
        match joined {
            Ok(result) => result.map_err(RpcError::from),
            Err(join) => {
                tracing::error!(error = %join, "rpc task failed");
                Err(RpcError::new(
                    Code::Internal,
                    "internal error; see the metald log",
                ))
            }
        }
    }
}
