//! Transmission-phase messages: request headers (compact 28-byte and extended 32-byte), the
//! BLOCK_STATUS request payload, simple replies, and structured/extended reply chunks.
//! Invariants: headers are decoded without touching the payload, and every length is checked
//! against the caller's `max_payload` and against the layout of its chunk type before the
//! caller reads the payload, so a peer cannot make us buffer more than we allow. Chunk types
//! the protocol does not allow for the negotiated header style are rejected.

use super::buf::{Reader, check_str, decode_string};
use super::consts::*;
use super::error::WireError;
use super::flags::{CommandFlags, ReplyFlags};
use super::types::{ChunkType, Command, Cookie, HeaderStyle, NbdError};
use bytes::{BufMut, Bytes};

/// A request header. The payload (WRITE data, or any payload flagged with PAYLOAD_LEN in
/// the extended style) follows it on the wire; see [`Request::payload_len`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags; unknown bits are kept (a server answers them with `NBD_EINVAL`).
    pub flags: CommandFlags,
    /// Command type; unknown commands are kept (a server answers them with `NBD_EINVAL`).
    pub command: Command,
    /// Cookie echoed in the reply.
    pub cookie: Cookie,
    /// Offset into the export.
    pub offset: u64,
    /// Effect or payload length; at most `u32::MAX` in the compact style.
    pub length: u64,
}

impl Request {
    /// Size of the header on the wire for `style`.
    pub const fn header_len(style: HeaderStyle) -> usize {
        match style {
            HeaderStyle::Compact => COMPACT_REQUEST_LEN,
            HeaderStyle::Extended => EXTENDED_REQUEST_LEN,
        }
    }

    /// Bytes of payload that follow this header on the wire: the length of a WRITE in the
    /// compact style, the length of any request flagged PAYLOAD_LEN in the extended style.
    pub fn payload_len(&self, style: HeaderStyle) -> u64 {
        let has_payload = match style {
            HeaderStyle::Compact => self.command == Command::Write,
            HeaderStyle::Extended => self.flags.contains(CommandFlags::PAYLOAD_LEN),
        };
        if has_payload { self.length } else { 0 }
    }

    /// Appends the header. Compact headers cannot carry PAYLOAD_LEN or a length over 32 bits.
    pub fn encode<B: BufMut>(&self, style: HeaderStyle, out: &mut B) -> Result<(), WireError> {
        match style {
            HeaderStyle::Compact => {
                if self.flags.contains(CommandFlags::PAYLOAD_LEN) {
                    return Err(WireError::ReservedBits {
                        what: "compact request flags (PAYLOAD_LEN)",
                        bits: CommandFlags::PAYLOAD_LEN.bits().into(),
                    });
                }
                let length = u32::try_from(self.length).map_err(|_| WireError::TooLong {
                    what: "compact request length",
                    len: self.length,
                    limit: u32::MAX.into(),
                })?;
                out.put_u32(NBD_REQUEST_MAGIC);
                out.put_u16(self.flags.bits());
                out.put_u16(self.command.raw());
                out.put_u64(self.cookie.0);
                out.put_u64(self.offset);
                out.put_u32(length);
            }
            HeaderStyle::Extended => {
                out.put_u32(NBD_EXTENDED_REQUEST_MAGIC);
                out.put_u16(self.flags.bits());
                out.put_u16(self.command.raw());
                out.put_u64(self.cookie.0);
                out.put_u64(self.offset);
                out.put_u64(self.length);
            }
        }
        Ok(())
    }

