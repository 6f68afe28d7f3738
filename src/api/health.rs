//! `GET /health` (spec §11): Docker reachability decides between 200 and 503.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::AppState;

/// Longest the health check waits for the engine.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn health(State(app): State<AppState>) -> Response {
    let service = &app.service;
    let ping = tokio::time::timeout(PING_TIMEOUT, service.backend().ping()).await;
    let reachable = matches!(ping, Ok(Ok(()))) && service.docker_up();
    let engine = service.backend().engine();
    let error = match ping {
        Ok(Ok(())) if !service.docker_up() => {
            Some("index not yet in step with the engine".to_owned())
        }
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {}s", PING_TIMEOUT.as_secs())),
    };
    let billing = app.billing.status();
    let status = match (reachable, billing.reachable) {
        (false, _) => "error",
        (true, false) => "degraded",
        (true, true) => "ok",
    };
    let body = serde_json::json!({
        "status": status,
        "service": "metald",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": app.started.elapsed().as_secs(),
        "checks": {
            "docker": {
                "reachable": reachable,
                "version": engine.version,
                "api_version": engine.api_version,
                "error": error,
            },
            "billing": billing,
            "vms": service.index().len(),
            "scope": service.scope(),
        },
    });
    let code = if reachable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}
