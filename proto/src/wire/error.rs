//! The one error type of the wire codec.
//! Invariant: every decoder reports malformed input through `WireError` (never a panic), and
//! every encoder checks its input before writing a byte, so an `Err` leaves the output untouched.

use super::types::OptionCode;
use thiserror::Error;

/// Why bytes could not be decoded, or a value could not be encoded, as NBD wire data.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// A magic number did not match the message expected at this point of the stream.
    #[error("bad magic for {what}: got {got:#x}")]
    BadMagic {
        /// The message that was expected.
        what: &'static str,
        /// The magic that arrived.
        got: u64,
    },
    /// The peer still speaks the oldstyle handshake, which this codec does not implement.
    #[error("peer uses the oldstyle handshake, which is not supported")]
    Oldstyle,
    /// A length field exceeds the limit the caller (or the protocol) allows.
    #[error("{what} length {len} exceeds the limit of {limit} bytes")]
    TooLong {
        /// The field or message.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The largest length allowed.
        limit: u64,
    },
    /// A length field is inconsistent with the message layout.
    #[error("{what} has invalid length {len}: {reason}")]
    BadLength {
        /// The field or message.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A fully framed message ended before one of its fields.
    #[error("{what} is truncated")]
    Truncated {
        /// The field that is missing.
        what: &'static str,
    },
    /// Bits that the protocol reserves (or forbids here) are set.
    #[error("{what} has reserved or forbidden bits {bits:#x} set")]
    ReservedBits {
        /// The flag field.
        what: &'static str,
        /// The offending bits.
        bits: u64,
    },
    /// A field holds a value the protocol forbids at this point.
    #[error("{what}: invalid value {value:#x}")]
    InvalidValue {
        /// The field and the rule it breaks.
        what: &'static str,
        /// The value found.
        value: u64,
    },
    /// A string is not valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// The string field.
        what: &'static str,
    },
    /// A string contains a NUL character, which the protocol forbids.
    #[error("{what} contains a NUL character")]
    NulInString {
        /// The string field.
        what: &'static str,
    },
    /// A list names the same item twice where the protocol forbids it.
    #[error("{what} is listed more than once")]
    Duplicate {
        /// The repeated item.
        what: &'static str,
    },
    /// The framing of an option request was fine but its data is malformed. The connection
    /// can continue: skip `frame_len` bytes and answer `NBD_REP_ERR_INVALID` for `option`.
    #[error("option {option:?} has malformed data: {reason}")]
    MalformedOption {
        /// The option code the client sent.
        option: OptionCode,
        /// Bytes the whole option request occupies in the input (header included).
        frame_len: usize,
        /// What is wrong with the data.
        reason: Box<WireError>,
    },
}
