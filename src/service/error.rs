//! Service errors, by what the caller should understand. Mapped to the wire in exactly one
//! place (`api::error`).

use crate::backend;

/// Why a VmService call failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bug or an unexpected engine answer: the detail is logged, the caller gets a generic
    /// message.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn vm_not_found(vm_id: &str) -> Self {
        Error::NotFound(format!("vm {vm_id} not found"))
    }

    /// Maps a Docker failure on `vm_id` to what the caller can act on.
    pub fn from_backend(vm_id: &str, err: backend::Error) -> Self {
        use backend::ErrorKind as K;
        match err.kind {
            K::NotFound(_) => Error::vm_not_found(vm_id),
            K::Conflict(message) => Error::FailedPrecondition(format!("vm {vm_id}: {message}")),
            K::NotModified => {
                Error::FailedPrecondition(format!("vm {vm_id}: already in that state"))
            }
            K::Unavailable(reason) => Error::Unavailable(format!(
                "docker engine unreachable during {}: {reason}",
                err.op
            )),
            K::PortsExhausted(reason) => Error::ResourceExhausted(format!(
                "vm {vm_id}: no free host port in the configured range: {reason}"
            )),
            // Not exhaustion: the ports were free to Docker, a process outside it held them.
            // Another try picks other ports, so the caller may well succeed by retrying.
            ref kind @ K::HostPortInUse { tries, .. } => Error::Unavailable(format!(
                "vm {vm_id}: host port {} is held by a process outside Docker (tried {tries} port{}); retry",
                kind.held_address().unwrap_or("of the configured range"),
                if tries == 1 { "" } else { "s" },
            )),
            K::ImageUnavailable(reason) => {
                Error::FailedPrecondition(format!("image {} cannot be had: {reason}", err.target))
            }
            K::Rejected {
                status: 400,
                message,
            } => {
                Error::InvalidArgument(format!("vm {vm_id}: docker refused {}: {message}", err.op))
            }
            K::Rejected { message, .. } => Error::FailedPrecondition(format!(
                "vm {vm_id}: docker refused {}: {message}",
                err.op
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_held_outside_docker_is_unavailable_not_exhausted() {
        let err = backend::Error {
            op: "start container",
            target: "c".into(),
            kind: backend::ErrorKind::HostPortInUse {
                tries: 8,
                message: "Error starting userland proxy: listen tcp4 127.0.0.1:33164: bind: address already in use".into(),
            },
        };
        assert_eq!(
            Error::from_backend("vm-1", err),
            Error::Unavailable(
                "vm vm-1: host port 127.0.0.1:33164 is held by a process outside Docker (tried 8 ports); retry".into()
            )
        );
    }
}
