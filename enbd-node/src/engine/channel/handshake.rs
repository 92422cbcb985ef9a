//! The client side of the fixed-newstyle handshake: greeting, client flags,
//! NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_GO for the export with its block-size constraints.
//!
//! Against a broken or hostile server, option replies are bounded in size
//! (`MAX_OPTION_REPLY`) and number (`MAX_OPTION_REPLIES`).
//!
//! TLS: with a [`ClientTls`], NBD_OPT_STARTTLS goes first and everything after it runs over
//! TLS 1.3, the server's certificate checked against the CA and the host dialled. A server
//! that refuses STARTTLS (NBD_REP_ERR_UNSUP, _POLICY or anything else) is an error: the
//! engine never falls back to plain text. Every reconnect redoes TLS with the files' current
//! contents.
//!
//! Access: with an [`AccessCredential`], ENBD_OPT_ACCESS goes before GO (over TLS; in plain
//! text only when the credential allows it). NBD_REP_ERR_POLICY is a refusal
//! ([`EngineError::ExportRefused`]: not published to this node, or revoked); a server that
//! does not know the option (NBD_REP_ERR_UNSUP) does not check access, and GO goes on.

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use enbd_proto::wire::{
    ClientFlags, Greeting, HandshakeFlags, InfoReply, InfoRequest, InfoType, OptionCode,
    OptionError, OptionReply, OptionReplyBody, OptionRequest, WireError,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Connected, Geometry, Stream};
use crate::engine::access::AccessCredential;
use crate::engine::error::EngineError;
use crate::engine::tls::ClientTls;

/// Largest option reply we accept during the handshake.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most replies we read for one option: NBD_OPT_GO needs a handful of INFOs and an ACK.
const MAX_OPTION_REPLIES: usize = 64;

/// Opens a connection to `addr` and negotiates `export`, all within `timeout`.
pub(crate) async fn open(
    addr: &str,
    export: &str,
    timeout: Duration,
    tls: Option<&ClientTls>,
    access: Option<&AccessCredential>,
) -> Result<Connected, EngineError> {
    match tokio::time::timeout(timeout, handshake(addr, export, tls, access)).await {
        Ok(r) => r,
        Err(_) => Err(EngineError::ConnectTimeout {
            addr: addr.to_owned(),
            secs: timeout.as_secs_f64(),
        }),
    }
}