    /// Decodes a header. A payload longer than `max_payload` is an error (the server cannot
    /// skip it cheaply and the document allows a hard disconnect for it).
    pub fn decode(
        buf: &[u8],
        style: HeaderStyle,
        max_payload: u64,
    ) -> Result<Option<(Self, usize)>, WireError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let mut r = Reader::new(buf);
        let magic = r.u32("request magic")?;
        let expected = match style {
            HeaderStyle::Compact => NBD_REQUEST_MAGIC,
            HeaderStyle::Extended => NBD_EXTENDED_REQUEST_MAGIC,
        };
        if magic != expected {
            return Err(WireError::BadMagic {
                what: "request",
                got: magic.into(),
            });
        }
        let len = Self::header_len(style);
        if buf.len() < len {
            return Ok(None);
        }
        let flags = CommandFlags::from_bits_retain(r.u16("command flags")?);
        let command = Command::from_raw(r.u16("command")?);
        let cookie = Cookie(r.u64("cookie")?);
        let offset = r.u64("offset")?;
        let length = match style {
            HeaderStyle::Compact => {
                if flags.contains(CommandFlags::PAYLOAD_LEN) {
                    return Err(WireError::ReservedBits {
                        what: "compact request flags (PAYLOAD_LEN)",
                        bits: CommandFlags::PAYLOAD_LEN.bits().into(),
                    });
                }
                u64::from(r.u32("length")?)
            }
            HeaderStyle::Extended => r.u64("length")?,
        };
        let request = Self {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let payload = request.payload_len(style);
        if payload > max_payload {
            return Err(WireError::TooLong {
                what: "request payload",
                len: payload,
                limit: max_payload,
            });
        }
        Ok(Some((request, len)))
    }
}

/// Payload of an extended `NBD_CMD_BLOCK_STATUS` sent with PAYLOAD_LEN: the effect length
/// and the metadata context ids the client wants answers for.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BlockStatusPayload {
    /// Length of the region of interest.
    pub effect_length: u64,
    /// Context ids to report on.
    pub context_ids: Vec<u32>,
}

impl BlockStatusPayload {
    /// Bytes this payload occupies (the request's length field).
    pub fn encoded_len(&self) -> usize {
        8 + 4 * self.context_ids.len()
    }

    /// Appends the payload.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        out.put_u64(self.effect_length);
        for id in &self.context_ids {
            out.put_u32(*id);
        }
    }

    /// Decodes a complete payload (8 + 4n bytes).
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        if payload.len() < 8 || !(payload.len() - 8).is_multiple_of(4) {
            return Err(WireError::BadLength {
                what: "block status payload",
                len: payload.len() as u64,
                reason: "must be 8 + 4n bytes",
            });
        }
        let mut r = Reader::new(payload);
        let effect_length = r.u64("effect length")?;
        let mut context_ids = Vec::with_capacity(r.remaining() / 4);
        while r.remaining() > 0 {
            context_ids.push(r.u32("metadata context id")?);
        }
        Ok(Self {
            effect_length,
            context_ids,
        })
    }
}

/// A simple reply header (16 bytes). For a successful READ, the data follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// `None` for success.
    pub error: Option<NbdError>,
    /// Cookie of the request.
    pub cookie: Cookie,
}

impl SimpleReply {
    /// Appends the 16-byte header.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        out.put_u32(NBD_SIMPLE_REPLY_MAGIC);
        out.put_u32(self.error.map_or(0, NbdError::raw));
        out.put_u64(self.cookie.0);
    }

    /// Decodes the 16-byte header.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, WireError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let mut r = Reader::new(buf);
        let magic = r.u32("reply magic")?;
        if magic != NBD_SIMPLE_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "simple reply",
                got: magic.into(),
            });
        }
        if buf.len() < SIMPLE_REPLY_LEN {
            return Ok(None);
        }
        let error = match r.u32("error")? {
            0 => None,
            raw => Some(NbdError::from_raw(raw)),
        };
        let cookie = Cookie(r.u64("cookie")?);
        Ok(Some((Self { error, cookie }, SIMPLE_REPLY_LEN)))
    }
}

/// Header of a structured (20-byte) or extended (32-byte) reply chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags; unknown bits are kept (clients ignore them).
    pub flags: ReplyFlags,
    /// Chunk type.
    pub chunk_type: ChunkType,
    /// Cookie of the request.
    pub cookie: Cookie,
    /// Offset of the request; carried only by extended headers (0 when compact).
    pub request_offset: u64,
    /// Payload length; at most `u32::MAX` for structured headers.
    pub length: u64,
}

