//! Connect error codes, and the one mapping from service errors to them.

use http::StatusCode;

use crate::service;

/// The Connect / gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok,
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of the Connect protocol's code table.
    pub fn http_status(self) -> StatusCode {
        match self {
            Code::Ok => StatusCode::OK,
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }

    /// The gRPC status number.
    pub fn grpc(self) -> u16 {
        match self {
            Code::Ok => 0,
            Code::Canceled => 1,
            Code::Unknown => 2,
            Code::InvalidArgument => 3,
            Code::DeadlineExceeded => 4,
            Code::NotFound => 5,
            Code::AlreadyExists => 6,
            Code::PermissionDenied => 7,
            Code::ResourceExhausted => 8,
            Code::FailedPrecondition => 9,
            Code::Aborted => 10,
            Code::OutOfRange => 11,
            Code::Unimplemented => 12,
            Code::Internal => 13,
            Code::Unavailable => 14,
            Code::DataLoss => 15,
            Code::Unauthenticated => 16,
        }
    }
}

/// An error as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The single mapping of service errors to the wire. No wildcard arm: a new variant must be
/// decided here.
impl From<service::Error> for RpcError {
    fn from(e: service::Error) -> Self {
        use service::Error as E;
        match e {
            E::InvalidArgument(m) => RpcError::new(Code::InvalidArgument, m),
            E::Unauthenticated(m) => RpcError::new(Code::Unauthenticated, m),
            E::PermissionDenied(m) => RpcError::new(Code::PermissionDenied, m),
            E::NotFound(m) => RpcError::new(Code::NotFound, m),
            E::AlreadyExists(m) => RpcError::new(Code::AlreadyExists, m),
            E::FailedPrecondition(m) => RpcError::new(Code::FailedPrecondition, m),
            E::ResourceExhausted(m) => RpcError::new(Code::ResourceExhausted, m),
            E::Unavailable(m) => RpcError::new(Code::Unavailable, m),
            E::DeadlineExceeded(m) => RpcError::new(Code::DeadlineExceeded, m),
            E::Internal(detail) => {
                tracing::error!(detail, "internal error");
                RpcError::new(Code::Internal, "internal error; see the metald log")
            }
        }
    }
}