async fn handshake(
    addr: &str,
    export: &str,
    tls: Option<&ClientTls>,
    access: Option<&AccessCredential>,
) -> Result<Connected, EngineError> {
    let hs_err = |reason: String| EngineError::Handshake {
        addr: addr.to_owned(),
        reason,
    };
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|source| EngineError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    // Latency matters more than segment count: every request is a small write.
    let _ = stream.set_nodelay(true);
    let local_addr = stream.local_addr().ok();
    let mut buf = BytesMut::with_capacity(4096);

    let greeting = read_msg(&mut stream, &mut buf, Greeting::decode)
        .await
        .map_err(|e| hs_err(e.to_string()))?;
    if !greeting.flags.contains(HandshakeFlags::FIXED_NEWSTYLE) {
        return Err(hs_err(
            "server does not speak fixed newstyle negotiation".into(),
        ));
    }
    let mut client = ClientFlags::FIXED_NEWSTYLE;
    if greeting.flags.contains(HandshakeFlags::NO_ZEROES) {
        client |= ClientFlags::NO_ZEROES;
    }
    let mut out = Vec::with_capacity(256);
    client.encode(&mut out);
    let Some(tls) = tls else {
        if access.is_some_and(|a| !a.allow_plaintext) {
            return Err(EngineError::Tls {
                addr: addr.to_owned(),
                reason: "refusing to send the volume's access token without TLS (give the \
                         volume tls=require, or allow a plain-text token for a lab)"
                    .into(),
            });
        }
        let (geometry, structured) =
            negotiate(&mut stream, &mut buf, out, addr, export, access).await?;
        return Ok(Connected {
            stream: Stream::Plain(stream),
            geometry,
            local_addr,
            structured,
        });
    };
    OptionRequest::StartTls
        .encode(&mut out)
        .map_err(|e| hs_err(e.to_string()))?;
    send(&mut stream, &out)
        .await
        .map_err(|e| hs_err(e.to_string()))?;
    let reply = read_option_reply(&mut stream, &mut buf)
        .await
        .map_err(|e| hs_err(e.to_string()))?;
    let tls_err = |reason: String| EngineError::Tls {
        addr: addr.to_owned(),
        reason,
    };
    match (reply.option, reply.body) {
        (OptionCode::StartTls, OptionReplyBody::Ack) => {}
        (OptionCode::StartTls, OptionReplyBody::Error { error, message }) => {
            return Err(tls_err(format!(
                "server refused NBD_OPT_STARTTLS ({error:?}: {message}); this volume requires \
                 TLS, so the engine does not continue in plain text"
            )));
        }
        (option, body) => {
            return Err(hs_err(format!(
                "unexpected reply to NBD_OPT_STARTTLS: {option:?} {body:?}"
            )));
        }
    }
    if !buf.is_empty() {
        return Err(tls_err(
            "server sent data after its NBD_OPT_STARTTLS reply, before TLS".into(),
        ));
    }
    let name = server_name(addr).map_err(tls_err)?;
    let connector = tokio_rustls::TlsConnector::from(tls.current());
    let mut stream = connector
        .connect(name, stream)
        .await
        .map_err(|e| tls_err(e.to_string()))?;
    let (geometry, structured) =
        negotiate(&mut stream, &mut buf, Vec::new(), addr, export, access).await?;
    Ok(Connected {
        stream: Stream::Tls(Box::new(stream)),
        geometry,
        local_addr,
        structured,
    })
}

/// The name the server's certificate must carry: the host of `HOST:PORT` (an IP address or
/// a DNS name; IPv6 in brackets).
fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|_| format!("{host:?} is not a valid TLS server name"))
}

