//! The transmission phase of one channel: a writer that takes requests from the journal and
//! a reader that matches replies to them by cookie, sharing the in-flight table.
//!
//! Invariants: see [`super`]; the reader checks every reply or chunk against its request
//! before buffering its payload.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use enbd_proto::wire::{
    ChunkBody, ChunkType, Command, CommandFlags, Cookie, HeaderStyle, NbdError, ReplyFlags,
    ReplyHeader, Request as WireRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;

use super::{Connected, Ended};
use crate::engine::config::MAX_REQUEST_BYTES;
use crate::engine::error::IoError;
use crate::engine::journal::{Op, Request};
use crate::engine::{Inner, Slot, dispatch};

/// Largest error chunk: error (4) + message length (2) + a message the protocol asks to keep
/// under 4 KiB + an ERROR_OFFSET's offset (8), with room to spare.
const MAX_ERROR_CHUNK: u64 = 8 * 1024;
/// Read buffer: large enough for many 4 KiB replies per syscall.
const READ_BUFFER: usize = 256 * 1024;

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