impl ChunkHeader {
    /// Size of the header on the wire for `style`.
    pub const fn header_len(style: HeaderStyle) -> usize {
        match style {
            HeaderStyle::Compact => STRUCTURED_REPLY_HEADER_LEN,
            HeaderStyle::Extended => EXTENDED_REPLY_HEADER_LEN,
        }
    }

    /// Checks the length and flags against the chunk type's layout and the header style.
    pub fn validate(&self, style: HeaderStyle) -> Result<(), WireError> {
        let len = self.length;
        let bad = |reason: &'static str| {
            Err(WireError::BadLength {
                what: "reply chunk",
                len,
                reason,
            })
        };
        match self.chunk_type {
            ChunkType::None => {
                if len != 0 {
                    return bad("NONE chunk must be empty");
                }
                if !self.flags.contains(ReplyFlags::DONE) {
                    return Err(WireError::InvalidValue {
                        what: "NONE chunk without DONE flag",
                        value: self.flags.bits().into(),
                    });
                }
            }
            ChunkType::OffsetData if len < 9 => {
                return bad("OFFSET_DATA needs an offset and at least one byte");
            }
            ChunkType::OffsetHole if len != 12 => return bad("OFFSET_HOLE must be 12 bytes"),
            ChunkType::BlockStatus => {
                if style == HeaderStyle::Extended {
                    return Err(WireError::InvalidValue {
                        what: "BLOCK_STATUS chunk with extended headers",
                        value: self.chunk_type.raw().into(),
                    });
                }
                if len < 12 || !(len - 4).is_multiple_of(8) {
                    return bad("BLOCK_STATUS must be 4 + 8n bytes, n > 0");
                }
            }
            ChunkType::BlockStatusExt => {
                if style == HeaderStyle::Compact {
                    return Err(WireError::InvalidValue {
                        what: "BLOCK_STATUS_EXT chunk without extended headers",
                        value: self.chunk_type.raw().into(),
                    });
                }
                if len < 24 || !(len - 8).is_multiple_of(16) {
                    return bad("BLOCK_STATUS_EXT must be 8 + 16n bytes, n > 0");
                }
            }
            ChunkType::ErrorOffset if len < 14 => {
                return bad("ERROR_OFFSET needs at least 14 bytes");
            }
            ChunkType::Error if len < 6 => return bad("ERROR needs at least 6 bytes"),
            ChunkType::Unknown(raw) if raw & NBD_REPLY_TYPE_FLAG_ERROR == 0 => {
                return Err(WireError::InvalidValue {
                    what: "unknown non-error chunk type",
                    value: raw.into(),
                });
            }
            ChunkType::Unknown(_) if len < 6 => return bad("error chunks need at least 6 bytes"),
            _ => {}
        }
        if style == HeaderStyle::Compact && (len > u64::from(u32::MAX) || self.request_offset != 0)
        {
            return Err(WireError::InvalidValue {
                what: "structured chunk with a 64-bit length or a request offset",
                value: len,
            });
        }
        Ok(())
    }

    /// Appends the header after validating it.
    pub fn encode<B: BufMut>(&self, style: HeaderStyle, out: &mut B) -> Result<(), WireError> {
        self.validate(style)?;
        match style {
            HeaderStyle::Compact => {
                out.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
                out.put_u16(self.flags.bits());
                out.put_u16(self.chunk_type.raw());
                out.put_u64(self.cookie.0);
                out.put_u32(self.length as u32);
            }
            HeaderStyle::Extended => {
                out.put_u32(NBD_EXTENDED_REPLY_MAGIC);
                out.put_u16(self.flags.bits());
                out.put_u16(self.chunk_type.raw());
                out.put_u64(self.cookie.0);
                out.put_u64(self.request_offset);
                out.put_u64(self.length);
            }
        }
        Ok(())
    }

    /// Decodes and validates a chunk header; the payload (`length` bytes) follows it.
    pub fn decode(
        buf: &[u8],
        style: HeaderStyle,
        max_payload: u64,
    ) -> Result<Option<(Self, usize)>, WireError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let mut r = Reader::new(buf);
        let magic = r.u32("reply magic")?;
        let expected = match style {
            HeaderStyle::Compact => NBD_STRUCTURED_REPLY_MAGIC,
            HeaderStyle::Extended => NBD_EXTENDED_REPLY_MAGIC,
        };
        if magic != expected {
            return Err(WireError::BadMagic {
                what: "reply chunk",
                got: magic.into(),
            });
        }
        let header_len = Self::header_len(style);
        if buf.len() < header_len {
            return Ok(None);
        }
        let flags = ReplyFlags::from_bits_retain(r.u16("reply flags")?);
        let chunk_type = ChunkType::from_raw(r.u16("chunk type")?);
        let cookie = Cookie(r.u64("cookie")?);
        let (request_offset, length) = match style {
            HeaderStyle::Compact => (0, u64::from(r.u32("chunk length")?)),
            HeaderStyle::Extended => (r.u64("request offset")?, r.u64("chunk length")?),
        };
        if length > max_payload {
            return Err(WireError::TooLong {
                what: "reply chunk payload",
                len: length,
                limit: max_payload,
            });
        }
        let header = Self {
            flags,
            chunk_type,
            cookie,
            request_offset,
            length,
        };
        header.validate(style)?;
        Ok(Some((header, header_len)))
    }
}

