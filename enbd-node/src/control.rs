//! The daemon's control socket: how `enbd-node attach|detach|list` talk to `enbd-node daemon`.
//!
//! Protocol: a client connects to the unix socket, writes one JSON request on one line, reads
//! one JSON response line, and closes. The socket is created mode 0600 (root only): attaching
//! a device is a privileged act.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::attach::{AttachError, AttachRequest, AttachmentManager, AttachmentStatus, Phase};
use crate::engine::BrownoutPolicy;

/// Longest request line accepted (a request is a few hundred bytes).
const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Attach {
        volume_id: String,
        servers: Vec<String>,
        export: String,
        channels: u16,
        queues: u16,
        queue_depth: u16,
        brownout: String,
        read_only: bool,
    },
    /// `target` is a volume id or a device path (`/dev/ublkbN`).
    Detach {
        target: String,
    },
    List,
    ResetChannel {
        target: String,
        channel: usize,
    },
    Resize {
        target: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelView {
    pub index: usize,
    pub server: String,
    pub state: String,
    pub in_flight: u64,
    pub completed: u64,
    pub reissued: u64,
    pub connects: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeView {
    pub volume_id: String,
    pub device: String,
    pub size_bytes: u64,
    pub servers: Vec<String>,
    pub export: String,
    pub read_only: bool,
    pub brownout: String,
    /// attached | recovering | failed: <reason>
    pub phase: String,
    /// Engine state (Healthy, Degraded, Waiting, Failed), or "-" while not connected.
    pub engine: String,
    pub channels: Vec<ChannelView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Attached {
        volume_id: String,
        device: String,
        size_bytes: u64,
    },
    Detached {
        volume_id: String,
    },
    List {
        volumes: Vec<VolumeView>,
    },
    Resized {
        volume_id: String,
        size_bytes: u64,
    },
    Done,
    Error {
        message: String,
    },
}

#[derive(Debug, Error)]
pub enum ControlError {
    #[error(
        "cannot reach the enbd-node daemon at {path}: {source} (is `enbd-node daemon` running?)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed control message: {0}")]
    Protocol(String),
}

impl From<&AttachmentStatus> for VolumeView {
    fn from(s: &AttachmentStatus) -> Self {
        let (engine, channels) = match &s.engine {
            Some(e) => (
                format!("{:?}", e.state),
                e.channels
                    .iter()
                    .map(|c| ChannelView {
                        index: c.index,
                        server: c.server.clone(),
                        state: format!("{:?}", c.state),
                        in_flight: c.in_flight,
                        completed: c.completed,
                        reissued: c.reissued,
                        connects: c.connects,
                        last_error: c.last_error.clone(),
                    })
                    .collect(),
            ),
            None => ("-".to_string(), Vec::new()),
        };
        VolumeView {
            volume_id: s.volume_id.clone(),
            device: s.dev_path.display().to_string(),
            size_bytes: s.size_bytes,
            servers: s.servers.clone(),
            export: s.export.clone(),
            read_only: s.read_only,
            brownout: s.brownout.clone(),
            phase: match &s.phase {
                Phase::Attached => "attached".into(),
                Phase::Recovering => "recovering".into(),
                Phase::Failed(why) => format!("failed: {why}"),
            },
            engine,
            channels,
        }
    }
}

/// Binds the control socket (replacing a stale one) and serves it until `shutdown`.
pub async fn serve(
    path: &Path,
    mgr: AttachmentManager,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a non-socket file is in the way",
            )));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    tracing::info!(socket = %path.display(), "control socket ready");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let mgr = mgr.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_one(stream, &mgr).await {
                            tracing::warn!(error = %e, "control connection failed");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "control accept failed"),
            },
        }
    }
}

