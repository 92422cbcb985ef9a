//! Raw numeric values of the NBD protocol, named as the NBD protocol document names them.
//! Invariant: every value here is copied from that document (the `extension-ext-header` branch
//! for the experimental EXTENDED_HEADERS values); the typed wrappers in the sibling modules are
//! built from these constants and nothing else.

// ---- Magic numbers -------------------------------------------------------------------------

/// `NBDMAGIC` (also `INIT_PASSWD`): first 8 bytes the server sends.
pub const NBD_INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second word of the newstyle greeting, and the prefix of every option request.
pub const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// `cliserv_magic` of the oldstyle handshake (recognised only to reject it clearly).
pub const NBD_CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every fixed-newstyle option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request header.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request header.
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply (formerly `NBD_REPLY_MAGIC`).
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---- Handshake flags (16 bits, server) -----------------------------------------------------

/// Server supports fixed newstyle negotiation.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

// ---- Client flags (32 bits) ----------------------------------------------------------------

/// Client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client asks the server to omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- Transmission flags (16 bits) ----------------------------------------------------------

/// MUST always be set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Server supports `NBD_CMD_FLUSH`.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Server supports `NBD_CMD_FLAG_FUA`.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Export behaves like a rotational medium.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// Server supports `NBD_CMD_TRIM`.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Server supports `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE`.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Server supports `NBD_CMD_FLAG_DF` on reads.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// FLUSH and FUA are visible across all connections to the export.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Experimental RESIZE extension.
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Server understands `NBD_CMD_CACHE`.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Server supports `NBD_CMD_FLAG_FAST_ZERO`.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Server accepts `NBD_CMD_FLAG_PAYLOAD_LEN` on `NBD_CMD_BLOCK_STATUS` (extended headers).
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---- Option codes (32 bits) ----------------------------------------------------------------

/// Choose an export and enter transmission (no error reply possible).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Soft disconnect during negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// List exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension; decoded as an unknown option.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade the connection to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Query an export without entering transmission.
pub const NBD_OPT_INFO: u32 = 6;
/// Query an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Negotiate structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Negotiate extended (32-byte) headers.
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;
/// ENBD extension (not in the NBD protocol document): present a per-attachment access token
/// before LIST/INFO/GO. The value spells "ENBD" in ASCII, far from the standard range
/// (1-11 today, growing by one per extension), so no standard option will ever collide.
/// Data: the token, ASCII (64 lowercase hex digits). Reply: `NBD_REP_ACK` when the token
/// names a grant on this server, `NBD_REP_ERR_POLICY` otherwise; servers that do not know
/// it answer `NBD_REP_ERR_UNSUP` as for any unknown option.
pub const ENBD_OPT_ACCESS: u32 = 0x454e_4244;

// ---- Option reply types (32 bits) ----------------------------------------------------------

/// Option accepted / list finished.
pub const NBD_REP_ACK: u32 = 1;
/// One export in the reply to `NBD_OPT_LIST`.
pub const NBD_REP_SERVER: u32 = 2;
/// One information item in the reply to `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const NBD_REP_INFO: u32 = 3;
/// One metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit that marks every error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// Option unknown to the server.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// Forbidden by server policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// Syntactically or semantically invalid option.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// Not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// TLS required first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// Export not available.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// Server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// Client must request `NBD_INFO_BLOCK_SIZE`.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// Request or reply too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
/// Extended headers required first.
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR | 10;

// ---- Information types (16 bits) ----------------------------------------------------------

/// Export size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Human-readable description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---- Command flags (16 bits) ---------------------------------------------------------------

/// Force unit access.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES must not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// READ: do not fragment the structured reply.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// BLOCK_STATUS: one extent per context.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// WRITE_ZEROES: fail fast with `NBD_ENOTSUP` unless faster than a write.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: *length* is a payload length and that many bytes follow.
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---- Commands (16 bits) --------------------------------------------------------------------

/// Read.
pub const NBD_CMD_READ: u16 = 0;
/// Write (payload follows the header).
pub const NBD_CMD_WRITE: u16 = 1;
/// Disconnect (no reply).
pub const NBD_CMD_DISC: u16 = 2;
/// Flush to stable storage.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Discard.
pub const NBD_CMD_TRIM: u16 = 4;
/// Prefetch hint.
pub const NBD_CMD_CACHE: u16 = 5;
/// Write zeroes without payload.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata (block status).
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Experimental RESIZE extension; decoded as an unknown command.
pub const NBD_CMD_RESIZE: u16 = 8;

// ---- Structured reply flags and chunk types (16 bits) --------------------------------------

/// Final chunk of a structured/extended reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Empty final chunk.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Offset + data.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Offset + length of a zero region.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Context id + (32-bit length, 32-bit flags) extents.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Context id + count + (64-bit length, 64-bit flags) extents (extended headers only).
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit that marks every error chunk type.
pub const NBD_REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Error + message.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 1;
/// Error + message + offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 2;

// ---- Error values (32 bits) ----------------------------------------------------------------

/// Operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Input/output error.
pub const NBD_EIO: u32 = 5;
/// Cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// Invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// No space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// Value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

// ---- base:allocation -----------------------------------------------------------------------

/// Name of the one metadata context the protocol document defines.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation`: extent is a hole.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

// ---- Sizes ---------------------------------------------------------------------------------

/// Longest string (export name, message, ...) the protocol allows, in bytes.
pub const MAX_STRING_LEN: usize = 4096;
/// Server greeting: two magics and the handshake flags.
pub const GREETING_LEN: usize = 18;
/// Client flags.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Reply to `NBD_OPT_EXPORT_NAME` without the zero padding.
pub const EXPORT_NAME_REPLY_SHORT_LEN: usize = 10;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless NO_ZEROES was negotiated.
pub const EXPORT_NAME_REPLY_PADDING: usize = 124;
/// Compact request header.
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Extended reply chunk header.
pub const EXTENDED_REPLY_HEADER_LEN: usize = 32;
