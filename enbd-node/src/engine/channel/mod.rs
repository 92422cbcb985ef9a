//! One NBD channel: a TCP connection through the fixed-newstyle handshake ([`handshake`]:
//! structured replies when offered, block-size constraints), then the transmission phase
//! ([`transmission`]) with a writer and a reader sharing an in-flight table keyed by cookie.
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

mod handshake;
mod transmission;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use enbd_proto::wire::TransmissionFlags;
use tokio::net::TcpStream;

use super::config::MAX_REQUEST_BYTES;

pub(crate) use self::handshake::open;
pub(crate) use self::transmission::{InFlight, run};

/// Block size defaults when the server sends no constraints (the protocol's defaults).
const DEFAULT_MIN_BLOCK: u32 = 1;
const DEFAULT_PREF_BLOCK: u32 = 4096;

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
    pub(super) stream: TcpStream,
    pub geometry: Geometry,
    pub local_addr: Option<SocketAddr>,
    pub(super) structured: bool,
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