/// The option phase after the client flags (and STARTTLS): the access token, structured
/// replies, then GO. `out` holds bytes still to be sent in front of the first option.
async fn negotiate<S>(
    stream: &mut S,
    buf: &mut BytesMut,
    mut out: Vec<u8>,
    addr: &str,
    export: &str,
    access: Option<&AccessCredential>,
) -> Result<(Geometry, bool), EngineError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hs_err = |reason: String| EngineError::Handshake {
        addr: addr.to_owned(),
        reason,
    };
    if let Some(access) = access {
        OptionRequest::Access(access.token().clone())
            .encode(&mut out)
            .map_err(|e| hs_err(e.to_string()))?;
        send(stream, &out)
            .await
            .map_err(|e| hs_err(e.to_string()))?;
        out.clear();
        let reply = read_option_reply(stream, buf)
            .await
            .map_err(|e| hs_err(e.to_string()))?;
        match (reply.option, reply.body) {
            (OptionCode::Access, OptionReplyBody::Ack) => {}
            (
                OptionCode::Access,
                OptionReplyBody::Error {
                    error: OptionError::Unsupported,
                    ..
                },
            ) => {
                tracing::debug!(server = addr, "server does not check access tokens");
            }
            (OptionCode::Access, OptionReplyBody::Error { error, message }) => {
                return Err(EngineError::ExportRefused {
                    addr: addr.to_owned(),
                    export: export.to_owned(),
                    reason: format!(
                        "access token refused ({error:?}: {message}): the volume is not \
                         published to this node, or was unpublished"
                    ),
                });
            }
            (option, body) => {
                return Err(hs_err(format!(
                    "unexpected reply to ENBD_OPT_ACCESS: {option:?} {body:?}"
                )));
            }
        }
    }
    OptionRequest::StructuredReply
        .encode(&mut out)
        .map_err(|e| hs_err(e.to_string()))?;
    send(stream, &out)
        .await
        .map_err(|e| hs_err(e.to_string()))?;
    let reply = read_option_reply(stream, buf)
        .await
        .map_err(|e| hs_err(e.to_string()))?;
    if reply.option != OptionCode::StructuredReply {
        return Err(hs_err(format!(
            "reply for option {:?} to NBD_OPT_STRUCTURED_REPLY",
            reply.option
        )));
    }
    let structured = match reply.body {
        OptionReplyBody::Ack => true,
        OptionReplyBody::Error { .. } => false,
        other => {
            return Err(hs_err(format!(
                "unexpected reply to NBD_OPT_STRUCTURED_REPLY: {other:?}"
            )));
        }
    };

    out.clear();
    let go = InfoRequest {
        export: export.to_owned(),
        requests: vec![InfoType::BlockSize],
    };
    OptionRequest::Go(go)
        .encode(&mut out)
        .map_err(|e| hs_err(e.to_string()))?;
    send(stream, &out)
        .await
        .map_err(|e| hs_err(e.to_string()))?;

    let mut export_info = None;
    let mut blocks = None;
    let mut replies = 0;
    loop {
        replies += 1;
        if replies > MAX_OPTION_REPLIES {
            return Err(hs_err(format!(
                "more than {MAX_OPTION_REPLIES} replies to NBD_OPT_GO without an ACK"
            )));
        }
        let reply = read_option_reply(stream, buf)
            .await
            .map_err(|e| hs_err(e.to_string()))?;
        if reply.option != OptionCode::Go {
            return Err(hs_err(format!(
                "reply for option {:?} to NBD_OPT_GO",
                reply.option
            )));
        }
        match reply.body {
            OptionReplyBody::Info(InfoReply::Export(info)) => export_info = Some(info),
            OptionReplyBody::Info(InfoReply::BlockSize(b)) => match b.validate() {
                Ok(()) => blocks = Some((b.minimum, b.preferred, b.maximum)),
                Err(e) => {
                    tracing::warn!(server = addr, error = %e, "ignoring invalid block size constraints")
                }
            },
            OptionReplyBody::Info(_) => {}
            OptionReplyBody::Ack => break,
            OptionReplyBody::Error {
                error: OptionError::TlsRequired,
                message,
            } => {
                return Err(EngineError::Tls {
                    addr: addr.to_owned(),
                    reason: format!(
                        "server requires TLS ({message}): give the volume tls=require and the \
                         node a --tls-ca"
                    ),
                });
            }
            OptionReplyBody::Error { error, message } => {
                let reason = match error {
                    OptionError::UnknownExport => format!("no such export ({message})"),
                    OptionError::Unsupported => "server does not support NBD_OPT_GO".to_owned(),
                    other => format!("{other:?}: {message}"),
                };
                return Err(EngineError::ExportRefused {
                    addr: addr.to_owned(),
                    export: export.to_owned(),
                    reason,
                });
            }
            other => return Err(hs_err(format!("unexpected reply to NBD_OPT_GO: {other:?}"))),
        }
    }
    let info =
        export_info.ok_or_else(|| hs_err("NBD_OPT_GO ended without NBD_INFO_EXPORT".into()))?;
    if !buf.is_empty() {
        return Err(hs_err("server sent data before the first request".into()));
    }
    Ok((Geometry::new(info.size, info.flags, blocks), structured))
}

/// Writes `out` whole; over TLS it is only on the wire once flushed.
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, out: &[u8]) -> io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await
}

async fn read_option_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<OptionReply, WireIoError> {
    read_msg(stream, buf, |b| OptionReply::decode(b, MAX_OPTION_REPLY)).await
}

#[derive(Debug, thiserror::Error)]
enum WireIoError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("server closed the connection during the handshake")]
    Eof,
}

/// Reads until `decode` yields one whole message, consuming exactly its bytes.
async fn read_msg<S: AsyncRead + Unpin, T>(
    stream: &mut S,
    buf: &mut BytesMut,
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, WireError>,
) -> Result<T, WireIoError> {
    loop {
        if let Some((msg, used)) = decode(buf)? {
            buf.advance(used);
            return Ok(msg);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(WireIoError::Eof);
        }
    }
}
