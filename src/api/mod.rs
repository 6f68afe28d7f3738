//! The wire layer: the only module that knows HTTP, Connect/gRPC framing and the proto
//! request/response types. Routes, one dispatch per RPC, health and metrics.

mod call;
pub mod connect;
pub mod error;
pub mod health;
pub mod tenant;
pub mod vm_service;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use self::call::Call;
use self::connect::Rpc;
use self::error::{Code, RpcError};
use crate::listener::Throttle;
use crate::service::VmService;
use crate::telemetry::Metrics;

/// The service's full name (the proto package decides it; part of the wire contract).
pub const SERVICE: &str = "metal.vmprovisioner.v1.VmService";

/// Declares the methods once: the enum, and its names as they appear in paths.
macro_rules! methods {
    ($($name:ident),* $(,)?) => {
        /// A VmService method.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Method {
            $($name),*
        }

        impl Method {
            /// The method a path segment names, if any.
            pub fn parse(segment: &str) -> Option<Self> {
                match segment {
                    $(stringify!($name) => Some(Self::$name),)*
                    _ => None,
                }
            }

            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$name => stringify!($name)),*
                }
            }
        }
    };
}

methods!(CreateVm, BootVm, ShutdownVm, PauseVm, ResumeVm, RebootVm, DeleteVm, GetVmInfo, ListVms,);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub service: Arc<VmService>,
    pub billing: Arc<crate::billing::Billing>,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    /// The service calls in flight: shutdown waits for them (within the drain bound), also
    /// for those whose caller has gone or whose deadline passed.
    pub rpc_tasks: TaskTracker,
    /// The bound on RPCs in flight (spec §5.1).
    pub rpc_slots: Arc<RpcSlots>,
    /// The engine ping `/health` shares among its requests.
    pub engine_ping: Arc<health::EnginePing>,
}

/// Slots for RPCs in flight. One is taken before the body is read and given back when the
/// service task ends (also when that outlives its caller: the work is still being done);
/// with none free the RPC is refused at once, never queued, so a flood costs a refusal each,
/// not memory and tasks. `/health` and `/metrics` take none.
#[derive(Debug)]
pub struct RpcSlots {
    slots: Arc<Semaphore>,
    max: usize,
    /// The most ever taken at once, for `/metrics`.
    peak: std::sync::atomic::AtomicUsize,
    /// Refusals at the limit are logged at most once a second (they are all counted in
    /// `rpc_server_requests_total`).
    refused_log: Throttle,
}

impl RpcSlots {
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            peak: std::sync::atomic::AtomicUsize::new(0),
            refused_log: Throttle::new(Duration::from_secs(1)),
        }
    }

    fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        self.peak
            .fetch_max(self.in_flight(), std::sync::atomic::Ordering::Relaxed);
        Some(slot)
    }

    /// Slots taken now.
    pub fn in_flight(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// All routes of the main listener.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(&format!("/{SERVICE}/{{method}}"), post(rpc))
        .route("/health", get(health::health))
        .route("/metrics", get(metrics))
        .fallback(unknown)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// What every request from a VM network gets, on every listener (spec §5.1): RPC paths
/// `permission_denied` in the caller's protocol, anything else 403 with a Connect error
/// body. The body is thrown away unread and nothing else runs: no identity, no service.
pub fn refusal_router() -> Router {
    Router::new().fallback(refuse_vm_peer)
}

async fn refuse_vm_peer(request: Request) -> Response {
    let (parts, body) = request.into_parts();
    connect::discard_body(body).await;
    let err = RpcError::new(Code::PermissionDenied, "metald does not serve VM networks");
    let rpc_path = parts.uri.path().starts_with(&format!("/{SERVICE}/"));
    if parts.method == http::Method::POST && rpc_path {
        if let Ok(rpc) = connect::negotiate(&parts.headers) {
            return connect::error_response(&rpc, &err);
        }
    }
    connect::connect_error(&err)
}

/// The routes of the separate Prometheus listener.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn metrics(State(app): State<AppState>) -> Response {
    let mut body = app.metrics.render(app.service.index(), &app.billing);
    // The in-flight bound's own figures: how close the instance is (and came) to
    // refusing RPCs.
    let slots = &app.rpc_slots;
    body.push_str(&format!(
        "# TYPE metald_rpcs_in_flight gauge\nmetald_rpcs_in_flight {}\n\
         # TYPE metald_rpcs_in_flight_peak gauge\nmetald_rpcs_in_flight_peak {}\n\
         # TYPE metald_rpcs_in_flight_limit gauge\nmetald_rpcs_in_flight_limit {}\n",
        slots.in_flight(),
        slots.peak.load(std::sync::atomic::Ordering::Relaxed),
        slots.max
    ));
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
        .into_response()
}

/// Anything else: an unknown RPC gets `unimplemented` in its own protocol (HTTP 404 for
/// Connect), everything else a plain 404 with a Connect error body.
async fn unknown(request: Request) -> Response {
    let (parts, body) = request.into_parts();
    connect::discard_body(body).await;
    let path = parts.uri.path().to_owned();
    let err = RpcError::new(
        Code::Unimplemented,
        format!("no such method or path: {path}"),
    );
    if parts.method == http::Method::POST {
        if let Ok(rpc) = connect::negotiate(&parts.headers) {
            if rpc.protocol != connect::Protocol::Connect {
                return connect::error_response(&rpc, &err);
            }
        }
    }
    let mut response = connect::connect_error(&err);
    *response.status_mut() = http::StatusCode::NOT_FOUND;
    response
}

