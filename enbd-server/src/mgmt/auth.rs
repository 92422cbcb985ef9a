//! Who may call the management API: mutual TLS on the listener, then a per-method check of
//! the caller's role, read from its client certificate's Subject Common Name.
//!
//! Roles: `enbd-controller` and `enbd-admin` may call everything; `enbd-node` (the node
//! plugin's mirror) may call `enbd.v1.ReplicaService` and the read-only `GetVolume` and
//! `Health` of `enbd.v1.VolumeService`, nothing that creates, deletes or changes volumes;
//! under `--access published` only for volumes whose access token it sends ([`super::scope`]).
//! `grpc.health.v1.Health` needs no certificate, so probes and load balancers can use it.
//! Invariants: with `--mgmt-tls require` no other method runs without a certificate that the
//! client CA signed (the TLS layer verified it) and whose role allows the method; refusals are
//! UNAUTHENTICATED (no certificate) or PERMISSION_DENIED (a role that may not), naming the
//! method and the role, never anything secret.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::Connected;

/// Settings of `--mgmt-tls require`: the server certificate (shared with the data path) and
/// the CA that signs client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MgmtTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// What a caller's certificate lets it do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Controller,
    Admin,
    Node,
}

impl Role {
    /// The role named by a certificate's Common Name.
    pub fn from_name(cn: &str) -> Option<Role> {
        match cn {
            "enbd-controller" => Some(Role::Controller),
            "enbd-admin" => Some(Role::Admin),
            "enbd-node" => Some(Role::Node),
            _ => None,
        }
    }
}

/// Methods a node certificate may call (full gRPC paths); everything of `ReplicaService` too.
const NODE_METHODS: &[&str] = &[
    "/enbd.v1.VolumeService/GetVolume",
    "/enbd.v1.VolumeService/Health",
];
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
const REPLICA_PREFIX: &str = "/enbd.v1.ReplicaService/";

/// The verdict on one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Unauthenticated(String),
    Denied(String),
}

/// Decides whether a caller whose verified certificate names `identity` (None: no certificate)
/// may call the gRPC method at `path`.
pub fn authorize(identity: Option<&str>, path: &str) -> Decision {
    if path.starts_with(HEALTH_PREFIX) {
        return Decision::Allow;
    }
    let Some(cn) = identity else {
        return Decision::Unauthenticated(format!(
            "{path} needs a client certificate signed by the management CA \
             (CN enbd-controller, enbd-admin or enbd-node)"
        ));
    };
    match Role::from_name(cn) {
        Some(Role::Controller | Role::Admin) => Decision::Allow,
        Some(Role::Node) if path.starts_with(REPLICA_PREFIX) || NODE_METHODS.contains(&path) => {
            Decision::Allow
        }
        Some(Role::Node) => Decision::Denied(format!(
            "certificate CN enbd-node may not call {path} (only ReplicaService, GetVolume, Health)"
        )),
        None => Decision::Denied(format!(
            "certificate CN {cn:?} has no management role (expected enbd-controller, enbd-admin or enbd-node)"
        )),
    }
}

/// The Subject Common Name of a DER certificate, if it has one (a minimal DER walk:
/// Certificate → tbsCertificate → subject → the first CN attribute).
pub fn common_name(der: &[u8]) -> Option<String> {
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let (cert, _) = expect(der, 0x30)?;
    let (mut tbs, _) = expect(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2; // [0] version
    }
    let (_, rest) = expect(tbs, 0x02)?; // serialNumber
    let (_, rest) = expect(rest, 0x30)?; // signature
    let (_, rest) = expect(rest, 0x30)?; // issuer
    let (_, rest) = expect(rest, 0x30)?; // validity
    let (mut subject, _) = expect(rest, 0x30)?;
    while !subject.is_empty() {
        let (mut set, rest) = expect(subject, 0x31)?;
        subject = rest;
        while !set.is_empty() {
            let (attr, rest) = expect(set, 0x30)?;
            set = rest;
            let (oid, value) = expect(attr, 0x06)?;
            if oid == CN_OID {
                let (tag, text, _) = tlv(value)?;
                // UTF8String, PrintableString, T61String, IA5String.
                if matches!(tag, 0x0c | 0x13 | 0x14 | 0x16) {
                    return std::str::from_utf8(text).ok().map(str::to_owned);
                }
                return None;
            }
        }
    }
    None
}

/// One DER TLV: (tag, contents, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let (bytes, rest) = b.split_at(n);
        b = rest;
        bytes.iter().fold(0usize, |a, &x| (a << 8) | usize::from(x))
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

fn expect(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, contents, rest) = tlv(b)?;
    (t == tag).then_some((contents, rest))
}

/// Who is on the other end of one management connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// Common Name of the client certificate the TLS layer verified; None without TLS or
    /// without a certificate.
    pub identity: Option<String>,
    pub tls: bool,
}

/// One accepted management connection, plain or TLS.
pub enum MgmtConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Peer),
}