async fn serve_one(stream: UnixStream, mgr: &AttachmentManager) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r.take(MAX_LINE))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handle(req, mgr).await,
        Err(e) => Response::Error {
            message: format!("malformed request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

/// A volume id, or the volume behind a device path.
fn resolve(target: &str, mgr: &AttachmentManager) -> Result<String, String> {
    if target.starts_with("/dev/") || target.starts_with("ublkb") {
        mgr.volume_of_device(target)
            .ok_or_else(|| format!("device {target} is not attached by this daemon"))
    } else {
        Ok(target.to_string())
    }
}

pub async fn handle(req: Request, mgr: &AttachmentManager) -> Response {
    let err = |e: AttachError| Response::Error {
        message: e.to_string(),
    };
    match req {
        Request::Attach {
            volume_id,
            servers,
            export,
            channels,
            queues,
            queue_depth,
            brownout,
            read_only,
        } => {
            let brownout: BrownoutPolicy = match brownout.parse() {
                Ok(b) => b,
                Err(e) => {
                    return Response::Error {
                        message: e.to_string(),
                    };
                }
            };
            let req = AttachRequest {
                volume_id,
                servers,
                export,
                channels,
                queues,
                queue_depth,
                brownout,
                read_only,
            };
            match mgr.attach(req).await {
                Ok(a) => Response::Attached {
                    volume_id: a.volume_id,
                    device: a.dev_path.display().to_string(),
                    size_bytes: a.size_bytes,
                },
                Err(e) => err(e),
            }
        }
        Request::Detach { target } => match resolve(&target, mgr) {
            Ok(id) => match mgr.detach(&id).await {
                Ok(()) => Response::Detached { volume_id: id },
                Err(e) => err(e),
            },
            Err(message) => Response::Error { message },
        },
        Request::List => Response::List {
            volumes: mgr.list().iter().map(VolumeView::from).collect(),
        },
        Request::ResetChannel { target, channel } => match resolve(&target, mgr) {
            Ok(id) => match mgr.reset_channel(&id, channel) {
                Ok(()) => Response::Done,
                Err(e) => err(e),
            },
            Err(message) => Response::Error { message },
        },
        Request::Resize { target } => match resolve(&target, mgr) {
            Ok(id) => match mgr.resize(&id).await {
                Ok(size_bytes) => Response::Resized {
                    volume_id: id,
                    size_bytes,
                },
                Err(e) => err(e),
            },
            Err(message) => Response::Error { message },
        },
    }
}

/// Sends one request to the daemon and returns its response.
pub async fn call(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line).await.map_err(io)?;
    w.shutdown().await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(r.take(MAX_LINE * 16))
        .read_line(&mut answer)
        .await
        .map_err(io)?;
    if answer.is_empty() {
        return Err(ControlError::Protocol(
            "the daemon closed the connection without answering".into(),
        ));
    }
    serde_json::from_str(&answer).map_err(|e| ControlError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = Request::Detach {
            target: "/dev/ublkb0".into(),
        };
        let text = serde_json::to_string(&r).expect("encode");
        assert_eq!(text, r#"{"op":"detach","target":"/dev/ublkb0"}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).expect("decode"), r);
        let e = Response::Error {
            message: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).expect("encode"),
            r#"{"result":"error","message":"x"}"#
        );
    }

    #[tokio::test]
    async fn socket_round_trip_against_a_real_manager() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = crate::attach::ManagerConfig {
            state_dir: dir.path().join("state"),
            max_volumes: 0,
            journal_bytes: 1 << 20,
        };
        let mgr = AttachmentManager::new(cfg, tokio::runtime::Handle::current()).expect("manager");
        let sock = dir.path().join("run/control.sock");
        let stop = CancellationToken::new();
        let server = tokio::spawn({
            let (sock, mgr, stop) = (sock.clone(), mgr.clone(), stop.clone());
            async move { serve(&sock, mgr, stop).await }
        });
        // Readiness: the socket accepts connections.
        let mut tries = 0;
        while UnixStream::connect(&sock).await.is_err() {
            tries += 1;
            assert!(tries < 500, "control socket never came up");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            call(&sock, &Request::List).await.expect("list"),
            Response::List { volumes: vec![] }
        );
        // An unknown volume and an unknown device are both refused by name.
        for target in ["ghost", "/dev/ublkb7"] {
            let reply = call(
                &sock,
                &Request::Detach {
                    target: target.into(),
                },
            )
            .await
            .expect("detach");
            match reply {
                Response::Error { message } => assert!(
                    message.contains(&format!("{target} is not attached")),
                    "{message}"
                ),
                other => panic!("unexpected {other:?}"),
            }
        }
        stop.cancel();
        server.await.expect("join").expect("serve");
    }
}
