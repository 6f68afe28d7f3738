//! `GET /health` (spec §11): Docker reachability decides between 200 and 503.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::AppState;

/// Longest the health check waits for the engine.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// A ping answered this recently is reused: a load balancer's or a flood's health checks
/// cost the engine one ping a second, not one each.
const PING_REUSE: Duration = Duration::from_secs(1);

/// What the last ping said: `Err` carries the reason it failed.
type PingResult = Result<(), String>;

/// The last engine ping, and the single flight that makes a new one: requests that find it
/// stale while a ping is under way wait for that ping instead of sending their own.
#[derive(Debug, Default)]
pub struct EnginePing {
    /// When the last ping finished, and its result.
    last: Mutex<Option<(Instant, PingResult)>>,
    /// Held by the request that pings.
    flight: tokio::sync::Mutex<()>,
}

impl EnginePing {
    fn fresh(&self) -> Option<PingResult> {
        let last = match self.last.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < PING_REUSE)
            .map(|(_, result)| result.clone())
    }

    /// A result at most [`PING_REUSE`] old (counted from when its ping finished, so those
    /// who waited for a ping get its answer), pinging if there is none. A hung engine holds
    /// each ping [`PING_TIMEOUT`] at most.
    async fn get<F, Fut, E>(&self, ping: F) -> PingResult
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        if let Some(result) = self.fresh() {
            return result;
        }
        let _turn = self.flight.lock().await;
        if let Some(result) = self.fresh() {
            return result;
        }
        let result = match tokio::time::timeout(PING_TIMEOUT, ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {}s", PING_TIMEOUT.as_secs())),
        };
        let mut last = match self.last.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

pub async fn health(State(app): State<AppState>) -> Response {
    let service = &app.service;
    let ping = app.engine_ping.get(|| service.backend().ping()).await;
    let docker_up = service.docker_up();
    let reachable = ping.is_ok() && docker_up;
    let engine = service.backend().engine();
    let error = match ping {
        Ok(()) if !docker_up => Some("index not yet in step with the engine".to_owned()),
        Ok(()) => None,
        Err(e) => Some(e),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn concurrent_checks_share_one_ping_and_reuse_it_for_a_second() {
        let cache = Arc::new(EnginePing::default());
        let pings = Arc::new(AtomicUsize::new(0));
        let check = |cache: Arc<EnginePing>, pings: Arc<AtomicUsize>| async move {
            cache
                .get(|| async move {
                    pings.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<(), String>(())
                })
                .await
        };
        let checks: Vec<_> = (0..50)
            .map(|_| tokio::spawn(check(cache.clone(), pings.clone())))
            .collect();
        for c in checks {
            assert_eq!(c.await.unwrap(), Ok(()));
        }
        assert_eq!(pings.load(Ordering::SeqCst), 1, "one ping for 50 checks");
        assert_eq!(check(cache.clone(), pings.clone()).await, Ok(()));
        assert_eq!(pings.load(Ordering::SeqCst), 1, "reused within the second");
        // Older than a second: pinged again.
        cache.last.lock().unwrap().as_mut().unwrap().0 -= PING_REUSE;
        check(cache.clone(), pings.clone()).await.unwrap();
        assert_eq!(pings.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_hung_ping_is_bounded_and_its_failure_shared() {
        let cache = EnginePing::default();
        let hung = cache.get(std::future::pending::<Result<(), String>>).await;
        assert_eq!(hung, Err("no answer within 2s".to_owned()));
        // Within the second the failure is the answer; no second wait.
        let again = cache.get(|| async { Ok::<(), String>(()) }).await;
        assert_eq!(again, Err("no answer within 2s".to_owned()));
    }
}
