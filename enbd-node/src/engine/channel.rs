//! One NBD channel: a TCP connection through the fixed-newstyle handshake (structured
//! replies when offered, block-size constraints), then the transmission phase with a writer
//! and a reader sharing an in-flight table keyed by cookie.
//!
//! Invariants: a request is inserted into the in-flight table before its bytes are written
//! (its reply can never outrun it) and leaves only when its final reply was fully read; the
//! writer and reader never hold a request across an await outside that table, so dropping
//! them at any point loses nothing — the supervisor drains the table back into the journal.
//! Cookies are never reused within a connection.
//!
//! Against a broken or hostile server, memory stays bounded and nothing panics: option replies
//! are bounded in size (`MAX_OPTION_REPLY`) and number (`MAX_OPTION_REPLIES`); a reply or
//! chunk for a cookie not in the table, a chunk bigger than its request can need, or a chunk
//! type never asked for ends the connection with a protocol error before its payload is
//! buffered (the supervisor reconnects and re-issues the requests).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use enbd_proto::wire::{
    ChunkBody, ChunkType, ClientFlags, Command, CommandFlags, Cookie, Greeting, HandshakeFlags,
    HeaderStyle, InfoReply, InfoRequest, InfoType, NbdError, OptionCode, OptionError, OptionReply,
    OptionReplyBody, OptionRequest, ReplyFlags, ReplyHeader, Request as WireRequest,
    TransmissionFlags, WireError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;

use super::config::MAX_REQUEST_BYTES;
use super::error::{EngineError, IoError};
use super::journal::{Op, Request};
use super::{Inner, Slot, dispatch};

/// Largest option reply we accept during the handshake.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most replies we read for one option: NBD_OPT_GO needs a handful of INFOs and an ACK.
const MAX_OPTION_REPLIES: usize = 64;
/// Largest error chunk: error (4) + message length (2) + a message the protocol asks to keep
/// under 4 KiB + an ERROR_OFFSET's offset (8), with room to spare.
const MAX_ERROR_CHUNK: u64 = 8 * 1024;
/// Block size defaults when the server sends no constraints (the protocol's defaults).
const DEFAULT_MIN_BLOCK: u32 = 1;
const DEFAULT_PREF_BLOCK: u32 = 4096;
/// Read buffer: large enough for many 4 KiB replies per syscall.
const READ_BUFFER: usize = 256 * 1024;

/// What the handshake says about the export: its identity, which reconnects must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    pub min_block: u32,
    pub pref_block: u32,
    pub max_block: u32,
    pub read_only: bool,
    pub can_flush: bool,
    pub can_fua: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    pub can_fast_zero: bool,
    pub multi_conn: bool,
    /// Raw transmission flags as sent.
    pub flags: u16,
}

impl Geometry {
    fn new(size: u64, flags: TransmissionFlags, blocks: Option<(u32, u32, u32)>) -> Self {
        let (min_block, pref_block, max_block) = blocks.unwrap_or((
            DEFAULT_MIN_BLOCK,
            DEFAULT_PREF_BLOCK,
            MAX_REQUEST_BYTES as u32,
        ));
        let has = |f| flags.contains(f);
        Self {
            size,
            min_block,
            pref_block,
            // We never send more than our own request limit, whatever the server allows.
            max_block: max_block.min(MAX_REQUEST_BYTES as u32),
            read_only: has(TransmissionFlags::READ_ONLY),
            can_flush: has(TransmissionFlags::SEND_FLUSH),
            can_fua: has(TransmissionFlags::SEND_FUA),
            can_trim: has(TransmissionFlags::SEND_TRIM),
            can_write_zeroes: has(TransmissionFlags::SEND_WRITE_ZEROES),
            can_fast_zero: has(TransmissionFlags::SEND_FAST_ZERO),
            multi_conn: has(TransmissionFlags::CAN_MULTI_CONN),
            flags: flags.bits(),
        }
    }
}

