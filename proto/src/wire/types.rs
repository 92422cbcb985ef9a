//! Typed codes of the NBD wire: option codes, information types, commands, chunk types, option
//! errors and transmission errors, plus the `Cookie` and `HeaderStyle` newtypes.
//! Invariant: every enum round-trips every raw value; values without a name land in the
//! `Unknown` arm because the protocol document requires peers to tolerate them (unknown options
//! get `NBD_REP_ERR_UNSUP`, unknown info types are ignored, unknown errors read as EINVAL).

use super::consts::*;

macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident: $ty:ty {
            $( $(#[$vmeta:meta])* $variant:ident = $value:path, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A value this codec has no name for, kept verbatim.
            Unknown($ty),
        }

        impl $name {
            /// Types a raw wire value.
            pub const fn from_raw(raw: $ty) -> Self {
                match raw {
                    $( $value => Self::$variant, )*
                    other => Self::Unknown(other),
                }
            }

            /// The raw wire value.
            pub const fn raw(self) -> $ty {
                match self {
                    $( Self::$variant => $value, )*
                    Self::Unknown(other) => other,
                }
            }
        }

        impl From<$ty> for $name {
            fn from(raw: $ty) -> Self {
                Self::from_raw(raw)
            }
        }

        impl From<$name> for $ty {
            fn from(value: $name) -> Self {
                value.raw()
            }
        }
    };
}

wire_enum! {
    /// Option code of a fixed-newstyle option request (and echoed in its replies).
    OptionCode: u32 {
        /// `NBD_OPT_EXPORT_NAME`.
        ExportName = NBD_OPT_EXPORT_NAME,
        /// `NBD_OPT_ABORT`.
        Abort = NBD_OPT_ABORT,
        /// `NBD_OPT_LIST`.
        List = NBD_OPT_LIST,
        /// `NBD_OPT_STARTTLS`.
        StartTls = NBD_OPT_STARTTLS,
        /// `NBD_OPT_INFO`.
        Info = NBD_OPT_INFO,
        /// `NBD_OPT_GO`.
        Go = NBD_OPT_GO,
        /// `NBD_OPT_STRUCTURED_REPLY`.
        StructuredReply = NBD_OPT_STRUCTURED_REPLY,
        /// `NBD_OPT_LIST_META_CONTEXT`.
        ListMetaContext = NBD_OPT_LIST_META_CONTEXT,
        /// `NBD_OPT_SET_META_CONTEXT`.
        SetMetaContext = NBD_OPT_SET_META_CONTEXT,
        /// `NBD_OPT_EXTENDED_HEADERS`.
        ExtendedHeaders = NBD_OPT_EXTENDED_HEADERS,
        /// `ENBD_OPT_ACCESS` (ENBD extension): an access token.
        Access = ENBD_OPT_ACCESS,
    }
}

wire_enum! {
    /// Information type in `NBD_OPT_INFO`/`NBD_OPT_GO` requests and `NBD_REP_INFO` replies.
    InfoType: u16 {
        /// `NBD_INFO_EXPORT`.
        Export = NBD_INFO_EXPORT,
        /// `NBD_INFO_NAME`.
        Name = NBD_INFO_NAME,
        /// `NBD_INFO_DESCRIPTION`.
        Description = NBD_INFO_DESCRIPTION,
        /// `NBD_INFO_BLOCK_SIZE`.
        BlockSize = NBD_INFO_BLOCK_SIZE,
    }
}

wire_enum! {
    /// Error reply type of an option reply (bit 31 set). `Unknown` holds other error codes.
    OptionError: u32 {
        /// `NBD_REP_ERR_UNSUP`.
        Unsupported = NBD_REP_ERR_UNSUP,
        /// `NBD_REP_ERR_POLICY`.
        Policy = NBD_REP_ERR_POLICY,
        /// `NBD_REP_ERR_INVALID`.
        Invalid = NBD_REP_ERR_INVALID,
        /// `NBD_REP_ERR_PLATFORM`.
        Platform = NBD_REP_ERR_PLATFORM,
        /// `NBD_REP_ERR_TLS_REQD`.
        TlsRequired = NBD_REP_ERR_TLS_REQD,
        /// `NBD_REP_ERR_UNKNOWN`: the export does not exist.
        UnknownExport = NBD_REP_ERR_UNKNOWN,
        /// `NBD_REP_ERR_SHUTDOWN`.
        Shutdown = NBD_REP_ERR_SHUTDOWN,
        /// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
        BlockSizeRequired = NBD_REP_ERR_BLOCK_SIZE_REQD,
        /// `NBD_REP_ERR_TOO_BIG`.
        TooBig = NBD_REP_ERR_TOO_BIG,
        /// `NBD_REP_ERR_EXT_HEADER_REQD`.
        ExtendedHeadersRequired = NBD_REP_ERR_EXT_HEADER_REQD,
    }
}

