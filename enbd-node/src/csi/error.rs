//! The node service's error type and its single mapping onto gRPC status codes.
//!
//! Invariant: every failure reaching a CSI caller carries the code the CSI spec assigns
//! (never `Unknown`), and messages name the volume or path involved but never secrets.

use enbd_proto::ids::IdError;
use enbd_proto::params::ParamError;
use tonic::{Code, Status};

use super::attacher::AttacherError;
use crate::mount::MountError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A required field is missing or malformed.
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    BadVolumeId(#[from] IdError),
    #[error("volume context: {0}")]
    BadContext(#[from] ParamError),
    /// The volume or path is not known on this node.
    #[error("{0}")]
    NotFound(String),
    /// Staged or published already, with something incompatible.
    #[error("{0}")]
    AlreadyExists(String),
    /// The call is valid but the node is not in a state to do it (e.g. not staged yet).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same volume is in progress.
    #[error("an operation on volume {0} is already in progress")]
    Aborted(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error(transparent)]
    Attach(#[from] AttacherError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("{0}")]
    Internal(String),
}

impl NodeError {
    pub fn code(&self) -> Code {
        match self {
            NodeError::InvalidArgument(_)
            | NodeError::BadVolumeId(_)
            | NodeError::BadContext(_) => Code::InvalidArgument,
            NodeError::NotFound(_) => Code::NotFound,
            NodeError::AlreadyExists(_) => Code::AlreadyExists,
            NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
            NodeError::Aborted(_) => Code::Aborted,
            NodeError::OutOfRange(_) => Code::OutOfRange,
            NodeError::ResourceExhausted(_) => Code::ResourceExhausted,
            NodeError::Internal(_) => Code::Internal,
            NodeError::Attach(e) => match e {
                AttacherError::NotFound(_) => Code::NotFound,
                AttacherError::Unavailable(_) => Code::Unavailable,
                AttacherError::Busy(_) => Code::FailedPrecondition,
                AttacherError::Conflict(_) => Code::AlreadyExists,
                AttacherError::InProgress(_) => Code::Aborted,
                AttacherError::Invalid(_) => Code::InvalidArgument,
                AttacherError::Unsupported(_) => Code::FailedPrecondition,
                AttacherError::Exhausted(_) => Code::ResourceExhausted,
                AttacherError::Internal(_) => Code::Internal,
            },
            NodeError::Mount(e) => match e {
                MountError::BadOption(_) | MountError::NulInPath(_) => Code::InvalidArgument,
                // The device holds data we will not overwrite, or is still in use: the
                // operator must act before a retry can succeed.
                MountError::ForeignContent { .. }
                | MountError::Busy { .. }
                | MountError::TooSmall { .. } => Code::FailedPrecondition,
                MountError::ToolMissing { .. } => Code::FailedPrecondition,
                MountError::Io { .. }
                | MountError::ToolFailed { .. }
                | MountError::MountInfo { .. } => Code::Internal,
            },
        }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

impl From<tokio::task::JoinError> for NodeError {
    fn from(e: tokio::task::JoinError) -> NodeError {
        NodeError::Internal(format!("node task failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn codes_follow_the_spec() {
        let cases: Vec<(NodeError, Code)> = vec![
            (
                NodeError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (
                IdError::Empty { kind: "volume id" }.into(),
                Code::InvalidArgument,
            ),
            (
                ParamError::MissingContext("enbd.io/server").into(),
                Code::InvalidArgument,
            ),
            (NodeError::NotFound("x".into()), Code::NotFound),
            (NodeError::AlreadyExists("x".into()), Code::AlreadyExists),
            (
                NodeError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (NodeError::Aborted("v".into()), Code::Aborted),
            (NodeError::OutOfRange("x".into()), Code::OutOfRange),
            (
                NodeError::ResourceExhausted("x".into()),
                Code::ResourceExhausted,
            ),
            (AttacherError::NotFound("x".into()).into(), Code::NotFound),
            (
                AttacherError::Unavailable("x".into()).into(),
                Code::Unavailable,
            ),
            (
                AttacherError::Busy("x".into()).into(),
                Code::FailedPrecondition,
            ),
            (
                MountError::BadOption("bind".into()).into(),
                Code::InvalidArgument,
            ),
            (
                MountError::ForeignContent {
                    path: PathBuf::from("/dev/x"),
                    found: "btrfs".into(),
                }
                .into(),
                Code::FailedPrecondition,
            ),
        ];
        for (err, code) in cases {
            let msg = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{msg}");
            assert_eq!(status.message(), msg);
        }
    }
}
