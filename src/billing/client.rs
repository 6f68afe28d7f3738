//! The billaged client: Connect unary, binary proto, `X-Tenant-ID` on every call.

use std::time::Duration;

use prost::Message;

use crate::proto::billing as pb;

/// Longest a single billaged call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const SERVICE: &str = "/deploy.billaged.v1.BillingService/";

/// Why a call failed, by what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// billaged is unreachable or overloaded: keep the records and retry later.
    #[error("billaged unreachable: {0}")]
    Retry(String),
    /// billaged refused the content as invalid: set it aside, never resend.
    #[error("billaged rejected the request: {0}")]
    Reject(String),
}

#[derive(Clone)]
pub struct BillagedClient {
    http: reqwest::Client,
    endpoint: String,
}

impl BillagedClient {
    pub fn new(endpoint: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            http,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
        }
    }

    /// One unary call, in a client span `billaged.<Method>` whose context goes along as
    /// `traceparent` when tracing is on.
    #[tracing::instrument(
        name = "billaged.call",
        level = "info",
        skip_all,
        fields(
            otel.name = %format_args!("billaged.{method}"),
            otel.kind = "client",
            rpc.system = "connect_rpc",
            rpc.service = "deploy.billaged.v1.BillingService",
            rpc.method = method,
        )
    )]
    async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        tenant: &str,
        req: &Req,
    ) -> Result<Resp, CallError> {
        let mut trace_headers = http::HeaderMap::new();
        crate::telemetry::inject_trace(&mut trace_headers);
        let response = self
            .http
            .post(format!("{}{SERVICE}{method}", self.endpoint))
            .headers(trace_headers)
            .header("content-type", "application/proto")
            .header("connect-protocol-version", "1")
            .header("connect-timeout-ms", CALL_TIMEOUT.as_millis().to_string())
            .header("x-tenant-id", tenant)
            .body(req.encode_to_vec())
            .send()
            .await
            .map_err(|e| CallError::Retry(format!("{method}: {e}")))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| CallError::Retry(format!("{method}: reading the answer: {e}")))?;
        if status.is_success() {
            return Resp::decode(body)
                .map_err(|e| CallError::Retry(format!("{method}: undecodable answer: {e}")));
        }
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let code = error["code"].as_str().unwrap_or("").to_owned();
        let message = format!(
            "{method}: {} {code}: {}",
            status.as_u16(),
            error["message"].as_str().unwrap_or_default()
        );
        Err(match code.as_str() {
            "invalid_argument" | "failed_precondition" | "out_of_range" => {
                CallError::Reject(message)
            }
            _ => CallError::Retry(message),
        })
    }

    pub async fn send_batch(
        &self,
        vm_id: &str,
        customer_id: &str,
        samples: &[super::sample::Sample],
    ) -> Result<(), CallError> {
        let req = pb::SendMetricsBatchRequest {
            vm_id: vm_id.to_owned(),
            customer_id: customer_id.to_owned(),
            metrics: samples
                .iter()
                .map(|s| pb::VmMetrics {
                    timestamp: Some(pbjson_types::Timestamp {
                        seconds: s.timestamp_nanos.div_euclid(1_000_000_000),
                        nanos: s.timestamp_nanos.rem_euclid(1_000_000_000) as i32,
                    }),
                    cpu_time_nanos: s.cpu_time_nanos,
                    memory_usage_bytes: s.memory_usage_bytes,
                    disk_read_bytes: s.disk_read_bytes,
                    disk_write_bytes: s.disk_write_bytes,
                    network_rx_bytes: s.network_rx_bytes,
                    network_tx_bytes: s.network_tx_bytes,
                })
                .collect(),
        };
        let resp: pb::SendMetricsBatchResponse =
            self.call("SendMetricsBatch", customer_id, &req).await?;
        if resp.success {
            Ok(())
        } else {
            Err(CallError::Reject(format!(
                "SendMetricsBatch: success=false: {}",
                resp.message
            )))
        }
    }

    pub async fn vm_started(
        &self,
        vm_id: &str,
        customer_id: &str,
        start_nanos: i64,
    ) -> Result<(), CallError> {
        let req = pb::NotifyVmStartedRequest {
            vm_id: vm_id.to_owned(),
            customer_id: customer_id.to_owned(),
            start_time: start_nanos,
        };
        let resp: pb::NotifyVmStartedResponse =
            self.call("NotifyVmStarted", customer_id, &req).await?;
        accepted("NotifyVmStarted", resp.success)
    }

    pub async fn vm_stopped(
        &self,
        vm_id: &str,
        customer_id: &str,
        stop_nanos: i64,
    ) -> Result<(), CallError> {
        let req = pb::NotifyVmStoppedRequest {
            vm_id: vm_id.to_owned(),
            stop_time: stop_nanos,
        };
        let resp: pb::NotifyVmStoppedResponse =
            self.call("NotifyVmStopped", customer_id, &req).await?;
        accepted("NotifyVmStopped", resp.success)
    }

    pub async fn possible_gap(
        &self,
        vm_id: &str,
        customer_id: &str,
        last_sent: i64,
        resume: i64,
    ) -> Result<(), CallError> {
        let req = pb::NotifyPossibleGapRequest {
            vm_id: vm_id.to_owned(),
            last_sent,
            resume_time: resume,
        };
        let resp: pb::NotifyPossibleGapResponse =
            self.call("NotifyPossibleGap", customer_id, &req).await?;
        accepted("NotifyPossibleGap", resp.success)
    }

    pub async fn heartbeat(
        &self,
        tenant: &str,
        instance_id: &str,
        active_vms: Vec<String>,
    ) -> Result<(), CallError> {
        let req = pb::SendHeartbeatRequest {
            instance_id: instance_id.to_owned(),
            active_vms,
        };
        let resp: pb::SendHeartbeatResponse = self.call("SendHeartbeat", tenant, &req).await?;
        accepted("SendHeartbeat", resp.success)
    }
}

fn accepted(method: &str, success: bool) -> Result<(), CallError> {
    if success {
        Ok(())
    } else {
        Err(CallError::Reject(format!("{method}: success=false")))
    }
}
