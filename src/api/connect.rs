//! Unary RPC framing for the three protocols served on the same paths (spec §2): Connect
//! (`application/proto`, `application/json`), gRPC and gRPC-Web (`+proto`, `+json`).
//! Content types, compression, deadlines, size limits and error bodies; nothing about VMs.

use std::io::Read as _;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};
use http::StatusCode;
use http_body_util::BodyExt as _;

use super::error::{Code, RpcError};

/// Largest message accepted, before and after decompression.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Responses smaller than this are not worth compressing.
const COMPRESS_MIN_BYTES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Connect,
    Grpc,
    GrpcWeb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Proto,
    Json,
}

/// What a request asked for: protocol, codec, compression and deadline.
#[derive(Debug, Clone)]
pub struct Rpc {
    pub protocol: Protocol,
    pub codec: Codec,
    /// The request body is gzip-compressed (Connect `Content-Encoding`, gRPC `grpc-encoding`).
    pub request_gzip: bool,
    /// The client accepts gzip responses.
    pub accept_gzip: bool,
    pub deadline: Option<Duration>,
}

/// Reads the protocol from the headers. `Err` carries the finished response (wrong content
/// type) or an error to answer in the detected protocol.
pub fn negotiate(headers: &HeaderMap) -> Result<Rpc, Box<Response>> {
    let content_type = header(headers, CONTENT_TYPE.as_str()).unwrap_or_default();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let (protocol, codec) = match essence.as_str() {
        "application/proto" => (Protocol::Connect, Codec::Proto),
        "application/json" => (Protocol::Connect, Codec::Json),
        "application/grpc" | "application/grpc+proto" => (Protocol::Grpc, Codec::Proto),
        "application/grpc+json" => (Protocol::Grpc, Codec::Json),
        "application/grpc-web" | "application/grpc-web+proto" => (Protocol::GrpcWeb, Codec::Proto),
        "application/grpc-web+json" => (Protocol::GrpcWeb, Codec::Json),
        _ => return Err(Box::new(unsupported_media_type(content_type))),
    };
    let mut rpc = Rpc {
        protocol,
        codec,
        request_gzip: false,
        accept_gzip: false,
        deadline: None,
    };
    let fail = |rpc: &Rpc, e: RpcError| Err(Box::new(error_response(rpc, &e)));
    match protocol {
        Protocol::Connect => {
            if let Some(v) = header(headers, "connect-protocol-version") {
                if v != "1" {
                    return fail(
                        &rpc,
                        RpcError::new(
                            Code::InvalidArgument,
                            format!("connect-protocol-version must be 1, got {v:?}"),
                        ),
                    );
                }
            }
            match compression(header(headers, CONTENT_ENCODING.as_str())) {
                Ok(gzip) => rpc.request_gzip = gzip,
                Err(e) => return fail(&rpc, e),
            }
            rpc.accept_gzip = accepts_gzip(header(headers, "accept-encoding"));
            if let Some(v) = header(headers, "connect-timeout-ms") {
                match connect_timeout(v) {
                    Ok(d) => rpc.deadline = Some(d),
                    Err(e) => return fail(&rpc, e),
                }
            }
        }
        Protocol::Grpc | Protocol::GrpcWeb => {
            match compression(header(headers, "grpc-encoding")) {
                Ok(gzip) => rpc.request_gzip = gzip,
                Err(e) => return fail(&rpc, e),
            }
            rpc.accept_gzip = accepts_gzip(header(headers, "grpc-accept-encoding"));
            if let Some(v) = header(headers, "grpc-timeout") {
                match grpc_timeout(v) {
                    Ok(d) => rpc.deadline = Some(d),
                    Err(e) => return fail(&rpc, e),
                }
            }
        }
    }
    Ok(rpc)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn compression(value: Option<&str>) -> Result<bool, RpcError> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") | Some("identity") => Ok(false),
        Some("gzip") => Ok(true),
        Some(other) => Err(RpcError::new(
            Code::Unimplemented,
            format!("unsupported compression {other:?}; supported: gzip, identity"),
        )),
    }
}

fn accepts_gzip(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        v.split(',').any(|e| {
            e.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("gzip")
        })
    })
}

