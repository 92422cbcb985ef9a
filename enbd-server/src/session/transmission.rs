//! The transmission phase: a reader that decodes requests and starts them, and a writer that
//! sends replies as they complete, in completion order, matched to requests by cookie.
//!
//! Invariants:
//! - Every request that was read gets exactly one reply (all chunks of a structured reply are
//!   written together, DONE last), unless the client is gone.
//! - Every request read, refused ones included, holds a [`Ticket`] of the connection's budget
//!   (requests and bytes, see [`super::budget`]) from its header until its reply is written:
//!   when the budget is spent the reader stops reading, which pushes back on the client
//!   through TCP. A client that never reads its replies thus holds at most one budget's worth
//!   of server memory. A WRITE's payload is only read once its ticket is held.
//! - The reply channel holds at most one reply per ticket, so the completion callbacks'
//!   `try_send` never finds it full.
//! - On NBD_CMD_DISC, shutdown or force-delete the reader stops and the writer drains every
//!   request already started before the connection closes.
//! - Requests with bad ranges, flags or commands get an NBD error and change nothing; only
//!   framing errors (bad magic, a WRITE payload over the limit) close the connection.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use enbd_proto::wire::{
    ChunkBody, Command, CommandFlags, Cookie, ExtendedExtent, Extent as WireExtent, HeaderStyle,
    NBD_STATE_HOLE, NBD_STATE_ZERO, NbdError, ReplyChunk, ReplyFlags, Request, SimpleReply,
    WireError,
};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::budget::{CONNECTION_BYTES, CONNECTION_REQUESTS, ConnBudget, Ticket};
use super::io::{Op, OpResult, Output};
use super::negotiate::{BASE_ALLOCATION_ID, Negotiated};
use super::{SessionConfig, SessionError};
use crate::metrics::ExportMetrics;

/// Most extents returned for one BLOCK_STATUS request.
const MAX_EXTENTS: usize = 2048;
/// How long a draining connection waits for the rest of a half-received request.
const DRAIN_PARTIAL: std::time::Duration = std::time::Duration::from_secs(2);
/// Payloads at most this big are copied into the output buffer; bigger ones go out as their
/// own iovec.
const COPY_LIMIT: usize = 64 * 1024;

/// A finished request on its way to the writer.
struct Reply {
    cookie: Cookie,
    offset: u64,
    result: Result<Output, (NbdError, String)>,
    ticket: Ticket,
}

/// Hands a reply to the writer. The channel has room for every ticket of the connection, so
/// it is never full; it is closed only when the writer is gone, and then so is the client.
fn send_reply(tx: &mpsc::Sender<Reply>, reply: Reply) {
    if let Err(mpsc::error::TrySendError::Full(r)) = tx.try_send(reply) {
        // Unreachable by the channel's sizing; if it ever were, the client would wait forever
        // for this reply, so say so.
        tracing::error!(cookie = r.cookie.0, "reply channel full; reply dropped");
    }
}

/// Data bytes a request brings or asks for, known from its header alone: what it will cost
/// in the budget. Requests that will be refused for their size cost only their bookkeeping.
/// A BLOCK_STATUS reply may list `MAX_EXTENTS` extents: held in memory (16 bytes each) and
/// then encoded (up to 16 more), it is charged 32 bytes per extent.
fn data_cost(req: &Request, style: HeaderStyle, max_request: u32) -> u64 {
    match req.command {
        Command::Read if req.length <= u64::from(max_request) => req.length,
        Command::BlockStatus if !req.flags.contains(CommandFlags::REQ_ONE) => {
            req.payload_len(style) + 32 * MAX_EXTENTS as u64
        }
        _ => req.payload_len(style),
    }
}

/// Why a request is refused before it touches the backend.
fn refuse(err: NbdError, msg: impl Into<String>) -> Result<Op, (NbdError, String)> {
    Err((err, msg.into()))
}