wire_enum! {
    /// Command type of a transmission request.
    Command: u16 {
        /// `NBD_CMD_READ`.
        Read = NBD_CMD_READ,
        /// `NBD_CMD_WRITE`.
        Write = NBD_CMD_WRITE,
        /// `NBD_CMD_DISC`.
        Disc = NBD_CMD_DISC,
        /// `NBD_CMD_FLUSH`.
        Flush = NBD_CMD_FLUSH,
        /// `NBD_CMD_TRIM`.
        Trim = NBD_CMD_TRIM,
        /// `NBD_CMD_CACHE`.
        Cache = NBD_CMD_CACHE,
        /// `NBD_CMD_WRITE_ZEROES`.
        WriteZeroes = NBD_CMD_WRITE_ZEROES,
        /// `NBD_CMD_BLOCK_STATUS`.
        BlockStatus = NBD_CMD_BLOCK_STATUS,
    }
}

wire_enum! {
    /// Type of a structured or extended reply chunk.
    ChunkType: u16 {
        /// `NBD_REPLY_TYPE_NONE`.
        None = NBD_REPLY_TYPE_NONE,
        /// `NBD_REPLY_TYPE_OFFSET_DATA`.
        OffsetData = NBD_REPLY_TYPE_OFFSET_DATA,
        /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
        OffsetHole = NBD_REPLY_TYPE_OFFSET_HOLE,
        /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
        BlockStatus = NBD_REPLY_TYPE_BLOCK_STATUS,
        /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`.
        BlockStatusExt = NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
        /// `NBD_REPLY_TYPE_ERROR`.
        Error = NBD_REPLY_TYPE_ERROR,
        /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
        ErrorOffset = NBD_REPLY_TYPE_ERROR_OFFSET,
    }
}

impl ChunkType {
    /// True for error chunk types (bit 15 set), including unknown ones.
    pub const fn is_error(self) -> bool {
        self.raw() & NBD_REPLY_TYPE_FLAG_ERROR != 0
    }
}

wire_enum! {
    /// Error value of a simple reply or an error chunk. Zero (success) is never an `NbdError`.
    /// Its errno mapping, both ways, is in `wire::errno`.
    NbdError: u32 {
        /// `NBD_EPERM`.
        Perm = NBD_EPERM,
        /// `NBD_EIO`.
        Io = NBD_EIO,
        /// `NBD_ENOMEM`.
        NoMem = NBD_ENOMEM,
        /// `NBD_EINVAL`.
        Inval = NBD_EINVAL,
        /// `NBD_ENOSPC`.
        NoSpc = NBD_ENOSPC,
        /// `NBD_EOVERFLOW`.
        Overflow = NBD_EOVERFLOW,
        /// `NBD_ENOTSUP`.
        NotSup = NBD_ENOTSUP,
        /// `NBD_ESHUTDOWN`.
        Shutdown = NBD_ESHUTDOWN,
    }
}

/// The opaque 64-bit value a client puts in a request and the server echoes in every reply
/// to it (called *handle* by older versions of the protocol document).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cookie(pub u64);

/// Which transmission headers a connection uses, fixed by the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum HeaderStyle {
    /// 28-byte requests; simple replies, and structured replies if negotiated.
    #[default]
    Compact,
    /// 32-byte requests and 32-byte extended replies (`NBD_OPT_EXTENDED_HEADERS` acknowledged).
    Extended,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_raw_values() {
        for raw in 0..=20u32 {
            assert_eq!(OptionCode::from_raw(raw).raw(), raw);
        }
        assert_eq!(OptionCode::from_raw(4), OptionCode::Unknown(4));
        assert_eq!(Command::from_raw(8), Command::Unknown(8));
        assert_eq!(ChunkType::from_raw(0x8001), ChunkType::Error);
        assert!(ChunkType::Unknown(0x8123).is_error());
        assert!(!ChunkType::OffsetData.is_error());
        assert_eq!(
            OptionError::from_raw(0x8000_0006),
            OptionError::UnknownExport
        );
    }
}