/// `Connect-Timeout-Ms`: 1–10 ASCII digits.
pub fn connect_timeout(v: &str) -> Result<Duration, RpcError> {
    if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!("connect-timeout-ms {v:?} is not 1-10 digits"),
        ));
    }
    let ms: u64 = v.parse().map_err(|_| {
        RpcError::new(
            Code::InvalidArgument,
            format!("connect-timeout-ms {v:?} is not a number"),
        )
    })?;
    Ok(Duration::from_millis(ms))
}

/// `grpc-timeout`: 1–8 digits and a unit (H, M, S, m, u, n).
pub fn grpc_timeout(v: &str) -> Result<Duration, RpcError> {
    let bad = || {
        RpcError::new(
            Code::InvalidArgument,
            format!("grpc-timeout {v:?} is not 1-8 digits and a unit (H, M, S, m, u, n)"),
        )
    };
    if v.len() < 2 || v.len() > 9 {
        return Err(bad());
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    })
}

/// How much of an unread request body an early answer (bad auth, wrong content type,
/// unknown method) reads and throws away, and for how long.
const DISCARD_MAX_BYTES: usize = MAX_MESSAGE_BYTES + 5;
const DISCARD_MAX_WAIT: Duration = Duration::from_secs(2);

/// Reads what is left of a request body and throws it away, within a bound. Answering
/// before the body is read makes HTTP/2 reset the stream right after the response; a
/// client still sending (curl, for one) then reports a framing error instead of the
/// answer. Larger or slower bodies are left to that reset. Nothing is kept: a flood of
/// refused requests costs no memory for their bodies.
pub async fn discard_body(body: Body) {
    let drain = async {
        let mut body = body;
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > DISCARD_MAX_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_MAX_WAIT, drain).await;
}

/// Reads the request body (at most the message limit plus framing) and returns the one
/// message in it, decompressed.
pub async fn read_message(rpc: &Rpc, body: Body) -> Result<Bytes, RpcError> {
    let framing = if rpc.protocol == Protocol::Connect {
        0
    } else {
        5
    };
    let limit = MAX_MESSAGE_BYTES + framing;
    let collected = http_body_util::Limited::new(body, limit).collect().await;
    let raw = match collected {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(too_large());
        }
        Err(e) => {
            return Err(RpcError::new(
                Code::Canceled,
                format!("reading the request body failed: {e}"),
            ))
        }
    };
    match rpc.protocol {
        Protocol::Connect => {
            if rpc.request_gzip {
                gunzip(&raw)
            } else {
                Ok(raw)
            }
        }
        Protocol::Grpc | Protocol::GrpcWeb => unframe(&raw, rpc.request_gzip),
    }
}

fn too_large() -> RpcError {
    RpcError::new(
        Code::ResourceExhausted,
        format!("message larger than the {MAX_MESSAGE_BYTES}-byte limit"),
    )
}

/// The single length-prefixed message of a unary gRPC / gRPC-Web request.
pub fn unframe(raw: &[u8], encoding_gzip: bool) -> Result<Bytes, RpcError> {
    if raw.len() < 5 {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!(
                "request has {} bytes, less than a 5-byte message prefix",
                raw.len()
            ),
        ));
    }
    let flags = raw[0];
    let len = u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(too_large());
    }
    let rest = &raw[5..];
    if rest.len() < len {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!(
                "message prefix announces {len} bytes, body has {}",
                rest.len()
            ),
        ));
    }
    if rest.len() > len {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "unary request carries more than one message",
        ));
    }
    let message = Bytes::copy_from_slice(rest);
    match flags {
        0 => Ok(message),
        1 if encoding_gzip => gunzip(&message),
        1 => Err(RpcError::new(
            Code::Internal,
            "compressed message flag set without grpc-encoding",
        )),
        other => Err(RpcError::new(
            Code::InvalidArgument,
            format!("unknown message flags {other:#04x}"),
        )),
    }
}

