//! Fixed-newstyle option replies the server sends during negotiation: ACK, SERVER, INFO,
//! META_CONTEXT and the error replies.
//! Invariants: data length is bounded by the caller's `max_data` before anything is copied;
//! each reply type's data is checked against the exact layout the protocol document gives it;
//! unknown information types and unknown non-error reply types are kept, not rejected,
//! because clients must ignore them.

use super::buf::{Reader, check_str, decode_string, frame_end};
use super::consts::*;
use super::error::WireError;
use super::flags::TransmissionFlags;
use super::handshake::ExportInfo;
use super::types::{InfoType, OptionCode, OptionError};
use bytes::BufMut;

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizeInfo {
    /// Minimum block size.
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload size.
    pub maximum: u32,
}

impl BlockSizeInfo {
    /// Checks the rules of the "Size constraints" section: minimum a power of two no larger
    /// than 64 KiB, preferred a power of two at least max(minimum, 512), maximum at least the
    /// preferred size. Decoding does not call this (clients may choose to be lenient).
    pub fn validate(&self) -> Result<(), WireError> {
        if !self.minimum.is_power_of_two() || self.minimum > 65_536 {
            return Err(WireError::InvalidValue {
                what: "minimum block size",
                value: self.minimum.into(),
            });
        }
        if !self.preferred.is_power_of_two() || self.preferred < self.minimum.max(512) {
            return Err(WireError::InvalidValue {
                what: "preferred block size",
                value: self.preferred.into(),
            });
        }
        if self.maximum < self.preferred {
            return Err(WireError::InvalidValue {
                what: "maximum payload size",
                value: self.maximum.into(),
            });
        }
        Ok(())
    }
}

/// One `NBD_REP_INFO` item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export(ExportInfo),
    /// `NBD_INFO_NAME`: canonical export name.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`: human-readable description.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`: size constraints.
    BlockSize(BlockSizeInfo),
    /// An information type this codec does not know (clients ignore it). `info_type` must
    /// not be a known type.
    Unknown {
        /// Raw information type.
        info_type: u16,
        /// Payload after the type.
        data: Vec<u8>,
    },
}

impl InfoReply {
    /// The information type of this item.
    pub fn info_type(&self) -> InfoType {
        match self {
            Self::Export(_) => InfoType::Export,
            Self::Name(_) => InfoType::Name,
            Self::Description(_) => InfoType::Description,
            Self::BlockSize(_) => InfoType::BlockSize,
            Self::Unknown { info_type, .. } => InfoType::from_raw(*info_type),
        }
    }
}

/// What an option reply says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionReplyBody {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`: one export of `NBD_OPT_LIST`.
    Server {
        /// Export name.
        name: String,
        /// Optional human-readable details (empty if absent).
        details: String,
    },
    /// `NBD_REP_INFO`.
    Info(InfoReply),
    /// `NBD_REP_META_CONTEXT`.
    MetaContext {
        /// Context id (zero in replies to `NBD_OPT_LIST_META_CONTEXT`).
        id: u32,
        /// Context name, e.g. `base:allocation`.
        name: String,
    },
    /// An error reply (bit 31 set) with an optional message for humans.
    Error {
        /// The error.
        error: OptionError,
        /// Message, possibly empty.
        message: String,
    },
    /// A non-error reply type this codec does not know. `reply_type` must not be a known
    /// type nor have bit 31 set.
    Unknown {
        /// Raw reply type.
        reply_type: u32,
        /// Raw data.
        data: Vec<u8>,
    },
}

impl OptionReplyBody {
    /// The raw reply type sent on the wire.
    pub fn reply_type(&self) -> u32 {
        match self {
            Self::Ack => NBD_REP_ACK,
            Self::Server { .. } => NBD_REP_SERVER,
            Self::Info(_) => NBD_REP_INFO,
            Self::MetaContext { .. } => NBD_REP_META_CONTEXT,
            Self::Error { error, .. } => error.raw(),
            Self::Unknown { reply_type, .. } => *reply_type,
        }
    }
}

/// One option reply: the option it answers and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionReply {
    /// The option code the client sent.
    pub option: OptionCode,
    /// The reply.
    pub body: OptionReplyBody,
}

impl OptionReply {
    /// Shorthand for an `NBD_REP_ACK`.
    pub fn ack(option: OptionCode) -> Self {
        Self {
            option,
            body: OptionReplyBody::Ack,
        }
    }

    /// Shorthand for an error reply.
    pub fn error(option: OptionCode, error: OptionError, message: impl Into<String>) -> Self {
        Self {
            option,
            body: OptionReplyBody::Error {
                error,
                message: message.into(),
            },
        }
    }

    /// Appends the reply (20-byte header and data). Fails, writing nothing, if a string
    /// breaks the protocol's string rules or an error code lacks bit 31.
    pub fn encode<B: BufMut>(&self, out: &mut B) -> Result<(), WireError> {
        let mut data = Vec::new();
        match &self.body {
            OptionReplyBody::Ack => {}
            OptionReplyBody::Server { name, details } => {
                check_str(name, "export name")?;
                check_str(details, "export details")?;
                data.put_u32(name.len() as u32);
                data.put_slice(name.as_bytes());
                data.put_slice(details.as_bytes());
            }
            OptionReplyBody::Info(info) => encode_info(info, &mut data)?,
            OptionReplyBody::MetaContext { id, name } => {
                check_str(name, "metadata context name")?;
                data.put_u32(*id);
                data.put_slice(name.as_bytes());
            }
            OptionReplyBody::Error { error, message } => {
                if error.raw() & NBD_REP_FLAG_ERROR == 0 {
                    return Err(WireError::InvalidValue {
                        what: "option error without bit 31",
                        value: error.raw().into(),
                    });
                }
                check_str(message, "option error message")?;
                data.put_slice(message.as_bytes());
            }
            OptionReplyBody::Unknown { data: raw, .. } => data.extend_from_slice(raw),
        }
        let length = u32::try_from(data.len()).map_err(|_| WireError::TooLong {
            what: "option reply data",
            len: data.len() as u64,
            limit: u32::MAX.into(),
        })?;
        out.put_u64(NBD_REP_MAGIC);
        out.put_u32(self.option.raw());
        out.put_u32(self.body.reply_type());
        out.put_u32(length);
        out.put_slice(&data);
        Ok(())
    }

