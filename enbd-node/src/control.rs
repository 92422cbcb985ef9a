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
        /// Mirrored volumes: `ID@HOST:PORT@http://HOST:PORT` per replica.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        replicas: Vec<String>,
        /// Mirrored volumes: e.g. `5s` (default 5s).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replica_timeout: Option<String>,
        /// `require` or `off`; absent: the daemon's `--tls`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<String>,
        /// Mirrored volumes: resync copy limit, e.g. `50Mi` (bytes per second).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resync_bandwidth: Option<String>,
    },
    /// Replaces replica `replica` of an attached mirrored volume by `with`
    /// (`ID@HOST:PORT@http://HOST:PORT`), which receives a full copy.
    Replace {
        target: String,
        replica: String,
        with: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resync_bandwidth: Option<String>,
    },
    /// Makes one replica of an attached mirrored volume the only in-sync copy; refused
    /// unless `accept_data_loss`.
    Promote {
        target: String,
        replica: String,
        accept_data_loss: bool,
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
    /// Mirrored volumes: every replica (empty for a single copy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaView>,
    /// Mirrored volumes: the generation of the membership record in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    pub id: String,
    /// NBD data address.
    pub address: String,
    pub mgmt: String,
    /// Generation its server last reported (0: not known).
    pub generation: u64,
    /// in-sync | out | resyncing | down | "-" (mirror not open)
    pub state: String,
    /// Resyncing: bytes of missed regions, bytes copied, copy rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_copy: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<u64>,
    pub reads: u64,
    pub writes: u64,
    pub last_error: Option<String>,
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
    Promoted {
        volume_id: String,
        replica: String,
        generation: u64,
    },
    Replaced {
        volume_id: String,
        replica: String,
        with: String,
        generation: u64,
        /// The new replica's volume was created by this call.
        created: bool,
    },
    Done,
    Error {
        message: String,
        /// What kind of failure, for the client's exit code (absent from older daemons:
        /// [`ErrorKind::Failed`]).
        #[serde(default, skip_serializing_if = "ErrorKind::is_failed")]
        kind: ErrorKind,
    },
}

/// Failure classes a client command reports as distinct exit codes (see
/// [`ErrorKind::exit_code`]); everything without a class of its own is `Failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    #[default]
    Failed,
    /// The request itself is malformed or names impossible settings.
    Invalid,
    /// The volume, device or replica named is not attached here (or not on its server).
    NotFound,
    /// The volume is in use: mounted or open, or attached with other settings.
    InUse,
    /// Not now: the daemon or a server cannot be reached, or the volume is busy being
    /// taken over. Retrying later may succeed.
    Unavailable,
}

impl ErrorKind {
    fn is_failed(&self) -> bool {
        *self == ErrorKind::Failed
    }

    /// The process exit code of a client command that failed this way (README: "Exit
    /// codes"). 2 is also what the argument parser exits with on a usage error.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Failed => 1,
            ErrorKind::Invalid => 2,
            ErrorKind::NotFound => 3,
            ErrorKind::InUse => 4,
            ErrorKind::Unavailable => 5,
        }
    }

    /// The class of an attachment manager error.
    pub fn of(e: &AttachError) -> Self {
        use crate::engine::EngineError;
        match e {
            AttachError::Invalid(_) | AttachError::ReadOnlyExport(_) => ErrorKind::Invalid,
            AttachError::NotAttached(_) => ErrorKind::NotFound,
            AttachError::Busy { .. } | AttachError::Conflict { .. } => ErrorKind::InUse,
            AttachError::InProgress(_) => ErrorKind::Unavailable,
            AttachError::Engine(e) => match e {
                EngineError::Connect { .. }
                | EngineError::ConnectTimeout { .. }
                | EngineError::Handshake { .. } => ErrorKind::Unavailable,
                EngineError::ExportRefused { .. } => ErrorKind::NotFound,
                EngineError::Config(_) => ErrorKind::Invalid,
                EngineError::Tls { .. } | EngineError::IdentityChanged { .. } => ErrorKind::Failed,
            },
            _ => ErrorKind::Failed,
        }
    }
}

