//! Fixed-newstyle handshake messages the client side sends or both sides exchange before
//! options: the server greeting, the client flags, option requests, and the reply that ends
//! `NBD_OPT_EXPORT_NAME`.
//! Invariants: streaming decoders return `Ok(None)` until a whole message is buffered and never
//! look past it; option data is bounded by the caller's `max_data` before anything is copied;
//! malformed option data is reported as `WireError::MalformedOption` so a server can skip the
//! frame and answer `NBD_REP_ERR_INVALID` instead of dropping the connection.

use super::buf::{Reader, check_str, decode_string, frame_end};
use super::consts::*;
use super::error::WireError;
use super::flags::{ClientFlags, HandshakeFlags, TransmissionFlags};
use super::types::{InfoType, OptionCode};
use bytes::BufMut;
use std::collections::HashSet;

/// The first message of a session: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags; unknown bits are kept (clients must ignore them).
    pub flags: HandshakeFlags,
}

impl Greeting {
    /// Appends the 18-byte greeting.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        out.put_u64(NBD_INIT_MAGIC);
        out.put_u64(NBD_OPTS_MAGIC);
        out.put_u16(self.flags.bits());
    }

    /// Decodes the greeting; rejects a wrong magic as soon as 8 or 16 bytes are present and
    /// reports an oldstyle server as `WireError::Oldstyle`.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, WireError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let mut r = Reader::new(buf);
        let init = r.u64("greeting magic")?;
        if init != NBD_INIT_MAGIC {
            return Err(WireError::BadMagic {
                what: "server greeting",
                got: init,
            });
        }
        if buf.len() < 16 {
            return Ok(None);
        }
        let opts = r.u64("greeting option magic")?;
        if opts == NBD_CLISERV_MAGIC {
            return Err(WireError::Oldstyle);
        }
        if opts != NBD_OPTS_MAGIC {
            return Err(WireError::BadMagic {
                what: "server greeting (IHAVEOPT)",
                got: opts,
            });
        }
        if buf.len() < GREETING_LEN {
            return Ok(None);
        }
        let flags = HandshakeFlags::from_bits_retain(r.u16("handshake flags")?);
        Ok(Some((Self { flags }, GREETING_LEN)))
    }
}

impl ClientFlags {
    /// Appends the 4-byte client flags.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        out.put_u32(self.bits());
    }

    /// Decodes the client flags. Unknown bits are an error: the protocol document requires
    /// the server to drop a client that sets them.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, WireError> {
        if buf.len() < CLIENT_FLAGS_LEN {
            return Ok(None);
        }
        let flags = Self::from_bits_retain(Reader::new(buf).u32("client flags")?);
        if flags.unknown_bits() != 0 {
            return Err(WireError::ReservedBits {
                what: "client flags",
                bits: flags.unknown_bits().into(),
            });
        }
        Ok(Some((flags, CLIENT_FLAGS_LEN)))
    }
}

/// The 16-byte header of an option request: `IHAVEOPT`, option code, data length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code.
    pub option: OptionCode,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes the header only; the caller reads `length` data bytes next. Lengths over
    /// `max_data` are an error so a hostile client cannot make the server buffer gigabytes.
    pub fn decode(buf: &[u8], max_data: u32) -> Result<Option<(Self, usize)>, WireError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let mut r = Reader::new(buf);
        let magic = r.u64("option magic")?;
        if magic != NBD_OPTS_MAGIC {
            return Err(WireError::BadMagic {
                what: "option request",
                got: magic,
            });
        }
        if buf.len() < OPTION_HEADER_LEN {
            return Ok(None);
        }
        let option = OptionCode::from_raw(r.u32("option code")?);
        let length = r.u32("option length")?;
        if length > max_data {
            return Err(WireError::TooLong {
                what: "option data",
                len: length.into(),
                limit: max_data.into(),
            });
        }
        Ok(Some((Self { option, length }, OPTION_HEADER_LEN)))
    }
}