/// A connection that finished its handshake and is ready for transmission.
pub(crate) struct Connected {
    stream: TcpStream,
    pub geometry: Geometry,
    pub local_addr: Option<SocketAddr>,
    structured: bool,
}

/// Why a connection's transmission phase ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The engine is shutting down.
    Cancelled,
    /// Reset on request (operator, test, or an abandoned request on it).
    Reset,
    /// The server closed the connection.
    Eof,
    Io(io::Error),
    /// The server sent something we cannot parse or match.
    Protocol(String),
    /// The oldest request got no reply within the io timeout.
    Timeout(Duration),
    /// The server answered ESHUTDOWN: it is going away; its requests go elsewhere.
    ServerShutdown,
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cancelled => f.write_str("engine shut down"),
            Self::Reset => f.write_str("reset on request"),
            Self::Eof => f.write_str("server closed the connection"),
            Self::Io(e) => write!(f, "socket error: {e}"),
            Self::Protocol(m) => write!(f, "protocol error: {m}"),
            Self::Timeout(d) => write!(f, "no reply for {:.1}s", d.as_secs_f64()),
            Self::ServerShutdown => f.write_str("server is shutting down (ESHUTDOWN)"),
        }
    }
}

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

/// Hashes cookies (sequential integers) with one multiply: cheap and spreads the high bits.
#[derive(Default)]
struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A request on the wire, with the parts of its reply read so far.
struct Pending {
    req: Request,
    sent: Instant,
    /// Read data assembled from structured chunks.
    data: Option<BytesMut>,
    /// A structured read answered by one chunk covering it all (no copy needed).
    whole: Option<Bytes>,
    error: Option<NbdError>,
}

/// A channel's requests awaiting replies.
#[derive(Default)]
pub(crate) struct InFlight {
    table: Mutex<HashMap<u64, Pending, BuildHasherDefault<CookieHasher>>>,
    len: AtomicUsize,
    next_cookie: AtomicU64,
    /// Signalled when a reply frees room (the writer may be waiting for it).
    room: Notify,
}

impl InFlight {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, Pending, BuildHasherDefault<CookieHasher>>> {
        // Each critical section is one map operation plus counter updates: a poisoned table is
        // still consistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Empties the table (the connection is gone), oldest first.
    pub fn drain(&self) -> Vec<Request> {
        let mut t = self.lock();
        let mut v: Vec<Pending> = t.drain().map(|(_, p)| p).collect();
        self.len.store(0, Ordering::Release);
        drop(t);
        v.sort_by_key(|p| p.sent);
        v.into_iter().map(|p| p.req).collect()
    }

    /// Whether a request whose caller gave up is still on the wire.
    pub fn has_abandoned(&self) -> bool {
        self.lock().values().any(|p| p.req.abandoned())
    }

