//! A Connect unary client for VmService: binary proto over HTTP, the compat identity headers,
//! `Connect-Timeout-Ms`, TLS from files, and Connect errors turned into `CliError`s.

use std::path::PathBuf;
use std::time::Duration;

use prost::Message;

use crate::error::{one_line, CliError};

const SERVICE: &str = "metal.vmprovisioner.v1.VmService";

/// How to talk to metald; built from the global flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: String,
    pub user: String,
    pub tenant: String,
    pub tls: Tls,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum Tls {
    Disabled,
    File {
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    },
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    user: String,
    tenant: String,
    timeout: Duration,
}

impl Client {
    pub fn new(s: &Settings) -> Result<Self, CliError> {
        let base = base_url(&s.server, matches!(s.tls, Tls::File { .. }))?;
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("metald-cli/", env!("CARGO_PKG_VERSION")))
            // Connecting is never allowed to eat the whole deadline silently: a host that
            // drops SYNs is "unreachable" (exit 3) well before a long --timeout ends.
            .connect_timeout(s.timeout.min(Duration::from_secs(10)));
        if let Tls::File { cert, key, ca } = &s.tls {
            builder = builder.use_rustls_tls();
            if let Some(ca) = ca {
                let pem = read(ca, "--tls-ca")?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    CliError::Usage(format!("--tls-ca {}: {}", ca.display(), chain(&e)))
                })?;
                if certs.is_empty() {
                    return Err(CliError::Usage(format!(
                        "--tls-ca {}: no PEM certificate in the file",
                        ca.display()
                    )));
                }
                // A given CA is the only trust anchor: a private metald deployment should not
                // also accept any public certificate for its name.
                builder = builder.tls_built_in_root_certs(false);
                for c in certs {
                    builder = builder.add_root_certificate(c);
                }
            }
            match (cert, key) {
                (Some(cert), Some(key)) => {
                    let cert_pem = read(cert, "--tls-cert")?;
                    let key_pem = read(key, "--tls-key")?;
                    // reqwest's own error here is only "builder error": say which file is wrong.
                    for (flag, path, pem, what) in [
                        ("--tls-cert", cert, &cert_pem, "CERTIFICATE-----"),
                        ("--tls-key", key, &key_pem, "PRIVATE KEY-----"),
                    ] {
                        if !String::from_utf8_lossy(pem).contains(what) {
                            return Err(CliError::Usage(format!(
                                "{flag} {}: no PEM {} in the file",
                                path.display(),
                                what.trim_end_matches('-').to_lowercase()
                            )));
                        }
                    }
                    let mut pem = cert_pem;
                    pem.push(b'\n');
                    pem.extend(key_pem);
                    let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                        CliError::Usage(format!(
                            "--tls-cert/--tls-key: not a usable identity: {}",
                            chain(&e)
                        ))
                    })?;
                    builder = builder.identity(id);
                }
                (None, None) => {}
                _ => {
                    return Err(CliError::Usage(
                        "--tls-cert and --tls-key must be given together".into(),
                    ))
                }
            }
        }
        let http = builder
            .build()
            .map_err(|e| CliError::Usage(format!("HTTP client: {}", chain(&e))))?;
        Ok(Client {
            http,
            base,
            user: s.user.clone(),
            tenant: s.tenant.clone(),
            timeout: s.timeout,
        })
    }

    /// One unary call with the default deadline.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, CliError> {
        self.call_with_deadline(method, req, self.timeout).await
    }

    /// One unary call; `deadline` goes to the server as `Connect-Timeout-Ms`, and the client
    /// waits a little longer so the server's own `deadline_exceeded` normally arrives first.
    pub async fn call_with_deadline<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
        deadline: Duration,
    ) -> Result<Resp, CliError> {
        let url = format!("{}/{SERVICE}/{method}", self.base);
        let millis = deadline.as_millis().clamp(1, 9_999_999_999);
        let resp = self
            .http
            .post(&url)
            .header("content-type", "application/proto")
            .header("connect-protocol-version", "1")
            .header("connect-timeout-ms", millis.to_string())
            .header("authorization", format!("Bearer dev_user_{}", self.user))
            .header("x-tenant-id", &self.tenant)
            .timeout(deadline + Duration::from_secs(2))
            .body(req.encode_to_vec())
            .send()
            .await
            .map_err(|e| self.transport_error(&e, deadline))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(&e, deadline))?;
        if status.is_success() {
            return Resp::decode(body).map_err(|e| CliError::Server {
                code: "internal".into(),
                message: format!("{method}: response is not a valid protobuf message: {e}"),
            });
        }
        Err(connect_error(status.as_u16(), &body))
    }

    fn transport_error(&self, e: &reqwest::Error, deadline: Duration) -> CliError {
        if e.is_timeout() {
            CliError::Unreachable {
                code: "deadline_exceeded",
                message: format!(
                    "no answer from metald at {} within {} (raise --timeout)",
                    self.base,
                    humantime::format_duration(deadline)
                ),
            }
        } else {
            CliError::Unreachable {
                code: "unavailable",
                message: format!("cannot reach metald at {}: {}", self.base, chain(e)),
            }
        }
    }
}

