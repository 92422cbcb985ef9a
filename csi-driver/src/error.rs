//! The controller's one error type and its one mapping to `tonic::Status`.
//!
//! Every failure a CSI caller can see is classified here with the code the CSI
//! spec assigns; an enbd-server's own status is passed through when its code is
//! meaningful to the caller, and transport trouble becomes `Unavailable` so the
//! sidecars retry. Nothing reaches a caller as `Unknown`.

use enbd_proto::ids::ServerId;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("an operation on {0} is already in progress")]
    Aborted(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0} is not supported by this driver")]
    Unimplemented(&'static str),
    #[error("{0}")]
    Internal(String),
    /// A management call to an enbd-server failed.
    #[error("enbd-server {server}: {message}")]
    Server {
        server: ServerId,
        code: Code,
        message: String,
    },
}

impl CsiError {
    pub fn server(server: &ServerId, status: Status) -> Self {
        CsiError::Server {
            server: server.clone(),
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

    /// The gRPC code a CSI caller sees.
    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Unimplemented(_) => Code::Unimplemented,
            CsiError::Internal(_) => Code::Internal,
            CsiError::Server { code, .. } => match code {
                // The server's verdicts on the request itself mean the same to
                // the CSI caller.
                Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::FailedPrecondition
                | Code::ResourceExhausted
                | Code::OutOfRange
                | Code::Aborted => *code,
                // The server could not be reached or gave up: retryable.
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Code::Unavailable,
                _ => Code::Internal,
            },
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Code::NotFound
    }
}

impl From<CsiError> for Status {
    fn from(err: CsiError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

/// Shorthand for argument checks at the top of each RPC.
pub fn invalid(msg: impl Into<String>) -> CsiError {
    CsiError::InvalidArgument(msg.into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_map_to_csi_codes() {
        let s = ServerId::parse("s0").unwrap();
        let cases = [
            (Code::NotFound, Code::NotFound),
            (Code::OutOfRange, Code::OutOfRange),
            (Code::Unavailable, Code::Unavailable),
            (Code::DeadlineExceeded, Code::Unavailable),
            (Code::Unknown, Code::Internal),
            (Code::PermissionDenied, Code::Internal),
        ];
        for (server_code, csi_code) in cases {
            let err = CsiError::server(&s, Status::new(server_code, "x"));
            let status = Status::from(err);
            assert_eq!(status.code(), csi_code, "{server_code:?}");
            assert_eq!(status.message(), "enbd-server s0: x");
        }
    }

    #[test]
    fn nothing_maps_to_unknown() {
        for err in [
            invalid("a"),
            CsiError::Aborted("volume x".into()),
            CsiError::Unimplemented("ControllerModifyVolume"),
            CsiError::Internal("i".into()),
        ] {
            assert_ne!(Status::from(err).code(), Code::Unknown);
        }
    }
}