    fn oldest(&self) -> Option<Instant> {
        self.lock().values().map(|p| p.sent).min()
    }
}

/// Runs the transmission phase until the connection fails, a reset is requested, the oldest
/// request times out, or the engine shuts down. The in-flight table is left for the caller
/// to drain.
pub(crate) async fn run(conn: Connected, inner: &Inner, slot: &Slot) -> Ended {
    let structured = conn.structured;
    let (mut rd, mut wr) = conn.stream.into_split();
    let ended = {
        let writer = write_loop(&mut wr, inner, slot);
        let reader = read_loop(&mut rd, structured, slot);
        let watchdog = watchdog(inner, slot);
        tokio::pin!(writer, reader, watchdog);
        tokio::select! {
            e = &mut writer => e,
            e = &mut reader => e,
            e = &mut watchdog => e,
            _ = slot.reset.notified() => Ended::Reset,
            _ = inner.cancel.cancelled() => Ended::Cancelled,
        }
    };
    match ended {
        Ended::Cancelled if slot.inflight.len() == 0 => {
            // Polite goodbye; the server may close first, which is fine.
            let mut out = Vec::with_capacity(32);
            let disc = WireRequest {
                flags: CommandFlags::empty(),
                command: Command::Disc,
                cookie: Cookie(u64::MAX),
                offset: 0,
                length: 0,
            };
            if disc.encode(HeaderStyle::Compact, &mut out).is_ok() {
                let _ = tokio::time::timeout(Duration::from_millis(200), wr.write_all(&out)).await;
            }
        }
        Ended::Reset => {
            // Abortive close: any bytes still queued in our socket are discarded, not sent.
            let _ = wr.as_ref().set_zero_linger();
        }
        _ => {}
    }
    ended
}

fn command(op: Op) -> Command {
    match op {
        Op::Read => Command::Read,
        Op::Write => Command::Write,
        Op::Flush => Command::Flush,
        Op::Trim => Command::Trim,
        Op::WriteZeroes => Command::WriteZeroes,
    }
}

async fn write_loop(wr: &mut OwnedWriteHalf, inner: &Inner, slot: &Slot) -> Ended {
    let depth = inner.cfg.queue_depth as usize;
    let inflight = &slot.inflight;
    let stats = &slot.stats;
    let mut batch = Vec::with_capacity(depth);
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        // Wait for room on this channel, then for work.
        loop {
            let room = inflight.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if inflight.len() < depth {
                break;
            }
            room.await;
        }
        inner.journal.wait_queued().await;
        let room = depth.saturating_sub(inflight.len());
        let share = dispatch::share(
            inner.journal.queued_len(),
            inner.up.load(Ordering::Acquire),
            room,
        );
        inner.journal.take(share, &mut batch);
        if batch.is_empty() {
            continue;
        }
        out.clear();
        let mut written = 0u64;
        {
            let mut table = inflight.lock();
            let now = Instant::now();
            for mut req in batch.drain(..) {
                // Checked under the table lock: a caller that gives up either sees the request
                // here (and resets us) or we see it gone and never send it.
                if req.abandoned() {
                    continue;
                }
                let cookie = inflight.next_cookie.fetch_add(1, Ordering::Relaxed);
                let header = WireRequest {
                    flags: req.flags,
                    command: command(req.op),
                    cookie: Cookie(cookie),
                    offset: req.offset,
                    length: u64::from(req.len),
                };
                if let Err(e) = header.encode(HeaderStyle::Compact, &mut out) {
                    req.complete(Err(IoError::Invalid {
                        len: header.length,
                        why: "cannot be encoded",
                    }));
                    tracing::error!(error = %e, "request header encoding failed");
                    continue;
                }
                if req.op == Op::Write {
                    out.extend_from_slice(&req.payload);
                    written += u64::from(req.len);
                }
                req.issues += 1;
                table.insert(
                    cookie,
                    Pending {
                        req,
                        sent: now,
                        data: None,
                        whole: None,
                        error: None,
                    },
                );
            }
            inflight.len.store(table.len(), Ordering::Release);
            stats.in_flight.store(table.len() as u64, Ordering::Relaxed);
        }
        if let Err(e) = wr.write_all(&out).await {
            return Ended::Io(e);
        }
        stats.bytes_written.fetch_add(written, Ordering::Relaxed);
    }
}