/// Decompresses a gzip body: every member of it (RFC 1952 allows several in a row, and
/// reading only the first would silently cut the message), and nothing for an empty body
/// (the empty message, as connect-go reads it).
fn gunzip(data: &[u8]) -> Result<Bytes, RpcError> {
    if data.is_empty() {
        return Ok(Bytes::new());
    }
    let mut out = Vec::new();
    let mut decoder = flate2::read::MultiGzDecoder::new(data).take(MAX_MESSAGE_BYTES as u64 + 1);
    decoder.read_to_end(&mut out).map_err(|e| {
        RpcError::new(
            Code::InvalidArgument,
            format!("request body is not valid gzip: {e}"),
        )
    })?;
    if out.len() > MAX_MESSAGE_BYTES {
        return Err(too_large());
    }
    Ok(Bytes::from(out))
}

fn gzip(data: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).ok()?;
    enc.finish().ok()
}

/// Decodes a request message in the request's codec.
pub fn decode<M>(rpc: &Rpc, bytes: &[u8]) -> Result<M, RpcError>
where
    M: prost::Message + Default + serde::de::DeserializeOwned,
{
    let name = std::any::type_name::<M>()
        .rsplit("::")
        .next()
        .unwrap_or("message");
    match rpc.codec {
        Codec::Proto => M::decode(bytes).map_err(|e| {
            RpcError::new(
                Code::InvalidArgument,
                format!("request is not a valid binary {name}: {e}"),
            )
        }),
        Codec::Json => {
            // An empty JSON body is the empty message, as other Connect servers accept.
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(M::default());
            }
            serde_json::from_slice(bytes).map_err(|e| {
                RpcError::new(
                    Code::InvalidArgument,
                    format!("request is not a valid JSON {name}: {e}"),
                )
            })
        }
    }
}

fn encode<M: prost::Message + serde::Serialize>(
    codec: Codec,
    msg: &M,
) -> Result<Vec<u8>, RpcError> {
    match codec {
        Codec::Proto => Ok(msg.encode_to_vec()),
        Codec::Json => serde_json::to_vec(msg).map_err(|e| {
            RpcError::new(Code::Internal, format!("encoding the response failed: {e}"))
        }),
    }
}

fn content_type(rpc: &Rpc) -> &'static str {
    match (rpc.protocol, rpc.codec) {
        (Protocol::Connect, Codec::Proto) => "application/proto",
        (Protocol::Connect, Codec::Json) => "application/json",
        (Protocol::Grpc, Codec::Proto) => "application/grpc+proto",
        (Protocol::Grpc, Codec::Json) => "application/grpc+json",
        (Protocol::GrpcWeb, Codec::Proto) => "application/grpc-web+proto",
        (Protocol::GrpcWeb, Codec::Json) => "application/grpc-web+json",
    }
}

/// A success response carrying `msg`.
pub fn respond<M: prost::Message + serde::Serialize>(rpc: &Rpc, msg: &M) -> Response {
    let payload = match encode(rpc.codec, msg) {
        Ok(p) => p,
        Err(e) => return error_response(rpc, &e),
    };
    let compressed = if rpc.accept_gzip && payload.len() >= COMPRESS_MIN_BYTES {
        gzip(&payload)
    } else {
        None
    };
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, content_type(rpc));
    match rpc.protocol {
        Protocol::Connect => {
            builder = builder.header("accept-encoding", "gzip");
            let body = match compressed {
                Some(z) => {
                    builder = builder.header(CONTENT_ENCODING, "gzip");
                    z
                }
                None => payload,
            };
            builder
                .body(Body::from(body))
                .unwrap_or_else(|_| internal_fallback())
        }
        Protocol::Grpc | Protocol::GrpcWeb => {
            builder = builder.header("grpc-accept-encoding", "gzip,identity");
            let (flag, data) = match compressed {
                Some(z) => {
                    builder = builder.header("grpc-encoding", "gzip");
                    (1u8, z)
                }
                None => (0u8, payload),
            };
            let frame = frame(flag, &data);
            let trailers = status_trailers(Code::Ok, "");
            if rpc.protocol == Protocol::Grpc {
                builder
                    .body(body_with_trailers(frame, trailers))
                    .unwrap_or_else(|_| internal_fallback())
            } else {
                let mut body = BytesMut::from(&frame[..]);
                body.extend_from_slice(&web_trailer_frame(&trailers));
                builder
                    .body(Body::from(body.freeze()))
                    .unwrap_or_else(|_| internal_fallback())
            }
        }
    }
}

