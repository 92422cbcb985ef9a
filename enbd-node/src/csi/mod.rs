//! CSI services of the node plugin (Identity + Node) served over a unix socket.
//!
//! Layering: this module talks to the device layer only through the [`Attacher`] trait and
//! to the system only through [`crate::mount`]; it never sees libublk or engine types.
//! Invariants: every RPC validates its arguments before acting, maps failures through
//! [`error::NodeError`] (one mapping to gRPC codes), and never logs secrets.

pub mod attacher;
pub mod error;
pub mod identity;
pub mod layout;
pub mod locks;
pub mod node;
pub mod validate;

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use enbd_proto::csi::identity_server::IdentityServer;
use enbd_proto::csi::node_server::NodeServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use attacher::{AttachSpec, AttachedDevice, Attacher, AttacherError, VolumeHealth};
pub use identity::IdentityService;
pub use node::NodeService;

/// What the node service reports about this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Kubernetes node name (`NodeGetInfo.node_id`).
    pub node_id: String,
    /// CSI driver name (`GetPluginInfo.name`), e.g. `csi.enbd.io`.
    pub driver_name: String,
    /// Most volumes this node attaches at once; 0 means no limit.
    pub max_volumes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("CSI endpoint {0:?} must be unix:///absolute/path or an absolute path")]
    BadEndpoint(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CSI gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Parses `unix:///csi/csi.sock` (or a bare absolute path) into the socket path.
pub fn endpoint_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let raw = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    let p = Path::new(raw);
    if !p.is_absolute() || raw.contains('\0') {
        return Err(ServeError::BadEndpoint(endpoint.to_string()));
    }
    Ok(p.to_path_buf())
}

/// Binds the CSI endpoint, replacing a stale socket left by a previous run (only a socket:
/// any other file there is an error, never deleted).
pub fn bind_endpoint(endpoint: &str) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::FileTypeExt;
    let path = endpoint_path(endpoint)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ServeError::Io {
            op: "create directory",
            path: parent.into(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(&path).map_err(|source| ServeError::Io {
                op: "remove stale socket",
                path: path.clone(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(ServeError::Io {
                op: "bind",
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a non-socket file is in the way",
                ),
            });
        }
        Err(_) => {}
    }
    UnixListener::bind(&path).map_err(|source| ServeError::Io {
        op: "bind",
        path,
        source,
    })
}

/// Serves Identity and Node on `endpoint` until `shutdown` is cancelled; in-flight calls
/// finish first.
pub async fn serve_csi<A: Attacher>(
    endpoint: &str,
    node_config: NodeConfig,
    attachments: Arc<A>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let listener = bind_endpoint(endpoint)?;
    info!(endpoint, node_id = %node_config.node_id, "serving CSI identity and node services");
    serve_on(listener, node_config, attachments, shutdown).await
}

/// Serves on an already bound listener (tests bind their own in a temporary directory).
pub async fn serve_on<A: Attacher>(
    listener: UnixListener,
    node_config: NodeConfig,
    attachments: Arc<A>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let identity = IdentityService::new(&node_config, attachments.clone());
    let node = NodeService::new(node_config, attachments);
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}