/// Checks a request against the negotiated export and turns it into a backend op.
fn validate(
    req: &Request,
    payload: Option<Bytes>,
    n: &Negotiated,
    max_request: u32,
) -> Result<Op, (NbdError, String)> {
    let known = CommandFlags::FUA
        | CommandFlags::NO_HOLE
        | CommandFlags::DF
        | CommandFlags::REQ_ONE
        | CommandFlags::FAST_ZERO
        | CommandFlags::PAYLOAD_LEN;
    if req.flags.difference(known).bits() != 0 {
        return refuse(
            NbdError::Inval,
            format!("unknown command flags {:#x}", req.flags.bits()),
        );
    }
    let allowed = match req.command {
        Command::Read => CommandFlags::DF,
        Command::Write => CommandFlags::FUA | CommandFlags::PAYLOAD_LEN,
        Command::Trim => CommandFlags::FUA,
        Command::WriteZeroes => CommandFlags::FUA | CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
        Command::BlockStatus => CommandFlags::REQ_ONE | CommandFlags::PAYLOAD_LEN,
        Command::Flush | Command::Cache | Command::Disc => CommandFlags::FUA,
        Command::Unknown(c) => return refuse(NbdError::Inval, format!("unknown command {c}")),
    };
    if req.flags.difference(allowed).bits() != 0 {
        return refuse(
            NbdError::Inval,
            format!("flags {:?} not valid for {:?}", req.flags, req.command),
        );
    }
    if req.flags.contains(CommandFlags::DF) && !n.structured {
        return refuse(NbdError::Inval, "DF needs structured replies");
    }
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && n.export.read_only {
        return refuse(NbdError::Perm, "export is read-only");
    }
    let (offset, len) = (req.offset, req.length);
    let in_range = offset
        .checked_add(len)
        .is_some_and(|end| end <= n.export.size);
    let ranged = !matches!(req.command, Command::Flush | Command::Disc);
    if ranged && !in_range {
        // The document: ENOSPC for a write (WRITE, WRITE_ZEROES) past the end, EINVAL for a
        // read or a trim (and the rest).
        let err = if matches!(req.command, Command::Write | Command::WriteZeroes) {
            NbdError::NoSpc
        } else {
            NbdError::Inval
        };
        return refuse(
            err,
            format!(
                "range {offset}+{len} is beyond the export size {}",
                n.export.size
            ),
        );
    }
    let fua = req.flags.contains(CommandFlags::FUA);
    match req.command {
        Command::Read => {
            if len > u64::from(max_request) {
                let err = if n.structured {
                    NbdError::Overflow
                } else {
                    NbdError::Inval
                };
                return refuse(
                    err,
                    format!("read of {len} bytes exceeds the limit of {max_request}"),
                );
            }
            Ok(Op::Read {
                offset,
                len: len as usize,
            })
        }
        Command::Write => {
            // With extended headers the payload is only there if the client flagged it.
            let data = payload.unwrap_or_default();
            if data.len() as u64 != len {
                return refuse(
                    NbdError::Inval,
                    "WRITE without its payload (PAYLOAD_LEN missing)",
                );
            }
            Ok(Op::Write { offset, data, fua })
        }
        Command::Flush => Ok(Op::Flush),
        Command::Trim => Ok(Op::Trim { offset, len, fua }),
        Command::WriteZeroes => Ok(Op::WriteZeroes {
            offset,
            len,
            keep_allocated: req.flags.contains(CommandFlags::NO_HOLE),
            fast_only: req.flags.contains(CommandFlags::FAST_ZERO),
            fua,
        }),
        Command::Cache => Ok(Op::Cache { offset, len }),
        Command::BlockStatus => {
            if !n.base_allocation {
                return refuse(NbdError::Inval, "no metadata context was negotiated");
            }
            if len == 0 {
                return refuse(NbdError::Inval, "block status of an empty range");
            }
            let max_extents = if req.flags.contains(CommandFlags::REQ_ONE) {
                1
            } else {
                MAX_EXTENTS
            };
            Ok(Op::BlockStatus {
                offset,
                len,
                max_extents,
            })
        }
        Command::Disc | Command::Unknown(_) => refuse(NbdError::Inval, "not an IO command"),
    }
}