/// An error response in the request's protocol. It names the encodings we accept, as
/// success responses do, so a client refused for its compression can tell what would do.
pub fn error_response(rpc: &Rpc, err: &RpcError) -> Response {
    let mut response = protocol_error(rpc, err);
    let (name, value) = match rpc.protocol {
        Protocol::Connect => ("accept-encoding", "gzip"),
        Protocol::Grpc | Protocol::GrpcWeb => ("grpc-accept-encoding", "gzip,identity"),
    };
    response.headers_mut().insert(
        HeaderName::from_static(name),
        HeaderValue::from_static(value),
    );
    response
}

fn protocol_error(rpc: &Rpc, err: &RpcError) -> Response {
    match rpc.protocol {
        Protocol::Connect => connect_error(err),
        // Trailers-only: the status travels in the response headers, with no body.
        Protocol::Grpc => {
            let mut response = Response::builder()
                .status(StatusCode::OK)
                .header(CONTENT_TYPE, content_type(rpc))
                .body(Body::empty())
                .unwrap_or_else(|_| internal_fallback());
            response
                .headers_mut()
                .extend(status_trailers(err.code, &err.message));
            response
        }
        Protocol::GrpcWeb => {
            let trailers = status_trailers(err.code, &err.message);
            let mut response = Response::builder()
                .status(StatusCode::OK)
                .header(CONTENT_TYPE, content_type(rpc))
                .body(Body::from(web_trailer_frame(&trailers)))
                .unwrap_or_else(|_| internal_fallback());
            // Also in the headers, for clients that read a trailers-only answer there.
            response.headers_mut().extend(trailers);
            response
        }
    }
}

/// The Connect error body with the HTTP status of the code.
pub fn connect_error(err: &RpcError) -> Response {
    let body = serde_json::json!({ "code": err.code.as_str(), "message": err.message });
    (
        err.code.http_status(),
        [(CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn unsupported_media_type(content_type: &str) -> Response {
    let err = RpcError::new(
        Code::InvalidArgument,
        format!(
            "unsupported content type {content_type:?}; use application/proto, application/json, application/grpc[+proto|+json] or application/grpc-web[+proto|+json]"
        ),
    );
    let body = serde_json::json!({ "code": err.code.as_str(), "message": err.message });
    (
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        [
            (CONTENT_TYPE, "application/json"),
            (HeaderName::from_static("accept-post"), "application/proto, application/json, application/grpc, application/grpc+proto, application/grpc+json, application/grpc-web, application/grpc-web+proto, application/grpc-web+json"),
        ],
        body.to_string(),
    )
        .into_response()
}

fn frame(flag: u8, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + data.len());
    out.put_u8(flag);
    out.put_u32(data.len() as u32);
    out.extend_from_slice(data);
    out.freeze()
}

fn status_trailers(code: Code, message: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from(code.grpc()),
    );
    if !message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
            map.insert(HeaderName::from_static("grpc-message"), v);
        }
    }
    map
}

/// gRPC-Web carries trailers as a final length-prefixed frame with flag 0x80.
fn web_trailer_frame(trailers: &HeaderMap) -> Bytes {
    let mut text = String::new();
    for (name, value) in trailers {
        text.push_str(name.as_str());
        text.push(':');
        text.push_str(value.to_str().unwrap_or_default());
        text.push_str("\r\n");
    }
    frame(0x80, text.as_bytes())
}

fn body_with_trailers(data: Bytes, trailers: HeaderMap) -> Body {
    let frames = vec![
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(data)),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    Body::new(http_body_util::StreamBody::new(futures::stream::iter(
        frames,
    )))
}