    /// Decodes one whole option reply with at most `max_data` data bytes.
    pub fn decode(buf: &[u8], max_data: u32) -> Result<Option<(Self, usize)>, WireError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let mut r = Reader::new(buf);
        let magic = r.u64("option reply magic")?;
        if magic != NBD_REP_MAGIC {
            return Err(WireError::BadMagic {
                what: "option reply",
                got: magic,
            });
        }
        if buf.len() < OPTION_REPLY_HEADER_LEN {
            return Ok(None);
        }
        let option = OptionCode::from_raw(r.u32("option code")?);
        let reply_type = r.u32("option reply type")?;
        let length = r.u32("option reply length")?;
        if length > max_data {
            return Err(WireError::TooLong {
                what: "option reply data",
                len: length.into(),
                limit: max_data.into(),
            });
        }
        let frame_len = frame_end(OPTION_REPLY_HEADER_LEN, length, "option reply data")?;
        let Some(data) = buf.get(OPTION_REPLY_HEADER_LEN..frame_len) else {
            return Ok(None);
        };
        let body = parse_body(reply_type, data)?;
        Ok(Some((Self { option, body }, frame_len)))
    }
}

fn parse_body(reply_type: u32, data: &[u8]) -> Result<OptionReplyBody, WireError> {
    let mut r = Reader::new(data);
    let body = match reply_type {
        NBD_REP_ACK => OptionReplyBody::Ack,
        NBD_REP_SERVER => {
            let name = r.string_u32("export name")?;
            let details = decode_string(r.rest(), "export details")?;
            OptionReplyBody::Server { name, details }
        }
        NBD_REP_INFO => OptionReplyBody::Info(parse_info(&mut r)?),
        NBD_REP_META_CONTEXT => {
            let id = r.u32("metadata context id")?;
            let name = decode_string(r.rest(), "metadata context name")?;
            OptionReplyBody::MetaContext { id, name }
        }
        error if error & NBD_REP_FLAG_ERROR != 0 => OptionReplyBody::Error {
            error: OptionError::from_raw(error),
            message: decode_string(r.rest(), "option error message")?,
        },
        other => OptionReplyBody::Unknown {
            reply_type: other,
            data: r.rest().to_vec(),
        },
    };
    r.finish("option reply data")?;
    Ok(body)
}

fn encode_info(info: &InfoReply, data: &mut Vec<u8>) -> Result<(), WireError> {
    match info {
        InfoReply::Export(export) => {
            data.put_u16(NBD_INFO_EXPORT);
            data.put_u64(export.size);
            data.put_u16((export.flags | TransmissionFlags::HAS_FLAGS).bits());
        }
        InfoReply::Name(name) => {
            check_str(name, "export name")?;
            data.put_u16(NBD_INFO_NAME);
            data.put_slice(name.as_bytes());
        }
        InfoReply::Description(text) => {
            check_str(text, "export description")?;
            data.put_u16(NBD_INFO_DESCRIPTION);
            data.put_slice(text.as_bytes());
        }
        InfoReply::BlockSize(sizes) => {
            data.put_u16(NBD_INFO_BLOCK_SIZE);
            data.put_u32(sizes.minimum);
            data.put_u32(sizes.preferred);
            data.put_u32(sizes.maximum);
        }
        InfoReply::Unknown {
            info_type,
            data: raw,
        } => {
            data.put_u16(*info_type);
            data.put_slice(raw);
        }
    }
    Ok(())
}

fn parse_info(r: &mut Reader<'_>) -> Result<InfoReply, WireError> {
    let info_type = r.u16("information type")?;
    let payload_len = r.remaining();
    let exact = |want: usize, what: &'static str| {
        if payload_len == want {
            Ok(())
        } else {
            Err(WireError::BadLength {
                what,
                len: payload_len as u64 + 2,
                reason: "wrong length for this type",
            })
        }
    };
    Ok(match info_type {
        NBD_INFO_EXPORT => {
            exact(10, "NBD_INFO_EXPORT")?;
            let size = r.u64("export size")?;
            let flags = TransmissionFlags::from_bits_retain(r.u16("transmission flags")?);
            InfoReply::Export(ExportInfo {
                size,
                flags: ExportInfo::check_flags(flags)?,
            })
        }
        NBD_INFO_NAME => InfoReply::Name(decode_string(r.rest(), "export name")?),
        NBD_INFO_DESCRIPTION => {
            InfoReply::Description(decode_string(r.rest(), "export description")?)
        }
        NBD_INFO_BLOCK_SIZE => {
            exact(12, "NBD_INFO_BLOCK_SIZE")?;
            InfoReply::BlockSize(BlockSizeInfo {
                minimum: r.u32("minimum block size")?,
                preferred: r.u32("preferred block size")?,
                maximum: r.u32("maximum payload size")?,
            })
        }
        other => InfoReply::Unknown {
            info_type: other,
            data: r.rest().to_vec(),
        },
    })
}