/// Serves requests until DISC, EOF, an error, or cancellation; then drains.
pub async fn transmit<R, W>(
    mut rd: R,
    wr: W,
    mut buf: BytesMut,
    n: Negotiated,
    cfg: Arc<SessionConfig>,
    stop: CancellationToken,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Reply>(CONNECTION_REQUESTS);
    let writer_failed = CancellationToken::new();
    let budget = ConnBudget::new(&cfg.budget, CONNECTION_REQUESTS, CONNECTION_BYTES);
    let style = n.style;
    let structured = n.structured;
    let writer = tokio::spawn(write_replies(
        wr,
        rx,
        style,
        structured,
        writer_failed.clone(),
    ));
    let n = Arc::new(n);
    // Looked up once per connection: requests touch only its atomics.
    let em = cfg.metrics.export(&n.export.name);
    let _open = em.open_connection();

    let result = read_requests(
        &mut rd,
        &mut buf,
        &n,
        &cfg,
        &em,
        &tx,
        &budget,
        &stop,
        &writer_failed,
    )
    .await;
    drop(tx);
    // In-flight ops hold sender clones; the writer ends once the last one has replied.
    let written = writer
        .await
        .map_err(|e| SessionError::Io(std::io::Error::other(e)))?;
    result?;
    written
}

#[allow(clippy::too_many_arguments)]
async fn read_requests<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    n: &Arc<Negotiated>,
    cfg: &Arc<SessionConfig>,
    em: &Arc<ExportMetrics>,
    tx: &mpsc::Sender<Reply>,
    budget: &ConnBudget,
    stop: &CancellationToken,
    writer_failed: &CancellationToken,
) -> Result<(), SessionError> {
    let style = n.style;
    let max_payload = u64::from(cfg.max_request_bytes);
    let closed = n.export.closed.clone();
    loop {
        let req = loop {
            match Request::decode(buf, style, max_payload) {
                Ok(Some((req, used))) => {
                    buf.advance(used);
                    break req;
                }
                Ok(None) => {}
                Err(e @ WireError::TooLong { .. }) => {
                    tracing::warn!(error = %e, "request payload over --max-request-bytes; closing");
                    return Err(SessionError::Protocol(e));
                }
                Err(e) => return Err(SessionError::Protocol(e)),
            }
            if !fill(
                rd,
                buf,
                Request::header_len(style),
                stop,
                &closed,
                writer_failed,
            )
            .await?
            {
                return Ok(());
            }
        };
        // Waiting here is the backpressure: nothing more is read until replies get written.
        let ticket = tokio::select! {
            t = budget.acquire(data_cost(&req, style, cfg.max_request_bytes)) => t,
            _ = closed.cancelled() => return Ok(()),
            _ = writer_failed.cancelled() => return Err(SessionError::Closed),
        };
        let payload_len = req.payload_len(style) as usize;
        let payload = if payload_len > 0 || req.command == Command::Write {
            while buf.len() < payload_len {
                buf.reserve(payload_len - buf.len());
                if !fill(rd, buf, payload_len, stop, &closed, writer_failed).await? {
                    return Err(SessionError::Closed);
                }
            }
            Some(buf.split_to(payload_len).freeze())
        } else {
            None
        };
        let started = Instant::now();
        if req.command != Command::Disc {
            em.request(req.command);
        }
        if req.command == Command::Disc {
            tracing::debug!("client sent DISC");
            return Ok(());
        }
        let op = if style == HeaderStyle::Extended
            && req.command == Command::BlockStatus
            && payload.is_some()
        {
            // The extended BLOCK_STATUS payload only narrows context ids; we serve one.
            validate(
                &Request {
                    flags: req.flags.difference(CommandFlags::PAYLOAD_LEN),
                    ..req
                },
                None,
                n,
                cfg.max_request_bytes,
            )
        } else {
            validate(&req, payload, n, cfg.max_request_bytes)
        };
        let op = match op {
            Ok(op) => op,
            Err(e) => {
                em.error(e.0);
                em.completed(req.command, started.elapsed());
                tracing::debug!(cookie = req.cookie.0, command = ?req.command, error = %e.1, "request refused");
                send_reply(
                    tx,
                    Reply {
                        cookie: req.cookie,
                        offset: req.offset,
                        result: Err(e),
                        ticket,
                    },
                );
                continue;
            }
        };
        match &op {
            Op::Read { len, .. } => em.read(*len as u64),
            Op::Write { data, .. } => em.written(data.len() as u64),
            _ => {}
        }
        let tx = tx.clone();
        let (cookie, command, offset) = (req.cookie, req.command, req.offset);
        let em = Arc::clone(em);
        cfg.io.submit(&n.export.backend, op, move |r: OpResult| {
            em.completed(command, started.elapsed());
            let result = r.map_err(|e| {
                em.error(e.nbd_error());
                tracing::debug!(cookie = cookie.0, command = ?command, error = %e, "request failed");
                (e.nbd_error(), e.to_string())
            });
            // The writer is gone only if the client is; then the reply has nowhere to go.
            send_reply(&tx, Reply { cookie, offset, result, ticket });
        });
    }
}