/// Data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information requested.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct InfoRequest {
    /// Export name; empty selects the default export.
    pub export: String,
    /// Information types requested, each at most once.
    pub requests: Vec<InfoType>,
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MetaContextRequest {
    /// Export name the contexts are for.
    pub export: String,
    /// Queries such as `base:allocation`.
    pub queries: Vec<String>,
}

/// Longest access token a peer may send (ours are 64 bytes).
pub const MAX_ACCESS_TOKEN: usize = 256;

/// The data of `ENBD_OPT_ACCESS`: an opaque secret, printable ASCII, 1 to
/// [`MAX_ACCESS_TOKEN`] bytes. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(Vec<u8>);

impl AccessToken {
    /// Checks a token's form (printable ASCII, 1 to [`MAX_ACCESS_TOKEN`] bytes).
    pub fn new(token: impl Into<Vec<u8>>) -> Result<Self, WireError> {
        Self::from_wire(&token.into())
    }

    fn from_wire(data: &[u8]) -> Result<Self, WireError> {
        if data.is_empty() || data.len() > MAX_ACCESS_TOKEN {
            return Err(WireError::BadLength {
                what: "access token",
                len: data.len() as u64,
                reason: "must be 1 to 256 bytes",
            });
        }
        if !data.iter().all(|b| b.is_ascii_graphic()) {
            return Err(WireError::BadLength {
                what: "access token",
                len: data.len() as u64,
                reason: "must be printable ASCII",
            });
        }
        Ok(Self(data.to_vec()))
    }

    /// The token's bytes, for hashing or comparing; never for logging.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccessToken(<{} bytes>)", self.0.len())
    }
}

/// A typed option request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionRequest {
    /// `NBD_OPT_EXPORT_NAME` with the export name.
    ExportName(String),
    /// `NBD_OPT_ABORT` (any data the client sent is ignored, as the document asks).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// `ENBD_OPT_ACCESS` (ENBD extension) with its token. `Debug` shows only the length: the
    /// token is a secret and option requests end up in logs.
    Access(AccessToken),
    /// An option this codec does not know; a server answers `NBD_REP_ERR_UNSUP`.
    /// `option` must not be one of the known codes (decoding never produces that).
    Unknown {
        /// Raw option code.
        option: u32,
        /// Raw option data.
        data: Vec<u8>,
    },
}

impl OptionRequest {
    /// The option code this request is sent with.
    pub fn code(&self) -> OptionCode {
        match self {
            Self::ExportName(_) => OptionCode::ExportName,
            Self::Abort => OptionCode::Abort,
            Self::List => OptionCode::List,
            Self::StartTls => OptionCode::StartTls,
            Self::Info(_) => OptionCode::Info,
            Self::Go(_) => OptionCode::Go,
            Self::StructuredReply => OptionCode::StructuredReply,
            Self::ListMetaContext(_) => OptionCode::ListMetaContext,
            Self::SetMetaContext(_) => OptionCode::SetMetaContext,
            Self::ExtendedHeaders => OptionCode::ExtendedHeaders,
            Self::Access(_) => OptionCode::Access,
            Self::Unknown { option, .. } => OptionCode::from_raw(*option),
        }
    }

    /// Appends the whole option request (header and data). Fails, writing nothing, if a
    /// string breaks the protocol's string rules or a count does not fit its field.
    pub fn encode<B: BufMut>(&self, out: &mut B) -> Result<(), WireError> {
        let mut data = Vec::new();
        match self {
            Self::ExportName(name) => {
                check_str(name, "export name")?;
                data.extend_from_slice(name.as_bytes());
            }
            Self::Abort
            | Self::List
            | Self::StartTls
            | Self::StructuredReply
            | Self::ExtendedHeaders => {}
            Self::Info(req) | Self::Go(req) => encode_info_request(req, &mut data)?,
            Self::ListMetaContext(req) | Self::SetMetaContext(req) => {
                encode_meta_request(req, &mut data)?
            }
            Self::Access(token) => data.extend_from_slice(token.as_bytes()),
            Self::Unknown { data: raw, .. } => data.extend_from_slice(raw),
        }
        let length = u32::try_from(data.len()).map_err(|_| WireError::TooLong {
            what: "option data",
            len: data.len() as u64,
            limit: u32::MAX.into(),
        })?;
        out.put_u64(NBD_OPTS_MAGIC);
        out.put_u32(self.code().raw());
        out.put_u32(length);
        out.put_slice(&data);
        Ok(())
    }

