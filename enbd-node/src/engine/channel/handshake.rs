//! The client side of the fixed-newstyle handshake: greeting, client flags,
//! NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_GO for the export with its block-size constraints.
//!
//! Against a broken or hostile server, option replies are bounded in size
//! (`MAX_OPTION_REPLY`) and number (`MAX_OPTION_REPLIES`).

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use enbd_proto::wire::{
    ClientFlags, Greeting, HandshakeFlags, InfoReply, InfoRequest, InfoType, OptionCode,
    OptionError, OptionReply, OptionReplyBody, OptionRequest, WireError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Connected, Geometry};
use crate::engine::error::EngineError;

/// Largest option reply we accept during the handshake.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most replies we read for one option: NBD_OPT_GO needs a handful of INFOs and an ACK.
const MAX_OPTION_REPLIES: usize = 64;

/// Opens a connection to `addr` and negotiates `export`, all within `timeout`.
pub(crate) async fn open(
    addr: &str,
    export: &str,
    timeout: Duration,
) -> Result<Connected, EngineError> {
    match tokio::time::timeout(timeout, handshake(addr, export)).await {
        Ok(r) => r,
        Err(_) => Err(EngineError::ConnectTimeout {
            addr: addr.to_owned(),
            secs: timeout.as_secs_f64(),
        }),
    }
}

async fn handshake(addr: &str, export: &str) -> Result<Connected, EngineError> {
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
    OptionRequest::StructuredReply
        .encode(&mut out)
        .map_err(|e| hs_err(e.to_string()))?;
    stream
        .write_all(&out)
        .await
        .map_err(|e| hs_err(e.to_string()))?;
    let reply = read_option_reply(&mut stream, &mut buf)
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
    stream
        .write_all(&out)
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
        let reply = read_option_reply(&mut stream, &mut buf)
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
            OptionReplyBody::Error { error, message } => {
                let reason = match error {
                    OptionError::UnknownExport => format!("no such export ({message})"),
                    OptionError::Unsupported => "server does not support NBD_OPT_GO".to_owned(),
                    OptionError::TlsRequired => format!("server requires TLS ({message})"),
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
    Ok(Connected {
        stream,
        geometry: Geometry::new(info.size, info.flags, blocks),
        local_addr,
        structured,
    })
}

async fn read_option_reply(
    stream: &mut TcpStream,
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
async fn read_msg<T>(
    stream: &mut TcpStream,
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