/// Reads more bytes. `Ok(false)`: stop reading (clean EOF at a request boundary, or we were
/// asked to stop). EOF with a partial request is an error.
///
/// On shutdown (`stop`) the connection drains: bytes the client already sent are still read
/// and answered (what has arrived, plus the rest of a half-received request), then reading
/// stops. A force-deleted export (`closed`) stops at once.
async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    want: usize,
    stop: &CancellationToken,
    closed: &CancellationToken,
    writer_failed: &CancellationToken,
) -> Result<bool, SessionError> {
    if buf.capacity() - buf.len() < want.max(4096) {
        buf.reserve(want.max(64 * 1024));
    }
    let partial = !buf.is_empty();
    if closed.is_cancelled() {
        return Ok(false);
    }
    if stop.is_cancelled() {
        let got = if partial {
            match tokio::time::timeout(DRAIN_PARTIAL, rd.read_buf(buf)).await {
                Ok(r) => Some(r?),
                Err(_) => None,
            }
        } else {
            rd.read_buf(buf).now_or_never().transpose()?
        };
        return match got {
            Some(0) if partial => Err(SessionError::Closed),
            Some(0) | None => Ok(false),
            Some(_) => Ok(true),
        };
    }
    tokio::select! {
        biased;
        // Re-entered in drain mode by the caller's loop.
        _ = stop.cancelled() => Ok(true),
        _ = closed.cancelled() => Ok(false),
        _ = writer_failed.cancelled() => Err(SessionError::Closed),
        r = rd.read_buf(buf) => match r? {
            0 if partial => Err(SessionError::Closed),
            0 => Ok(false),
            _ => Ok(true),
        },
    }
}

