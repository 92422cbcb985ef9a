//! Engine errors: `EngineError` for connecting/handshaking, `IoError` for one request.
//! Every `IoError` maps to exactly one positive errno for the block device completion.

use std::io;

use enbd_proto::wire::NbdError;
use thiserror::Error;

use super::config::ConfigError;

/// Why the engine could not be started or a connection could not be (re)established.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("invalid engine configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connecting to {addr}: no answer within {secs:.1}s")]
    ConnectTimeout { addr: String, secs: f64 },
    #[error("NBD handshake with {addr}: {reason}")]
    Handshake { addr: String, reason: String },
    #[error("server {addr} refused export {export:?}: {reason}")]
    ExportRefused {
        addr: String,
        export: String,
        reason: String,
    },
    #[error(
        "server {addr} changed identity on reconnect ({what}): refusing to continue, \
         the data may not be the same disk"
    )]
    IdentityChanged { addr: String, what: String },
}

/// Why one request failed. Nothing is reported failed while the engine can still complete it
/// (brownout policy `wait`), except errors the server itself returned.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IoError {
    /// The server answered the request with an NBD error.
    #[error("server returned {0}")]
    Server(NbdError),
    #[error("request [{offset}, +{len}) lies beyond the end of the {size}-byte export")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request of {len} bytes is invalid: {why}")]
    Invalid { len: u64, why: &'static str },
    #[error("export is read-only")]
    ReadOnly,
    #[error("server does not support {0}")]
    Unsupported(&'static str),
    #[error("no server acknowledgement within the brownout deadline of {0:?}")]
    BrownoutTimeout(std::time::Duration),
    #[error("engine has failed: {0}")]
    EngineFailed(String),
    #[error("engine is shut down")]
    Shutdown,
    #[error("server sent a malformed reply: {0}")]
    Protocol(String),
}

const EIO: i32 = 5;
const EINVAL: i32 = 22;
const EROFS: i32 = 30;
const EOPNOTSUPP: i32 = 95;

impl IoError {
    /// Positive errno for the block layer. A server's error is the protocol's errno for it
    /// ([`NbdError::to_errno`]: the same number, EINVAL for a value the protocol does not
    /// define), except ESHUTDOWN: the engine re-issues a request the server refused while
    /// shutting down, so one that still ends so has lost its server and reads as EIO.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Server(NbdError::Shutdown) => EIO,
            Self::Server(e) => e.to_errno(),
            Self::OutOfRange { .. } | Self::Invalid { .. } => EINVAL,
            Self::ReadOnly => EROFS,
            Self::Unsupported(_) => EOPNOTSUPP,
            Self::BrownoutTimeout(_)
            | Self::EngineFailed(_)
            | Self::Shutdown
            | Self::Protocol(_) => EIO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert_eq!(IoError::Server(NbdError::NoSpc).errno(), 28);
        assert_eq!(IoError::Server(NbdError::Perm).errno(), 1);
        assert_eq!(IoError::Server(NbdError::Overflow).errno(), 75);
        assert_eq!(IoError::Server(NbdError::Shutdown).errno(), 5);
        // The protocol: an unknown value reads as EINVAL.
        assert_eq!(IoError::Server(NbdError::Unknown(9999)).errno(), 22);
        assert_eq!(
            IoError::Server(NbdError::NoSpc).to_string(),
            "server returned NBD_ENOSPC (28)"
        );
        assert_eq!(IoError::ReadOnly.errno(), 30);
        assert_eq!(IoError::Unsupported("trim").errno(), 95);
        assert_eq!(
            IoError::BrownoutTimeout(std::time::Duration::from_secs(1)).errno(),
            5
        );
        assert_eq!(
            IoError::OutOfRange {
                offset: 0,
                len: 1,
                size: 0
            }
            .errno(),
            22
        );
    }
}
