//! The NBD wire codec (fixed newstyle handshake and transmission phase).
//! Pure functions over byte buffers: no IO, malformed input is an error, never a panic.
//!
//! Shared by the server and the client engine, so every message has both an encoder and a
//! decoder. Conventions:
//! - Streaming decoders take the bytes received so far and return
//!   `Ok(None)` (need more bytes), `Ok(Some((value, consumed)))`, or `Err(WireError)`.
//!   They reject a bad magic as soon as its bytes are present, and check every length against
//!   a caller-supplied limit before anything is copied, so input never drives allocation.
//! - Encoders append to any [`bytes::BufMut`] (`Vec<u8>`, `BytesMut`). Fixed-size messages
//!   encode infallibly; messages with strings or counts return `Result` and write nothing on
//!   error.
//! - Values that the protocol document requires peers to tolerate (unknown options, info
//!   types, flags, commands, errors) are kept in `Unknown` arms or retained flag bits;
//!   values it forbids are errors.
//! - Transmission messages take a [`HeaderStyle`]: `Compact` (28-byte requests, simple and
//!   structured replies) or `Extended` (`NBD_OPT_EXTENDED_HEADERS`: 32-byte headers).
//!
//! ```
//! use enbd_proto::wire::*;
//!
//! // Client: a compact READ request.
//! let read = Request {
//!     flags: CommandFlags::empty(),
//!     command: Command::Read,
//!     cookie: Cookie(7),
//!     offset: 4096,
//!     length: 512,
//! };
//! let mut wire = Vec::new();
//! read.encode(HeaderStyle::Compact, &mut wire)?;
//!
//! // Server: decodes as bytes arrive; a partial header asks for more.
//! assert_eq!(Request::decode(&wire[..10], HeaderStyle::Compact, 1 << 25)?, None);
//! let (request, used) = Request::decode(&wire, HeaderStyle::Compact, 1 << 25)?.expect("whole header");
//! assert_eq!((request, used), (read, 28));
//!
//! // Server: answers with one structured chunk carrying the data and the DONE flag.
//! let chunk = ReplyChunk {
//!     flags: ReplyFlags::DONE,
//!     cookie: request.cookie,
//!     request_offset: 0,
//!     body: ChunkBody::OffsetData { offset: request.offset, data: vec![0u8; 512].into() },
//! };
//! let mut reply = Vec::new();
//! chunk.encode(HeaderStyle::Compact, &mut reply)?;
//!
//! // Client: reads the header first, then the payload it announces.
//! match ReplyHeader::decode(&reply, HeaderStyle::Compact, 1 << 25)? {
//!     Some((ReplyHeader::Chunk(header), len)) => {
//!         let payload = &reply[len..len + header.length as usize];
//!         let body = ChunkBody::decode(header.chunk_type, payload)?;
//!         assert_eq!(body, chunk.body);
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! # Ok::<(), WireError>(())
//! ```

#![warn(missing_docs)]

mod buf;
pub mod consts;
mod errno;
mod error;
mod flags;
mod handshake;
mod option_reply;
mod transmission;
mod types;

pub use consts::{BASE_ALLOCATION, MAX_STRING_LEN, NBD_STATE_HOLE, NBD_STATE_ZERO};
pub use error::WireError;
pub use flags::{ClientFlags, CommandFlags, HandshakeFlags, ReplyFlags, TransmissionFlags};
pub use handshake::{
    AccessToken, ExportInfo, Greeting, InfoRequest, MAX_ACCESS_TOKEN, MetaContextRequest,
    OptionHeader, OptionRequest,
};
pub use option_reply::{BlockSizeInfo, InfoReply, OptionReply, OptionReplyBody};
pub use transmission::{
    BlockStatusPayload, ChunkBody, ChunkHeader, ExtendedExtent, Extent, ReplyChunk, ReplyHeader,
    Request, SimpleReply,
};
pub use types::{
    ChunkType, Command, Cookie, HeaderStyle, InfoType, NbdError, OptionCode, OptionError,
};