/// grpc-message: percent-encode everything outside printable ASCII, and '%'.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn internal_fallback() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(CONTENT_TYPE, "application/json")],
        r#"{"code":"internal","message":"response could not be built"}"#,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn timeouts_parse() {
        assert_eq!(
            connect_timeout("1500").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(connect_timeout("").is_err());
        assert!(connect_timeout("12345678901").is_err());
        assert!(connect_timeout("-1").is_err());
        assert_eq!(grpc_timeout("2S").unwrap(), Duration::from_secs(2));
        assert_eq!(grpc_timeout("100m").unwrap(), Duration::from_millis(100));
        assert_eq!(grpc_timeout("1H").unwrap(), Duration::from_secs(3600));
        assert!(grpc_timeout("123456789S").is_err());
        assert!(grpc_timeout("10x").is_err());
        assert!(grpc_timeout("S").is_err());
    }

    #[test]
    fn unframes_exactly_one_message() {
        assert_eq!(
            unframe(&frame(0, b"abc"), false).unwrap(),
            Bytes::from_static(b"abc")
        );
        let z = gzip(b"hello").unwrap();
        assert_eq!(
            unframe(&frame(1, &z), true).unwrap(),
            Bytes::from_static(b"hello")
        );
        assert_eq!(
            unframe(&frame(1, &z), false).unwrap_err().code,
            Code::Internal
        );
        let mut two = frame(0, b"a").to_vec();
        two.extend_from_slice(&frame(0, b"b"));
        assert_eq!(
            unframe(&two, false).unwrap_err().code,
            Code::InvalidArgument
        );
        assert_eq!(
            unframe(&[0, 0, 0], false).unwrap_err().code,
            Code::InvalidArgument
        );
        assert_eq!(
            unframe(&[0, 0xff, 0xff, 0xff, 0xff], false)
                .unwrap_err()
                .code,
            Code::ResourceExhausted
        );
    }

    #[test]
    fn gunzip_reads_every_member_and_nothing_for_empty() {
        let mut two = gzip(b"first ").unwrap();
        two.extend(gzip(b"second").unwrap());
        assert_eq!(gunzip(&two).unwrap(), Bytes::from_static(b"first second"));
        assert_eq!(gunzip(b"").unwrap(), Bytes::new());
        assert!(gunzip(b"not gzip").is_err());
    }

    #[test]
    fn gzip_bombs_are_cut_at_the_limit() {
        let big = vec![0u8; MAX_MESSAGE_BYTES + 10];
        let z = gzip(&big).unwrap();
        assert!(z.len() < 100_000);
        assert_eq!(gunzip(&z).unwrap_err().code, Code::ResourceExhausted);
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("vm 100% gone é"), "vm 100%25 gone %C3%A9");
    }

    fn rpc(protocol: Protocol, codec: Codec, gzip: bool) -> Rpc {
        Rpc {
            protocol,
            codec,
            request_gzip: gzip,
            accept_gzip: false,
            deadline: None,
        }
    }

    proptest! {
        // Decoders never panic, whatever the bytes: every failure is a Connect error.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), gz in any::<bool>()) {
            use crate::proto::vmprovisioner::{CreateVmRequest, ListVmsRequest};
            let _ = unframe(&bytes, gz);
            let _ = gunzip(&bytes);
            for codec in [Codec::Proto, Codec::Json] {
                let r = rpc(Protocol::Connect, codec, false);
                let _ = decode::<CreateVmRequest>(&r, &bytes);
                let _ = decode::<ListVmsRequest>(&r, &bytes);
            }
        }

        #[test]
        fn json_decoder_never_panics_on_text(text in "\\PC{0,256}") {
            use crate::proto::vmprovisioner::CreateVmRequest;
            let _ = decode::<CreateVmRequest>(&rpc(Protocol::Connect, Codec::Json, false), text.as_bytes());
        }

        #[test]
        fn json_decoder_never_panics_on_json_shapes(
            vm_id in proptest::option::of("\\PC{0,20}"),
            vcpu in any::<i64>(),
            size in "[0-9a-z\"-]{0,25}",
        ) {
            use crate::proto::vmprovisioner::CreateVmRequest;
            let doc = format!(
                r#"{{"vmId": {}, "config": {{"cpu": {{"vcpuCount": {vcpu}}}, "memory": {{"sizeBytes": "{size}"}}, "metadata": {{"a": 1}}}}}}"#,
                serde_json::to_string(&vm_id).unwrap()
            );
            let _ = decode::<CreateVmRequest>(&rpc(Protocol::Connect, Codec::Json, false), doc.as_bytes());
        }
    }
}