impl Connected for MgmtConn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        match self {
            MgmtConn::Plain(s) => Peer {
                addr: s.peer_addr().ok(),
                identity: None,
                tls: false,
            },
            MgmtConn::Tls(_, p) => p.clone(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            MgmtConn::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            MgmtConn::Tls($s, _) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for MgmtConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for MgmtConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            MgmtConn::Plain(s) => s.is_write_vectored(),
            MgmtConn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the accept queue.
const MAX_HANDSHAKES: usize = 64;

/// Accepts management connections until `stop`, doing TLS handshakes (when `tls` is set)
/// concurrently so a slow client cannot hold up others. Failed handshakes are logged (the
/// peer and rustls's reason) and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<crate::tls::ReloadingConfig>>,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<MgmtConn>> {
    let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let (sock, addr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "management accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let _ = sock.set_nodelay(true);
            let tx = tx.clone();
            // Each handshake takes the files' current certificate and client CA.
            let Some(acceptor) = tls
                .as_ref()
                .map(|t| tokio_rustls::TlsAcceptor::from(t.current()))
            else {
                if tx.send(Ok(MgmtConn::Plain(sock))).await.is_err() {
                    return;
                }
                continue;
            };
            tokio::spawn(async move {
                let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(peer = %addr, error = %e, "management TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(peer = %addr, "management TLS handshake timed out");
                        return;
                    }
                };
                drop(permit);
                let identity = conn
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| common_name(c));
                tracing::debug!(peer = %addr, identity = ?identity, "management TLS connection");
                let peer = Peer {
                    addr: Some(addr),
                    identity,
                    tls: true,
                };
                let _ = tx.send(Ok(MgmtConn::Tls(Box::new(conn), peer))).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Tower layer that applies [`authorize`] to every request (when `enforce`).
#[derive(Debug, Clone, Copy)]
pub struct AuthLayer {
    pub enforce: bool,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            enforce: self.enforce,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    enforce: bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.enforce {
            let peer = req.extensions().get::<Peer>();
            let identity = peer.and_then(|p| p.identity.as_deref());
            let path = req.uri().path();
            let refusal = match authorize(identity, path) {
                Decision::Allow => None,
                Decision::Unauthenticated(m) => Some(Status::unauthenticated(m)),
                Decision::Denied(m) => Some(Status::permission_denied(m)),
            };
            if let Some(status) = refusal {
                tracing::info!(
                    peer = ?peer.and_then(|p| p.addr), identity = ?identity, method = path,
                    code = ?status.code(), "management call refused"
                );
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_map_onto_methods() {
        let create = "/enbd.v1.VolumeService/CreateVolume";
        let member = "/enbd.v1.ReplicaService/GetMembership";
        let health = "/grpc.health.v1.Health/Check";
        assert_eq!(authorize(None, health), Decision::Allow);
        // Granting and revoking NBD access is the control plane's alone.
        for m in [
            "/enbd.v1.VolumeService/GrantAccess",
            "/enbd.v1.VolumeService/RevokeAccess",
        ] {
            assert!(matches!(
                authorize(Some("enbd-node"), m),
                Decision::Denied(_)
            ));
            assert_eq!(authorize(Some("enbd-controller"), m), Decision::Allow);
            assert_eq!(authorize(Some("enbd-admin"), m), Decision::Allow);
        }
        assert!(matches!(
            authorize(None, create),
            Decision::Unauthenticated(_)
        ));
        assert!(matches!(
            authorize(None, member),
            Decision::Unauthenticated(_)
        ));
        for admin in ["enbd-controller", "enbd-admin"] {
            assert_eq!(authorize(Some(admin), create), Decision::Allow);
            assert_eq!(authorize(Some(admin), member), Decision::Allow);
        }
        assert_eq!(authorize(Some("enbd-node"), member), Decision::Allow);
        assert_eq!(
            authorize(Some("enbd-node"), "/enbd.v1.VolumeService/GetVolume"),
            Decision::Allow
        );
        for m in [
            "CreateVolume",
            "DeleteVolume",
            "ExpandVolume",
            "CreateSnapshot",
            "ListVolumes",
        ] {
            let path = format!("/enbd.v1.VolumeService/{m}");
            assert!(
                matches!(authorize(Some("enbd-node"), &path), Decision::Denied(_)),
                "{m}"
            );
        }
        assert!(matches!(
            authorize(Some("mallory"), member),
            Decision::Denied(_)
        ));
        // A prefix of a role is not the role.
        assert!(matches!(
            authorize(Some("enbd-node "), member),
            Decision::Denied(_)
        ));
        assert!(matches!(
            authorize(Some("enbd-nodes"), member),
            Decision::Denied(_)
        ));
    }

    #[test]
    fn der_walk_survives_garbage() {
        for input in [
            &b""[..],
            &[0x30],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x80],
            &[0x30, 0x02, 0x30, 0x00],
        ] {
            assert_eq!(common_name(input), None);
        }
        // Every truncation of a real certificate parses to the CN or to nothing, never panics.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "enbd");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "enbd-node");
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(common_name(&der).as_deref(), Some("enbd-node"));
        for n in 0..der.len() {
            let _ = common_name(&der[..n]);
        }
        let mut params = rcgen::CertificateParams::new(vec!["x.example".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(common_name(&der), None);
    }
}