/// Any reply header a client can receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (compact style only).
    Simple(SimpleReply),
    /// A structured or extended chunk header.
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// The cookie of the request this answers.
    pub fn cookie(&self) -> Cookie {
        match self {
            Self::Simple(reply) => reply.cookie,
            Self::Chunk(header) => header.cookie,
        }
    }

    /// Appends the header.
    pub fn encode<B: BufMut>(&self, style: HeaderStyle, out: &mut B) -> Result<(), WireError> {
        match self {
            Self::Simple(reply) => {
                if style == HeaderStyle::Extended {
                    return Err(WireError::InvalidValue {
                        what: "simple reply with extended headers",
                        value: 0,
                    });
                }
                reply.encode(out);
                Ok(())
            }
            Self::Chunk(header) => header.encode(style, out),
        }
    }

    /// Decodes the next reply header, dispatching on the magic. With extended headers only
    /// extended chunks are valid; in the compact style, whether structured chunks were
    /// negotiated is for the caller to check.
    pub fn decode(
        buf: &[u8],
        style: HeaderStyle,
        max_payload: u64,
    ) -> Result<Option<(Self, usize)>, WireError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let magic = Reader::new(buf).u32("reply magic")?;
        if style == HeaderStyle::Compact && magic == NBD_SIMPLE_REPLY_MAGIC {
            return Ok(SimpleReply::decode(buf)?.map(|(reply, len)| (Self::Simple(reply), len)));
        }
        Ok(ChunkHeader::decode(buf, style, max_payload)?
            .map(|(header, len)| (Self::Chunk(header), len)))
    }
}

/// One `NBD_REPLY_TYPE_BLOCK_STATUS` descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (nonzero).
    pub length: u32,
    /// Status flags defined by the context (`NBD_STATE_*` for `base:allocation`).
    pub flags: u32,
}

/// One `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtendedExtent {
    /// Length in bytes (nonzero).
    pub length: u64,
    /// Status flags defined by the context.
    pub flags: u64,
}