    /// Decodes one whole option request of at most `max_data` data bytes.
    ///
    /// Errors in the framing (magic, length over the limit) are fatal for the connection.
    /// Errors inside the data come back as `WireError::MalformedOption`, which carries the
    /// frame length so the server can skip it and reply `NBD_REP_ERR_INVALID`.
    pub fn decode(buf: &[u8], max_data: u32) -> Result<Option<(Self, usize)>, WireError> {
        let Some((header, header_len)) = OptionHeader::decode(buf, max_data)? else {
            return Ok(None);
        };
        let frame_len = frame_end(header_len, header.length, "option data")?;
        let Some(data) = buf.get(header_len..frame_len) else {
            return Ok(None);
        };
        match Self::parse(header.option, data) {
            Ok(request) => Ok(Some((request, frame_len))),
            Err(reason) => Err(WireError::MalformedOption {
                option: header.option,
                frame_len,
                reason: Box::new(reason),
            }),
        }
    }

    /// Types the data of an option whose header was already read.
    pub fn parse(option: OptionCode, data: &[u8]) -> Result<Self, WireError> {
        let no_data = |request: Self| {
            if data.is_empty() {
                Ok(request)
            } else {
                Err(WireError::BadLength {
                    what: "option data",
                    len: data.len() as u64,
                    reason: "this option takes no data",
                })
            }
        };
        match option {
            OptionCode::ExportName => Ok(Self::ExportName(decode_string(data, "export name")?)),
            OptionCode::Abort => Ok(Self::Abort),
            OptionCode::List => no_data(Self::List),
            OptionCode::StartTls => no_data(Self::StartTls),
            OptionCode::StructuredReply => no_data(Self::StructuredReply),
            OptionCode::ExtendedHeaders => no_data(Self::ExtendedHeaders),
            OptionCode::Info => Ok(Self::Info(parse_info_request(data)?)),
            OptionCode::Go => Ok(Self::Go(parse_info_request(data)?)),
            OptionCode::ListMetaContext => Ok(Self::ListMetaContext(parse_meta_request(data)?)),
            OptionCode::SetMetaContext => Ok(Self::SetMetaContext(parse_meta_request(data)?)),
            OptionCode::Access => Ok(Self::Access(AccessToken::from_wire(data)?)),
            OptionCode::Unknown(option) => Ok(Self::Unknown {
                option,
                data: data.to_vec(),
            }),
        }
    }
}

fn encode_info_request(req: &InfoRequest, data: &mut Vec<u8>) -> Result<(), WireError> {
    check_str(&req.export, "export name")?;
    let count = u16::try_from(req.requests.len()).map_err(|_| WireError::TooLong {
        what: "information request list",
        len: req.requests.len() as u64,
        limit: u16::MAX.into(),
    })?;
    data.put_u32(req.export.len() as u32);
    data.put_slice(req.export.as_bytes());
    data.put_u16(count);
    for info in &req.requests {
        data.put_u16(info.raw());
    }
    Ok(())
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, WireError> {
    let mut r = Reader::new(data);
    let export = r.string_u32("export name")?;
    let count = r.u16("information request count")?;
    if r.remaining() != usize::from(count) * 2 {
        return Err(WireError::BadLength {
            what: "information request list",
            len: r.remaining() as u64,
            reason: "does not match the request count",
        });
    }
    let mut seen = HashSet::with_capacity(usize::from(count));
    let mut requests = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let info = InfoType::from_raw(r.u16("information request")?);
        if !seen.insert(info) {
            return Err(WireError::Duplicate {
                what: "information request",
            });
        }
        requests.push(info);
    }
    Ok(InfoRequest { export, requests })
}