/// Appends one reply; big READ payloads become separate segments (no copy). The reply's
/// ticket moves to `held`: it is released once those bytes are written.
fn encode_reply(
    r: Reply,
    held: &mut Vec<Ticket>,
    style: HeaderStyle,
    structured: bool,
    out: &mut BytesMut,
    segs: &mut VecDeque<Bytes>,
) -> Result<(), WireError> {
    let request_offset = if style == HeaderStyle::Extended {
        r.offset
    } else {
        0
    };
    held.push(r.ticket);
    let chunk = |body: ChunkBody| ReplyChunk {
        flags: ReplyFlags::DONE,
        cookie: r.cookie,
        request_offset,
        body,
    };
    match r.result {
        Err((error, message)) => {
            if structured {
                let message: String = message.chars().take(1024).collect();
                chunk(ChunkBody::Error { error, message }).encode(style, out)?;
            } else {
                SimpleReply {
                    error: Some(error),
                    cookie: r.cookie,
                }
                .encode(out);
            }
        }
        Ok(Output::Data(data)) => {
            if structured && !data.is_empty() {
                // `Bytes` clones share the buffer: the chunk only describes it.
                chunk(ChunkBody::OffsetData {
                    offset: r.offset,
                    data: data.clone(),
                })
                .encode_without_data(style, out)?;
                push_data(data, out, segs);
            } else if structured {
                chunk(ChunkBody::None).encode(style, out)?;
            } else {
                SimpleReply {
                    error: None,
                    cookie: r.cookie,
                }
                .encode(out);
                push_data(data, out, segs);
            }
        }
        Ok(Output::Extents(extents)) => {
            let flags = |hole: bool| {
                if hole {
                    NBD_STATE_HOLE | NBD_STATE_ZERO
                } else {
                    0
                }
            };
            let body = if style == HeaderStyle::Extended {
                ChunkBody::BlockStatusExt {
                    context_id: BASE_ALLOCATION_ID,
                    extents: extents
                        .iter()
                        .map(|e| ExtendedExtent {
                            length: e.length,
                            flags: flags(e.hole).into(),
                        })
                        .collect(),
                }
            } else {
                ChunkBody::BlockStatus {
                    context_id: BASE_ALLOCATION_ID,
                    // Request lengths are 32-bit in the compact style, so every extent fits.
                    extents: extents
                        .iter()
                        .map(|e| WireExtent {
                            length: e.length.min(u64::from(u32::MAX)) as u32,
                            flags: flags(e.hole),
                        })
                        .collect(),
                }
            };
            chunk(body).encode(style, out)?;
        }
        Ok(Output::None) => {
            if style == HeaderStyle::Extended {
                chunk(ChunkBody::None).encode(style, out)?;
            } else {
                // Simple replies are allowed for everything but READ and BLOCK_STATUS.
                SimpleReply {
                    error: None,
                    cookie: r.cookie,
                }
                .encode(out);
            }
        }
    }
    Ok(())
}

fn push_data(data: Bytes, out: &mut BytesMut, segs: &mut VecDeque<Bytes>) {
    if data.len() <= COPY_LIMIT {
        out.extend_from_slice(&data);
    } else {
        segs.push_back(out.split().freeze());
        segs.push_back(data);
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Reply>,
    style: HeaderStyle,
    structured: bool,
    failed: CancellationToken,
) -> Result<(), SessionError> {
    let mut out = BytesMut::with_capacity(256 * 1024);
    let mut segs: VecDeque<Bytes> = VecDeque::new();
    let mut held: Vec<Ticket> = Vec::with_capacity(64);
    let result = async {
        while let Some(first) = rx.recv().await {
            encode_reply(first, &mut held, style, structured, &mut out, &mut segs)?;
            // Batch whatever else is ready into the same write.
            while out.len() < 256 * 1024 && segs.len() < 64 {
                match rx.try_recv() {
                    Ok(r) => encode_reply(r, &mut held, style, structured, &mut out, &mut segs)?,
                    Err(_) => break,
                }
            }
            if !out.is_empty() {
                segs.push_back(out.split().freeze());
            }
            write_segments(&mut wr, &mut segs).await?;
            // TLS holds records it could not send yet until flushed (a no-op on TCP).
            wr.flush().await?;
            // Written: the budget these replies held is free for new requests.
            held.clear();
        }
        wr.flush().await?;
        Ok::<(), SessionError>(())
    }
    .await;
    if result.is_err() {
        failed.cancel();
    }
    let _ = wr.shutdown().await;
    result
}

async fn write_segments<W: AsyncWrite + Unpin>(
    wr: &mut W,
    segs: &mut VecDeque<Bytes>,
) -> Result<(), SessionError> {
    while !segs.is_empty() {
        let n = {
            let slices: Vec<IoSlice<'_>> = segs.iter().take(64).map(|b| IoSlice::new(b)).collect();
            wr.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(SessionError::Io(std::io::ErrorKind::WriteZero.into()));
        }
        let mut left = n;
        while left > 0 {
            let Some(front) = segs.front_mut() else { break };
            if front.len() <= left {
                left -= front.len();
                segs.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
    Ok(())
}