/// The payload of a reply chunk, typed by chunk type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkBody {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: non-empty data read at `offset`.
    OffsetData {
        /// Export offset of the first byte.
        offset: u64,
        /// The data.
        data: Bytes,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: `length` zero bytes at `offset`.
    OffsetHole {
        /// Export offset of the hole.
        offset: u64,
        /// Hole size (nonzero).
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// Metadata context id.
        context_id: u32,
        /// Consecutive extents (at least one).
        extents: Vec<Extent>,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`.
    BlockStatusExt {
        /// Metadata context id.
        context_id: u32,
        /// Consecutive extents (at least one).
        extents: Vec<ExtendedExtent>,
    },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error {
        /// The error (never success).
        error: NbdError,
        /// Message for humans, possibly empty.
        message: String,
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// The error (never success).
        error: NbdError,
        /// Message for humans, possibly empty.
        message: String,
        /// Export offset where the error happened.
        offset: u64,
    },
    /// An error chunk type this codec does not know (bit 15 set); the reply counts as failed.
    UnknownError {
        /// Raw chunk type (bit 15 set, not a known type).
        chunk_type: u16,
        /// The error.
        error: NbdError,
        /// Message for humans, possibly empty.
        message: String,
        /// Fields after the message.
        tail: Vec<u8>,
    },
}

impl ChunkBody {
    /// The chunk type this body is sent as.
    pub fn chunk_type(&self) -> ChunkType {
        match self {
            Self::None => ChunkType::None,
            Self::OffsetData { .. } => ChunkType::OffsetData,
            Self::OffsetHole { .. } => ChunkType::OffsetHole,
            Self::BlockStatus { .. } => ChunkType::BlockStatus,
            Self::BlockStatusExt { .. } => ChunkType::BlockStatusExt,
            Self::Error { .. } => ChunkType::Error,
            Self::ErrorOffset { .. } => ChunkType::ErrorOffset,
            Self::UnknownError { chunk_type, .. } => ChunkType::from_raw(*chunk_type),
        }
    }

    /// Payload length on the wire.
    pub fn payload_len(&self) -> u64 {
        let len = match self {
            Self::None => 0,
            Self::OffsetData { data, .. } => 8 + data.len(),
            Self::OffsetHole { .. } => 12,
            Self::BlockStatus { extents, .. } => 4 + 8 * extents.len(),
            Self::BlockStatusExt { extents, .. } => 8 + 16 * extents.len(),
            Self::Error { message, .. } => 6 + message.len(),
            Self::ErrorOffset { message, .. } => 14 + message.len(),
            Self::UnknownError { message, tail, .. } => 6 + message.len() + tail.len(),
        };
        len as u64
    }

    /// Checks the rules the header cannot express: nonzero errors, hole sizes and extent
    /// lengths, message length rules, and the descriptor count fitting its field.
    fn check(&self) -> Result<(), WireError> {
        let check_error = |error: &NbdError, message: &str| {
            if error.raw() == 0 {
                return Err(WireError::InvalidValue {
                    what: "error chunk with error 0",
                    value: 0,
                });
            }
            check_str(message, "error message")
        };
        match self {
            Self::OffsetHole { length: 0, .. } => Err(WireError::InvalidValue {
                what: "OFFSET_HOLE of size 0",
                value: 0,
            }),
            Self::BlockStatus { extents, .. } if extents.iter().any(|e| e.length == 0) => {
                Err(WireError::InvalidValue {
                    what: "block status extent of length 0",
                    value: 0,
                })
            }
            Self::BlockStatusExt { extents, .. } => {
                if extents.iter().any(|e| e.length == 0) {
                    return Err(WireError::InvalidValue {
                        what: "block status extent of length 0",
                        value: 0,
                    });
                }
                if u32::try_from(extents.len()).is_err() {
                    return Err(WireError::TooLong {
                        what: "extent list",
                        len: extents.len() as u64,
                        limit: u32::MAX.into(),
                    });
                }
                Ok(())
            }
            Self::Error { error, message } | Self::ErrorOffset { error, message, .. } => {
                check_error(error, message)
            }
            Self::UnknownError {
                chunk_type,
                error,
                message,
                ..
            } => {
                if chunk_type & NBD_REPLY_TYPE_FLAG_ERROR == 0 {
                    return Err(WireError::InvalidValue {
                        what: "unknown error chunk without bit 15",
                        value: (*chunk_type).into(),
                    });
                }
                check_error(error, message)
            }
            _ => Ok(()),
        }
    }

    /// Appends the payload; with `with_data == false` the data bytes of OFFSET_DATA are left
    /// out so the caller can write them straight from its buffer.
    fn encode_payload<B: BufMut>(&self, with_data: bool, out: &mut B) {
        match self {
            Self::None => {}
            Self::OffsetData { offset, data } => {
                out.put_u64(*offset);
                if with_data {
                    out.put_slice(data);
                }
            }
            Self::OffsetHole { offset, length } => {
                out.put_u64(*offset);
                out.put_u32(*length);
            }
            Self::BlockStatus {
                context_id,
                extents,
            } => {
                out.put_u32(*context_id);
                for extent in extents {
                    out.put_u32(extent.length);
                    out.put_u32(extent.flags);
                }
            }
            Self::BlockStatusExt {
                context_id,
                extents,
            } => {
                out.put_u32(*context_id);
                out.put_u32(extents.len() as u32);
                for extent in extents {
                    out.put_u64(extent.length);
                    out.put_u64(extent.flags);
                }
            }
            Self::Error { error, message } => encode_error(*error, message, out),
            Self::ErrorOffset {
                error,
                message,
                offset,
            } => {
                encode_error(*error, message, out);
                out.put_u64(*offset);
            }
            Self::UnknownError {
                error,
                message,
                tail,
                ..
            } => {
                encode_error(*error, message, out);
                out.put_slice(tail);
            }
        }
    }

    /// Types a complete payload of a chunk whose header was already validated.
    pub fn decode(chunk_type: ChunkType, payload: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let body = match chunk_type {
            ChunkType::None => Self::None,
            ChunkType::OffsetData => {
                let offset = r.u64("data offset")?;
                let data = r.rest();
                if data.is_empty() {
                    return Err(WireError::BadLength {
                        what: "OFFSET_DATA",
                        len: 8,
                        reason: "no data",
                    });
                }
                Self::OffsetData {
                    offset,
                    data: Bytes::copy_from_slice(data),
                }
            }
            ChunkType::OffsetHole => {
                let offset = r.u64("hole offset")?;
                let length = r.u32("hole size")?;
                Self::OffsetHole { offset, length }
            }
            ChunkType::BlockStatus => {
                let context_id = r.u32("metadata context id")?;
                if r.remaining() == 0 || !r.remaining().is_multiple_of(8) {
                    return Err(WireError::BadLength {
                        what: "BLOCK_STATUS",
                        len: payload.len() as u64,
                        reason: "must be 4 + 8n bytes, n > 0",
                    });
                }
                let mut extents = Vec::with_capacity(r.remaining() / 8);
                while r.remaining() > 0 {
                    extents.push(Extent {
                        length: r.u32("extent length")?,
                        flags: r.u32("extent flags")?,
                    });
                }
                Self::BlockStatus {
                    context_id,
                    extents,
                }
            }
            ChunkType::BlockStatusExt => {
                let context_id = r.u32("metadata context id")?;
                let count = r.u32("descriptor count")?;
                if r.remaining() == 0
                    || !r.remaining().is_multiple_of(16)
                    || u64::from(count) != (r.remaining() / 16) as u64
                {
                    return Err(WireError::BadLength {
                        what: "BLOCK_STATUS_EXT",
                        len: payload.len() as u64,
                        reason: "must be 8 + 16n bytes with n equal to the nonzero descriptor count",
                    });
                }
                let mut extents = Vec::with_capacity(r.remaining() / 16);
                while r.remaining() > 0 {
                    extents.push(ExtendedExtent {
                        length: r.u64("extent length")?,
                        flags: r.u64("extent flags")?,
                    });
                }
                Self::BlockStatusExt {
                    context_id,
                    extents,
                }
            }
            ChunkType::Error => {
                let (error, message) = decode_error(&mut r)?;
                Self::Error { error, message }
            }
            ChunkType::ErrorOffset => {
                let (error, message) = decode_error(&mut r)?;
                let offset = r.u64("error offset")?;
                Self::ErrorOffset {
                    error,
                    message,
                    offset,
                }
            }
            ChunkType::Unknown(raw) if raw & NBD_REPLY_TYPE_FLAG_ERROR != 0 => {
                let (error, message) = decode_error(&mut r)?;
                Self::UnknownError {
                    chunk_type: raw,
                    error,
                    message,
                    tail: r.rest().to_vec(),
                }
            }
            ChunkType::Unknown(raw) => {
                return Err(WireError::InvalidValue {
                    what: "unknown non-error chunk type",
                    value: raw.into(),
                });
            }
        };
        r.finish("reply chunk payload")?;
        body.check()?;
        Ok(body)
    }
}

fn encode_error<B: BufMut>(error: NbdError, message: &str, out: &mut B) {
    out.put_u32(error.raw());
    out.put_u16(message.len() as u16);
    out.put_slice(message.as_bytes());
}

fn decode_error(r: &mut Reader<'_>) -> Result<(NbdError, String), WireError> {
    let error = r.u32("error")?;
    if error == 0 {
        return Err(WireError::InvalidValue {
            what: "error chunk with error 0",
            value: 0,
        });
    }
    let len = r.u16("error message length")?;
    if usize::from(len) > r.remaining() {
        return Err(WireError::BadLength {
            what: "error message",
            len: len.into(),
            reason: "longer than the chunk",
        });
    }
    let message = decode_string(r.bytes(usize::from(len), "error message")?, "error message")?;
    Ok((NbdError::from_raw(error), message))
}

/// One whole reply chunk: header fields and typed payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyChunk {
    /// Reply flags (DONE on the last chunk).
    pub flags: ReplyFlags,
    /// Cookie of the request.
    pub cookie: Cookie,
    /// Offset of the request; sent only with extended headers (must be 0 when compact).
    pub request_offset: u64,
    /// The payload.
    pub body: ChunkBody,
}

impl ReplyChunk {
    /// The header this chunk is sent with.
    pub fn header(&self) -> ChunkHeader {
        ChunkHeader {
            flags: self.flags,
            chunk_type: self.body.chunk_type(),
            cookie: self.cookie,
            request_offset: self.request_offset,
            length: self.body.payload_len(),
        }
    }

    /// Appends header and payload. Fails, writing nothing, if the chunk breaks a rule of its
    /// type or of the header style.
    pub fn encode<B: BufMut>(&self, style: HeaderStyle, out: &mut B) -> Result<(), WireError> {
        self.encode_inner(style, true, out)
    }

    /// Like [`ReplyChunk::encode`] but leaves out the data bytes of OFFSET_DATA, for a server
    /// that writes them straight from its read buffer after this prefix.
    pub fn encode_without_data<B: BufMut>(
        &self,
        style: HeaderStyle,
        out: &mut B,
    ) -> Result<(), WireError> {
        self.encode_inner(style, false, out)
    }

    fn encode_inner<B: BufMut>(
        &self,
        style: HeaderStyle,
        with_data: bool,
        out: &mut B,
    ) -> Result<(), WireError> {
        let header = self.header();
        header.validate(style)?;
        self.body.check()?;
        header.encode(style, out)?;
        self.body.encode_payload(with_data, out);
        Ok(())
    }

    /// Decodes one whole chunk (header and payload of at most `max_payload` bytes).
    pub fn decode(
        buf: &[u8],
        style: HeaderStyle,
        max_payload: u64,
    ) -> Result<Option<(Self, usize)>, WireError> {
        let Some((header, header_len)) = ChunkHeader::decode(buf, style, max_payload)? else {
            return Ok(None);
        };
        // The header validated length <= max_payload, so this cannot overflow usize on 64-bit.
        let Some(frame_len) = usize::try_from(header.length)
            .ok()
            .and_then(|len| len.checked_add(header_len))
        else {
            return Err(WireError::TooLong {
                what: "reply chunk payload",
                len: header.length,
                limit: usize::MAX as u64,
            });
        };
        let Some(payload) = buf.get(header_len..frame_len) else {
            return Ok(None);
        };
        let body = ChunkBody::decode(header.chunk_type, payload)?;
        Ok(Some((
            Self {
                flags: header.flags,
                cookie: header.cookie,
                request_offset: header.request_offset,
                body,
            },
            frame_len,
        )))
    }
}