impl Response {
    /// An error of no particular class.
    pub fn error(message: impl Into<String>) -> Self {
        Response::Error {
            message: message.into(),
            kind: ErrorKind::Failed,
        }
    }

    /// An error of class `kind`.
    pub fn error_of(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response::Error {
            message: message.into(),
            kind,
        }
    }
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
        let engine = match &s.mirror {
            Some(m) => format!("{:?}", m.state),
            None => engine,
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
            replicas: replica_views(s),
            generation: s.mirror.as_ref().map(|m| m.generation),
        }
    }
}

/// What promoting `replica` throws away, for the refusal without `--accept-data-loss`.
pub fn promote_warning(volume: &str, replica: &str) -> String {
    format!(
        "promoting replica {replica} makes it the only in-sync copy of {volume}: every write \
         it did not receive (everything acknowledged while it was out or stale) is lost for \
         good, on every replica once they resync from it. Do this only when the other \
         replicas are really lost; repeat with --accept-data-loss to proceed"
    )
}

fn replica_views(s: &AttachmentStatus) -> Vec<ReplicaView> {
    use crate::engine::status::ReplicaHealth;
    if let Some(m) = &s.mirror {
        return m
            .replicas
            .iter()
            .map(|r| {
                let (to_copy, copied, rate) = match r.health {
                    ReplicaHealth::Resyncing {
                        to_copy,
                        copied,
                        bytes_per_sec,
                    } => (Some(to_copy), Some(copied), Some(bytes_per_sec as u64)),
                    _ => (None, None, None),
                };
                ReplicaView {
                    id: r.id.clone(),
                    address: r.address.clone(),
                    mgmt: r.mgmt_address.clone(),
                    generation: r.generation,
                    state: crate::backing::health_word(&r.health).to_owned(),
                    to_copy,
                    copied,
                    bytes_per_sec: rate,
                    reads: r.reads,
                    writes: r.writes,
                    last_error: r.last_error.clone(),
                }
            })
            .collect();
    }
    s.replicas
        .iter()
        .map(|r| ReplicaView {
            id: r.id.clone(),
            address: r.nbd.clone(),
            mgmt: r.mgmt.clone(),
            generation: 0,
            state: "-".into(),
            to_copy: None,
            copied: None,
            bytes_per_sec: None,
            reads: 0,
            writes: 0,
            last_error: None,
        })
        .collect()
}

/// The replicas and replica timeout of an attach request, parsed.
fn mirror_args(
    replicas: &[String],
    timeout: Option<String>,
) -> Result<(Vec<crate::state::ReplicaRecord>, std::time::Duration), String> {
    let replicas = replicas
        .iter()
        .map(|r| crate::backing::parse_replica(r))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = match timeout {
        Some(t) => crate::engine::config::parse_duration(&t)
            .map_err(|e| format!("replica timeout: {e}"))?,
        None => crate::backing::DEFAULT_REPLICA_TIMEOUT,
    };
    Ok((replicas, timeout))
}