/// A Connect error body (`{"code","message"}`), or, when something else answered (a proxy, a
/// wrong port), the code the Connect protocol derives from the HTTP status.
pub fn connect_error(status: u16, body: &[u8]) -> CliError {
    #[derive(serde::Deserialize)]
    struct Body {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(Body {
        code: Some(code),
        message,
    }) = serde_json::from_slice::<Body>(body)
    {
        return CliError::Server {
            code,
            message: message.unwrap_or_default(),
        };
    }
    let code = match status {
        400 => "internal",
        401 => "unauthenticated",
        403 => "permission_denied",
        404 => "unimplemented",
        429 | 502..=504 => "unavailable",
        _ => "unknown",
    };
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    CliError::Server {
        code: code.into(),
        message: format!(
            "HTTP {status} without a Connect error body: {}",
            one_line(&text)
        ),
    }
}

/// The server address as a base URL: a bare `host:port` gets the scheme the TLS mode implies.
pub fn base_url(server: &str, tls: bool) -> Result<String, CliError> {
    let server = server.trim().trim_end_matches('/');
    if server.is_empty() {
        return Err(CliError::Usage("--server must not be empty".into()));
    }
    let url = if server.contains("://") {
        server.to_owned()
    } else if tls {
        format!("https://{server}")
    } else {
        format!("http://{server}")
    };
    if tls && url.starts_with("http://") {
        return Err(CliError::Usage(format!(
            "--tls-mode file needs an https:// server address, got {url}"
        )));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(CliError::Usage(format!(
            "--server must be an http:// or https:// address, got {url}"
        )));
    }
    Ok(url)
}

fn read(path: &PathBuf, flag: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))
}

/// The innermost causes of an error, which say what actually happened ("Connection refused")
/// where reqwest's own text only says that sending failed.
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    // The last one or two causes are the informative ones.
    let start = parts.len().saturating_sub(2);
    parts[start..].join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_rules() {
        assert_eq!(
            base_url("localhost:8080", false).ok(),
            Some("http://localhost:8080".into())
        );
        assert_eq!(
            base_url("https://h:1/", true).ok(),
            Some("https://h:1".into())
        );
        assert!(base_url("http://h:1", true).is_err());
        assert!(base_url("ftp://h", false).is_err());
    }

    #[test]
    fn error_bodies() {
        let e = connect_error(404, br#"{"code":"not_found","message":"vm x"}"#);
        assert_eq!(e.to_string(), "error: not_found: vm x");
        let e = connect_error(503, b"<html>busy</html>");
        assert_eq!(e.code(), "unavailable");
    }
}