fn encode_meta_request(req: &MetaContextRequest, data: &mut Vec<u8>) -> Result<(), WireError> {
    check_str(&req.export, "export name")?;
    for query in &req.queries {
        check_str(query, "metadata context query")?;
    }
    let count = u32::try_from(req.queries.len()).map_err(|_| WireError::TooLong {
        what: "metadata context query list",
        len: req.queries.len() as u64,
        limit: u32::MAX.into(),
    })?;
    data.put_u32(req.export.len() as u32);
    data.put_slice(req.export.as_bytes());
    data.put_u32(count);
    for query in &req.queries {
        data.put_u32(query.len() as u32);
        data.put_slice(query.as_bytes());
    }
    Ok(())
}

fn parse_meta_request(data: &[u8]) -> Result<MetaContextRequest, WireError> {
    let mut r = Reader::new(data);
    let export = r.string_u32("export name")?;
    let count = r.u32("metadata context query count")?;
    // Each query needs at least its 4-byte length, which bounds the allocation by the input.
    if u64::from(count) * 4 > r.remaining() as u64 {
        return Err(WireError::BadLength {
            what: "metadata context query list",
            len: count.into(),
            reason: "more queries than the data can hold",
        });
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        queries.push(r.string_u32("metadata context query")?);
    }
    r.finish("metadata context request")?;
    Ok(MetaContextRequest { export, queries })
}

/// Size and transmission flags of an export, as sent by `NBD_INFO_EXPORT` and in the reply
/// to `NBD_OPT_EXPORT_NAME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags; `HAS_FLAGS` is always set on the wire.
    pub flags: TransmissionFlags,
}

impl ExportInfo {
    pub(crate) fn check_flags(flags: TransmissionFlags) -> Result<TransmissionFlags, WireError> {
        if flags.contains(TransmissionFlags::HAS_FLAGS) {
            Ok(flags)
        } else {
            Err(WireError::InvalidValue {
                what: "transmission flags without HAS_FLAGS",
                value: flags.bits().into(),
            })
        }
    }

    /// Appends the reply that ends `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes
    /// unless both sides agreed on NO_ZEROES. `HAS_FLAGS` is always set.
    pub fn encode_export_name_reply<B: BufMut>(&self, no_zeroes: bool, out: &mut B) {
        out.put_u64(self.size);
        out.put_u16((self.flags | TransmissionFlags::HAS_FLAGS).bits());
        if !no_zeroes {
            out.put_bytes(0, EXPORT_NAME_REPLY_PADDING);
        }
    }

    /// Decodes the reply to `NBD_OPT_EXPORT_NAME`; the padding must be zero.
    pub fn decode_export_name_reply(
        buf: &[u8],
        no_zeroes: bool,
    ) -> Result<Option<(Self, usize)>, WireError> {
        let len = if no_zeroes {
            EXPORT_NAME_REPLY_SHORT_LEN
        } else {
            EXPORT_NAME_REPLY_SHORT_LEN + EXPORT_NAME_REPLY_PADDING
        };
        if buf.len() < len {
            return Ok(None);
        }
        let mut r = Reader::new(buf);
        let size = r.u64("export size")?;
        let flags = Self::check_flags(TransmissionFlags::from_bits_retain(
            r.u16("transmission flags")?,
        ))?;
        let padding = r.bytes(
            len - EXPORT_NAME_REPLY_SHORT_LEN,
            "export name reply padding",
        )?;
        if padding.iter().any(|&b| b != 0) {
            return Err(WireError::InvalidValue {
                what: "export name reply padding is not zero",
                value: 0,
            });
        }
        Ok(Some((Self { size, flags }, len)))
    }
}