/// A resync limit as given on the command line or in a request (`50Mi`, `100MB/s`).
pub fn bandwidth_arg(v: Option<&str>) -> Result<Option<u64>, String> {
    v.map(|b| {
        enbd_proto::params::parse_bandwidth(b)
            .map_err(|why| format!("resync bandwidth {b:?}: {why}"))
    })
    .transpose()
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
        Err(e) => Response::error_of(ErrorKind::Invalid, format!("malformed request: {e}")),
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
    let err = |e: AttachError| Response::error_of(ErrorKind::of(&e), e.to_string());
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
            replicas,
            replica_timeout,
            tls,
            resync_bandwidth,
        } => {
            let tls = match tls
                .map(|t| t.parse::<crate::attach::TlsPolicy>())
                .transpose()
            {
                Ok(t) => t,
                Err(e) => return Response::error_of(ErrorKind::Invalid, e.to_string()),
            };
            let resync_bytes_per_sec = match bandwidth_arg(resync_bandwidth.as_deref()) {
                Ok(b) => b,
                Err(message) => return Response::error_of(ErrorKind::Invalid, message),
            };
            let brownout: BrownoutPolicy = match brownout.parse() {
                Ok(b) => b,
                Err(e) => return Response::error_of(ErrorKind::Invalid, e.to_string()),
            };
            let (replicas, replica_timeout) = match mirror_args(&replicas, replica_timeout) {
                Ok(m) => m,
                Err(message) => return Response::error_of(ErrorKind::Invalid, message),
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
                replicas,
                replica_timeout,
                tls,
                resync_bytes_per_sec,
                access_token: None,
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
            Err(message) => Response::error_of(ErrorKind::NotFound, message),
        },
        Request::List => Response::List {
            volumes: mgr.list().iter().map(VolumeView::from).collect(),
        },
        Request::ResetChannel { target, channel } => match resolve(&target, mgr) {
            Ok(id) => match mgr.reset_channel(&id, channel) {
                Ok(()) => Response::Done,
                Err(e) => err(e),
            },
            Err(message) => Response::error_of(ErrorKind::NotFound, message),
        },
        Request::Promote {
            target,
            replica,
            accept_data_loss,
        } => match resolve(&target, mgr) {
            Ok(id) if !accept_data_loss => {
                Response::error_of(ErrorKind::Invalid, promote_warning(&id, &replica))
            }
            Ok(id) => match mgr.promote(&id, &replica).await {
                Ok(generation) => Response::Promoted {
                    volume_id: id,
                    replica,
                    generation,
                },
                Err(e) => err(e),
            },
            Err(message) => Response::error_of(ErrorKind::NotFound, message),
        },
        Request::Replace {
            target,
            replica,
            with,
            resync_bandwidth,
        } => {
            let limit = match bandwidth_arg(resync_bandwidth.as_deref()) {
                Ok(b) => b,
                Err(message) => return Response::error_of(ErrorKind::Invalid, message),
            };
            let new = match crate::backing::parse_replica(&with) {
                Ok(n) => n,
                Err(message) => return Response::error_of(ErrorKind::Invalid, message),
            };
            let new_id = new.id.clone();
            match resolve(&target, mgr) {
                Ok(id) => match mgr.replace(&id, &replica, new, limit).await {
                    Ok(done) => Response::Replaced {
                        volume_id: id,
                        replica,
                        with: new_id,
                        generation: done.record.generation,
                        created: done.created,
                    },
                    Err(e) => err(e),
                },
                Err(message) => Response::error_of(ErrorKind::NotFound, message),
            }
        }
        Request::Resize { target } => match resolve(&target, mgr) {
            Ok(id) => match mgr.resize(&id).await {
                Ok(size_bytes) => Response::Resized {
                    volume_id: id,
                    size_bytes,
                },
                Err(e) => err(e),
            },
            Err(message) => Response::error_of(ErrorKind::NotFound, message),
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
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classed_for_exit_codes() {
        let busy = AttachError::Busy {
            volume_id: "v".into(),
            dev_path: "/dev/ublkb0".into(),
            users: "mounted on /mnt".into(),
        };
        assert_eq!(ErrorKind::of(&busy), ErrorKind::InUse);
        assert_eq!(
            ErrorKind::of(&AttachError::NotAttached("v".into())),
            ErrorKind::NotFound
        );
        assert_eq!(
            ErrorKind::of(&AttachError::InProgress("v".into())),
            ErrorKind::Unavailable
        );
        let refused = AttachError::Engine(crate::engine::EngineError::Connect {
            addr: "10.0.0.1:10809".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        assert_eq!(ErrorKind::of(&refused), ErrorKind::Unavailable);
        let codes: Vec<u8> = [
            ErrorKind::Failed,
            ErrorKind::Invalid,
            ErrorKind::NotFound,
            ErrorKind::InUse,
            ErrorKind::Unavailable,
        ]
        .iter()
        .map(|k| k.exit_code())
        .collect();
        assert_eq!(codes, [1, 2, 3, 4, 5], "distinct, and as documented");
    }

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = Request::Detach {
            target: "/dev/ublkb0".into(),
        };
        let text = serde_json::to_string(&r).expect("encode");
        assert_eq!(text, r#"{"op":"detach","target":"/dev/ublkb0"}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).expect("decode"), r);
        let e = Response::error("x");
        assert_eq!(
            serde_json::to_string(&e).expect("encode"),
            r#"{"result":"error","message":"x"}"#
        );
        let e = Response::error_of(ErrorKind::InUse, "x");
        let text = serde_json::to_string(&e).expect("encode");
        assert_eq!(text, r#"{"result":"error","message":"x","kind":"in_use"}"#);
        assert_eq!(serde_json::from_str::<Response>(&text).expect("decode"), e);
        // An older daemon's answer (no kind) still decodes.
        assert_eq!(
            serde_json::from_str::<Response>(r#"{"result":"error","message":"x"}"#)
                .expect("decode"),
            Response::error("x")
        );
    }

    #[tokio::test]
    async fn socket_round_trip_against_a_real_manager() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = crate::attach::ManagerConfig {
            tls_default: crate::attach::TlsPolicy::Off,
            tls: None,
            access_plaintext: false,
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
                Response::Error { message, kind } => {
                    assert!(
                        message.contains(&format!("{target} is not attached")),
                        "{message}"
                    );
                    assert_eq!(kind, ErrorKind::NotFound, "exit code 3");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // Promotion is refused without the data-loss flag, saying what would be lost.
        let promote = |accept_data_loss| Request::Promote {
            target: "ghost".into(),
            replica: "a".into(),
            accept_data_loss,
        };
        match call(&sock, &promote(false)).await.expect("promote") {
            Response::Error { message, .. } => {
                assert!(message.contains("is lost for good"), "{message}");
                assert!(message.contains("--accept-data-loss"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        match call(&sock, &promote(true)).await.expect("promote") {
            Response::Error { message, kind } => {
                assert_eq!(message, "volume ghost is not attached on this node");
                assert_eq!(kind, ErrorKind::NotFound);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Replacement: a bad new replica or bandwidth is refused by name, before the volume
        // is looked up; an unknown volume is not attached.
        let replace = |with: &str, bw: Option<&str>| Request::Replace {
            target: "ghost".into(),
            replica: "a".into(),
            with: with.into(),
            resync_bandwidth: bw.map(String::from),
        };
        for (req, want) in [
            (replace("c@h:1", None), "three @-separated parts"),
            (replace("c@h:1@http://h:2", Some("10")), "resync bandwidth"),
            (
                replace("c@h:1@http://h:2", Some("50Mi")),
                "volume ghost is not attached on this node",
            ),
        ] {
            match call(&sock, &req).await.expect("replace") {
                Response::Error { message, .. } => assert!(message.contains(want), "{message}"),
                other => panic!("unexpected {other:?}"),
            }
        }
        // A malformed or lone replica is refused before anything connects.
        let attach = |replicas: Vec<&str>| Request::Attach {
            tls: None,
            volume_id: "m".into(),
            servers: vec!["127.0.0.1:1".into()],
            export: "m".into(),
            channels: 1,
            queues: 1,
            queue_depth: 64,
            brownout: "wait".into(),
            read_only: false,
            replicas: replicas.into_iter().map(String::from).collect(),
            replica_timeout: Some("2s".into()),
            resync_bandwidth: None,
        };
        for (replicas, want) in [
            (vec!["a@127.0.0.1:1"], "three @-separated parts"),
            (vec!["a@127.0.0.1:1@http://127.0.0.1:2"], "2 to 3 replicas"),
        ] {
            match call(&sock, &attach(replicas)).await.expect("attach") {
                Response::Error { message, .. } => assert!(message.contains(want), "{message}"),
                other => panic!("unexpected {other:?}"),
            }
        }
        stop.cancel();
        server.await.expect("join").expect("serve");
    }
}