async fn read_loop(rd: &mut OwnedReadHalf, structured: bool, slot: &Slot) -> Ended {
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    loop {
        loop {
            match parse_reply(&mut buf, structured, slot) {
                Ok(Parsed::One) => {}
                Ok(Parsed::NeedMore(n)) => {
                    if buf.capacity() - buf.len() < n.max(READ_BUFFER / 4) {
                        buf.reserve(n.max(READ_BUFFER));
                    }
                    break;
                }
                Err(e) => return e,
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => return Ended::Eof,
            Ok(_) => {}
            Err(e) => return Ended::Io(e),
        }
    }
}

enum Parsed {
    One,
    /// At least this many more bytes are needed.
    NeedMore(usize),
}

fn protocol(msg: impl Into<String>) -> Ended {
    Ended::Protocol(msg.into())
}

/// Consumes at most one whole reply (or chunk) from `buf` and completes its request when it
/// was the last part.
///
/// A reply saying the server is shutting down (ESHUTDOWN) does not complete its request: the
/// connection is abandoned instead, so the request is re-issued once the server is back — a
/// server restart stays invisible to the caller like any other outage.
fn parse_reply(buf: &mut BytesMut, structured: bool, slot: &Slot) -> Result<Parsed, Ended> {
    let header = match ReplyHeader::decode(buf, HeaderStyle::Compact, MAX_REQUEST_BYTES as u64 + 64)
    {
        Ok(Some((h, len))) => (h, len),
        Ok(None) => return Ok(Parsed::NeedMore(1)),
        Err(e) => return Err(Ended::Protocol(e.to_string())),
    };
    let inflight = &slot.inflight;
    let mut table = inflight.lock();
    match header {
        (ReplyHeader::Simple(reply), hlen) => {
            let cookie = reply.cookie.0;
            let pending = table
                .get(&cookie)
                .ok_or_else(|| protocol(format!("reply for unknown cookie {cookie}")))?;
            if reply.error == Some(NbdError::Shutdown) {
                return Err(Ended::ServerShutdown);
            }
            let data_len = match (pending.req.op, reply.error) {
                (Op::Read, None) => pending.req.len as usize,
                _ => 0,
            };
            if structured && pending.req.op == Op::Read {
                return Err(protocol(
                    "simple reply to a READ after structured replies were negotiated",
                ));
            }
            if buf.len() < hlen + data_len {
                return Ok(Parsed::NeedMore(hlen + data_len - buf.len()));
            }
            let Some(pending) = table.remove(&cookie) else {
                return Err(protocol(format!("reply for unknown cookie {cookie}")));
            };
            finish_locked(inflight, &mut table, slot);
            drop(table);
            buf.advance(hlen);
            let result = match reply.error {
                Some(e) => Err(IoError::Server(e)),
                None => Ok(buf.split_to(data_len).freeze()),
            };
            complete(pending, result, slot);
        }
        (ReplyHeader::Chunk(chunk), hlen) => {
            if !structured {
                return Err(protocol(
                    "structured reply chunk without structured replies negotiated",
                ));
            }
            let cookie = chunk.cookie.0;
            // Checked before the payload is buffered: a hostile server cannot make us hold
            // more than the request can need.
            let pending = table
                .get_mut(&cookie)
                .ok_or_else(|| protocol(format!("reply chunk for unknown cookie {cookie}")))?;
            let limit = chunk_limit(chunk.chunk_type, pending).map_err(protocol)?;
            if chunk.length > limit {
                return Err(protocol(format!(
                    "{:?} chunk of {} bytes for cookie {cookie}, more than its request allows ({limit})",
                    chunk.chunk_type, chunk.length
                )));
            }
            let frame = hlen + chunk.length as usize;
            if buf.len() < frame {
                return Ok(Parsed::NeedMore(frame - buf.len()));
            }
            let mut payload = {
                let mut f = buf.split_to(frame);
                f.advance(hlen);
                f
            };
            match chunk.chunk_type {
                ChunkType::OffsetData => {
                    let offset = payload.get_u64();
                    place_read_data(pending, offset, payload.freeze()).map_err(protocol)?;
                }
                ChunkType::OffsetHole => {
                    let offset = payload.get_u64();
                    let len = payload.get_u32();
                    place_hole(pending, offset, len).map_err(protocol)?;
                }
                ChunkType::None => {}
                t if t.is_error() => {
                    let body =
                        ChunkBody::decode(t, &payload).map_err(|e| protocol(e.to_string()))?;
                    let error = match body {
                        ChunkBody::Error { error, .. }
                        | ChunkBody::ErrorOffset { error, .. }
                        | ChunkBody::UnknownError { error, .. } => error,
                        _ => NbdError::Io,
                    };
                    if error == NbdError::Shutdown {
                        return Err(Ended::ServerShutdown);
                    }
                    pending.error.get_or_insert(error);
                }
                // `chunk_limit` refused every other type.
                _ => {}
            }
            if chunk.flags.contains(ReplyFlags::DONE) {
                let Some(pending) = table.remove(&cookie) else {
                    return Err(protocol(format!("reply chunk for unknown cookie {cookie}")));
                };
                finish_locked(inflight, &mut table, slot);
                drop(table);
                let result = match pending.error {
                    Some(e) => Err(IoError::Server(e)),
                    None => Ok(match (&pending.whole, &pending.data) {
                        (Some(w), _) => w.clone(),
                        (None, Some(d)) => d.clone().freeze(),
                        // A read answered only by NONE: nothing was sent, so it reads as zeroes.
                        (None, None) if pending.req.op == Op::Read => {
                            Bytes::from(vec![0u8; pending.req.len as usize])
                        }
                        (None, None) => Bytes::new(),
                    }),
                };
                complete(pending, result, slot);
            }
        }
    }
    Ok(Parsed::One)
}

/// Largest payload a chunk of type `t` may have for request `p`, or why that type is not
/// acceptable at all.
fn chunk_limit(t: ChunkType, p: &Pending) -> Result<u64, String> {
    match t {
        ChunkType::OffsetData if p.req.op == Op::Read => Ok(8 + u64::from(p.req.len)),
        ChunkType::OffsetHole if p.req.op == Op::Read => Ok(12),
        ChunkType::None => Ok(0),
        t if t.is_error() => Ok(MAX_ERROR_CHUNK),
        t => Err(format!("{t:?} chunk for a {:?} request", p.req.op)),
    }
}

fn read_range(p: &Pending, offset: u64, len: u64) -> Result<usize, String> {
    let start = offset
        .checked_sub(p.req.offset)
        .ok_or("read chunk before the request's offset")?;
    if p.req.op != Op::Read || start + len > u64::from(p.req.len) {
        return Err(format!("read chunk [{offset}, +{len}) outside the request"));
    }
    Ok(start as usize)
}

fn assembly(p: &mut Pending) -> &mut BytesMut {
    let len = p.req.len as usize;
    let whole = p.whole.take();
    p.data.get_or_insert_with(|| {
        let mut b = BytesMut::zeroed(len);
        if let Some(w) = whole {
            b.copy_from_slice(&w);
        }
        b
    })
}

fn place_read_data(p: &mut Pending, offset: u64, data: Bytes) -> Result<(), String> {
    let start = read_range(p, offset, data.len() as u64)?;
    if start == 0 && data.len() == p.req.len as usize && p.data.is_none() && p.whole.is_none() {
        p.whole = Some(data);
        return Ok(());
    }
    let b = assembly(p);
    b[start..start + data.len()].copy_from_slice(&data);
    Ok(())
}

fn place_hole(p: &mut Pending, offset: u64, len: u32) -> Result<(), String> {
    let start = read_range(p, offset, u64::from(len))?;
    let b = assembly(p);
    b[start..start + len as usize].fill(0);
    Ok(())
}

/// Counter updates when a request leaves the table (lock held).
fn finish_locked(
    inflight: &InFlight,
    table: &mut HashMap<u64, Pending, BuildHasherDefault<CookieHasher>>,
    slot: &Slot,
) {
    inflight.len.store(table.len(), Ordering::Release);
    slot.stats
        .in_flight
        .store(table.len() as u64, Ordering::Relaxed);
}

fn complete(p: Pending, result: Result<Bytes, IoError>, slot: &Slot) {
    let stats = &slot.stats;
    stats.completed.fetch_add(1, Ordering::Relaxed);
    if let Ok(data) = &result {
        stats
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    p.req.complete(result);
    slot.inflight.room.notify_one();
}

/// Declares the connection dead when its oldest request waited longer than the io timeout.
async fn watchdog(inner: &Inner, slot: &Slot) -> Ended {
    let Some(limit) = inner.cfg.io_timeout else {
        return std::future::pending().await;
    };
    let tick = (limit / 4).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(tick).await;
        if let Some(oldest) = slot.inflight.oldest() {
            let age = oldest.elapsed();
            if age >= limit {
                return Ended::Timeout(age);
            }
        }
    }
}