/// A known path with the wrong HTTP method: 405 with `Allow`, and a Connect error body
/// like every other refusal on this port.
async fn method_not_allowed(request: Request) -> Response {
    let (parts, body) = request.into_parts();
    connect::discard_body(body).await;
    let rpc_path = parts.uri.path().starts_with(&format!("/{SERVICE}/"));
    let allow = if rpc_path { "POST" } else { "GET, HEAD" };
    let err = RpcError::new(
        Code::Unimplemented,
        format!(
            "{} is not allowed on {}; use {allow}",
            parts.method,
            parts.uri.path()
        ),
    );
    let mut response = connect::connect_error(&err);
    *response.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
    response
        .headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    response
}

/// One VmService call, in a server span `metald.<Method>` that continues the caller's trace.
async fn rpc(State(app): State<AppState>, request: Request) -> Response {
    // The segment as sent, not percent-decoded: a method is named by its plain name only,
    // and a segment that does not decode is just another unknown method.
    let segment = request.uri().path().rsplit('/').next().unwrap_or_default();
    let method = Method::parse(segment);
    // Only the nine names become span names: a path is the caller's to choose.
    let name = method.map_or("unknown", Method::name);
    let span = tracing::info_span!(
        "rpc",
        otel.name = %format_args!("metald.{name}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "connect_rpc",
        rpc.service = SERVICE,
        rpc.method = name,
        rpc.connect_rpc.error_code = tracing::field::Empty,
    );
    crate::telemetry::continue_trace(&span, request.headers());
    dispatch(app, method, request).instrument(span).await
}

/// The checks on headers and path alone: the protocol, and that the method exists.
fn preflight(
    parts: &http::request::Parts,
    method: Option<Method>,
) -> Result<(Rpc, Method), Box<Response>> {
    let rpc = connect::negotiate(&parts.headers)?;
    let Some(method) = method else {
        let err = RpcError::new(
            Code::Unimplemented,
            format!("{} is not a VmService method", parts.uri.path()),
        );
        let mut response = connect::error_response(&rpc, &err);
        if rpc.protocol == connect::Protocol::Connect {
            *response.status_mut() = http::StatusCode::NOT_FOUND;
        }
        return Err(Box::new(response));
    };
    Ok((rpc, method))
}

async fn dispatch(app: AppState, method: Option<Method>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let (rpc, method) = match preflight(&parts, method) {
        Ok(checked) => checked,
        Err(response) => {
            connect::discard_body(body).await;
            return *response;
        }
    };
    let Some(slot) = app.rpc_slots.try_take() else {
        return at_limit(&app, &rpc, method, body, started).await;
    };
    let call = Call {
        app: &app,
        rpc: &rpc,
        headers: &parts.headers,
        body,
        arrived: started,
        slot,
    };
    let outcome = match method {
        Method::CreateVm => call.unary(vm_service::create_vm).await,
        Method::BootVm => call.unary(vm_service::boot_vm).await,
        Method::ShutdownVm => call.unary(vm_service::shutdown_vm).await,
        Method::PauseVm => call.unary(vm_service::pause_vm).await,
        Method::ResumeVm => call.unary(vm_service::resume_vm).await,
        Method::RebootVm => call.unary(vm_service::reboot_vm).await,
        Method::DeleteVm => call.unary(vm_service::delete_vm).await,
        Method::GetVmInfo => call.unary(vm_service::get_vm_info).await,
        Method::ListVms => call.unary(vm_service::list_vms).await,
    };
    let elapsed = started.elapsed();
    let code = outcome.code;
    if code != Code::Ok {
        let span = tracing::Span::current();
        span.record("otel.status_code", "ERROR");
        span.record("rpc.connect_rpc.error_code", code.as_str());
    }
    app.metrics
        .record_rpc(method.name(), code.as_str(), elapsed);
    let message = outcome
        .error
        .as_ref()
        .map(|e| e.message.as_str())
        .unwrap_or_default();
    // One line per RPC; failures of ours (internal, unknown) at error level.
    macro_rules! log_rpc {
        ($level:ident) => {
            tracing::$level!(
                method = method.name(),
                code = code.as_str(),
                duration_ms = elapsed.as_secs_f64() * 1e3,
                customer = outcome.customer,
                vm_id = outcome.vm_id,
                error = message,
                "rpc"
            )
        };
    }
    if matches!(code, Code::Internal | Code::Unknown) {
        log_rpc!(error);
    } else {
        log_rpc!(info);
    }
    outcome.response
}

/// The answer when every RPC slot is taken: `resource_exhausted` at once. Counted in the
/// metrics like any RPC; logged at most once a second, with how many were held back.
async fn at_limit(
    app: &AppState,
    rpc: &Rpc,
    method: Method,
    body: Body,
    started: Instant,
) -> Response {
    connect::discard_body(body).await;
    let limit = app.rpc_slots.max;
    let err = RpcError::new(
        Code::ResourceExhausted,
        format!("metald is at its limit of {limit} RPCs in flight; retry"),
    );
    let span = tracing::Span::current();
    span.record("otel.status_code", "ERROR");
    span.record("rpc.connect_rpc.error_code", err.code.as_str());
    app.metrics
        .record_rpc(method.name(), err.code.as_str(), started.elapsed());
    if let Some(held) = app.rpc_slots.refused_log.ready() {
        tracing::warn!(
            method = method.name(),
            code = err.code.as_str(),
            limit,
            also_refused = held,
            "rpc refused: at the limit of RPCs in flight"
        );
    }
    connect::error_response(rpc, &err)
}
